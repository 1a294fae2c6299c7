//! ACME orders and authorizations as this process last committed them, for
//! a database that only this process writes them to (SQLite, one
//! `sigil serve` per database: [`crate::ServerLock`]). Each ACME request
//! reads one or two of them; served from here, such a read skips the hand-off
//! to the database's thread and back.
//!
//! Entries come only from the writer, after a commit and in commit order, so
//! a hit is never older than the database. A write whose outcome is unknown
//! (the transaction failed) drops its entries. Reads of anything else (or
//! after eviction or a restart) go to the database.

use crate::acme::{AcmeObject, AcmeTable, StateWrite};
use std::collections::HashMap;
use std::sync::Mutex;

/// Entries per generation: two generations are kept, the older dropped
/// when the newer fills up. An order in progress needs its own entry and
/// its authorizations'; a thousand cover hundreds of concurrent orders.
const GENERATION: usize = 1024;

/// The cache (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct ObjectCache {
    inner: Mutex<Generations>,
}

/// Objects by id, with the table each came from. Ids are random, so two
/// tables sharing one is only a miss: a lookup checks the table, and storing
/// or dropping either entry never leaves a wrong one behind.
#[derive(Debug, Default)]
struct Generations {
    current: HashMap<String, (AcmeTable, AcmeObject)>,
    previous: HashMap<String, (AcmeTable, AcmeObject)>,
}

/// The objects a state write stores.
fn touched(write: &StateWrite) -> Vec<(AcmeTable, &AcmeObject)> {
    match write {
        StateWrite::SpendNonce { .. } => Vec::new(),
        StateWrite::Insert { order, authzs } => authzs
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
        g.current
            .get(id)
            .or_else(|| g.previous.get(id))
            .filter(|(t, _)| *t == table)
            .map(|(_, o)| o.clone())
    }

    /// Records a committed state write (`changed`: it took effect). A
    /// compare-and-set that lost says nothing of the stored row.
    pub(crate) fn committed(&self, write: &StateWrite, changed: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (table, object) in touched(write) {
            if changed {
                g.put(table, object);
            } else {
                g.forget(&object.id);
            }
        }
    }

    /// Drops what a write whose outcome is unknown touches.
    pub(crate) fn uncertain(&self, write: &StateWrite) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (_, object) in touched(write) {
            g.forget(&object.id);
        }
    }
}

impl Generations {
    fn put(&mut self, table: AcmeTable, object: &AcmeObject) {
        if self.current.len() >= GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        // The newer copy shadows an older one in the previous generation.
        self.previous.remove(&object.id);
        self.current
            .insert(object.id.clone(), (table, object.clone()));
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
}
