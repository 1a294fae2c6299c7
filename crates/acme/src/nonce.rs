//! Replay nonces that every node can check: `base64url(time ‖ random ‖ MAC)`
//! under a key shared through the database, each accepted once (the spent set
//! lives in the database too, so a nonce from node A is accepted once by node B).

use crate::problem::Problem;
use aws_lc_rs::{constant_time, hmac, rand};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use sigil_store::Store;

const TAG_LEN: usize = 16;
const RAW_LEN: usize = 8 + 8 + TAG_LEN;

/// Issues and spends nonces.
pub struct Nonces {
    key: hmac::Key,
    store: Store,
    /// Seconds a nonce stays valid.
    ttl: i64,
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nonces").field("ttl", &self.ttl).finish()
    }
}

impl Nonces {
    /// Loads (or creates, on the first node) the shared MAC key.
    pub async fn new(store: Store, ttl: i64) -> Result<Nonces, sigil_store::Error> {
        let mut fresh = [0u8; 32];
        rand::fill(&mut fresh)
            .map_err(|_| sigil_store::Error::Corrupt("no randomness for the nonce key".into()))?;
        let secret = store.acme_secret("nonce-mac", &fresh).await?;
        Ok(Nonces {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            store,
            ttl,
        })
    }

    /// A fresh nonce.
    pub fn issue(&self, now: i64) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[..8].copy_from_slice(&now.to_be_bytes());
        // A failed RNG leaves zeros; the time and the spent-set still make a
        // replay fail, so the nonce stays single-use.
        let _ = rand::fill(&mut raw[8..16]);
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
        constant_time::verify_slices_are_equal(&tag.as_ref()[..TAG_LEN], &raw[16..])
            .map_err(|_| bad("the nonce was not issued by this CA"))?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let issued = i64::from_be_bytes(ts);
        if issued + self.ttl < now {
            return Err(bad("the nonce has expired"));
        }
        if !self
            .store
            .acme_spend_nonce(nonce, issued + self.ttl)
            .await?
        {
            return Err(bad("the nonce was already used"));
        }
        Ok(())
    }

    /// Forgets spent nonces that have expired anyway.
    pub async fn prune(&self, now: i64) -> Result<u64, sigil_store::Error> {
        self.store.acme_prune_nonces(now - 60).await
    }
}
