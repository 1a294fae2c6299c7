//! ACME state: accounts, EAB keys, orders, authorizations, nonces and renewal
//! hints. Account and EAB changes go through the writer with an audit record
//! ([`crate::Change::Acme`]); orders, authorizations and nonces are protocol
//! state written directly (their outcome, issuance or denial, is audited by
//! the authority).

use crate::{Error, Store};
use sqlx::Row;
use sqlx::any::AnyRow;

/// A stored ACME account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeAccount {
    /// Account id (the last segment of its URL).
    pub id: String,
    /// RFC 7638 thumbprint of the account key (unique).
    pub thumbprint: String,
    /// The account key, JWK JSON.
    pub jwk: String,
    /// `valid`, `deactivated` or `revoked`.
    pub status: String,
    /// Contact URLs, JSON array.
    pub contact: String,
    /// The requester the naming policy sees (`acme:<id>` or `eab:<name>`).
    pub requester: String,
    /// The EAB key id the account is bound to.
    pub eab_kid: Option<String>,
    /// Creation time (unix s).
    pub created_at: i64,
}

/// An external-account-binding key.
#[derive(Debug, Clone)]
pub struct EabKey {
    /// Key id.
    pub kid: String,
    /// HMAC-SHA256 key.
    pub hmac_key: Vec<u8>,
    /// Requester name accounts bound to it act as (`eab:<requester>`).
    pub requester: String,
    /// Creation time (unix s).
    pub created_at: i64,
    /// The account it is bound to, once used.
    pub account_id: Option<String>,
}

/// An account or EAB change, written with its audit record.
#[derive(Debug, Clone)]
pub enum AcmeWrite {
    /// A new account; with `eab_kid`, the key is bound to it in the same
    /// transaction (a key already bound fails with `Error::Conflict`).
    NewAccount(AcmeAccount),
    /// Key, status or contact of an existing account, written only if its
    /// status and key are still those of `was` (else `Error::Stale`): a
    /// request authenticated before a deactivation or key change must not
    /// undo it.
    UpdateAccount {
        /// The account as it is to be.
        next: AcmeAccount,
        /// The account as the request read it.
        was: AcmeAccount,
    },
    /// A new EAB key.
    NewEabKey(EabKey),
    /// An operator's renew-by time (ARI) for `scope` (`serial:HEX` or `issuer:ID`).
    RenewalHint {
        /// What it covers.
        scope: String,
        /// Renew before (unix s).
        renew_by: i64,
        /// When set (unix s).
        set_at: i64,
    },
}

/// An order or authorization: indexed columns plus a JSON body the ACME
/// crate owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeObject {
    /// Object id.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// Status as RFC 8555 names it.
    pub status: String,
    /// Expiry (unix s).
    pub expires_at: i64,
    /// The rest, JSON.
    pub body: String,
    /// Creation time (unix s).
    pub created_at: i64,
}

/// An order's claim to replace a certificate (ARI `replaces`), checked in
/// the transaction that stores the order: of concurrent orders naming one
/// certificate, on one node or several, one is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacing {
    /// The requester whose accounts' orders count.
    pub requester: String,
    /// The ARI certificate ID.
    pub cert_id: String,
    /// Orders stored as live at this time (unix s) count.
    pub now: i64,
    /// Only orders made since this time (unix s) are looked for: the caller
    /// checked the older ones before asking, and an order's creation time
    /// never changes. It bounds the search made under the write lock.
    pub since: i64,
    /// Orders naming it that have failed since they were stored (their
    /// current status is `invalid`): they replace nothing.
    pub failed: Vec<String>,
}

/// Which object table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeTable {
    /// `acme_orders`.
    Orders,
    /// `acme_authzs`.
    Authzs,
}

impl AcmeTable {
    fn name(self) -> &'static str {
        match self {
            AcmeTable::Orders => "acme_orders",
            AcmeTable::Authzs => "acme_authzs",
        }
    }
}

/// An unaudited ACME protocol-state write, committed through the writer.
#[derive(Debug, Clone)]
pub enum StateWrite {
    /// Records a nonce as used; no effect (false) if it already was.
    SpendNonce {
        /// The nonce.
        nonce: String,
        /// When it would have expired anyway (unix s).
        expires_at: i64,
    },
    /// New authorizations and, optionally, the order that uses them. With
    /// `replacing`, nothing is written (false) if another order replacing
    /// the same certificate is stored by then.
    Insert {
        /// The order, if any (pre-authorization has none).
        order: Option<AcmeObject>,
        /// New authorizations with their lookup identifier (`dns:name`).
        authzs: Vec<(AcmeObject, String)>,
        /// The certificate the order replaces (RFC 9773 §5).
        replacing: Option<Replacing>,
    },
    /// Replaces an object if its stored status is still `from`; no effect
    /// (false) if another request changed it first.
    Update {
        /// Which table.
        table: AcmeTable,
        /// Expected current status.
        from: String,
        /// The new row.
        to: AcmeObject,
    },
}

impl StateWrite {
    /// What the write changes, for an error message.
    pub(crate) fn describe(&self) -> String {
        match self {
            StateWrite::SpendNonce { .. } => "a nonce".into(),
            StateWrite::Insert { .. } => "new ACME objects".into(),
            StateWrite::Update { table, from, to } => {
                let kind = match table {
                    AcmeTable::Orders => "order",
                    AcmeTable::Authzs => "authorization",
                };
                format!("{kind} {} (no longer {from})", to.id)
            }
        }
    }
}

/// Largest number of rows in one multi-row state statement.
const STATE_ROWS: usize = 32;

/// Splits `items` into runs whose lengths are powers of two (at most
/// [`STATE_ROWS`]), so a batch of any size uses one of a few statement
/// shapes and each stays in the prepared-statement cache.
fn pow2_chunks<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let n = items.len().min(STATE_ROWS);
        let n = 1 << n.ilog2();
        let (head, rest) = items.split_at(n);
        items = rest;
        Some(head)
    })
}

/// The orders of `requester`'s accounts, finalized or stored as live at
/// `now`, that name `cert_id` in `replaces`.
async fn orders_replacing<'e, E>(
    ex: E,
    requester: &str,
    cert_id: &str,
    now: i64,
    since: i64,
) -> Result<Vec<String>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    // The body is compact JSON written by serde, so the member appears
    // exactly like this; LIKE's wildcards in the id are escaped.
    let escaped = cert_id
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    let member = format!("\"replaces\":\"{cert_id}\"");
    let rows = sqlx::query(
        "SELECT id, body FROM acme_orders \
         WHERE account_id IN (SELECT id FROM acme_accounts WHERE requester = $1) \
         AND created_at >= $2 \
         AND (status = 'valid' OR (status <> 'invalid' AND expires_at > $3)) \
         AND body LIKE $4 ESCAPE '\\'",
    )
    .bind(requester)
    .bind(since)
    .bind(now)
    .bind(format!("%\"replaces\":\"{escaped}\"%"))
    .fetch_all(ex)
    .await?;
    // SQLite's LIKE ignores ASCII case; the ids are case-sensitive.
    let mut ids = Vec::new();
    for r in rows {
        let body: String = r.try_get("body")?;
        if body.contains(&member) {
            ids.push(r.try_get("id")?);
        }
    }
    Ok(ids)
}

/// Applies a batch's protocol-state writes inside the writer's transaction,
/// in a few multi-row statements instead of one per write: every insert
/// first, then the compare-and-sets, one statement per table and chunk.
/// `writes` pairs each write with its change's index; `changed[i]` is set to
/// whether change `i`'s write took effect. The result is the same as applying
/// the writes one by one in batch order: inserts create fresh random ids that
/// no other write of the batch can name, and when several compare-and-sets
/// target one object, the first goes in the batched statement and the others
/// follow it one at a time, in order.
pub(crate) async fn apply_states(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    writes: &[(usize, &StateWrite)],
    changed: &mut [bool],
    backend: crate::Backend,
) -> Result<(), Error> {
    apply_states_sql(tx, writes, changed, backend)
        .await
        .map_err(crate::writer::classify)
}

async fn apply_states_sql(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    writes: &[(usize, &StateWrite)],
    changed: &mut [bool],
    backend: crate::Backend,
) -> Result<(), sqlx::Error> {
    let mut authzs: Vec<(&AcmeObject, &str)> = Vec::new();
    let mut orders: Vec<&AcmeObject> = Vec::new();
    for (i, w) in writes {
        if let StateWrite::Insert {
            order,
            authzs: a,
            replacing,
        } = w
        {
            // Checked one at a time, in batch order and before the batched
            // inserts: the first of two orders replacing one certificate
            // is stored, and the second sees it.
            if let Some(r) = replacing {
                let mut others =
                    orders_replacing(&mut **tx, &r.requester, &r.cert_id, r.now, r.since).await?;
                others.retain(|id| !r.failed.contains(id));
                if !others.is_empty() {
                    changed[*i] = false;
                    continue;
                }
                let one: Vec<(&AcmeObject, &str)> =
                    a.iter().map(|(o, ident)| (o, ident.as_str())).collect();
                insert_objects(tx, &one, &order.iter().collect::<Vec<_>>(), backend).await?;
                continue;
            }
            authzs.extend(a.iter().map(|(o, ident)| (o, ident.as_str())));
            orders.extend(order.iter());
        }
    }
    insert_objects(tx, &authzs, &orders, backend).await?;
    for table in [AcmeTable::Authzs, AcmeTable::Orders] {
        // (change index, expected status, new row), first per object batched.
        let mut batched: Vec<(usize, &str, &AcmeObject)> = Vec::new();
        let mut after: Vec<(usize, &str, &AcmeObject)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, w) in writes {
            if let StateWrite::Update { table: t, from, to } = w
                && *t == table
            {
                let entry = (*i, from.as_str(), to);
                if seen.insert(to.id.as_str()) {
                    batched.push(entry);
                } else {
                    after.push(entry);
                }
            }
        }
        for chunk in pow2_chunks(&batched) {
            let mut sql = format!(
                "UPDATE {t} SET status = v.column2, expires_at = v.column3, body = v.column4 FROM (VALUES ",
                t = table.name()
            );
            crate::writer::push_placeholders(&mut sql, chunk.len(), 5, backend);
            sql.push_str(&format!(
                ") AS v WHERE {t}.id = v.column1 AND {t}.status = v.column5 RETURNING id",
                t = table.name()
            ));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (_, from, to) in chunk {
                q = q
                    .bind(to.id.as_str())
                    .bind(to.status.as_str())
                    .bind(to.expires_at)
                    .bind(to.body.as_str())
                    .bind(*from);
            }
            let updated = crate::writer::returned(q, tx, "id").await?;
            for (i, _, to) in chunk {
                changed[*i] = updated.contains(&to.id);
            }
        }
        for (i, from, to) in after {
            let sql = format!(
                "UPDATE {} SET status = $1, expires_at = $2, body = $3 WHERE id = $4 AND status = $5",
                table.name()
            );
            let r = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(to.status.as_str())
                .bind(to.expires_at)
                .bind(to.body.as_str())
                .bind(to.id.as_str())
                .bind(from)
                .execute(&mut **tx)
                .await?;
            changed[i] = r.rows_affected() == 1;
        }
    }
    Ok(())
}

/// Inserts authorizations and orders, in a few multi-row statements.
async fn insert_objects(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    authzs: &[(&AcmeObject, &str)],
    orders: &[&AcmeObject],
    backend: crate::Backend,
) -> Result<(), sqlx::Error> {
    for chunk in pow2_chunks(authzs) {
        let mut sql = String::from(
            "INSERT INTO acme_authzs (id, account_id, identifier, status, expires_at, body, created_at) VALUES ",
        );
        crate::writer::push_placeholders(&mut sql, chunk.len(), 7, backend);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (a, identifier) in chunk {
            q = q
                .bind(a.id.as_str())
                .bind(a.account_id.as_str())
                .bind(*identifier)
                .bind(a.status.as_str())
                .bind(a.expires_at)
                .bind(a.body.as_str())
                .bind(a.created_at);
        }
        q.execute(&mut **tx).await?;
    }
    for chunk in pow2_chunks(orders) {
        let mut sql = String::from(
            "INSERT INTO acme_orders (id, account_id, status, expires_at, body, created_at) VALUES ",
        );
        crate::writer::push_placeholders(&mut sql, chunk.len(), 6, backend);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for o in chunk {
            q = q
                .bind(o.id.as_str())
                .bind(o.account_id.as_str())
                .bind(o.status.as_str())
                .bind(o.expires_at)
                .bind(o.body.as_str())
                .bind(o.created_at);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

const ACCOUNT_COLS: &str = "id, thumbprint, jwk, status, contact, requester, eab_kid, created_at";

fn account_from_row(r: &AnyRow) -> Result<AcmeAccount, Error> {
    Ok(AcmeAccount {
        id: r.try_get("id")?,
        thumbprint: r.try_get("thumbprint")?,
        jwk: r.try_get("jwk")?,
        status: r.try_get("status")?,
        contact: r.try_get("contact")?,
        requester: r.try_get("requester")?,
        eab_kid: r.try_get("eab_kid")?,
        created_at: r.try_get("created_at")?,
    })
}

fn object_from_row(r: &AnyRow) -> Result<AcmeObject, Error> {
    Ok(AcmeObject {
        id: r.try_get("id")?,
        account_id: r.try_get("account_id")?,
        status: r.try_get("status")?,
        expires_at: r.try_get("expires_at")?,
        body: r.try_get("body")?,
        created_at: r.try_get("created_at")?,
    })
}

/// Applies an account/EAB write inside the writer's transaction.
pub(crate) async fn apply(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    write: &AcmeWrite,
) -> Result<(), Error> {
    if let AcmeWrite::NewAccount(AcmeAccount {
        id,
        eab_kid: Some(kid),
        ..
    }) = write
    {
        let bound = sqlx::query(
            "UPDATE acme_eab_keys SET account_id = $1 WHERE kid = $2 AND account_id IS NULL",
        )
        .bind(id.as_str())
        .bind(kid.as_str())
        .execute(&mut **tx)
        .await?;
        if bound.rows_affected() != 1 {
            return Err(Error::Conflict(format!(
                "EAB key {kid} is already bound to an account"
            )));
        }
    }
    if let AcmeWrite::UpdateAccount { next, was } = write {
        let updated = sqlx::query(
            "UPDATE acme_accounts SET thumbprint = $1, jwk = $2, status = $3, contact = $4 \
             WHERE id = $5 AND status = $6 AND thumbprint = $7",
        )
        .bind(next.thumbprint.as_str())
        .bind(next.jwk.as_str())
        .bind(next.status.as_str())
        .bind(next.contact.as_str())
        .bind(next.id.as_str())
        .bind(was.status.as_str())
        .bind(was.thumbprint.as_str())
        .execute(&mut **tx)
        .await
        .map_err(crate::writer::classify)?;
        if updated.rows_affected() != 1 {
            return Err(Error::Stale(format!(
                "account {} was deactivated or given a new key meanwhile",
                next.id
            )));
        }
        return Ok(());
    }
    apply_sql(tx, write).await.map_err(crate::writer::classify)
}

async fn apply_sql(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    write: &AcmeWrite,
) -> Result<(), sqlx::Error> {
    match write {
        AcmeWrite::NewAccount(a) => {
            let sql = format!(
                "INSERT INTO acme_accounts ({ACCOUNT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(a.id.as_str())
                .bind(a.thumbprint.as_str())
                .bind(a.jwk.as_str())
                .bind(a.status.as_str())
                .bind(a.contact.as_str())
                .bind(a.requester.as_str())
                .bind(a.eab_kid.clone())
                .bind(a.created_at)
                .execute(&mut **tx)
                .await?;
        }
        // Applied by `apply`, as a compare-and-set.
        AcmeWrite::UpdateAccount { .. } => {}
        AcmeWrite::NewEabKey(k) => {
            sqlx::query(
                "INSERT INTO acme_eab_keys (kid, hmac_key, requester, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(k.kid.as_str())
            .bind(k.hmac_key.as_slice())
            .bind(k.requester.as_str())
            .bind(k.created_at)
            .execute(&mut **tx)
            .await?;
        }
        AcmeWrite::RenewalHint {
            scope,
            renew_by,
            set_at,
        } => {
            sqlx::query(
                "INSERT INTO acme_renewal_hints (scope, renew_by, set_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (scope) DO UPDATE SET renew_by = excluded.renew_by, set_at = excluded.set_at",
            )
            .bind(scope.as_str())
            .bind(*renew_by)
            .bind(*set_at)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

impl Store {
    /// A shared secret by name, created with `fresh` by the first node to ask.
    pub async fn acme_secret(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>, Error> {
        sqlx::query(
            "INSERT INTO acme_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(fresh)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM acme_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    /// Records a nonce as used (durably, batched). `false` if it already was (a replay).
    pub async fn acme_spend_nonce(&self, nonce: &str, expires_at: i64) -> Result<bool, Error> {
        self.apply(StateWrite::SpendNonce {
            nonce: nonce.to_string(),
            expires_at,
        })
        .await
    }

    /// Forgets used nonces that have expired anyway.
    pub async fn acme_prune_nonces(&self, now: i64) -> Result<u64, Error> {
        let r = sqlx::query("DELETE FROM acme_nonces WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// An account by id.
    pub async fn acme_account(&self, id: &str) -> Result<Option<AcmeAccount>, Error> {
        let sql = format!("SELECT {ACCOUNT_COLS} FROM acme_accounts WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(account_from_row).transpose()
    }

    /// An account by key thumbprint.
    pub async fn acme_account_by_key(
        &self,
        thumbprint: &str,
    ) -> Result<Option<AcmeAccount>, Error> {
        let sql = format!("SELECT {ACCOUNT_COLS} FROM acme_accounts WHERE thumbprint = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(thumbprint)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(account_from_row).transpose()
    }

    /// An EAB key by id.
    pub async fn acme_eab_key(&self, kid: &str) -> Result<Option<EabKey>, Error> {
        let row = sqlx::query(
            "SELECT kid, hmac_key, requester, created_at, account_id FROM acme_eab_keys WHERE kid = $1",
        )
        .bind(kid)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(EabKey {
                kid: r.try_get("kid")?,
                hmac_key: r.try_get("hmac_key")?,
                requester: r.try_get("requester")?,
                created_at: r.try_get("created_at")?,
                account_id: r.try_get("account_id")?,
            })
        })
        .transpose()
    }

    /// Inserts new authorizations and the order that uses them (if any) atomically.
    /// Stores an order (if any) and its new authorizations. False, with
    /// nothing stored, if `replacing` names a certificate that another
    /// order replaces by then.
    pub async fn acme_insert_order(
        &self,
        order: Option<&AcmeObject>,
        new_authzs: &[(AcmeObject, String)],
        replacing: Option<Replacing>,
    ) -> Result<bool, Error> {
        self.apply(StateWrite::Insert {
            order: order.cloned(),
            authzs: new_authzs.to_vec(),
            replacing,
        })
        .await
    }

    /// One order or authorization.
    pub async fn acme_object(
        &self,
        table: AcmeTable,
        id: &str,
    ) -> Result<Option<AcmeObject>, Error> {
        if let Some(hit) = self.objects.as_ref().and_then(|c| c.get(table, id)) {
            return Ok(Some(hit));
        }
        let sql = format!(
            "SELECT id, account_id, status, expires_at, body, created_at FROM {} WHERE id = $1",
            table.name()
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(object_from_row).transpose()
    }

    /// Replaces status, expiry and body if the stored status is still `from`
    /// (compare-and-set across nodes). `false` if it changed meanwhile.
    pub async fn acme_update(
        &self,
        table: AcmeTable,
        from: &str,
        to: &AcmeObject,
    ) -> Result<bool, Error> {
        self.apply(StateWrite::Update {
            table,
            from: from.to_string(),
            to: to.clone(),
        })
        .await
    }

    /// The account's latest valid authorization for `identifier` that is
    /// still valid at `until`.
    pub async fn acme_valid_authz(
        &self,
        account_id: &str,
        identifier: &str,
        until: i64,
    ) -> Result<Option<AcmeObject>, Error> {
        if let Some(c) = &self.objects
            && !c.hints.may_exist(account_id, identifier, until)
        {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT id, account_id, status, expires_at, body, created_at FROM acme_authzs \
             WHERE account_id = $1 AND identifier = $2 AND status = 'valid' AND expires_at > $3 \
             ORDER BY expires_at DESC LIMIT 1",
        )
        .bind(account_id)
        .bind(identifier)
        .bind(until)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(object_from_row).transpose()
    }

    /// Identifiers the account holds valid authorizations for at `now`.
    pub async fn acme_authorized_identifiers(
        &self,
        account_id: &str,
        now: i64,
    ) -> Result<Vec<String>, Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT identifier FROM acme_authzs \
             WHERE account_id = $1 AND status = 'valid' AND expires_at > $2",
        )
        .bind(account_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("identifier").map_err(Error::from))
            .collect()
    }

    /// The orders of every account of `requester` (several accounts share
    /// one external account binding), finalized or stored as live at `now`,
    /// that name `cert_id` (an ARI certificate ID) in `replaces`. A stored
    /// `pending` order may have failed since (its status is brought up to
    /// date when it is read).
    pub async fn acme_orders_replacing(
        &self,
        requester: &str,
        cert_id: &str,
        now: i64,
    ) -> Result<Vec<String>, Error> {
        Ok(orders_replacing(&self.pool, requester, cert_id, now, i64::MIN).await?)
    }

    /// The ids of an account's orders, newest first (ids begin with their
    /// creation time), from the first one that sorts before `before` (all
    /// when None); at most `limit`.
    pub async fn acme_order_ids(
        &self,
        account_id: &str,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>, Error> {
        let rows = sqlx::query(
            "SELECT id FROM acme_orders WHERE account_id = $1 AND ($2 IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(account_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("id").map_err(Error::from))
            .collect()
    }

    /// The earliest operator renew-by time among `scopes`.
    pub async fn acme_renewal_hint(&self, scopes: &[String]) -> Result<Option<i64>, Error> {
        let mut best: Option<i64> = None;
        for scope in scopes {
            let row = sqlx::query("SELECT renew_by FROM acme_renewal_hints WHERE scope = $1")
                .bind(scope.as_str())
                .fetch_optional(&self.pool)
                .await?;
            if let Some(r) = row {
                let t: i64 = r.try_get("renew_by")?;
                best = Some(best.map_or(t, |b| b.min(t)));
            }
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::pow2_chunks;

    #[test]
    fn state_chunks_are_powers_of_two_and_cover_everything_in_order() {
        for n in 0..200usize {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = pow2_chunks(&items).collect();
            assert!(
                chunks
                    .iter()
                    .all(|c| c.len().is_power_of_two() && c.len() <= 32),
                "{n}: {:?}",
                chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
            );
            assert_eq!(chunks.concat(), items, "{n}");
        }
        let sizes = |n: usize| {
            pow2_chunks(&vec![0u8; n])
                .map(<[u8]>::len)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(45), vec![32, 8, 4, 1]);
        assert_eq!(sizes(7), vec![4, 2, 1]);
    }
}
