use thiserror::Error;

/// Storage errors. Messages never include database passwords.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration (URL).
    #[error("database configuration: {0}")]
    Config(String),
    /// Could not connect.
    #[error("cannot connect to database {0}: {1}")]
    Connect(String, sqlx::Error),
    /// Migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A uniqueness conflict (e.g. a serial already used).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A certificate for a key that a keyCompromise revocation blocked
    /// (committed after the request was checked); the key's fingerprint.
    #[error("key {0} is blocked: a certificate of it was revoked for keyCompromise")]
    KeyBlocked(String),
    /// A renewal of a certificate revoked after the request was checked;
    /// the revoked serial.
    #[error("certificate {0} was revoked before its renewal was stored")]
    Revoked(String),
    /// A compare-and-set missed: the row changed since it was read.
    #[error("changed concurrently: {0}")]
    Stale(String),
    /// The writer task is gone (shutting down).
    #[error("store is shutting down")]
    Closed,
    /// The database did not confirm a commit, and could not then be asked
    /// whether it landed: the change may or may not be stored.
    #[error(
        "the database did not confirm the write and could not be asked whether it landed ({0}); check the certificate or audit log before retrying"
    )]
    Uncertain(String),
    /// The database could not be reached for a write that was batched with
    /// one that failed so (the same failure, reported once per write).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Stored data that cannot be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl Error {
    /// The database could not be reached, or did not confirm a write, for
    /// now (connection lost, pool exhausted, shutting down): the same
    /// request may succeed shortly, here or on another node.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Connect(..) | Error::Closed | Error::Uncertain(_) | Error::Unavailable(_) => {
                true
            }
            Error::Db(sqlx::Error::Database(d)) => d.code().is_some_and(|c| transient(&c)),
            Error::Db(e) => matches!(
                e,
                sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Io(_)
                    | sqlx::Error::WorkerCrashed
            ),
            _ => false,
        }
    }
}

/// Whether a database error code says "not now" rather than "not this":
/// PostgreSQL's connection errors (class 08), a server shutting down or
/// starting (57P01–57P03), too many connections (53300), a standby that
/// refuses writes during a failover (25006), and a serialization failure or
/// deadlock (40001, 40P01); SQLite's busy database (5 and its extended
/// codes), which outlasted the busy timeout.
fn transient(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "25006" | "40001" | "40P01"
        )
        || matches!(code, "5" | "261" | "517" | "773")
}

#[cfg(test)]
mod tests {
    use super::{Error, transient};

    #[test]
    fn passing_database_states_are_transient() {
        for c in [
            "08006", "08003", "57P01", "53300", "25006", "40P01", "5", "517",
        ] {
            assert!(transient(c), "{c}");
        }
        // Unique and foreign-key violations, a syntax error, SQLite's
        // constraint and corruption codes: the request itself is at fault.
        for c in ["23505", "23503", "42601", "19", "2067", "11"] {
            assert!(!transient(c), "{c}");
        }
    }

    #[test]
    fn lost_connections_are_unavailable_and_data_errors_are_not() {
        for e in [
            Error::Db(sqlx::Error::PoolTimedOut),
            Error::Db(sqlx::Error::Io(std::io::Error::other("reset"))),
            Error::Uncertain("no reply".into()),
            Error::Closed,
        ] {
            assert!(e.is_unavailable(), "{e}");
        }
        for e in [
            Error::Db(sqlx::Error::RowNotFound),
            Error::Conflict("serial".into()),
            Error::Corrupt("row".into()),
        ] {
            assert!(!e.is_unavailable(), "{e}");
        }
    }
}
