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

/// Most problems [`Store::cross_check_records`] lists one by one; past this
/// it only counts them.
pub const MAX_LISTED_PROBLEMS: usize = 50;

/// The outcome of checking certificate and revocation rows against the audit
/// rows that record them.
#[derive(Debug, Clone, Default)]
pub struct RecordsReport {
    /// Certificate rows checked.
    pub certificates: u64,
    /// Revocation rows checked.
    pub revocations: u64,
    /// What does not match, at most [`MAX_LISTED_PROBLEMS`] of them.
    pub problems: Vec<String>,
    /// How many problems there were in all.
    pub problem_count: u64,
}

impl RecordsReport {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_LISTED_PROBLEMS {
            self.problems.push(p);
        }
    }
}

/// An issuance as its audit row records it.
struct Recorded {
    seq: i64,
    /// SHA-256 of the certificate, hex (rows written before it was recorded
    /// have none: only their presence is checked).
    sha256: Option<String>,
    /// [`record_digest`] of its row (absent in rows written before it was).
    record: Option<String>,
}

impl Recorded {
    /// The issuance row in a joined row's `a_seq` and `a_detail`, if any.
    fn from_joined(r: &sqlx::any::AnyRow) -> Result<Option<Recorded>, Error> {
        let Some(seq) = r.try_get::<Option<i64>, _>("a_seq")? else {
            return Ok(None);
        };
        let detail: Option<String> = r.try_get("a_detail")?;
        let detail = detail.and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok());
        let field = |k: &str| {
            detail
                .as_ref()
                .and_then(|d| d.get(k).and_then(|v| v.as_str()).map(str::to_string))
        };
        Ok(Some(Recorded {
            seq,
            sha256: field("sha256"),
            record: field("record"),
        }))
    }
}

/// One certificate row and the issuance rows that name it, as the joined
/// rows of [`Store::cross_check_records`] bring them in.
struct CertificateRecords {
    serial: String,
    /// SHA-256 of the DER, hex (empty when the column is not bytes).
    sha256: String,
    /// [`record_digest`] of the row (empty when a column cannot be read).
    record: String,
    /// The latest issuance row seen so far.
    latest: Option<Recorded>,
}

impl CertificateRecords {
    fn start(r: &sqlx::any::AnyRow) -> Result<CertificateRecords, Error> {
        // A value of the wrong type (an edit through another tool) is a
        // finding, not a reason to stop checking.
        let sha256 = r
            .try_get::<Vec<u8>, _>("der")
            .map(|der| hex::encode(Sha256::digest(&der)))
            .unwrap_or_default();
        let record = crate::rows::cert_from_row(r)
            .map(|c| record_digest(&c))
            .unwrap_or_default();
        Ok(CertificateRecords {
            serial: r.try_get("serial")?,
            sha256,
            record,
            latest: None,
        })
    }

    /// Takes in the next issuance row naming this certificate.
    fn add(&mut self, recorded: Recorded, report: &mut RecordsReport) {
        if let Some(earlier) = &self.latest {
            report.problem(format!(
                "audit rows {} and {} both record issuing certificate {}",
                earlier.seq, recorded.seq, self.serial
            ));
        }
        self.latest = Some(recorded);
    }

    /// Compares the certificate with the latest issuance row naming it.
    fn finish(self, report: &mut RecordsReport) {
        let serial = self.serial;
        report.certificates += 1;
        match self.latest {
            None => report.problem(format!(
                "certificate {serial} has no issuance row in the audit table (inserted outside the CA)"
            )),
            Some(Recorded {
                seq,
                sha256: Some(h),
                ..
            }) if h != self.sha256 => report.problem(format!(
                "certificate {serial} is not the one audit row {seq} recorded (SHA-256 differs: edited)"
            )),
            Some(Recorded {
                seq,
                record: Some(d),
                ..
            }) if d != self.record => report.problem(format!(
                "certificate {serial}'s row differs from what audit row {seq} recorded (expiry, issuer, names or CRL shard edited)"
            )),
            Some(_) => {}
        }
    }
}

/// Every certificate row with the issuance rows naming it (none, one, or
/// more), grouped by serial. SQLite keeps whatever type was written: the DER
/// is read as bytes even when an edit through another tool stored it as text.
fn certificates_with_issuance(backend: crate::Backend) -> &'static str {
    match backend {
        crate::Backend::Sqlite => {
            "SELECT c.serial, c.issuer_id, c.profile, c.requester, c.names, c.key_fingerprint, \
             c.not_before, c.not_after, c.issued_at, c.crl_shard, CAST(c.der AS BLOB) AS der, \
             a.seq AS a_seq, a.detail AS a_detail \
             FROM certificates c LEFT JOIN audit a \
             ON a.subject = c.serial AND a.kind IN ('cert.issued', 'cert.renewed') \
             ORDER BY c.serial, a.seq"
        }
        crate::Backend::Postgres => {
            "SELECT c.serial, c.issuer_id, c.profile, c.requester, c.names, c.key_fingerprint, \
             c.not_before, c.not_after, c.issued_at, c.crl_shard, c.der, \
             a.seq AS a_seq, a.detail AS a_detail \
             FROM certificates c LEFT JOIN audit a \
             ON a.subject = c.serial AND a.kind IN ('cert.issued', 'cert.renewed') \
             ORDER BY c.serial, a.seq"
        }
    }
}

fn put(h: &mut Sha256, field: &[u8]) {
    h.update((field.len() as u64).to_be_bytes());
    h.update(field);
}

/// SHA-256 (hex) of a certificate row's columns other than the DER, which
/// the issuance row's `sha256` covers. Recorded as `record` in the issuance
/// row, so an edit of a column the CA acts on (its expiry or issuer, which
/// decide whether a CRL lists it; its CRL shard) shows as well.
pub(crate) fn record_digest(c: &crate::NewCertificate) -> String {
    let mut h = Sha256::new();
    for text in [&c.serial, &c.issuer_id, &c.profile, &c.requester] {
        put(&mut h, text.as_bytes());
    }
    put(&mut h, &(c.names.len() as u64).to_be_bytes());
    for n in &c.names {
        put(&mut h, n.as_bytes());
    }
    put(&mut h, c.key_fingerprint.as_bytes());
    for n in [c.not_before, c.not_after, c.issued_at] {
        put(&mut h, &n.to_be_bytes());
    }
    match c.crl_shard {
        Some(k) => put(&mut h, &k.to_be_bytes()),
        None => put(&mut h, b""),
    }
    hex::encode(h.finalize())
}

/// SHA-256 (hex) of a revocation row, recorded as `record` in its
/// `cert.revoked` row: an edit of its issuer (which decides the CRL that
/// lists it), reason or time shows.
pub(crate) fn revocation_digest(r: &crate::NewRevocation) -> String {
    let mut h = Sha256::new();
    for text in [&r.serial, &r.issuer_id, &r.revoked_by] {
        put(&mut h, text.as_bytes());
    }
    put(&mut h, &i64::from(r.reason).to_be_bytes());
    put(&mut h, &r.revoked_at.to_be_bytes());
    hex::encode(h.finalize())
}

impl Store {
    /// Checks the tables the audit chain vouches for: every certificate row
    /// has its issuance row (`cert.issued` / `cert.renewed`, subject = serial)
    /// with the same SHA-256, every such audit row still has its certificate,
    /// and every revocation matches its `cert.revoked` row both ways. The
    /// chain ([`Store::verify_audit`]) proves the audit rows were not edited;
    /// this finds certificates inserted, edited or deleted, and revocations
    /// deleted, behind the CA's back.
    ///
    /// The database joins the tables and the rows are streamed through, so
    /// memory does not grow with the number of certificates.
    pub async fn cross_check_records(&self) -> Result<RecordsReport, Error> {
        use tokio_stream::StreamExt;
        let mut report = RecordsReport::default();
        // One snapshot of the three tables: on a CA in use, a certificate
        // committed between two of the scans would otherwise look inserted
        // outside the CA. (SQLite's read transactions are snapshots.)
        let mut tx = self.pool.begin().await?;
        if self.backend == crate::Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
        }

        {
            let mut rows = sqlx::query(certificates_with_issuance(self.backend)).fetch(&mut *tx);
            let mut current: Option<CertificateRecords> = None;
            while let Some(r) = rows.next().await {
                let r = r?;
                let serial: String = r.try_get("serial")?;
                let same = current.as_ref().is_some_and(|c| c.serial == serial);
                if !same {
                    if let Some(done) = current.take() {
                        done.finish(&mut report);
                    }
                    current = Some(CertificateRecords::start(&r)?);
                }
                if let (Some(c), Some(recorded)) = (current.as_mut(), Recorded::from_joined(&r)?) {
                    c.add(recorded, &mut report);
                }
            }
            if let Some(done) = current {
                done.finish(&mut report);
            }
        }

        orphaned_audit_rows(
            &mut tx,
            "a.kind IN ('cert.issued', 'cert.renewed') \
             AND NOT EXISTS (SELECT 1 FROM certificates c WHERE c.serial = a.subject)",
            &mut report,
            |seq, serial| {
                format!(
                    "audit row {seq} records issuing certificate {serial}, which is no longer in the certificates table (deleted)"
                )
            },
        )
        .await?;

        {
            // Each revocation with the cert.revoked rows naming its serial;
            // the latest of them is the one it must point at.
            let mut rows = sqlx::query(
                "SELECT r.serial, r.issuer_id, r.reason, r.revoked_at, r.revoked_by, r.audit_seq, \
                 a.seq AS a_seq, a.detail AS a_detail FROM revocations r \
                 LEFT JOIN audit a ON a.subject = r.serial AND a.kind = 'cert.revoked' \
                 ORDER BY r.serial, a.seq",
            )
            .fetch(&mut *tx);
            // A revocation, its digest, and the latest cert.revoked row
            // naming it (seq, recorded digest).
            type Seen = (String, i64, String, Option<(i64, Option<String>)>);
            let mut current: Option<Seen> = None;
            let finish = |(serial, audit_seq, digest, latest): Seen, report: &mut RecordsReport| {
                report.revocations += 1;
                match latest {
                    Some((seq, _)) if seq != audit_seq => report.problem(format!(
                        "the revocation of {serial} points at audit row {audit_seq}, but row {seq} records it"
                    )),
                    // Rows written before revocations carried a digest have none.
                    Some((seq, Some(recorded))) if recorded != digest => report.problem(format!(
                        "the revocation of {serial} differs from what audit row {seq} recorded (issuer, reason, time or revoker edited)"
                    )),
                    Some(_) => {}
                    None => report.problem(format!(
                        "certificate {serial} is marked revoked with no cert.revoked audit row (inserted outside the CA)"
                    )),
                }
            };
            while let Some(r) = rows.next().await {
                let r = r?;
                let serial: String = r.try_get("serial")?;
                let seq: Option<i64> = r.try_get("a_seq")?;
                let detail: Option<String> = r.try_get("a_detail")?;
                let recorded = detail.and_then(|d| {
                    serde_json::from_str::<serde_json::Value>(&d)
                        .ok()?
                        .get("record")?
                        .as_str()
                        .map(str::to_string)
                });
                let row = seq.map(|s| (s, recorded));
                match &mut current {
                    Some((s, _, _, latest)) if *s == serial => {
                        if row.is_some() {
                            *latest = row;
                        }
                    }
                    _ => {
                        if let Some(done) = current.take() {
                            finish(done, &mut report);
                        }
                        let reason: i64 = r.try_get("reason")?;
                        let revocation = crate::NewRevocation {
                            serial: serial.clone(),
                            issuer_id: r.try_get("issuer_id")?,
                            reason: i32::try_from(reason)
                                .map_err(|e| Error::Corrupt(e.to_string()))?,
                            revoked_at: r.try_get("revoked_at")?,
                            revoked_by: r.try_get("revoked_by")?,
                            block_key: None,
                        };
                        let digest = revocation_digest(&revocation);
                        current = Some((serial, r.try_get("audit_seq")?, digest, row));
                    }
                }
            }
            if let Some(done) = current {
                finish(done, &mut report);
            }
        }

        {
            // A key revoked as compromised stays blocked.
            let mut rows = sqlx::query(
                "SELECT r.serial FROM revocations r JOIN certificates c ON c.serial = r.serial \
                 WHERE r.reason = 1 AND NOT EXISTS \
                 (SELECT 1 FROM blocked_keys b WHERE b.fingerprint = c.key_fingerprint) \
                 ORDER BY r.serial",
            )
            .fetch(&mut *tx);
            while let Some(r) = rows.next().await {
                let serial: String = r?.try_get("serial")?;
                report.problem(format!(
                    "certificate {serial} was revoked as keyCompromise, but its key is not blocked (the block was deleted)"
                ));
            }
        }

        orphaned_audit_rows(
            &mut tx,
            "a.kind = 'cert.revoked' \
             AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.serial = a.subject)",
            &mut report,
            |seq, serial| {
                format!(
                    "audit row {seq} records revoking {serial}, but the revocation row is gone (the certificate looks valid again)"
                )
            },
        )
        .await?;
        Ok(report)
    }
}

/// Reports each audit row matching `condition` (on `audit a`), in order, as
/// `describe(seq, subject)`: rows recording a change whose row is gone.
async fn orphaned_audit_rows(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    condition: &'static str,
    report: &mut RecordsReport,
    describe: impl Fn(i64, &str) -> String,
) -> Result<(), Error> {
    use tokio_stream::StreamExt;
    let sql = format!("SELECT a.seq, a.subject FROM audit a WHERE {condition} ORDER BY a.seq");
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut **tx);
    while let Some(r) = rows.next().await {
        let r = r?;
        let seq: i64 = r.try_get("seq")?;
        let subject: String = r.try_get("subject")?;
        report.problem(describe(seq, &subject));
    }
    Ok(())
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
