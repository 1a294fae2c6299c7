//! The retention pass (`database.keep_expired`): on the node that runs the
//! background jobs, rows that expired that long ago are deleted (see
//! [`sigil_store::Expired`]), at start, hourly, and when the node takes the
//! jobs over. Without it these tables grow with every certificate for ever.
//! The job node's setting is the one that counts: set it alike everywhere.

use sigil_authority::Authority;
use sigil_revocation::Leader;
use sigil_store::Expired;
use std::sync::Arc;
use std::time::Duration;

/// Time between passes.
const EVERY: Duration = Duration::from_secs(3600);
/// Rows per delete statement: one short write transaction each.
const BATCH: u32 = 1000;
/// Pause between batches, so a large backlog (the first pass after an
/// upgrade) leaves the database to issuance in between.
const PAUSE: Duration = Duration::from_millis(20);

/// Runs the passes for ever.
/// `ocsp_validity` (the OCSP response validity) keeps the responder
/// certificates of every stored answer still valid.
pub async fn run(
    authority: Arc<Authority>,
    leader: Leader,
    keep: Duration,
    ocsp_validity: Duration,
) {
    loop {
        // Made before leadership is read: a change in between still wakes it.
        let changed = leader.next_change();
        if leader.is_leading() {
            pass(&authority, &leader, keep, ocsp_validity).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = changed => {}
        }
    }
}

/// Rows of kind `what` that expired before this (unix s) go at `now`:
/// `keep` back, and for responder certificates at least the OCSP response
/// validity back, since an answer still valid was stored (marking its
/// responder's certificates used) within it. Answers signed before the
/// validity was shortened may outlive theirs; followers sign those on demand.
fn cutoff(what: Expired, now: i64, keep: Duration, ocsp_validity: Duration) -> i64 {
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let before = now.saturating_sub(secs(keep));
    if what == Expired::OcspCerts {
        before.min(now.saturating_sub(secs(ocsp_validity)))
    } else {
        before
    }
}

/// One pass over every kind of row.
async fn pass(authority: &Authority, leader: &Leader, keep: Duration, ocsp_validity: Duration) {
    let now = authority.now().unix_timestamp();
    let mut deleted = Vec::new();
    for what in Expired::ALL {
        let before = cutoff(what, now, keep, ocsp_validity);
        let mut total = 0u64;
        // Stops when the node hands the jobs over (another node goes on).
        while leader.is_leading() {
            match authority.store().delete_expired(what, before, BATCH).await {
                Ok(n) => {
                    total += n;
                    metrics::counter!("sigil_retention_deleted_total", "table" => what.table())
                        .increment(n);
                    if n < u64::from(BATCH) {
                        break;
                    }
                    tokio::time::sleep(PAUSE).await;
                }
                Err(e) => {
                    tracing::warn!(table = what.table(), error = %e, "deleting expired rows failed; trying again at the next pass");
                    break;
                }
            }
        }
        if total > 0 {
            deleted.push((what.table(), total));
        }
    }
    if !deleted.is_empty() {
        let summary = deleted
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(
            deleted = %summary,
            // The `keep_expired` cutoff, which every kind but responder
            // certificates (possibly earlier) uses.
            before = cutoff(Expired::AcmeOrders, now, keep, ocsp_validity),
            "deleted rows expired before the retention cutoff"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responder_certificates_stay_at_least_the_ocsp_validity() {
        let hour = Duration::from_secs(3600);
        let now = 1_000_000;
        for what in Expired::ALL {
            let longer = if what == Expired::OcspCerts { 24 } else { 1 };
            assert_eq!(
                cutoff(what, now, hour, 24 * hour),
                now - longer * 3600,
                "{what:?}"
            );
            assert_eq!(
                cutoff(what, now, 48 * hour, hour),
                now - 48 * 3600,
                "{what:?}"
            );
        }
        assert_eq!(
            cutoff(Expired::OcspCerts, now, Duration::MAX, Duration::MAX),
            now.saturating_sub(i64::MAX)
        );
    }
}
