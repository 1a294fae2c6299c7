//! The audit chain: typed events in, hash-linked rows out, and verification.

use crate::{Error, Store};
use sha2::{Digest, Sha256};
use sqlx::Row;

/// `prev_hash` of the first row.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event to record, written in the same transaction as the change it describes.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// Time of the event (unix milliseconds, from the caller's clock).
    pub ts_ms: i64,
    /// Dotted kind, e.g. `cert.issued`, `cert.denied`, `issuer.installed`.
    pub kind: String,
    /// Who caused it (`operator:alice`, `token:web`, ...).
    pub actor: String,
    /// What it is about (a serial, an issuer id, a name).
    pub subject: String,
    /// Structured details (JSON). Never contains secrets.
    pub detail: serde_json::Value,
}

/// Proof that an event was committed: its position and hash in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReceipt {
    /// Sequence number.
    pub seq: i64,
    /// Row hash.
    pub hash: String,
}

/// A stored audit row.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// Sequence number (1, 2, ...).
    pub seq: i64,
    /// Event time (unix ms).
    pub ts_ms: i64,
    /// Kind.
    pub kind: String,
    /// Actor.
    pub actor: String,
    /// Subject.
    pub subject: String,
    /// JSON detail text.
    pub detail: String,
    /// Hash of the previous row.
    pub prev_hash: String,
    /// Hash of this row.
    pub hash: String,
}

/// The outcome of verifying the chain.
#[derive(Debug, Clone)]
pub struct ChainReport {
    /// Rows read.
    pub rows: u64,
    /// Hash of the last good row (anchor this externally to detect truncation).
    pub head: String,
    /// The first row that breaks the chain, and why.
    pub first_bad: Option<(i64, String)>,
}

/// SHA-256 over the length-prefixed fields, so no field can bleed into another.
pub fn row_hash(
    seq: i64,
    ts_ms: i64,
    kind: &str,
    actor: &str,
    subject: &str,
    detail: &str,
    prev_hash: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(b"sigil-audit-v1");
    h.update(seq.to_be_bytes());
    h.update(ts_ms.to_be_bytes());
    for field in [kind, actor, subject, detail, prev_hash] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

pub(crate) fn audit_from_row(r: &sqlx::any::AnyRow) -> Result<AuditRow, Error> {
    Ok(AuditRow {
        seq: r.try_get("seq")?,
        ts_ms: r.try_get("ts_ms")?,
        kind: r.try_get("kind")?,
        actor: r.try_get("actor")?,
        subject: r.try_get("subject")?,
        detail: r.try_get("detail")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

impl Store {
    /// Audit rows with `seq > after`, oldest first.
    pub async fn audit_rows(&self, after: i64, limit: i64) -> Result<Vec<AuditRow>, Error> {
        let rows = sqlx::query(
            "SELECT seq, ts_ms, kind, actor, subject, detail, prev_hash, hash \
             FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// The newest `n` audit rows of one kind, newest first.
    pub async fn audit_latest_of_kind(&self, kind: &str, n: i64) -> Result<Vec<AuditRow>, Error> {
        let rows = sqlx::query(
            "SELECT seq, ts_ms, kind, actor, subject, detail, prev_hash, hash \
             FROM audit WHERE kind = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(kind)
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// The most recent audit rows, newest last.
    pub async fn audit_tail(&self, n: i64) -> Result<Vec<AuditRow>, Error> {
        let rows = sqlx::query(
            "SELECT seq, ts_ms, kind, actor, subject, detail, prev_hash, hash \
             FROM audit ORDER BY seq DESC LIMIT $1",
        )
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        let mut v = rows
            .iter()
            .map(audit_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        v.reverse();
        Ok(v)
    }

    /// Recomputes the whole chain and names the first row that does not fit:
    /// an edited row (hash mismatch), a deleted row (sequence gap / link
    /// mismatch) or reordered rows (link mismatch).
    pub async fn verify_audit(&self) -> Result<ChainReport, Error> {
        let mut report = ChainReport {
            rows: 0,
            head: GENESIS_HASH.to_string(),
            first_bad: None,
        };
        let mut last = 0i64;
        loop {
            let page = self.audit_rows(last, 5000).await?;
            if page.is_empty() {
                return Ok(report);
            }
            for row in page {
                last = row.seq;
                if !extend(&mut report, row) {
                    return Ok(report);
                }
            }
        }
    }
}

/// Checks `row` against the chain so far; on success it becomes the head,
/// otherwise `first_bad` names it. Returns whether the chain still holds.
pub(crate) fn extend(report: &mut ChainReport, row: AuditRow) -> bool {
    report.rows += 1;
    let expect_seq = i64::try_from(report.rows).unwrap_or(i64::MAX);
    let problem = if row.seq != expect_seq {
        Some(format!(
            "sequence jumps from {} to {} (rows deleted or renumbered)",
            expect_seq - 1,
            row.seq
        ))
    } else if row.prev_hash != report.head {
        Some(
            "prev_hash does not match the previous row (rows deleted, inserted or reordered)"
                .to_string(),
        )
    } else if row.hash
        != row_hash(
            row.seq,
            row.ts_ms,
            &row.kind,
            &row.actor,
            &row.subject,
            &row.detail,
            &row.prev_hash,
        )
    {
        Some("row hash does not match its contents (row edited)".to_string())
    } else {
        None
    };
    match problem {
        Some(p) => {
            report.first_bad = Some((row.seq, p));
            false
        }
        None => {
            report.head = row.hash;
            true
        }
    }
}
