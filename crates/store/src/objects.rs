//! ACME orders and authorizations as this process last committed them, for
//! a database that only this process writes them to (SQLite, one
//! `sigil serve` per database: [`crate::ServerLock`]), and the certificates
//! it issued last. Each ACME request reads one or two objects, and a
//! certificate is read back at download; served from here, such a read skips
//! the hand-off to the database's thread and back. (A certificate row never
//! changes once written, so a remembered one is the stored one whichever
//! process wrote it.)
//!
//! Entries come only from the writer, after a commit and in commit order, so
//! a hit is never older than the database. A write whose outcome is unknown
//! (the transaction failed) drops its entries. Reads of anything else (or
//! after eviction or a restart) go to the database.

use crate::acme::{AcmeObject, AcmeTable, StateWrite};
use crate::rows::CertificateRow;
use std::collections::HashMap;
use std::sync::Mutex;

/// Entries per generation: two generations are kept, the older dropped
/// when the newer fills up. An order in progress needs its own entry and
/// its authorizations'; a thousand cover hundreds of concurrent orders, and
/// the last thousand certificates cover every download that follows its
/// order's finalization.
const GENERATION: usize = 1024;

/// The cache (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct ObjectCache {
    /// Objects by id, with the table each came from. Ids are random, so two
    /// tables sharing one is only a miss: a lookup checks the table, and
    /// storing or dropping either entry never leaves a wrong one behind.
    inner: Mutex<Generations<(AcmeTable, AcmeObject)>>,
    /// Certificates by serial.
    certs: Mutex<Generations<CertificateRow>>,
    /// Which accounts may hold authorizations for which names.
    pub(crate) hints: crate::authz_hints::AuthzHints,
}

/// Entries by id in two generations (see [`GENERATION`]).
#[derive(Debug)]
struct Generations<V> {
    current: HashMap<String, V>,
    previous: HashMap<String, V>,
}

impl<V> Default for Generations<V> {
    fn default() -> Self {
        Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }
}

/// The objects a state write stores.
fn touched(write: &StateWrite) -> Vec<(AcmeTable, &AcmeObject)> {
    match write {
        StateWrite::SpendNonce { .. } => Vec::new(),
        StateWrite::Insert { order, authzs, .. } => authzs
            .iter()
            .map(|(a, _)| (AcmeTable::Authzs, a))
            .chain(order.iter().map(|o| (AcmeTable::Orders, o)))
            .collect(),
        StateWrite::Update { table, to, .. } => vec![(*table, to)],
    }
}

impl ObjectCache {
    /// The object as last committed by this process, if remembered.
    pub(crate) fn get(&self, table: AcmeTable, id: &str) -> Option<AcmeObject> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.get(id)
            .filter(|(t, _)| *t == table)
            .map(|(_, o)| o.clone())
    }

    /// A certificate this process issued lately, if remembered.
    pub(crate) fn certificate(&self, serial: &str) -> Option<CertificateRow> {
        let g = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        g.get(serial).cloned()
    }

    /// Records a committed certificate.
    pub(crate) fn issued(&self, row: &CertificateRow) {
        let mut g = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        g.put(row.serial.clone(), row.clone());
    }

    /// Records a committed state write (`changed`: it took effect). A
    /// compare-and-set that lost says nothing of the stored row.
    pub(crate) fn committed(&self, write: &StateWrite, changed: bool) {
        self.hint(write);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (table, object) in touched(write) {
            if changed {
                g.put(object.id.clone(), (table, object.clone()));
            } else {
                g.forget(&object.id);
            }
        }
    }

    /// Adds the authorizations a write inserts (or may have) to the hints.
    fn hint(&self, write: &StateWrite) {
        if let StateWrite::Insert { authzs, .. } = write {
            for (authz, identifier) in authzs {
                self.hints.add(&authz.account_id, identifier);
            }
        }
    }

    /// Drops the objects that expired before `before` (unix s): the
    /// retention pass deleted them (or will).
    pub(crate) fn forget_expired(&self, before: i64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|(_, o)| o.expires_at >= before);
    }

    /// Drops what a write whose outcome is unknown touches.
    pub(crate) fn uncertain(&self, write: &StateWrite) {
        self.hint(write);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (_, object) in touched(write) {
            g.forget(&object.id);
        }
    }
}

impl<V> Generations<V> {
    fn get(&self, id: &str) -> Option<&V> {
        self.current.get(id).or_else(|| self.previous.get(id))
    }

    fn put(&mut self, id: String, value: V) {
        if self.current.len() >= GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        // The newer copy shadows an older one in the previous generation.
        self.previous.remove(&id);
        self.current.insert(id, value);
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.current.retain(|_, v| keep(v));
        self.previous.retain(|_, v| keep(v));
    }

    fn forget(&mut self, id: &str) {
        self.current.remove(id);
        self.previous.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(id: &str, status: &str) -> AcmeObject {
        AcmeObject {
            id: id.into(),
            account_id: "acct".into(),
            status: status.into(),
            expires_at: 100,
            body: "{}".into(),
            created_at: 1,
        }
    }

    fn update(id: &str, from: &str, to: &str) -> StateWrite {
        StateWrite::Update {
            table: AcmeTable::Authzs,
            from: from.into(),
            to: object(id, to),
        }
    }

    #[test]
    fn keeps_what_took_effect_and_drops_what_is_uncertain() {
        let c = ObjectCache::default();
        c.committed(
            &StateWrite::Insert {
                order: Some(object("o1", "pending")),
                authzs: vec![(object("a1", "pending"), "dns:x".into())],
                replacing: None,
            },
            true,
        );
        assert_eq!(c.get(AcmeTable::Orders, "o1").unwrap().status, "pending");
        // Ids are per table.
        assert!(c.get(AcmeTable::Orders, "a1").is_none());
        c.committed(&update("a1", "pending", "valid"), true);
        assert_eq!(c.get(AcmeTable::Authzs, "a1").unwrap().status, "valid");
        // A lost compare-and-set: the stored row is unknown here.
        c.committed(&update("a1", "pending", "invalid"), false);
        assert!(c.get(AcmeTable::Authzs, "a1").is_none());
        c.committed(&update("a1", "valid", "deactivated"), true);
        c.uncertain(&update("a1", "deactivated", "valid"));
        assert!(c.get(AcmeTable::Authzs, "a1").is_none());
    }

    #[test]
    fn two_generations_bound_it_and_the_newest_copy_wins() {
        let c = ObjectCache::default();
        c.committed(&update("old", "pending", "pending"), true);
        for i in 0..GENERATION {
            c.committed(&update(&format!("a{i}"), "pending", "valid"), true);
        }
        // "old" moved to the previous generation; a newer copy shadows it.
        c.committed(&update("old", "pending", "valid"), true);
        assert_eq!(c.get(AcmeTable::Authzs, "old").unwrap().status, "valid");
        for i in 0..2 * GENERATION {
            c.committed(&update(&format!("b{i}"), "pending", "valid"), true);
        }
        assert!(c.get(AcmeTable::Authzs, "a0").is_none());
        let g = c.inner.lock().unwrap();
        assert!(g.current.len() + g.previous.len() <= 2 * GENERATION);
    }

    #[test]
    fn remembers_the_certificates_it_issued_last() {
        let c = ObjectCache::default();
        let row = |serial: &str| CertificateRow {
            serial: serial.into(),
            issuer_id: "i".into(),
            profile: "mtls".into(),
            requester: "acme:a".into(),
            names: vec!["dns:x.internal".into()],
            key_fingerprint: "fp".into(),
            not_before: 1,
            not_after: 2,
            issued_at: 1,
            der: vec![0x30, 0x00],
            crl_shard: None,
        };
        c.issued(&row("01"));
        assert_eq!(c.certificate("01").unwrap().requester, "acme:a");
        assert!(c.certificate("02").is_none());
        // Ids are per kind: a certificate is not an ACME object.
        assert!(c.get(AcmeTable::Orders, "01").is_none());
        for i in 0..2 * GENERATION {
            c.issued(&row(&format!("{i:x}ff")));
        }
        assert!(c.certificate("01").is_none());
    }
}
