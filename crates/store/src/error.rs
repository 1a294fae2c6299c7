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
            Error::Connect(..) | Error::Closed | Error::Uncertain(_) => true,
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

#[cfg(test)]
mod tests {
    use super::Error;

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
