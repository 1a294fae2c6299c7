//! Replay nonces: `base64url(time ‖ serial ‖ MAC)`, each accepted once.
//!
//! Where they are checked depends on how many nodes share the database:
//!
//! - **PostgreSQL** (several nodes): the MAC key is shared through the
//!   database and so is the spent set, so a nonce from node A is accepted
//!   once by node B.
//! - **SQLite** (one `sigil serve` per database, held by a lock file): the key
//!   is made afresh at start and the spent set is a window of bits in memory.
//!   Nonces from before a restart fail their MAC, so forgetting the set on
//!   exit cannot let a spent one back in; and a spend costs no database
//!   write, which would otherwise be most of an ACME request's commits.

use crate::problem::Problem;
use aws_lc_rs::{constant_time, hmac, rand};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use sigil_store::{Backend, Store};
use std::sync::Mutex;

const TAG_LEN: usize = 16;
const RAW_LEN: usize = 8 + 8 + TAG_LEN;

/// How many of the latest nonces a single node tracks (one bit each): an
/// older one is refused as expired. At 5,000 nonces a second (about 700
/// ACME certificates) this is seven minutes; clients use a nonce within
/// seconds of getting it.
const WINDOW: u64 = 1 << 21;

/// Issues and spends nonces.
pub struct Nonces {
    key: hmac::Key,
    spent: Spent,
    /// Seconds a nonce stays valid.
    ttl: i64,
}

enum Spent {
    /// The database's spent set, shared by every node.
    Shared(Store),
    /// This process's window (single-node databases).
    Local(Mutex<Window>),
}

/// The spent bits of the last [`WINDOW`] serials issued, in a ring.
struct Window {
    /// The serial the next nonce gets.
    next: u64,
    /// Bit `s % WINDOW` is set once serial `s` is spent.
    bits: Vec<u64>,
}

impl Window {
    fn new() -> Window {
        Window {
            next: 0,
            bits: vec![0; (WINDOW / 64) as usize],
        }
    }

    fn slot(serial: u64) -> (usize, u64) {
        let i = serial % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// A new serial; its slot (last used by the serial `WINDOW` before) is cleared.
    fn issue(&mut self) -> u64 {
        let serial = self.next;
        self.next += 1;
        let (word, bit) = Window::slot(serial);
        self.bits[word] &= !bit;
        serial
    }

    /// Marks `serial` spent; `Err` says why it cannot be.
    fn spend(&mut self, serial: u64) -> Result<(), &'static str> {
        if serial >= self.next {
            return Err("the nonce was not issued by this server");
        }
        if self.next - serial > WINDOW {
            return Err("the nonce has expired (too many were issued since)");
        }
        let (word, bit) = Window::slot(serial);
        if self.bits[word] & bit != 0 {
            return Err("the nonce was already used");
        }
        self.bits[word] |= bit;
        Ok(())
    }
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nonces")
            .field("ttl", &self.ttl)
            .field(
                "spent",
                &match self.spent {
                    Spent::Shared(_) => "database",
                    Spent::Local(_) => "memory",
                },
            )
            .finish()
    }
}

impl Nonces {
    /// On PostgreSQL, loads (or creates, on the first node) the shared MAC
    /// key; on SQLite, makes a key for this process.
    pub async fn new(store: Store, ttl: i64) -> Result<Nonces, sigil_store::Error> {
        let mut fresh = [0u8; 32];
        rand::fill(&mut fresh)
            .map_err(|_| sigil_store::Error::Corrupt("no randomness for the nonce key".into()))?;
        let (secret, spent) = match store.backend() {
            Backend::Postgres => (
                store.acme_secret("nonce-mac", &fresh).await?,
                Spent::Shared(store),
            ),
            Backend::Sqlite => (fresh.to_vec(), Spent::Local(Mutex::new(Window::new()))),
        };
        Ok(Nonces {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            spent,
            ttl,
        })
    }

    /// A fresh nonce.
    pub fn issue(&self, now: i64) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[..8].copy_from_slice(&now.to_be_bytes());
        match &self.spent {
            Spent::Local(w) => {
                let serial = w.lock().unwrap_or_else(|p| p.into_inner()).issue();
                raw[8..16].copy_from_slice(&serial.to_be_bytes());
            }
            Spent::Shared(_) => {
                // A failed RNG leaves zeros; the time and the spent set still
                // make a replay fail, so the nonce stays single-use.
                let _ = rand::fill(&mut raw[8..16]);
            }
        }
        let tag = hmac::sign(&self.key, &raw[..16]);
        raw[16..].copy_from_slice(&tag.as_ref()[..TAG_LEN]);
        B64.encode(raw)
    }

    /// Accepts a nonce once: it must be ours, unexpired and unused.
    pub async fn spend(&self, nonce: &str, now: i64) -> Result<(), Problem> {
        let bad = |why: &str| {
            Problem::bad_nonce(format!(
                "{why}; retry with the Replay-Nonce of this response"
            ))
        };
        let raw = B64
            .decode(nonce)
            .ok()
            .filter(|r| r.len() == RAW_LEN)
            .ok_or_else(|| bad("the nonce was not issued by this CA"))?;
        let tag = hmac::sign(&self.key, &raw[..16]);
        constant_time::verify_slices_are_equal(&tag.as_ref()[..TAG_LEN], &raw[16..]).map_err(
            |_| match self.spent {
                Spent::Shared(_) => bad("the nonce was not issued by this CA"),
                Spent::Local(_) => bad(
                    "the nonce was not issued by this CA, or was issued before the server restarted",
                ),
            },
        )?;
        let mut word = [0u8; 8];
        word.copy_from_slice(&raw[..8]);
        let issued = i64::from_be_bytes(word);
        if issued + self.ttl < now {
            return Err(bad("the nonce has expired"));
        }
        match &self.spent {
            Spent::Local(w) => {
                word.copy_from_slice(&raw[8..16]);
                let serial = u64::from_be_bytes(word);
                w.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .spend(serial)
                    .map_err(bad)
            }
            Spent::Shared(store) => {
                if store.acme_spend_nonce(nonce, issued + self.ttl).await? {
                    Ok(())
                } else {
                    Err(bad("the nonce was already used"))
                }
            }
        }
    }

    /// Forgets spent nonces that have expired anyway.
    pub async fn prune(&self, now: i64) -> Result<u64, sigil_store::Error> {
        match &self.spent {
            Spent::Shared(store) => store.acme_prune_nonces(now - 60).await,
            Spent::Local(_) => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_serial_is_spent_once() {
        let mut w = Window::new();
        let a = w.issue();
        let b = w.issue();
        assert_eq!(w.spend(b), Ok(()));
        assert_eq!(w.spend(b), Err("the nonce was already used"));
        assert_eq!(w.spend(a), Ok(()));
        assert!(w.spend(a).is_err());
        assert_eq!(
            w.spend(b + 1),
            Err("the nonce was not issued by this server")
        );
    }

    #[test]
    fn a_window_forgets_only_serials_older_than_its_size() {
        let mut w = Window::new();
        let first = w.issue();
        let spent = w.issue();
        assert_eq!(w.spend(spent), Ok(()));
        for _ in 2..WINDOW {
            w.issue();
        }
        // Both still inside the window: the unspent one is accepted, the
        // spent one still refused.
        assert_eq!(w.spend(first), Ok(()));
        assert_eq!(w.spend(spent), Err("the nonce was already used"));
        // The next serials reuse their slots: the old ones are now too old,
        // and the new ones start unspent.
        let reuse_first = w.issue();
        let reuse_spent = w.issue();
        assert_eq!(reuse_first % WINDOW, first % WINDOW);
        assert!(w.spend(first).unwrap_err().contains("expired"));
        assert!(w.spend(spent).unwrap_err().contains("expired"));
        assert_eq!(w.spend(reuse_spent), Ok(()));
        assert_eq!(w.spend(reuse_first), Ok(()));
    }
}
