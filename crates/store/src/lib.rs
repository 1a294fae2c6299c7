//! Sigil storage on SQLite (embedded default) or PostgreSQL (several nodes).
//!
//! Every write goes through one group-commit writer per process: concurrent
//! changes are batched into a single durable transaction (SQLite WAL with
//! `synchronous=FULL`; PostgreSQL defaults), each with its audit record in the
//! same transaction. A caller's `commit` returns only after that transaction is
//! durable. The audit table is append-only (database triggers) and hash-chained.

mod acme;
mod audit;
mod authz_hints;
mod copy;
mod error;
mod objects;
mod retention;
mod rows;
mod writer;

pub use acme::{AcmeAccount, AcmeObject, AcmeTable, AcmeWrite, EabKey, Replacing, StateWrite};
pub use audit::{
    AuditEvent, AuditReceipt, AuditRow, ChainReport, GENESIS_HASH, MAX_LISTED_PROBLEMS,
    RecordsReport, row_hash,
};
pub use copy::CopyReport;
pub use error::Error;
pub use retention::Expired;
pub use rows::{
    CertificateRow, CrlRow, CrlSnapshot, IssuerRow, IssuerState, NewCertificate, NewIssuer,
    NewRevocation, OcspCerts, OcspSignerRow, RevocationRow, RevokedEntry, SignedOcsp, SpentToken,
};
pub use writer::{Change, IssuerChange};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, Row};
use std::time::Duration;
use tokio::sync::mpsc;

/// Which database engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file, served by one `sigil serve` at a time
    /// ([`ServerLock`]): what one server process holds in memory is the
    /// whole CA's state.
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// A handle to the database. Cheap to clone; all clones share one writer.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    writer: mpsc::Sender<writer::Job>,
    /// Orders and authorizations as last committed (SQLite only: one
    /// server writes them).
    objects: Option<std::sync::Arc<objects::ObjectCache>>,
    /// Taken by [`Store::crl_snapshot`], so this process's CRL snapshots of
    /// one database follow each other (other processes: a row lock).
    crl_turn: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    /// Connects (creating a SQLite file if needed), applies migrations and starts
    /// the group-commit writer. URLs: `sqlite://PATH`, `postgres://...`.
    pub async fn open(url: &str) -> Result<Store, Error> {
        install_default_drivers();
        let (backend, url) = normalize_url(url)?;
        if backend == Backend::Sqlite {
            create_private(&url)?;
        }
        let max = match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => 16,
        };
        let pool = pool_options(backend, max, 65536)
            .connect(&url)
            .await
            .map_err(|e| Error::Connect(redact(&url), e))?;
        migrator(backend).run(&pool).await?;
        let objects = (backend == Backend::Sqlite).then(Default::default);
        // The writer keeps a connection of its own: on SQLite its page cache
        // then stays warm across commits instead of re-reading the pages
        // another connection changed since it last wrote. Its working set is
        // the ends of the tables and indexes it appends to, the interior
        // pages of the others and the protocol state in flight, so a small
        // cache serves it; and a small one is cheaper. When a page split
        // renumbers pages, SQLite parks one under the lock-byte page number
        // (far beyond the file), and every commit after such a split walks
        // the connection's whole page-cache hash table: with a 16 MiB cache
        // that walk cost about 40 µs per ACME certificate.
        let writer_pool = pool_options(backend, 1, 1024)
            .min_connections(1)
            .connect(&url)
            .await
            .map_err(|e| Error::Connect(redact(&url), e))?;
        if let Some(cache) = &objects {
            authz_hints::spawn_rebuilds(pool.clone(), std::sync::Arc::downgrade(cache));
        }
        let writer = writer::spawn(writer_pool, backend, objects.clone());
        Ok(Store {
            pool,
            backend,
            writer,
            objects,
            crl_turn: Default::default(),
        })
    }

    /// Like [`Store::open`], but a SQLite file must already exist: for
    /// commands that read or change a CA's records, where a mistyped path
    /// would otherwise create an empty database and report on that.
    pub async fn open_existing(url: &str) -> Result<Store, Error> {
        let (backend, normalized) = normalize_url(url)?;
        if backend == Backend::Sqlite {
            let path = sqlite_path(&normalized)?.0;
            if !path.exists() {
                return Err(Error::Config(format!(
                    "SQLite database {} does not exist: check database.url (or SIGIL_DATABASE_URL); `sigil serve` with this configuration creates it",
                    path.display()
                )));
            }
        }
        Store::open(url).await
    }

    /// The engine in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Durably applies one change with its audit record; returns the audit
    /// receipt. Inside [`with_request_id`], the record names the request.
    pub async fn commit(&self, mut change: Change) -> Result<AuditReceipt, Error> {
        if let (Some(id), Some(event)) = (current_request_id(), change.event_mut())
            && let Some(detail) = event.detail.as_object_mut()
        {
            detail.insert("request_id".into(), serde_json::Value::String(id));
        }
        if let Change::Issue { cert, event, .. } = &mut change
            && let Some(detail) = event.detail.as_object_mut()
        {
            let digest = audit::record_digest(cert);
            detail.insert("record".into(), serde_json::Value::String(digest));
        }
        if let Change::Revoke { revocation, event } = &mut change
            && let Some(detail) = event.detail.as_object_mut()
        {
            let digest = audit::revocation_digest(revocation);
            detail.insert("record".into(), serde_json::Value::String(digest));
        }
        writer::submit(&self.writer, change)
            .await?
            .receipt
            .ok_or_else(|| Error::Corrupt("an audited change produced no audit row".into()))
    }

    /// Durably applies a protocol-state write (no audit row), batched with
    /// the other writes. Returns whether it took effect.
    pub async fn apply(&self, write: StateWrite) -> Result<bool, Error> {
        Ok(writer::submit(&self.writer, Change::State(write))
            .await?
            .changed)
    }

    /// A direct pool handle, for tests that must bypass the application (for
    /// example to prove the database itself refuses audit tampering).
    pub fn dangerous_raw_pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Tries to take the background-job lock (CRL publishing, OCSP
    /// pre-signing). On PostgreSQL it is a session advisory lock held by a
    /// connection of its own: when this node dies, the database drops the
    /// connection and another node's next attempt succeeds. SQLite serves a
    /// single host, so every node there runs the jobs.
    pub async fn try_lead(&self) -> Result<Option<Leadership>, Error> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(Leadership { conn: None }));
        }
        let mut conn = self.pool.acquire().await?.detach();
        let got: bool = sqlx::query("SELECT pg_try_advisory_lock($1) AS got")
            .bind(JOBS_LOCK_KEY)
            .fetch_one(&mut conn)
            .await?
            .try_get("got")?;
        if got {
            // If this node vanishes without closing the connection (a crash
            // of its host, a partition), the server notices within about a
            // minute and drops the lock, instead of at its keepalive
            // default (two hours). Ignored on Unix sockets.
            if let Err(e) = sqlx::query(
                "SELECT set_config('tcp_keepalives_idle', '30', false), \
                 set_config('tcp_keepalives_interval', '10', false), \
                 set_config('tcp_keepalives_count', '3', false)",
            )
            .execute(&mut conn)
            .await
            {
                tracing::warn!(error = %e, "could not shorten the job lock connection's keepalive");
            }
            Ok(Some(Leadership { conn: Some(conn) }))
        } else {
            // Dropping the detached connection closes it.
            Ok(None)
        }
    }

    /// Connections open in the pool, and how many of them are idle.
    pub fn pool_use(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Runs `f` on behalf of request `id`: audit records committed inside it
/// carry `"request_id"`, so a log line, an HTTP or gRPC exchange and the
/// audit row can be matched.
pub async fn with_request_id<F: std::future::Future>(id: String, f: F) -> F::Output {
    REQUEST_ID.scope(id, f).await
}

/// The request being served by this task, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Advisory-lock key of the background jobs (distinct from the audit lock).
const JOBS_LOCK_KEY: i64 = 0x5349_474c_4a4f_4253; // "SIGLJOBS"

/// How long the job lock's connection has to answer a check.
pub const LEASE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The background-job lock, held until dropped (its connection closes) or
/// lost (the connection broke).
pub struct Leadership {
    conn: Option<sqlx::AnyConnection>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Leadership")
    }
}

impl Leadership {
    /// Whether the lock is still held (its connection answers within
    /// [`LEASE_CHECK_TIMEOUT`]). A connection that does not answer in time
    /// counts as lost: the caller drops it and stops the jobs, rather than
    /// run them while another node may have taken over.
    pub async fn still_held(&mut self) -> bool {
        match self.conn.as_mut() {
            None => true,
            Some(c) => matches!(
                tokio::time::timeout(
                    LEASE_CHECK_TIMEOUT,
                    sqlx::query("SELECT 1").execute(&mut *c)
                )
                .await,
                Ok(Ok(_))
            ),
        }
    }
}

fn migrator(backend: Backend) -> Migrator {
    let files: [(i64, &str, &'static str); 15] = match backend {
        Backend::Sqlite => [
            (
                1,
                "init",
                include_str!("../../../migrations/sqlite/0001_init.sql"),
            ),
            (
                2,
                "revocation_tokens",
                include_str!("../../../migrations/sqlite/0002_revocation_tokens.sql"),
            ),
            (
                3,
                "crl_blocked_keys",
                include_str!("../../../migrations/sqlite/0003_crl_blocked_keys.sql"),
            ),
            (
                4,
                "ocsp_responses",
                include_str!("../../../migrations/sqlite/0004_ocsp_responses.sql"),
            ),
            (
                5,
                "acme",
                include_str!("../../../migrations/sqlite/0005_acme.sql"),
            ),
            (
                6,
                "issuer_rotation",
                include_str!("../../../migrations/sqlite/0006_issuer_rotation.sql"),
            ),
            (
                7,
                "cross_certs",
                include_str!("../../../migrations/sqlite/0007_cross_certs.sql"),
            ),
            (
                8,
                "crl_shards",
                include_str!("../../../migrations/sqlite/0008_crl_shards.sql"),
            ),
            (
                9,
                "ocsp_signers",
                include_str!("../../../migrations/sqlite/0009_ocsp_signers.sql"),
            ),
            (
                10,
                "token_serial",
                include_str!("../../../migrations/sqlite/0010_token_serial.sql"),
            ),
            (
                11,
                "authz_reuse_index",
                include_str!("../../../migrations/sqlite/0011_authz_reuse_index.sql"),
            ),
            (
                12,
                "retention_indexes",
                include_str!("../../../migrations/sqlite/0012_retention_indexes.sql"),
            ),
            (
                13,
                "ocsp_stored_at",
                include_str!("../../../migrations/sqlite/0013_ocsp_stored_at.sql"),
            ),
            (
                14,
                "ocsp_compact",
                include_str!("../../../migrations/sqlite/0014_ocsp_compact.sql"),
            ),
            (
                15,
                "key_compromise",
                include_str!("../../../migrations/sqlite/0015_key_compromise.sql"),
            ),
        ],
        Backend::Postgres => [
            (
                1,
                "init",
                include_str!("../../../migrations/postgres/0001_init.sql"),
            ),
            (
                2,
                "revocation_tokens",
                include_str!("../../../migrations/postgres/0002_revocation_tokens.sql"),
            ),
            (
                3,
                "crl_blocked_keys",
                include_str!("../../../migrations/postgres/0003_crl_blocked_keys.sql"),
            ),
            (
                4,
                "ocsp_responses",
                include_str!("../../../migrations/postgres/0004_ocsp_responses.sql"),
            ),
            (
                5,
                "acme",
                include_str!("../../../migrations/postgres/0005_acme.sql"),
            ),
            (
                6,
                "issuer_rotation",
                include_str!("../../../migrations/postgres/0006_issuer_rotation.sql"),
            ),
            (
                7,
                "cross_certs",
                include_str!("../../../migrations/postgres/0007_cross_certs.sql"),
            ),
            (
                8,
                "crl_shards",
                include_str!("../../../migrations/postgres/0008_crl_shards.sql"),
            ),
            (
                9,
                "ocsp_signers",
                include_str!("../../../migrations/postgres/0009_ocsp_signers.sql"),
            ),
            (
                10,
                "token_serial",
                include_str!("../../../migrations/postgres/0010_token_serial.sql"),
            ),
            (
                11,
                "authz_reuse_index",
                include_str!("../../../migrations/postgres/0011_authz_reuse_index.sql"),
            ),
            (
                12,
                "retention_indexes",
                include_str!("../../../migrations/postgres/0012_retention_indexes.sql"),
            ),
            (
                13,
                "ocsp_stored_at",
                include_str!("../../../migrations/postgres/0013_ocsp_stored_at.sql"),
            ),
            (
                14,
                "ocsp_compact",
                include_str!("../../../migrations/postgres/0014_ocsp_compact.sql"),
            ),
            (
                15,
                "key_compromise",
                include_str!("../../../migrations/postgres/0015_key_compromise.sql"),
            ),
        ],
    };
    Migrator::with_migrations(
        files
            .into_iter()
            .map(|(version, name, sql)| {
                Migration::new(
                    version,
                    name.into(),
                    MigrationType::Simple,
                    sqlx::AssertSqlSafe(sql).into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

use sqlx::SqlSafeStr as _;

/// Keeps other `sigil serve` processes off a SQLite database while held:
/// SQLite serves one node, and the server keeps some protocol state (ACME
/// nonces, orders in progress) in memory. An exclusive lock on `PATH.lock` next to the database,
/// released when the process exits, however it exits.
#[derive(Debug)]
pub struct ServerLock {
    _file: std::fs::File,
}

impl ServerLock {
    /// Takes the lock for the database at `url`; `None` for PostgreSQL (any
    /// number of nodes). Fails at once when another server holds it.
    pub fn take(url: &str) -> Result<Option<ServerLock>, Error> {
        let (backend, url) = normalize_url(url)?;
        if backend != Backend::Sqlite {
            return Ok(None);
        }
        let rest = url.trim_start_matches("sqlite://");
        let db = rest.split('?').next().unwrap_or(rest);
        let path = format!("{db}.lock");
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(&path)
            .map_err(|e| Error::Config(format!("cannot open the server lock file {path}: {e}")))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ServerLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Config(format!(
                "another `sigil serve` is running on the SQLite database {db} (it holds {path}); \
                 SQLite serves one node: stop that server first, or move to PostgreSQL \
                 (`sigil db migrate`) to run several"
            ))),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(Error::Config(format!("cannot lock {path}: {e}")))
            }
        }
    }
}

/// Pool settings for `backend` with at most `max` connections, each with a
/// SQLite page cache of up to `cache_kib` KiB.
fn pool_options(backend: Backend, max: u32, cache_kib: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max)
        // A SQLite connection is a local file handle that cannot go stale,
        // so the liveness ping before every checkout (a round trip to the
        // connection's thread) buys nothing; a server connection can.
        .test_before_acquire(backend == Backend::Postgres)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    // WAL for concurrent readers; FULL so a commit survives power loss.
                    // A larger page cache and fewer checkpoints cut page I/O;
                    // neither affects durability. 4 KiB pages (applied when the
                    // file is created) hold several certificate and audit rows
                    // each, so a commit writes a third of the WAL frames that
                    // one-row 1 KiB pages took, in a third of the syscalls.
                    let pragmas = format!(
                        "PRAGMA page_size=4096; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
                         PRAGMA foreign_keys=ON; PRAGMA busy_timeout=15000; \
                         PRAGMA cache_size=-{cache_kib}; PRAGMA wal_autocheckpoint=8192;"
                    );
                    conn.execute(sqlx::AssertSqlSafe(pragmas)).await?;
                }
                Ok(())
            })
        })
}

/// Creates a new SQLite database file readable by its owner only; SQLite
/// gives the WAL and shared-memory files the database file's permissions.
/// The database holds the EAB and nonce keys and every certificate, so it
/// must not depend on the umask. An existing file keeps its permissions (a
/// backup user may be meant to read it), with a warning when others can.
fn create_private(url: &str) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let (path, query) = sqlite_path(url)?;
    // Only when SQLite itself would create the file (mode=rwc).
    if !query.split('&').any(|kv| kv == "mode=rwc") {
        return Ok(());
    }
    let path = path.as_path();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if let Ok(meta) = std::fs::metadata(path)
                && meta.is_file()
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "other users can read or write the SQLite database; `chmod 600` it (and its -wal and -shm files)"
                );
            }
            Ok(())
        }
        // A missing directory and the like: SQLite's own error says more.
        Err(_) => Ok(()),
    }
}

/// The file of a normalized SQLite URL, and its query.
fn sqlite_path(url: &str) -> Result<(std::path::PathBuf, &str), Error> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| Error::Config(format!("SQLite path '{path}' is not valid UTF-8")))?;
    Ok((std::path::PathBuf::from(path.as_ref()), query))
}

fn normalize_url(url: &str) -> Result<(Backend, String), Error> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let rest = rest.trim_start_matches("//");
        if rest.is_empty() || rest.contains(":memory:") {
            return Err(Error::Config(
                "SQLite needs a file path (sqlite://PATH); in-memory databases lose every certificate".into(),
            ));
        }
        let sep = if rest.contains('?') { '&' } else { '?' };
        let mode = if rest.contains("mode=") {
            String::new()
        } else {
            format!("{sep}mode=rwc")
        };
        return Ok((Backend::Sqlite, format!("sqlite://{rest}{mode}")));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((Backend::Postgres, url.to_string()));
    }
    Err(Error::Config(format!(
        "database URL must start with sqlite:// or postgres:// (got '{}')",
        redact(url)
    )))
}

/// Hides a password in a database URL for messages (userinfo and `password=`).
pub fn redact(url: &str) -> String {
    let url = match url.split_once('?') {
        Some((base, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{base}?{}", q.join("&"))
        }
        None => url.to_string(),
    };
    let url = url.as_str();
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Helpers for test suites that must run against every backend.
#[doc(hidden)]
pub mod testing {
    use std::path::Path;

    /// Database URLs to test against: a fresh SQLite file in `dir`, and a fresh
    /// PostgreSQL database when `TEST_DATABASE_URL` is set. With
    /// `SIGIL_REQUIRE_EXTERNAL=1` a missing PostgreSQL is an error, not a skip.
    pub async fn backends(dir: &Path) -> Vec<(&'static str, String)> {
        let mut v = vec![(
            "sqlite",
            format!("sqlite://{}", dir.join("sigil-test.db").display()),
        )];
        match std::env::var("TEST_DATABASE_URL") {
            Ok(admin) if !admin.is_empty() => match fresh_postgres(&admin).await {
                Ok(url) => v.push(("postgres", url)),
                Err(e) => panic!("TEST_DATABASE_URL is set but unusable: {e}"),
            },
            _ => {
                if std::env::var("SIGIL_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
                    panic!(
                        "SIGIL_REQUIRE_EXTERNAL=1 but TEST_DATABASE_URL is not set; run ./scripts/test"
                    );
                }
                eprintln!("note: TEST_DATABASE_URL not set; PostgreSQL tests skipped");
            }
        }
        v
    }

    /// Creates an empty database next to the one in `admin_url`; returns its URL.
    pub async fn fresh_postgres(admin_url: &str) -> Result<String, String> {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(admin_url)
            .await
            .map_err(|e| e.to_string())?;
        let mut rnd = [0u8; 6];
        getrandom::fill(&mut rnd).map_err(|e| e.to_string())?;
        let name = format!("sigil_t_{}", hex::encode(rnd));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin_url, String::new()),
        };
        let cut = base.rfind('/').ok_or("URL has no database name")?;
        Ok(format!("{}/{name}{query}", &base[..cut]))
    }
}
