//! Whole-database operations: a consistent online SQLite backup, and copying
//! a CA from one database to another (SQLite to PostgreSQL when a single node
//! grows into several), with the audit chain re-verified on arrival.

use crate::audit::{audit_from_row, extend};
use crate::{Backend, ChainReport, Error, GENESIS_HASH, Store};
use sqlx::Row;
use sqlx::any::AnyRow;

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Int,
    Blob,
}

use Kind::{Blob, Int, Text};

/// Every table, parents before children; the first column is the primary key.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "issuers",
        &[
            ("id", Text),
            ("cert_der", Blob),
            ("subject", Text),
            ("not_before", Int),
            ("not_after", Int),
            ("installed_at", Int),
            ("status", Text),
            ("key_ref", Text),
            ("activate_at", Int),
            ("changed_at", Int),
        ],
    ),
    (
        "certificates",
        &[
            ("serial", Text),
            ("issuer_id", Text),
            ("profile", Text),
            ("requester", Text),
            ("names", Text),
            ("key_fingerprint", Text),
            ("not_before", Int),
            ("not_after", Int),
            ("issued_at", Int),
            ("der", Blob),
            ("crl_shard", Int),
        ],
    ),
    (
        "audit",
        &[
            ("seq", Int),
            ("ts_ms", Int),
            ("kind", Text),
            ("actor", Text),
            ("subject", Text),
            ("detail", Text),
            ("prev_hash", Text),
            ("hash", Text),
        ],
    ),
    (
        "revocations",
        &[
            ("serial", Text),
            ("issuer_id", Text),
            ("reason", Int),
            ("revoked_at", Int),
            ("revoked_by", Text),
            ("audit_seq", Int),
        ],
    ),
    (
        "used_tokens",
        &[
            ("jti", Text),
            ("subject", Text),
            ("used_at", Int),
            ("expires_at", Int),
            ("serial", Text),
        ],
    ),
    ("crl_numbers", &[("issuer_id", Text), ("last", Int)]),
    (
        "crls",
        &[
            ("issuer_id", Text),
            ("number", Int),
            ("this_update", Int),
            ("next_update", Int),
            ("der", Blob),
        ],
    ),
    (
        "crl_shards",
        &[
            ("issuer_id", Text),
            ("shard", Int),
            ("number", Int),
            ("this_update", Int),
            ("next_update", Int),
            ("der", Blob),
        ],
    ),
    (
        "blocked_keys",
        &[("fingerprint", Text), ("serial", Text), ("blocked_at", Int)],
    ),
    (
        "ocsp_certs",
        &[("digest", Text), ("der", Blob), ("used_at", Int)],
    ),
    (
        "ocsp_answers",
        &[
            ("serial", Text),
            ("issuer_id", Text),
            ("this_update", Int),
            ("next_update", Int),
            ("der", Blob),
            ("certs", Text),
            ("stored_at", Int),
        ],
    ),
    (
        "ocsp_signers",
        &[
            ("issuer_id", Text),
            ("serial", Text),
            ("cert_der", Blob),
            ("key_kind", Text),
            ("key_data", Blob),
            ("not_after", Int),
            ("created_at", Int),
        ],
    ),
    ("acme_secrets", &[("name", Text), ("value", Blob)]),
    ("acme_nonces", &[("nonce", Text), ("expires_at", Int)]),
    (
        "acme_accounts",
        &[
            ("id", Text),
            ("thumbprint", Text),
            ("jwk", Text),
            ("status", Text),
            ("contact", Text),
            ("requester", Text),
            ("eab_kid", Text),
            ("created_at", Int),
        ],
    ),
    (
        "acme_eab_keys",
        &[
            ("kid", Text),
            ("hmac_key", Blob),
            ("requester", Text),
            ("created_at", Int),
            ("account_id", Text),
        ],
    ),
    (
        "acme_orders",
        &[
            ("id", Text),
            ("account_id", Text),
            ("status", Text),
            ("expires_at", Int),
            ("body", Text),
            ("created_at", Int),
        ],
    ),
    (
        "acme_authzs",
        &[
            ("id", Text),
            ("account_id", Text),
            ("identifier", Text),
            ("status", Text),
            ("expires_at", Int),
            ("body", Text),
            ("created_at", Int),
        ],
    ),
    (
        "cross_certs",
        &[
            ("id", Text),
            ("der", Blob),
            ("subject", Text),
            ("issuer", Text),
            ("not_after", Int),
            ("installed_at", Int),
        ],
    ),
    (
        "acme_renewal_hints",
        &[("scope", Text), ("renew_by", Int), ("set_at", Int)],
    ),
];

/// Rows per INSERT statement.
const PAGE: usize = 500;

/// What a copy moved.
#[derive(Debug, Clone)]
pub struct CopyReport {
    /// Rows per table, in copy order.
    pub tables: Vec<(String, u64)>,
    /// Audit rows verified on the target.
    pub audit_rows: u64,
    /// The audit chain head, identical on both sides.
    pub audit_head: String,
}

enum Value {
    Text(Option<String>),
    Int(Option<i64>),
    Blob(Option<Vec<u8>>),
}

fn read(row: &AnyRow, cols: &[(&str, Kind)]) -> Result<Vec<Value>, Error> {
    cols.iter()
        .map(|(name, kind)| {
            Ok(match kind {
                Text => Value::Text(row.try_get(*name)?),
                Int => Value::Int(row.try_get(*name)?),
                Blob => Value::Blob(row.try_get(*name)?),
            })
        })
        .collect()
}

impl Store {
    /// Copies this (source) database into `target`, which must be empty, in
    /// one transaction on the target, from one consistent snapshot of the
    /// source. The audit chain is verified on the target before returning;
    /// on any failure the target keeps nothing.
    pub async fn copy_into(&self, target: &Store) -> Result<CopyReport, Error> {
        let mut target_rows = 0i64;
        for table in ["audit", "issuers"] {
            let n: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) AS n FROM {table}"
            )))
            .fetch_one(&target.pool)
            .await?
            .try_get("n")?;
            target_rows += n;
        }
        if target_rows > 0 {
            return Err(Error::Config(
                "the target database is not empty: copy into a fresh database".into(),
            ));
        }
        let mut src = self.pool.begin().await?;
        // One snapshot of every table (SQLite's read transactions are one).
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *src)
                .await?;
        }
        let mut dst = target.pool.begin().await?;
        let mut tables = Vec::new();
        for (table, cols) in TABLES {
            let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
            let list = names.join(", ");
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {list} FROM {table} ORDER BY {}",
                names[0]
            )))
            .fetch_all(&mut *src)
            .await?;
            let mut copied = 0u64;
            for chunk in rows.chunks(PAGE) {
                let mut sql = format!("INSERT INTO {table} ({list}) VALUES ");
                let mut n = 0;
                for (i, _) in chunk.iter().enumerate() {
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    sql.push('(');
                    for c in 0..cols.len() {
                        if c > 0 {
                            sql.push_str(", ");
                        }
                        n += 1;
                        sql.push_str(&format!("${n}"));
                    }
                    sql.push(')');
                }
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for row in chunk {
                    for v in read(row, cols)? {
                        q = match v {
                            Value::Text(t) => q.bind(t),
                            Value::Int(i) => q.bind(i),
                            Value::Blob(b) => q.bind(b),
                        };
                    }
                }
                copied += q.execute(&mut *dst).await?.rows_affected();
            }
            tables.push((table.to_string(), copied));
        }
        // The source's chain as of the snapshot, and the target's as written,
        // checked before the target commits.
        let head = |rows: Vec<AnyRow>| -> Result<ChainReport, Error> {
            let mut report = ChainReport {
                rows: 0,
                head: GENESIS_HASH.to_string(),
                first_bad: None,
            };
            for r in &rows {
                if !extend(&mut report, audit_from_row(r)?) {
                    break;
                }
            }
            Ok(report)
        };
        const AUDIT: &str = "SELECT seq, ts_ms, kind, actor, subject, detail, prev_hash, hash FROM audit ORDER BY seq";
        let mine = head(sqlx::query(AUDIT).fetch_all(&mut *src).await?)?;
        src.rollback().await?;
        let theirs = head(sqlx::query(AUDIT).fetch_all(&mut *dst).await?)?;
        if let Some((seq, why)) = &mine.first_bad {
            return Err(Error::Corrupt(format!(
                "the source audit chain is broken at row {seq} ({why}); run `sigil audit verify` and investigate before copying"
            )));
        }
        if let Some((seq, why)) = theirs.first_bad {
            return Err(Error::Corrupt(format!(
                "the copied audit chain does not verify at row {seq} ({why})"
            )));
        }
        if mine.head != theirs.head || mine.rows != theirs.rows {
            return Err(Error::Corrupt(format!(
                "the copied audit chain differs: source {} rows head {}, target {} rows head {}",
                mine.rows, mine.head, theirs.rows, theirs.head
            )));
        }
        dst.commit().await?;
        Ok(CopyReport {
            tables,
            audit_rows: theirs.rows,
            audit_head: theirs.head,
        })
    }

    /// Writes a consistent copy of a SQLite database to `path` while it is in
    /// use (`VACUUM INTO`). The file must not exist or be empty (made
    /// beforehand with the permissions it should have).
    pub async fn backup_sqlite(&self, path: &std::path::Path) -> Result<(), Error> {
        if self.backend != Backend::Sqlite {
            return Err(Error::Config(
                "online backup is for SQLite; back up PostgreSQL with pg_dump".into(),
            ));
        }
        let target = path
            .to_str()
            .ok_or_else(|| Error::Config(format!("{} is not a UTF-8 path", path.display())))?;
        sqlx::query("VACUUM INTO $1")
            .bind(target)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
