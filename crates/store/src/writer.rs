//! The group-commit writer: one task per process turns a burst of concurrent
//! changes into one durable transaction, so throughput does not pay one fsync
//! per certificate and durability is never weakened.

use crate::acme::{AcmeWrite, StateWrite};
use crate::audit::{AuditEvent, AuditReceipt, GENESIS_HASH, row_hash};
use crate::objects::ObjectCache;
use crate::rows::{NewCertificate, NewIssuer, NewRevocation, SpentToken};
use crate::{Backend, Error};
use sqlx::{AnyPool, Row};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Largest number of changes committed in one transaction.
const MAX_BATCH: usize = 512;
/// Rows per multi-row INSERT statement: fixed, so a few prepared statements
/// are reused from the cache, and as large as a gathered batch.
pub(crate) const ROWS_PER_STATEMENT: usize = 32;
/// Under load, the writer gathers for at most this long for a batch to grow
/// to [`GATHER_TARGET`] changes before committing. A commit's fixed cost
/// (lock, fsync, page reads, hand-offs to the database thread) dominates a
/// small batch, so a slightly later commit costs far less CPU per change.
const GATHER_WINDOW: std::time::Duration = std::time::Duration::from_millis(1);
/// Batch size the writer gathers for, under load.
const GATHER_TARGET: usize = 32;
/// Yields in a row without a new change after which gathering stops.
const GATHER_IDLE_YIELDS: u32 = 8;
/// Load means the previous batch held at least this many changes; a lone
/// change is committed at once, so a quiet server adds no latency.
const GATHER_AFTER: usize = 4;
/// Arbitrary constant naming the audit-chain lock on PostgreSQL.
const AUDIT_LOCK_KEY: i64 = 0x5167_11a0;
/// Tries at asking whether an unconfirmed commit landed, and the pause between.
const LANDED_ATTEMPTS: u32 = 5;
const LANDED_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);
/// Longest time spent asking.
const LANDED_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// One durable change and the audit event that records it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Change {
    /// A certificate was issued.
    Issue {
        /// The certificate row.
        cert: NewCertificate,
        /// The one-time bootstrap token this issuance spends, if any: a token
        /// already spent fails the change with `Error::Conflict`.
        token: Option<SpentToken>,
        /// For a renewal, the serial of the certificate it replaces: if that
        /// one was revoked before this commits, the change fails with
        /// `Error::Revoked`.
        renews: Option<String>,
        /// Its audit event.
        event: AuditEvent,
        /// A protocol-state write that finishes with this issuance (an ACME
        /// order becoming valid), in the same transaction: if it does not
        /// take effect (its compare-and-set lost), nothing is issued and the
        /// change fails with `Error::Conflict`.
        completes: Option<Box<StateWrite>>,
    },
    /// A certificate was revoked (fails with `Error::Conflict` if it already was).
    Revoke {
        /// The revocation row.
        revocation: NewRevocation,
        /// Its audit event.
        event: AuditEvent,
    },
    /// A key blocked from being certified again, after its certificate was
    /// revoked for another reason than keyCompromise (already blocked: no
    /// change).
    BlockKey {
        /// Key fingerprint.
        fingerprint: String,
        /// The revoked certificate it was found compromised through.
        serial: String,
        /// When (unix s).
        at: i64,
        /// Its audit event.
        event: AuditEvent,
    },
    /// An issuing CA's lifecycle step (fails with `Error::Conflict` when the
    /// issuer is not in the state the step starts from).
    Issuer {
        /// The step.
        change: IssuerChange,
        /// Its audit event.
        event: AuditEvent,
    },
    /// A new shared OCSP responder for an issuer (replaces the stored one).
    OcspSigner {
        /// The responder.
        row: crate::rows::OcspSignerRow,
        /// Its audit event.
        event: AuditEvent,
    },
    /// An ACME account or EAB key change.
    Acme {
        /// The change.
        write: AcmeWrite,
        /// Its audit event.
        event: AuditEvent,
    },
    /// An event with no other row (a denial, a config change).
    Record(AuditEvent),
    /// Protocol state with no audit record of its own (ACME nonces, orders,
    /// authorizations); batched with everything else for one fsync.
    State(StateWrite),
}

/// A step in an issuing CA's lifecycle.
#[derive(Debug, Clone)]
pub enum IssuerChange {
    /// Installed and active at once (the first intermediate); the active
    /// issuer, if any, becomes previous.
    Install(NewIssuer),
    /// Installed as staged: trusted, not issuing.
    Stage(NewIssuer),
    /// A staged issuer takes over issuance at `at` (unix s).
    Schedule {
        /// Issuer id.
        id: String,
        /// When.
        at: i64,
    },
    /// A staged issuer becomes active now; the active one becomes previous.
    Activate {
        /// Issuer id.
        id: String,
        /// Now (unix s).
        at: i64,
    },
    /// A cross-certificate between roots was installed.
    CrossCert {
        /// SHA-256 of the DER, hex.
        id: String,
        /// The certificate.
        der: Vec<u8>,
        /// Its subject, text.
        subject: String,
        /// Its issuer, text.
        issuer: String,
        /// notAfter (unix s).
        not_after: i64,
        /// Now (unix s).
        at: i64,
    },
    /// A staged issuer is withdrawn (retired without having issued).
    Unstage {
        /// Issuer id.
        id: String,
        /// Now (unix s).
        at: i64,
    },
    /// A previous issuer whose certificates all expired is retired.
    Retire {
        /// Issuer id.
        id: String,
        /// Now (unix s).
        at: i64,
    },
}

impl Change {
    pub(crate) fn event_mut(&mut self) -> Option<&mut AuditEvent> {
        match self {
            Change::Issue { event, .. }
            | Change::Revoke { event, .. }
            | Change::BlockKey { event, .. }
            | Change::Issuer { event, .. }
            | Change::OcspSigner { event, .. }
            | Change::Acme { event, .. }
            | Change::Record(event) => Some(event),
            Change::State(_) => None,
        }
    }

    /// The protocol-state write this change makes, if any.
    fn state_write(&self) -> Option<&StateWrite> {
        match self {
            Change::State(w) => Some(w),
            Change::Issue {
                completes: Some(w), ..
            } => Some(w),
            _ => None,
        }
    }

    fn event(&self) -> Option<&AuditEvent> {
        match self {
            Change::Issue { event, .. }
            | Change::Revoke { event, .. }
            | Change::BlockKey { event, .. }
            | Change::Issuer { event, .. }
            | Change::OcspSigner { event, .. }
            | Change::Acme { event, .. }
            | Change::Record(event) => Some(event),
            Change::State(_) => None,
        }
    }
}

/// What a committed change produced.
#[derive(Debug, Clone)]
pub(crate) struct Applied {
    /// The audit row, for audited changes.
    pub receipt: Option<AuditReceipt>,
    /// For state writes: whether it took effect (a compare-and-set matched,
    /// a nonce was not yet spent).
    pub changed: bool,
}

pub(crate) struct Job {
    change: Change,
    reply: oneshot::Sender<Result<Applied, Error>>,
}

pub(crate) fn spawn(
    pool: AnyPool,
    backend: Backend,
    objects: Option<Arc<ObjectCache>>,
) -> mpsc::Sender<Job> {
    let (tx, mut rx) = mpsc::channel::<Job>(4096);
    tokio::spawn(async move {
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        let mut head: Option<Head> = None;
        let mut last_batch = 0;
        while let Some(job) = rx.recv().await {
            batch.push(job);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            if last_batch >= GATHER_AFTER && batch.len() < GATHER_TARGET {
                gather(&mut rx, &mut batch).await;
            }
            last_batch = batch.len();
            process(&pool, backend, &mut batch, &mut head, objects.as_deref()).await;
        }
    });
    tx
}

/// Adds changes that arrive while other tasks run: the writer steps aside
/// (yields) so tasks that are about to submit can, for at most
/// [`GATHER_WINDOW`], stopping after [`GATHER_IDLE_YIELDS`] yields in a row
/// bring nothing. It never sleeps, so an idle runtime commits at once.
async fn gather(rx: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) {
    let started = std::time::Instant::now();
    let mut idle = 0;
    while batch.len() < GATHER_TARGET
        && idle < GATHER_IDLE_YIELDS
        && started.elapsed() < GATHER_WINDOW
    {
        tokio::task::yield_now().await;
        let before = batch.len();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        idle = if batch.len() > before { 0 } else { idle + 1 };
    }
}

pub(crate) async fn submit(tx: &mpsc::Sender<Job>, change: Change) -> Result<Applied, Error> {
    let (reply, rx) = oneshot::channel();
    tx.send(Job { change, reply })
        .await
        .map_err(|_| Error::Closed)?;
    rx.await.map_err(|_| Error::Closed)?
}

/// The chain head (last seq and hash) as this writer last committed it.
type Head = (i64, String);

async fn process(
    pool: &AnyPool,
    backend: Backend,
    batch: &mut Vec<Job>,
    head: &mut Option<Head>,
    objects: Option<&ObjectCache>,
) {
    // Before the reply, so the requester's next read sees its write.
    let settle = |job: Job, r: Result<Applied, Error>| {
        if let (Some(cache), Some(w)) = (objects, job.change.state_write()) {
            match &r {
                Ok(applied) => cache.committed(w, applied.changed),
                Err(_) => cache.uncertain(w),
            }
        }
        if let (Some(cache), Change::Issue { cert, .. }, Ok(_)) = (objects, &job.change, &r) {
            cache.issued(cert);
        }
        let _ = job.reply.send(r);
    };
    let changes: Vec<&Change> = batch.iter().map(|j| &j.change).collect();
    let started = std::time::Instant::now();
    let result = write_fresh(pool, backend, &changes, head).await;
    metrics::histogram!("sigil_db_query_seconds", "op" => "commit")
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(receipts) => {
            for (job, r) in batch.drain(..).zip(receipts) {
                settle(job, Ok(r));
            }
        }
        Err(e) if batch.len() == 1 || !retryable(&e) || e.is_unavailable() => {
            // Whether an unconfirmed commit landed is unknown: running its
            // changes again could store or audit them twice. A database out
            // of reach fails them all alike: writing them one by one would
            // wait out the pool's connect timeout once per change.
            let message = e.to_string();
            let unavailable = e.is_unavailable() && !matches!(e, Error::Uncertain(_));
            let mut first = Some(e);
            for job in batch.drain(..) {
                let e = first.take().unwrap_or_else(|| match unavailable {
                    true => Error::Unavailable(message.clone()),
                    false => Error::Uncertain(message.clone()),
                });
                settle(job, Err(e));
            }
        }
        Err(_) => {
            // One bad change (e.g. a duplicate serial) must not fail its
            // neighbours: retry each alone so only the culprit gets the error.
            for job in batch.drain(..) {
                let r = write_fresh(pool, backend, &[&job.change], head).await;
                settle(job, r.and_then(|mut v| v.pop().ok_or(Error::Closed)));
            }
        }
    }
}

/// [`write`], once more from the database's own chain head when it failed
/// from a cached one: another process (a node on the same PostgreSQL, the
/// CLI beside a SQLite server) may have appended since.
async fn write_fresh(
    pool: &AnyPool,
    backend: Backend,
    changes: &[&Change],
    head: &mut Option<Head>,
) -> Result<Vec<Applied>, Error> {
    let cached = head.is_some();
    let result = write(pool, backend, changes, head).await;
    match result {
        Err(e) if cached && retryable(&e) => write(pool, backend, changes, head).await,
        r => r,
    }
}

/// Whether a failed batch may be written again: not when its commit may have
/// landed.
fn retryable(e: &Error) -> bool {
    !matches!(e, Error::Uncertain(_))
}

/// Writes one batch. `head` caches the chain head between batches; the database
/// trigger refuses rows that do not extend the real head, so a stale cache
/// (another process appended) only costs a retry. Any failure clears it.
async fn write(
    pool: &AnyPool,
    backend: Backend,
    changes: &[&Change],
    head: &mut Option<Head>,
) -> Result<Vec<Applied>, Error> {
    let result = write_batch(pool, backend, changes, head.take()).await;
    if let Ok((receipts, new_head)) = result {
        *head = Some(new_head);
        return Ok(receipts);
    }
    result.map(|(r, _)| r)
}

/// After a COMMIT whose reply did not arrive: whether the batch whose last
/// audit row is `last` is stored (`None`: unknown). A batch without audit
/// rows leaves nothing to look for. A commit the server refused (rolled
/// back) reports `Some(false)`, so the batch may be written again.
async fn landed(pool: &AnyPool, backend: Backend, last: Option<(i64, &str)>) -> Option<bool> {
    // SQLite commits in this process: a COMMIT that reports an error left
    // the transaction uncommitted, and it is rolled back.
    if backend == Backend::Sqlite {
        return Some(false);
    }
    let (seq, hash) = last?;
    let ask = async {
        for attempt in 0..LANDED_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(LANDED_PAUSE).await;
            }
            match stored_hash(pool, seq).await {
                Ok(stored) => return Some(stored.as_deref() == Some(hash)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask the database whether a commit landed")
                }
            }
        }
        None
    };
    // Every write waits meanwhile: give up (outcome unknown) rather than
    // stall them for the pool's connect timeouts.
    tokio::time::timeout(LANDED_DEADLINE, ask)
        .await
        .ok()
        .flatten()
}

/// The hash of audit row `seq` (PostgreSQL), once no transaction appending
/// to the chain is open: the lost commit's server process may still be
/// finishing, and waiting for the chain's lock waits for it.
async fn stored_hash(pool: &AnyPool, seq: i64) -> Result<Option<String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(AUDIT_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query("SELECT hash FROM audit WHERE seq = $1")
        .bind(seq)
        .fetch_optional(&mut *tx)
        .await?;
    tx.rollback().await?;
    row.map(|r| r.try_get("hash")).transpose()
}

pub(crate) fn classify(e: sqlx::Error) -> Error {
    match e.as_database_error() {
        Some(d) if d.is_unique_violation() => Error::Conflict(d.message().to_string()),
        _ => Error::Db(e),
    }
}

async fn write_batch(
    pool: &AnyPool,
    backend: Backend,
    changes: &[&Change],
    cached_head: Option<Head>,
) -> Result<(Vec<Applied>, Head), Error> {
    let mut tx = match backend {
        // IMMEDIATE takes the write lock up front, so reading the chain head and
        // appending cannot race another process.
        Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await?,
        // The head is read after the chain's lock is granted, so it must be
        // read in a fresh snapshot: READ COMMITTED whatever the database's
        // default. A session left open by a node that vanished mid-batch
        // would hold the lock (and stop every node's writes) until the
        // server noticed; it is ended after a minute instead. Commits wait
        // for the WAL flush even where the server is tuned not to.
        Backend::Postgres => {
            let mut tx = pool
                .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
                .await?;
            sqlx::query(
                "SELECT set_config('idle_in_transaction_session_timeout', '60s', true), \
                 set_config('synchronous_commit', 'on', true), pg_advisory_xact_lock($1)",
            )
            .bind(AUDIT_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
            tx
        }
    };
    let (mut seq, mut prev): Head = match cached_head {
        Some(h) => h,
        None => {
            let row = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                Some(r) => (r.try_get("seq")?, r.try_get("hash")?),
                None => (0, GENESIS_HASH.to_string()),
            }
        }
    };

    let mut changed = vec![true; changes.len()];
    spend_nonces(&mut tx, changes, &mut changed, backend)
        .await
        .map_err(classify)?;
    for change in changes {
        match change {
            Change::Issuer { change, .. } => issuer_change(&mut tx, change).await?,
            Change::OcspSigner { row, .. } => save_ocsp_signer(&mut tx, row).await?,
            Change::BlockKey {
                fingerprint,
                serial,
                at,
                ..
            } => block_key(&mut tx, fingerprint, serial, *at).await?,
            Change::Acme { write, .. } => crate::acme::apply(&mut tx, write).await?,
            Change::Issue {
                token: Some(token), ..
            } => spend_token(&mut tx, token).await.map_err(classify)?,
            _ => {}
        }
    }
    // Protocol state after accounts (an order names its account), batched.
    let states: Vec<(usize, &StateWrite)> = changes
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            Change::State(StateWrite::SpendNonce { .. }) => None,
            c => c.state_write().map(|w| (i, w)),
        })
        .collect();
    crate::acme::apply_states(&mut tx, &states, &mut changed, backend).await?;
    for (change, changed) in changes.iter().zip(&changed) {
        if let Change::Issue {
            completes: Some(w), ..
        } = change
            && !changed
        {
            return Err(Error::Conflict(format!(
                "{} changed before the issuance that completes it",
                w.describe()
            )));
        }
    }
    let certs: Vec<&NewCertificate> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Issue { cert, .. } => Some(cert),
            _ => None,
        })
        .collect();
    // The requests were checked against blocked keys and revocations when
    // they arrived; a keyCompromise or a revocation committed since then
    // must still stop them. Every write holds the chain's lock, so nothing
    // commits between these reads and this transaction's commit.
    refuse_revoked_since(&mut tx, changes, &certs, backend).await?;
    for chunk in certs.chunks(ROWS_PER_STATEMENT) {
        insert_certificates(&mut tx, chunk, backend)
            .await
            .map_err(classify)?;
    }

    let mut receipts = Vec::with_capacity(changes.len());
    let mut rows = Vec::with_capacity(changes.len());
    // Receipt index per change (None for unaudited state writes).
    let mut receipt_of = Vec::with_capacity(changes.len());
    for change in changes {
        let Some(ev) = change.event() else {
            receipt_of.push(None);
            continue;
        };
        receipt_of.push(Some(receipts.len()));
        seq += 1;
        let detail = ev.detail.to_string();
        let hash = row_hash(
            seq,
            ev.ts_ms,
            &ev.kind,
            &ev.actor,
            &ev.subject,
            &detail,
            &prev,
        );
        rows.push((seq, ev, detail, std::mem::replace(&mut prev, hash.clone())));
        receipts.push(AuditReceipt { seq, hash });
    }
    for (change, idx) in changes.iter().zip(&receipt_of) {
        if let (Change::Revoke { revocation, .. }, Some(i)) = (change, idx) {
            revoke(&mut tx, revocation, receipts[*i].seq)
                .await
                .map_err(classify)?;
        }
    }
    for (chunk, hashes) in rows
        .chunks(ROWS_PER_STATEMENT)
        .zip(receipts.chunks(ROWS_PER_STATEMENT))
    {
        let mut sql = String::from(
            "INSERT INTO audit (seq, ts_ms, kind, actor, subject, detail, prev_hash, hash) VALUES ",
        );
        push_placeholders(&mut sql, chunk.len(), 8, backend);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((seq, ev, detail, prev_hash), r) in chunk.iter().zip(hashes) {
            q = q
                .bind(*seq)
                .bind(ev.ts_ms)
                .bind(ev.kind.as_str())
                .bind(ev.actor.as_str())
                .bind(ev.subject.as_str())
                .bind(detail.as_str())
                .bind(prev_hash.as_str())
                .bind(r.hash.as_str());
        }
        q.execute(&mut *tx).await.map_err(classify)?;
    }
    if let Err(e) = tx.commit().await {
        // The reply to COMMIT can be lost after the server committed (a
        // dropped connection). The batch's last audit row tells which.
        let last = receipts.last().map(|r| (r.seq, r.hash.as_str()));
        match landed(pool, backend, last).await {
            Some(true) => {
                tracing::warn!(error = %e, "the database did not confirm a commit, but it landed");
            }
            Some(false) => return Err(e.into()),
            None => return Err(Error::Uncertain(e.to_string())),
        }
    }
    let applied = receipt_of
        .iter()
        .zip(changed)
        .map(|(idx, changed)| Applied {
            receipt: idx.map(|i| receipts[i].clone()),
            changed,
        })
        .collect();
    Ok((applied, (seq, prev)))
}

/// Records the batch's spent nonces with a few multi-row statements; a nonce
/// already recorded (or repeated within the batch) is marked not changed.
async fn spend_nonces(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    changes: &[&Change],
    changed: &mut [bool],
    backend: Backend,
) -> Result<(), sqlx::Error> {
    let mut seen = std::collections::HashSet::new();
    let mut pending: Vec<(usize, &str, i64)> = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        if let Change::State(StateWrite::SpendNonce { nonce, expires_at }) = c {
            if seen.insert(nonce.as_str()) {
                pending.push((i, nonce.as_str(), *expires_at));
            } else {
                changed[i] = false;
            }
        }
    }
    for chunk in pending.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from("INSERT INTO acme_nonces (nonce, expires_at) VALUES ");
        push_placeholders(&mut sql, chunk.len(), 2, backend);
        sql.push_str(" ON CONFLICT (nonce) DO NOTHING RETURNING nonce");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (_, nonce, expires_at) in chunk {
            q = q.bind(*nonce).bind(*expires_at);
        }
        let inserted = returned(q, tx, "nonce").await?;
        for (i, nonce, _) in chunk {
            changed[*i] = inserted.contains(*nonce);
        }
    }
    Ok(())
}

async fn insert_issuer(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    issuer: &NewIssuer,
    status: &str,
) -> Result<(), Error> {
    // Staging never takes an issuer out of use; installing as active may
    // (an operator going back to an earlier intermediate).
    let sql = format!(
        "INSERT INTO issuers (id, cert_der, subject, not_before, not_after, installed_at, status, key_ref, changed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $6) \
         ON CONFLICT (id) DO UPDATE SET status = excluded.status, installed_at = excluded.installed_at, \
         key_ref = excluded.key_ref, changed_at = excluded.changed_at, activate_at = NULL{}",
        if status == "staged" {
            " WHERE issuers.status = 'staged' OR issuers.status = 'retired'"
        } else {
            ""
        }
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(issuer.id.clone())
        .bind(issuer.cert_der.clone())
        .bind(issuer.subject.clone())
        .bind(issuer.not_before)
        .bind(issuer.not_after)
        .bind(issuer.installed_at)
        .bind(status.to_string())
        .bind(issuer.key_ref.clone())
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(Error::Conflict(format!(
            "issuer {} is already installed and in use",
            issuer.id
        )));
    }
    Ok(())
}

/// A compare-and-set on one issuer: `sql` binds the id as `$1` and the time
/// as `$2` and matches only rows in state `from`; no match is a conflict.
async fn issuer_step(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    sql: &'static str,
    id: &str,
    at: i64,
    from: &str,
) -> Result<(), Error> {
    let done = sqlx::query(sql)
        .bind(id.to_string())
        .bind(at)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(Error::Conflict(format!("issuer {id} is not {from}")));
    }
    Ok(())
}

async fn issuer_change(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    change: &IssuerChange,
) -> Result<(), Error> {
    // The active issuer (other than `id`) becomes previous.
    let demote = |id: String, at: i64| {
        sqlx::query(
            "UPDATE issuers SET status = 'previous', changed_at = $2 WHERE status = 'active' AND id <> $1",
        )
        .bind(id)
        .bind(at)
    };
    match change {
        IssuerChange::Install(issuer) => {
            demote(issuer.id.clone(), issuer.installed_at)
                .execute(&mut **tx)
                .await?;
            insert_issuer(tx, issuer, "active").await
        }
        IssuerChange::Stage(issuer) => insert_issuer(tx, issuer, "staged").await,
        IssuerChange::Schedule { id, at } => {
            issuer_step(
                tx,
                "UPDATE issuers SET activate_at = $2 WHERE id = $1 AND status = 'staged'",
                id,
                *at,
                "staged",
            )
            .await
        }
        IssuerChange::Activate { id, at } => {
            demote(id.clone(), *at).execute(&mut **tx).await?;
            issuer_step(
                tx,
                "UPDATE issuers SET status = 'active', activate_at = NULL, changed_at = $2 \
                 WHERE id = $1 AND status = 'staged'",
                id,
                *at,
                "staged",
            )
            .await
        }
        IssuerChange::CrossCert {
            id,
            der,
            subject,
            issuer,
            not_after,
            at,
        } => {
            sqlx::query(
                "INSERT INTO cross_certs (id, der, subject, issuer, not_after, installed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
            )
            .bind(id.clone())
            .bind(der.clone())
            .bind(subject.clone())
            .bind(issuer.clone())
            .bind(*not_after)
            .bind(*at)
            .execute(&mut **tx)
            .await?;
            Ok(())
        }
        IssuerChange::Unstage { id, at } => {
            issuer_step(
                tx,
                "UPDATE issuers SET status = 'retired', activate_at = NULL, changed_at = $2 \
                 WHERE id = $1 AND status = 'staged'",
                id,
                *at,
                "staged",
            )
            .await
        }
        IssuerChange::Retire { id, at } => {
            issuer_step(
                tx,
                "UPDATE issuers SET status = 'retired', changed_at = $2 WHERE id = $1 AND status = 'previous'",
                id,
                *at,
                "previous",
            )
            .await
        }
    }
}

async fn spend_token(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    token: &SpentToken,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO used_tokens (jti, subject, used_at, expires_at, serial) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(token.jti.as_str())
    .bind(token.subject.as_str())
    .bind(token.used_at)
    .bind(token.expires_at)
    .bind(token.serial.clone())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn revoke(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    r: &NewRevocation,
    audit_seq: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO revocations (serial, issuer_id, reason, revoked_at, revoked_by, audit_seq) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(r.serial.as_str())
    .bind(r.issuer_id.as_str())
    .bind(i64::from(r.reason))
    .bind(r.revoked_at)
    .bind(r.revoked_by.as_str())
    .bind(audit_seq)
    .execute(&mut **tx)
    .await?;
    if let Some(fp) = &r.block_key {
        block_key(tx, fp, &r.serial, r.revoked_at).await?;
    }
    Ok(())
}

async fn block_key(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    fingerprint: &str,
    serial: &str,
    at: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO blocked_keys (fingerprint, serial, blocked_at) VALUES ($1, $2, $3) \
         ON CONFLICT (fingerprint) DO NOTHING",
    )
    .bind(fingerprint)
    .bind(serial)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn save_ocsp_signer(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    row: &crate::rows::OcspSignerRow,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ocsp_signers (issuer_id, serial, cert_der, key_kind, key_data, not_after, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (issuer_id) DO UPDATE SET \
         serial = excluded.serial, cert_der = excluded.cert_der, key_kind = excluded.key_kind, \
         key_data = excluded.key_data, not_after = excluded.not_after, created_at = excluded.created_at",
    )
    .bind(row.issuer_id.as_str())
    .bind(row.serial.as_str())
    .bind(row.cert_der.as_slice())
    .bind(row.key_kind.as_str())
    .bind(row.key_data.as_slice())
    .bind(row.not_after)
    .bind(row.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Fails with `Error::KeyBlocked` when a certificate in the batch is for a
/// key blocked by a keyCompromise revocation, and with `Error::Revoked`
/// when a renewal's predecessor has been revoked.
async fn refuse_revoked_since(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    changes: &[&Change],
    certs: &[&NewCertificate],
    backend: Backend,
) -> Result<(), Error> {
    let keys: Vec<&str> = certs.iter().map(|c| c.key_fingerprint.as_str()).collect();
    if let Some(fp) = first_present(tx, "blocked_keys", "fingerprint", &keys, backend).await? {
        return Err(Error::KeyBlocked(fp));
    }
    let renewed: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Issue {
                renews: Some(s), ..
            } => Some(s.as_str()),
            _ => None,
        })
        .collect();
    if let Some(serial) = first_present(tx, "revocations", "serial", &renewed, backend).await? {
        return Err(Error::Revoked(serial));
    }
    Ok(())
}

/// The first of `values` found in `table.column` (a fixed, trusted name).
async fn first_present(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    table: &str,
    column: &str,
    values: &[&str],
    backend: Backend,
) -> Result<Option<String>, Error> {
    for chunk in values.chunks(ROWS_PER_STATEMENT) {
        let mut sql = format!("SELECT {column} FROM {table} WHERE {column} IN ");
        push_placeholders(&mut sql, 1, chunk.len(), backend);
        sql.push_str(" LIMIT 1");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for v in chunk {
            q = q.bind(*v);
        }
        if let Some(row) = q.fetch_optional(&mut **tx).await? {
            return Ok(Some(row.try_get(0)?));
        }
    }
    Ok(None)
}

async fn insert_certificates(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    certs: &[&NewCertificate],
    backend: Backend,
) -> Result<(), sqlx::Error> {
    let mut sql = String::from(
        "INSERT INTO certificates (serial, issuer_id, profile, requester, names, key_fingerprint, \
         not_before, not_after, issued_at, der, crl_shard) VALUES ",
    );
    push_placeholders(&mut sql, certs.len(), 11, backend);
    let names: Vec<String> = certs
        .iter()
        .map(|c| serde_json::to_string(&c.names).unwrap_or_else(|_| "[]".into()))
        .collect();
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (c, names) in certs.iter().zip(&names) {
        q = q
            .bind(c.serial.as_str())
            .bind(c.issuer_id.as_str())
            .bind(c.profile.as_str())
            .bind(c.requester.as_str())
            .bind(names.as_str())
            .bind(c.key_fingerprint.as_str())
            .bind(c.not_before)
            .bind(c.not_after)
            .bind(c.issued_at)
            .bind(c.der.as_slice())
            .bind(c.crl_shard);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

/// Runs a statement with a `RETURNING column` clause: the values returned.
pub(crate) async fn returned(
    q: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    column: &str,
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    q.fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(column))
        .collect()
}

/// Appends `rows` tuples of `cols` placeholders. SQLite gets anonymous `?`
/// (bound in order): looking up a numbered parameter's name walks a list of
/// them all, which made wide statements cost quadratic time.
pub(crate) fn push_placeholders(sql: &mut String, rows: usize, cols: usize, backend: Backend) {
    use std::fmt::Write;
    let mut n = 1;
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push(',');
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${n}");
                }
            }
            n += 1;
        }
        sql.push(')');
    }
}
