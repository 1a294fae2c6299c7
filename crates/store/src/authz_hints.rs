//! Which (account, identifier) pairs may have an unexpired authorization,
//! so that a new order for a name its account never authorized skips the
//! reuse lookup ([`crate::Store::acme_valid_authz`]) instead of asking the
//! database, which answers "none" for nearly every order.
//!
//! For a database only this process writes ACME objects to (SQLite, like
//! [`crate::objects`]). A Bloom filter: a "no" is certain, a "maybe" (an
//! existing pair, or about one unknown pair in two thousand) goes to the
//! database. It is built by scanning the authorizations not long expired
//! (by the clock of the lookups, which may not be the system's), and the
//! writer adds each new one after its commit and before its requester hears
//! back. A scan that runs while authorizations are being added keeps the
//! pairs added during it, so the pairs committed after its snapshot are not
//! lost. It is rebuilt every [`REBUILD_EVERY`] (dropping expired pairs) or
//! once more pairs were added than it was sized for. Until the first scan
//! completes, every lookup goes to the database.

use sqlx::{AnyPool, Row};
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;
use tokio_stream::StreamExt;

/// Probes per pair.
const PROBES: u64 = 8;
/// Filter bits per pair it is sized for: with [`PROBES`], about one false
/// "maybe" in two thousand when full.
const BITS_PER_PAIR: usize = 16;
/// The smallest capacity (pairs): 128 KiB of bits.
const MIN_CAPACITY: usize = 1 << 16;
/// The largest (64 MiB of bits). Past it the filter answers "maybe" more
/// often, and filling it up no longer asks for an early rebuild.
const MAX_CAPACITY: usize = 1 << 25;
/// How often the filter is rebuilt from the database.
const REBUILD_EVERY: Duration = Duration::from_secs(3600);
/// How often the rebuild task checks whether the filter has filled up.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// A rebuild keeps authorizations that expired up to this long (seconds)
/// before the latest lookup's time.
const EXPIRED_KEPT: i64 = 86_400;

/// The hints (see the module documentation).
#[derive(Debug)]
pub(crate) struct AuthzHints {
    hasher: RandomState,
    state: Mutex<State>,
    /// The latest time a lookup asked about (unix s; `i64::MIN`: none yet).
    latest_until: AtomicI64,
}

impl Default for AuthzHints {
    fn default() -> Self {
        AuthzHints {
            hasher: RandomState::new(),
            state: Mutex::default(),
            latest_until: AtomicI64::new(i64::MIN),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// None until the first scan completes.
    filter: Option<Bloom>,
    /// While a scan runs: the pairs added meanwhile.
    scanning: Option<Vec<u64>>,
    /// Pairs added since the filter was built.
    added: usize,
}

#[derive(Debug)]
struct Bloom {
    bits: Vec<u64>,
    /// Bit count minus one (a power of two minus one).
    mask: u64,
    /// Pairs it was sized for.
    capacity: usize,
}

impl Bloom {
    fn with_capacity(pairs: usize) -> Bloom {
        let capacity = pairs.clamp(MIN_CAPACITY, MAX_CAPACITY);
        let bits = (capacity * BITS_PER_PAIR).next_power_of_two();
        Bloom {
            bits: vec![0; bits / 64],
            mask: (bits - 1) as u64,
            capacity,
        }
    }

    fn insert(&mut self, h: u64) {
        for (word, bit) in positions(self.mask, h) {
            self.bits[word] |= bit;
        }
    }

    fn contains(&self, h: u64) -> bool {
        positions(self.mask, h).all(|(word, bit)| self.bits[word] & bit != 0)
    }
}

/// Bit positions (word, bit) for hash `h` in a filter of `mask + 1` bits
/// (double hashing: the odd step visits distinct positions modulo a power
/// of two).
fn positions(mask: u64, h: u64) -> impl Iterator<Item = (usize, u64)> {
    let step = h.rotate_left(32) | 1;
    (0..PROBES).map(move |i| {
        let bit = h.wrapping_add(i.wrapping_mul(step)) & mask;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    })
}

impl AuthzHints {
    fn hash(&self, account_id: &str, identifier: &str) -> u64 {
        self.hasher.hash_one((account_id, identifier))
    }

    /// False when the account certainly has no authorization for
    /// `identifier` (`dns:name`) that is unexpired at `until`.
    pub(crate) fn may_exist(&self, account_id: &str, identifier: &str, until: i64) -> bool {
        self.latest_until.fetch_max(until, Ordering::Relaxed);
        let h = self.hash(account_id, identifier);
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.filter.as_ref().is_none_or(|f| f.contains(h))
    }

    /// Records an authorization the writer committed (or may have).
    pub(crate) fn add(&self, account_id: &str, identifier: &str) {
        let h = self.hash(account_id, identifier);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = s.filter.as_mut() {
            f.insert(h);
        }
        if let Some(pending) = s.scanning.as_mut() {
            pending.push(h);
        }
        s.added += 1;
    }

    /// More pairs were added than the filter was sized for (and a rebuild
    /// could size it larger).
    fn full(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.filter
            .as_ref()
            .is_some_and(|f| s.added > f.capacity && f.capacity < MAX_CAPACITY)
    }

    /// Starts keeping the pairs added from now on, for [`Self::finish_scan`].
    /// Call before the scan's snapshot is taken.
    fn begin_scan(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.scanning = Some(Vec::new());
    }

    /// Installs a filter built by a scan, with the pairs added meanwhile.
    fn finish_scan(&self, mut fresh: Bloom) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let pending = s.scanning.take().unwrap_or_default();
        for h in &pending {
            fresh.insert(*h);
        }
        s.added = pending.len();
        s.filter = Some(fresh);
    }

    /// A failed scan: the current filter (if any) stays.
    fn abort_scan(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.scanning = None;
    }

    /// Builds the filter from the authorizations that expire after `bound`.
    async fn rebuild(&self, pool: &AnyPool, bound: i64) -> Result<(), sqlx::Error> {
        let live: i64 = sqlx::query("SELECT COUNT(*) AS n FROM acme_authzs WHERE expires_at > $1")
            .bind(bound)
            .fetch_one(pool)
            .await?
            .try_get("n")?;
        // Room to grow until the next scheduled rebuild.
        let mut fresh = Bloom::with_capacity(usize::try_from(live).unwrap_or(0).saturating_mul(2));
        self.begin_scan();
        let scanned = async {
            let mut rows =
                sqlx::query("SELECT account_id, identifier FROM acme_authzs WHERE expires_at > $1")
                    .bind(bound)
                    .fetch(pool);
            while let Some(row) = rows.try_next().await? {
                let account_id: String = row.try_get("account_id")?;
                let identifier: String = row.try_get("identifier")?;
                fresh.insert(self.hash(&account_id, &identifier));
            }
            Ok::<_, sqlx::Error>(())
        }
        .await;
        match scanned {
            Ok(()) => {
                self.finish_scan(fresh);
                Ok(())
            }
            Err(e) => {
                self.abort_scan();
                Err(e)
            }
        }
    }
}

/// Builds the hints of `cache` now, then again every [`REBUILD_EVERY`] or
/// when they fill up, until the cache is dropped.
pub(crate) fn spawn_rebuilds(pool: AnyPool, cache: Weak<crate::objects::ObjectCache>) {
    tokio::spawn(async move {
        loop {
            let Some(c) = cache.upgrade() else { return };
            let bound = c
                .hints
                .latest_until
                .load(Ordering::Relaxed)
                .saturating_sub(EXPIRED_KEPT);
            if let Err(e) = c.hints.rebuild(&pool, bound).await {
                tracing::warn!(error = %e, "cannot scan ACME authorizations for reuse hints; lookups go to the database");
            }
            drop(c);
            let mut waited = Duration::ZERO;
            while waited < REBUILD_EVERY {
                tokio::time::sleep(CHECK_EVERY).await;
                waited += CHECK_EVERY;
                match cache.upgrade() {
                    None => return,
                    Some(c) if c.hints.full() => break,
                    Some(_) => {}
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_no_is_certain_and_false_maybes_are_rare() {
        let h = AuthzHints::default();
        // Not built yet: every lookup goes to the database.
        assert!(h.may_exist("acct", "dns:never.example", 0));
        h.finish_scan(Bloom::with_capacity(0));
        for i in 0..20_000 {
            h.add("acct", &format!("dns:n{i}.example"));
        }
        for i in 0..20_000 {
            assert!(h.may_exist("acct", &format!("dns:n{i}.example"), 0));
        }
        let false_maybes = (0..100_000)
            .filter(|i| h.may_exist("acct", &format!("dns:other{i}.example"), 0))
            .count();
        assert!(false_maybes < 200, "{false_maybes} false maybes in 100,000");
        // The pair is what is recorded: another account's name is a "no".
        assert!(!h.may_exist("other-acct", "dns:n1.example", 0));
    }

    #[test]
    fn pairs_added_during_a_scan_survive_it_and_growth_asks_for_a_rebuild() {
        let h = AuthzHints::default();
        h.finish_scan(Bloom::with_capacity(0));
        h.add("acct", "dns:before.example");
        h.begin_scan();
        // Committed after the scan's snapshot: the scan does not see it.
        h.add("acct", "dns:during.example");
        let mut fresh = Bloom::with_capacity(0);
        fresh.insert(h.hash("acct", "dns:before.example"));
        h.finish_scan(fresh);
        assert!(h.may_exist("acct", "dns:before.example", 0));
        assert!(h.may_exist("acct", "dns:during.example", 0));
        assert!(!h.full());
        for i in 0..=MIN_CAPACITY {
            h.add("acct", &format!("dns:n{i}.example"));
        }
        assert!(h.full());
        // At the largest size, filling up no longer asks for a rebuild.
        let big = AuthzHints::default();
        big.finish_scan(Bloom::with_capacity(usize::MAX));
        assert_eq!(
            big.state.lock().unwrap().filter.as_ref().unwrap().capacity,
            MAX_CAPACITY
        );
        big.state.lock().unwrap().added = MAX_CAPACITY + 1;
        assert!(!big.full());
        // A failed scan keeps the filter it had.
        h.begin_scan();
        h.abort_scan();
        assert!(h.may_exist("acct", "dns:during.example", 0));
    }

    #[tokio::test]
    async fn a_scan_finds_the_stored_authorizations_not_long_expired() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("hints.db").display());
        let store = crate::Store::open(&url).await.unwrap();
        let authz = |id: &str, expires_at: i64| crate::AcmeObject {
            id: id.into(),
            account_id: "acct".into(),
            status: "pending".into(),
            expires_at,
            body: "{}".into(),
            created_at: 1,
        };
        store
            .commit(crate::Change::Acme {
                write: crate::AcmeWrite::NewAccount(crate::AcmeAccount {
                    id: "acct".into(),
                    thumbprint: "tp".into(),
                    jwk: "{}".into(),
                    status: "valid".into(),
                    contact: "[]".into(),
                    requester: "acme".into(),
                    eab_kid: None,
                    created_at: 1,
                }),
                event: crate::AuditEvent {
                    ts_ms: 1,
                    kind: "acme.account.created".into(),
                    actor: "acme:acct".into(),
                    subject: "acct".into(),
                    detail: serde_json::json!({}),
                },
            })
            .await
            .unwrap();
        store
            .acme_insert_order(
                None,
                &[
                    (authz("live", 5_000_000), "dns:live.example".into()),
                    (authz("old", 1_000), "dns:old.example".into()),
                ],
                None,
            )
            .await
            .unwrap();
        let h = AuthzHints::default();
        h.rebuild(&store.pool, 2_000).await.unwrap();
        assert!(h.may_exist("acct", "dns:live.example", 0));
        assert!(!h.may_exist("acct", "dns:old.example", 0));
        assert!(!h.may_exist("acct", "dns:never.example", 0));
        assert!(!h.may_exist("other", "dns:live.example", 0));
        assert_eq!(h.latest_until.load(Ordering::Relaxed), 0);
    }
}
