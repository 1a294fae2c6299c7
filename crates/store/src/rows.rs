//! Row types and read queries.

use crate::{Error, Store};
use sqlx::Row;
use sqlx::any::AnyRow;

/// An issuing CA to record at install time.
#[derive(Debug, Clone)]
pub struct NewIssuer {
    /// Issuer id.
    pub id: String,
    /// Certificate DER.
    pub cert_der: Vec<u8>,
    /// Subject text.
    pub subject: String,
    /// Validity start (unix s).
    pub not_before: i64,
    /// Validity end (unix s).
    pub not_after: i64,
    /// Install time (unix s).
    pub installed_at: i64,
    /// Where its key is (a file name in the key directory); `None` for the
    /// configured intermediate key.
    pub key_ref: Option<String>,
}

/// The lifecycle state of an issuing CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IssuerState {
    /// Installed, trusted, not yet issuing.
    Staged,
    /// The one issuer taking new issuance.
    Active,
    /// Replaced; still answers OCSP and publishes CRLs for its certificates.
    Previous,
    /// Its last certificate expired; nothing more is published.
    Retired,
}

impl IssuerState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            IssuerState::Staged => "staged",
            IssuerState::Active => "active",
            IssuerState::Previous => "previous",
            IssuerState::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Result<IssuerState, Error> {
        Ok(match s {
            "staged" => IssuerState::Staged,
            "active" => IssuerState::Active,
            "previous" => IssuerState::Previous,
            "retired" => IssuerState::Retired,
            other => return Err(Error::Corrupt(format!("unknown issuer state '{other}'"))),
        })
    }

    /// Whether relying parties need its OCSP responses and CRLs.
    pub fn serves_revocation(self) -> bool {
        matches!(self, IssuerState::Active | IssuerState::Previous)
    }
}

impl std::fmt::Display for IssuerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored issuing CA.
#[derive(Debug, Clone)]
pub struct IssuerRow {
    /// Issuer id.
    pub id: String,
    /// Certificate DER.
    pub cert_der: Vec<u8>,
    /// Subject text.
    pub subject: String,
    /// Validity start (unix s).
    pub not_before: i64,
    /// Validity end (unix s).
    pub not_after: i64,
    /// Install time (unix s).
    pub installed_at: i64,
    /// Its lifecycle state.
    pub state: IssuerState,
    /// Where its key is (see [`NewIssuer::key_ref`]).
    pub key_ref: Option<String>,
    /// When a staged issuer is due to take over (unix s).
    pub activate_at: Option<i64>,
    /// Last state change (unix s).
    pub changed_at: Option<i64>,
}

/// A certificate to store at issuance.
#[derive(Debug, Clone)]
pub struct NewCertificate {
    /// Serial, lowercase hex.
    pub serial: String,
    /// Issuer id.
    pub issuer_id: String,
    /// Profile name.
    pub profile: String,
    /// Requester (`kind:name`).
    pub requester: String,
    /// Identifiers.
    pub names: Vec<String>,
    /// SHA-256 of the subject public key info.
    pub key_fingerprint: String,
    /// Validity start (unix s).
    pub not_before: i64,
    /// Validity end (unix s).
    pub not_after: i64,
    /// Issue time (unix s).
    pub issued_at: i64,
    /// Certificate DER.
    pub der: Vec<u8>,
    /// The time-sharded CRL its CRL DP names, if any.
    pub crl_shard: Option<i64>,
}

/// A stored certificate.
pub type CertificateRow = NewCertificate;

/// A revocation to record.
#[derive(Debug, Clone)]
pub struct NewRevocation {
    /// Serial, lowercase hex.
    pub serial: String,
    /// Issuer id of the certificate.
    pub issuer_id: String,
    /// RFC 5280 CRLReason code (0-10 except 7).
    pub reason: i32,
    /// Revocation time (unix s).
    pub revoked_at: i64,
    /// Who revoked it (`kind:name`).
    pub revoked_by: String,
    /// For keyCompromise: the key fingerprint to block from ever being
    /// certified again (not stored with the revocation row).
    pub block_key: Option<String>,
}

/// A stored revocation.
pub type RevocationRow = NewRevocation;

/// The revocations a CRL lists: of certificates issued by `$1` (the
/// certificate row's issuer, which its audit record vouches for), expiring
/// after `$2`.
const CRL_ENTRIES: &str = "SELECT r.serial, r.revoked_at, r.reason, c.crl_shard FROM revocations r \
     JOIN certificates c ON c.serial = r.serial \
     WHERE c.issuer_id = $1 AND c.not_after > $2 ORDER BY r.serial";

fn revoked_entry(r: &sqlx::any::AnyRow) -> Result<RevokedEntry, Error> {
    let reason: i64 = r.try_get("reason")?;
    Ok(RevokedEntry {
        serial: r.try_get("serial")?,
        revoked_at: r.try_get("revoked_at")?,
        reason: i32::try_from(reason).map_err(|e| Error::Corrupt(e.to_string()))?,
        crl_shard: r.try_get("crl_shard")?,
    })
}

/// What a CRL publication lists, with the numbers its CRLs get: see
/// [`Store::crl_snapshot`].
#[derive(Debug, Clone)]
pub struct CrlSnapshot {
    /// The first of `1 + shards` consecutive CRL numbers taken.
    pub first_number: i64,
    /// How many shard CRLs to sign besides the full one.
    pub shards: i64,
    /// The revocations to list.
    pub entries: Vec<RevokedEntry>,
}

/// One entry for a CRL.
#[derive(Debug, Clone)]
pub struct RevokedEntry {
    /// Serial, lowercase hex.
    pub serial: String,
    /// Revocation time (unix s).
    pub revoked_at: i64,
    /// CRLReason code.
    pub reason: i32,
    /// The certificate's CRL shard, if it has one.
    pub crl_shard: Option<i64>,
}

/// A pre-signed OCSP response.
#[derive(Debug, Clone)]
pub struct SignedOcsp {
    /// Certificate serial, lowercase hex.
    pub serial: String,
    /// Issuer id.
    pub issuer_id: String,
    /// thisUpdate (unix s).
    pub this_update: i64,
    /// nextUpdate (unix s).
    pub next_update: i64,
    /// The DER OCSPResponse, or with `certs` its bytes before them.
    pub der: Vec<u8>,
    /// The [`OcspCerts`] (by digest) that end the response, stored once for
    /// all the responses of a responder; `None` when `der` is all of it.
    pub certs: Option<String>,
    /// When it was stored (unix s, by the storing node's clock; 0 for
    /// responses stored before this was recorded).
    pub stored_at: i64,
}

/// The end of a responder's OCSP responses: the `certs` field carrying its
/// certificate and its issuer's, the same in every response it signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcspCerts {
    /// Hex SHA-256 of `der` (see [`OcspCerts::new`]).
    pub digest: String,
    /// The encoded field.
    pub der: Vec<u8>,
}

impl OcspCerts {
    /// The field and its digest.
    pub fn new(der: Vec<u8>) -> OcspCerts {
        use sha2::Digest;
        OcspCerts {
            digest: hex::encode(sha2::Sha256::digest(&der)),
            der,
        }
    }
}

/// The shared delegated OCSP responder of an issuer.
#[derive(Clone)]
pub struct OcspSignerRow {
    /// Issuer id.
    pub issuer_id: String,
    /// Serial of the responder certificate, lowercase hex.
    pub serial: String,
    /// The responder certificate.
    pub cert_der: Vec<u8>,
    /// `sealed` (encrypted PKCS#8 in `key_data`) or `pkcs11` (the label of a
    /// token object in `key_data`).
    pub key_kind: String,
    /// The sealed key or the token object label.
    pub key_data: Vec<u8>,
    /// notAfter of the certificate (unix s).
    pub not_after: i64,
    /// When it was made (unix s).
    pub created_at: i64,
}

impl std::fmt::Debug for OcspSignerRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OcspSignerRow")
            .field("issuer_id", &self.issuer_id)
            .field("serial", &self.serial)
            .field("key_kind", &self.key_kind)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A published CRL.
#[derive(Debug, Clone)]
pub struct CrlRow {
    /// Issuer id.
    pub issuer_id: String,
    /// Its time shard; `None` for the issuer's full CRL.
    pub shard: Option<i64>,
    /// CRL number.
    pub number: i64,
    /// thisUpdate (unix s).
    pub this_update: i64,
    /// nextUpdate (unix s).
    pub next_update: i64,
    /// DER.
    pub der: Vec<u8>,
}

/// A bootstrap token spent by an issuance.
#[derive(Debug, Clone)]
pub struct SpentToken {
    /// The token's `jti`.
    pub jti: String,
    /// The token's subject.
    pub subject: String,
    /// When it was used (unix s).
    pub used_at: i64,
    /// When it would have expired (unix s).
    pub expires_at: i64,
    /// The certificate it was spent on (serial, hex).
    pub serial: Option<String>,
}

pub(crate) fn cert_from_row(r: &AnyRow) -> Result<CertificateRow, Error> {
    let names: String = r.try_get("names")?;
    Ok(CertificateRow {
        serial: r.try_get("serial")?,
        issuer_id: r.try_get("issuer_id")?,
        profile: r.try_get("profile")?,
        requester: r.try_get("requester")?,
        names: serde_json::from_str(&names).map_err(|e| Error::Corrupt(e.to_string()))?,
        key_fingerprint: r.try_get("key_fingerprint")?,
        not_before: r.try_get("not_before")?,
        not_after: r.try_get("not_after")?,
        issued_at: r.try_get("issued_at")?,
        der: r.try_get("der")?,
        crl_shard: r.try_get("crl_shard")?,
    })
}

/// The upsert of one CRL: full CRLs in `crls`, shards in `crl_shards`; an
/// older number never replaces a newer one.
fn save_crl_query(crl: &CrlRow) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments> {
    let q = match crl.shard {
        Some(shard) => sqlx::query(
            "INSERT INTO crl_shards (issuer_id, shard, number, this_update, next_update, der) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (issuer_id, shard) DO UPDATE SET \
             number = excluded.number, this_update = excluded.this_update, \
             next_update = excluded.next_update, der = excluded.der \
             WHERE crl_shards.number < excluded.number",
        )
        .bind(crl.issuer_id.as_str())
        .bind(shard),
        None => sqlx::query(
            "INSERT INTO crls (issuer_id, number, this_update, next_update, der) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (issuer_id) DO UPDATE SET number = excluded.number, this_update = excluded.this_update, \
             next_update = excluded.next_update, der = excluded.der WHERE crls.number < excluded.number",
        )
        .bind(crl.issuer_id.as_str()),
    };
    q.bind(crl.number)
        .bind(crl.this_update)
        .bind(crl.next_update)
        .bind(crl.der.as_slice())
}

fn crl_from_row(r: &AnyRow, shard: Option<i64>) -> Result<CrlRow, Error> {
    Ok(CrlRow {
        issuer_id: r.try_get("issuer_id")?,
        shard,
        number: r.try_get("number")?,
        this_update: r.try_get("this_update")?,
        next_update: r.try_get("next_update")?,
        der: r.try_get("der")?,
    })
}

fn issuer_from_row(r: &AnyRow) -> Result<IssuerRow, Error> {
    Ok(IssuerRow {
        id: r.try_get("id")?,
        cert_der: r.try_get("cert_der")?,
        subject: r.try_get("subject")?,
        not_before: r.try_get("not_before")?,
        not_after: r.try_get("not_after")?,
        installed_at: r.try_get("installed_at")?,
        state: IssuerState::parse(&r.try_get::<String, _>("status")?)?,
        key_ref: r.try_get("key_ref")?,
        activate_at: r.try_get("activate_at")?,
        changed_at: r.try_get("changed_at")?,
    })
}

const CERT_COLS: &str = "serial, issuer_id, profile, requester, names, key_fingerprint, not_before, not_after, issued_at, der, crl_shard";

impl Store {
    /// All issuers, newest install first.
    pub async fn issuers(&self) -> Result<Vec<IssuerRow>, Error> {
        let rows = sqlx::query(
            "SELECT id, cert_der, subject, not_before, not_after, installed_at, status, key_ref, activate_at, changed_at \
             FROM issuers ORDER BY installed_at DESC, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(issuer_from_row).collect()
    }

    /// Whether an issuer has a certificate valid after `after` (unix s).
    pub async fn issuer_has_unexpired(&self, issuer_id: &str, after: i64) -> Result<bool, Error> {
        let row = sqlx::query(
            "SELECT serial FROM certificates WHERE not_after > $1 AND issuer_id = $2 LIMIT 1",
        )
        .bind(after)
        .bind(issuer_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// The certificates of a key (by fingerprint) valid after `after` (unix
    /// s) and not revoked: what a keyCompromise revokes with the one named.
    /// It walks the unexpired certificates (by the expiry index): an index
    /// by key would cost every issuance a random-order insert (about 50 µs
    /// of CPU per certificate on SQLite, measured) for this rare question.
    pub async fn unrevoked_of_key(
        &self,
        fingerprint: &str,
        after: i64,
    ) -> Result<Vec<CertificateRow>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CERT_COLS} FROM certificates c WHERE key_fingerprint = $1 AND not_after > $2 \
             AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.serial = c.serial) ORDER BY serial"
        )))
        .bind(fingerprint)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(cert_from_row).collect()
    }

    /// How many of an issuer's certificates are valid after `after` (unix s).
    pub async fn count_unexpired(&self, issuer_id: &str, after: i64) -> Result<i64, Error> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM certificates WHERE not_after > $1 AND issuer_id = $2",
        )
        .bind(after)
        .bind(issuer_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Installed cross-certificates (DER) not expired at `now` (unix s).
    pub async fn cross_certs(&self, now: i64) -> Result<Vec<Vec<u8>>, Error> {
        let rows = sqlx::query(
            "SELECT der FROM cross_certs WHERE not_after > $1 ORDER BY installed_at, id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("der").map_err(Error::from))
            .collect()
    }

    /// One issuer by id.
    pub async fn issuer(&self, id: &str) -> Result<Option<IssuerRow>, Error> {
        let row = sqlx::query(
            "SELECT id, cert_der, subject, not_before, not_after, installed_at, status, key_ref, activate_at, changed_at \
             FROM issuers WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(issuer_from_row).transpose()
    }

    /// One certificate by serial (lowercase hex).
    pub async fn certificate(&self, serial: &str) -> Result<Option<CertificateRow>, Error> {
        if let Some(hit) = self.objects.as_ref().and_then(|c| c.certificate(serial)) {
            return Ok(Some(hit));
        }
        let sql = format!("SELECT {CERT_COLS} FROM certificates WHERE serial = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(cert_from_row).transpose()
    }

    /// Certificates, newest first; `name` filters by an exact identifier in its
    /// normalized form (see `sigil_core::Identifier`).
    pub async fn certificates(
        &self,
        name: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<CertificateRow>, Error> {
        let rows = match name {
            Some(n) => {
                // names is a JSON array of normalized strings; match the quoted
                // element, with LIKE wildcards in the name escaped.
                let quoted = serde_json::to_string(n).unwrap_or_default();
                let escaped: String = quoted
                    .chars()
                    .flat_map(|c| match c {
                        '%' | '_' | '!' => vec!['!', c],
                        c => vec![c],
                    })
                    .collect();
                let pattern = format!("%{escaped}%");
                let sql = format!(
                    "SELECT {CERT_COLS} FROM certificates WHERE names LIKE $1 ESCAPE '!' \
                     ORDER BY issued_at DESC, serial LIMIT $2 OFFSET $3"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(pattern)
                    .bind(limit)
                    .bind(offset)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let sql = format!(
                    "SELECT {CERT_COLS} FROM certificates \
                     ORDER BY issued_at DESC, serial LIMIT $1 OFFSET $2"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(limit)
                    .bind(offset)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(cert_from_row).collect()
    }

    /// The revocation of a certificate, if it is revoked.
    pub async fn revocation(&self, serial: &str) -> Result<Option<RevocationRow>, Error> {
        let row = sqlx::query(
            "SELECT serial, issuer_id, reason, revoked_at, revoked_by FROM revocations WHERE serial = $1",
        )
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> Result<RevocationRow, Error> {
            let reason: i64 = r.try_get("reason")?;
            Ok(RevocationRow {
                serial: r.try_get("serial")?,
                issuer_id: r.try_get("issuer_id")?,
                reason: i32::try_from(reason).map_err(|e| Error::Corrupt(e.to_string()))?,
                revoked_at: r.try_get("revoked_at")?,
                revoked_by: r.try_get("revoked_by")?,
                block_key: None,
            })
        })
        .transpose()
    }

    /// Serials revoked after the revocation recorded by audit row `after_seq`,
    /// with that row's seq, in commit order (0 = from the start).
    pub async fn revoked_after(&self, after_seq: i64) -> Result<Vec<(String, i64)>, Error> {
        let rows = sqlx::query(
            "SELECT serial, audit_seq FROM revocations WHERE audit_seq > $1 ORDER BY audit_seq",
        )
        .bind(after_seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("serial")?, r.try_get("audit_seq")?)))
            .collect()
    }

    /// Serials of an issuer's certificates with notAfter after `after` (unix s).
    pub async fn unexpired_serials(
        &self,
        issuer_id: &str,
        after: i64,
    ) -> Result<Vec<String>, Error> {
        let rows =
            sqlx::query("SELECT serial FROM certificates WHERE issuer_id = $1 AND not_after > $2")
                .bind(issuer_id)
                .bind(after)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| Ok(r.try_get("serial")?)).collect()
    }

    /// Stores pre-signed OCSP responses, replacing older ones of the same
    /// certificates (one transaction; `rows` name each certificate once),
    /// with the [`OcspCerts`] they name (each stored once, and marked used).
    /// Several rows go in each statement, so a pre-signing pass over
    /// millions of certificates makes few round trips to the database; in
    /// serial order, a batch rewrites few pages.
    pub async fn save_ocsp(&self, rows: &[SignedOcsp], certs: &[OcspCerts]) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        let used_at = rows.iter().map(|r| r.stored_at).max().unwrap_or(0);
        for c in certs {
            sqlx::query(
                "INSERT INTO ocsp_certs (digest, der, used_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (digest) DO UPDATE SET used_at = excluded.used_at \
                 WHERE ocsp_certs.used_at < excluded.used_at",
            )
            .bind(c.digest.as_str())
            .bind(c.der.as_slice())
            .bind(used_at)
            .execute(&mut *tx)
            .await?;
        }
        for chunk in rows.chunks(crate::writer::ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "INSERT INTO ocsp_answers (serial, issuer_id, this_update, next_update, der, certs, stored_at) VALUES ",
            );
            crate::writer::push_placeholders(&mut sql, chunk.len(), 7, self.backend);
            sql.push_str(
                " ON CONFLICT (serial) DO UPDATE SET \
                 issuer_id = excluded.issuer_id, this_update = excluded.this_update, \
                 next_update = excluded.next_update, der = excluded.der, certs = excluded.certs, \
                 stored_at = excluded.stored_at \
                 WHERE ocsp_answers.this_update <= excluded.this_update",
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.serial.as_str())
                    .bind(r.issuer_id.as_str())
                    .bind(r.this_update)
                    .bind(r.next_update)
                    .bind(r.der.as_slice())
                    .bind(r.certs.as_deref())
                    .bind(r.stored_at);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Passes each stored OCSP response of an issuer still valid after
    /// `after` (unix s) and stored after `stored_after` (unix s; -1 for all)
    /// to `each`. Streamed: an issuer may have a response for each of
    /// millions of certificates, and they are not all held at once.
    pub async fn stored_ocsp<F: FnMut(SignedOcsp) + Send>(
        &self,
        issuer_id: &str,
        after: i64,
        stored_after: i64,
        mut each: F,
    ) -> Result<(), Error> {
        use tokio_stream::StreamExt;
        let mut rows = sqlx::query(
            "SELECT serial, issuer_id, this_update, next_update, der, certs, stored_at FROM ocsp_answers \
             WHERE issuer_id = $1 AND next_update > $2 AND stored_at > $3",
        )
        .bind(issuer_id)
        .bind(after)
        .bind(stored_after)
        .fetch(&self.pool);
        while let Some(r) = rows.next().await {
            let r = r?;
            each(SignedOcsp {
                serial: r.try_get("serial")?,
                issuer_id: r.try_get("issuer_id")?,
                this_update: r.try_get("this_update")?,
                next_update: r.try_get("next_update")?,
                der: r.try_get("der")?,
                certs: r.try_get("certs")?,
                stored_at: r.try_get("stored_at")?,
            });
        }
        Ok(())
    }

    /// The stored [`OcspCerts`] that answers stored after `used_after`
    /// (unix s) name: those of every answer still valid, with `used_after`
    /// the response validity back.
    pub async fn ocsp_certs(&self, used_after: i64) -> Result<Vec<OcspCerts>, Error> {
        let rows = sqlx::query("SELECT digest, der FROM ocsp_certs WHERE used_at > $1")
            .bind(used_after)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(OcspCerts {
                    digest: r.try_get("digest")?,
                    der: r.try_get("der")?,
                })
            })
            .collect()
    }

    /// Whether a public key (SPKI SHA-256, hex) is blocked after a keyCompromise.
    pub async fn key_blocked(&self, fingerprint: &str) -> Result<bool, Error> {
        Ok(
            sqlx::query("SELECT 1 AS one FROM blocked_keys WHERE fingerprint = $1")
                .bind(fingerprint)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// How many keys are blocked (the table only grows).
    pub async fn blocked_key_count(&self) -> Result<i64, Error> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM blocked_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Every blocked key fingerprint.
    pub async fn blocked_keys(&self) -> Result<Vec<String>, Error> {
        let rows = sqlx::query("SELECT fingerprint FROM blocked_keys")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("fingerprint")?)).collect()
    }

    /// Revocations of an issuer's certificates that expire after `not_after_min`
    /// (unix s), for its CRL, in serial order.
    pub async fn crl_entries(
        &self,
        issuer_id: &str,
        not_after_min: i64,
    ) -> Result<Vec<RevokedEntry>, Error> {
        use tokio_stream::StreamExt;
        // Streamed: a CRL may list millions; rows are not all held at once.
        let mut rows = sqlx::query(CRL_ENTRIES)
            .bind(issuer_id)
            .bind(not_after_min)
            .fetch(&self.pool);
        let mut out = Vec::new();
        while let Some(r) = rows.next().await {
            out.push(revoked_entry(&r?)?);
        }
        Ok(out)
    }

    /// The highest CRL shard any certificate of an issuer names (shards stay
    /// published while such certificates may exist, whatever the settings
    /// say now).
    pub async fn max_crl_shard(&self, issuer_id: &str) -> Result<Option<i64>, Error> {
        let row = sqlx::query("SELECT MAX(crl_shard) AS m FROM certificates WHERE issuer_id = $1")
            .bind(issuer_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("m")?)
    }

    /// Reads what an issuer's next CRLs list and takes their numbers, as one
    /// step: a CRL with a higher number never lists less than one with a
    /// lower (a revocation committed while another node was reading is in
    /// the later snapshot). Lists revocations of certificates expiring after
    /// `not_after_min`; signs `max(configured_shards, shards any stored
    /// certificate names)` shard CRLs, at most `max_shards`.
    ///
    /// On PostgreSQL the issuer's `crl_numbers` row stays locked from the
    /// read to the numbering, so other nodes' snapshots wait; this process's
    /// snapshots take turns (SQLite has no other process).
    pub async fn crl_snapshot(
        &self,
        issuer_id: &str,
        not_after_min: i64,
        configured_shards: i64,
        max_shards: i64,
    ) -> Result<CrlSnapshot, Error> {
        let _turn = self.crl_turn.lock().await;
        if self.backend == crate::Backend::Sqlite {
            // Not in a write transaction: that would hold up every commit
            // while a long list is read. Nothing else numbers CRLs.
            let named = self.max_crl_shard(issuer_id).await?.map_or(0, |m| m + 1);
            let shards = configured_shards.max(named).min(max_shards);
            let entries = self.crl_entries(issuer_id, not_after_min).await?;
            let first_number = self.next_crl_numbers(issuer_id, 1 + shards).await?;
            return Ok(CrlSnapshot {
                first_number,
                shards,
                entries,
            });
        }
        let mut tx = self.pool.begin().await?;
        // Whatever the server's default: each statement must see what was
        // committed before it began (below). And a node that cannot get the
        // row in a minute gives up and retries, rather than waiting for ever.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL lock_timeout = '60s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO crl_numbers (issuer_id, last) VALUES ($1, 0) ON CONFLICT (issuer_id) DO NOTHING",
        )
        .bind(issuer_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT last FROM crl_numbers WHERE issuer_id = $1 FOR UPDATE")
            .bind(issuer_id)
            .fetch_one(&mut *tx)
            .await?;
        // Each statement below sees what was committed before it began
        // (READ COMMITTED), so after the lock: everything the previous
        // snapshot saw, and more.
        let named: Option<i64> =
            sqlx::query("SELECT MAX(crl_shard) AS m FROM certificates WHERE issuer_id = $1")
                .bind(issuer_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("m")?;
        let shards = configured_shards
            .max(named.map_or(0, |m| m + 1))
            .min(max_shards);
        let entries = {
            use tokio_stream::StreamExt;
            let mut rows = sqlx::query(CRL_ENTRIES)
                .bind(issuer_id)
                .bind(not_after_min)
                .fetch(&mut *tx);
            let mut out = Vec::new();
            while let Some(r) = rows.next().await {
                out.push(revoked_entry(&r?)?);
            }
            out
        };
        let last: i64 = sqlx::query(
            "UPDATE crl_numbers SET last = last + $2 WHERE issuer_id = $1 RETURNING last",
        )
        .bind(issuer_id)
        .bind(1 + shards)
        .fetch_one(&mut *tx)
        .await?
        .try_get("last")?;
        tx.commit().await?;
        Ok(CrlSnapshot {
            first_number: last - shards,
            shards,
            entries,
        })
    }

    /// Takes the next CRL number for an issuer (atomically; numbers only grow,
    /// whichever node asks).
    pub async fn next_crl_number(&self, issuer_id: &str) -> Result<i64, Error> {
        self.next_crl_numbers(issuer_id, 1).await
    }

    /// Takes `count` consecutive CRL numbers for an issuer at once; returns
    /// the first.
    pub async fn next_crl_numbers(&self, issuer_id: &str, count: i64) -> Result<i64, Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO crl_numbers (issuer_id, last) VALUES ($1, 0) ON CONFLICT (issuer_id) DO NOTHING",
        )
        .bind(issuer_id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "UPDATE crl_numbers SET last = last + $2 WHERE issuer_id = $1 RETURNING last",
        )
        .bind(issuer_id)
        .bind(count.max(1))
        .fetch_one(&mut *tx)
        .await?;
        let n: i64 = row.try_get("last")?;
        tx.commit().await?;
        Ok(n - count.max(1) + 1)
    }

    /// Stores a CRL unless a newer one (higher number) is already stored.
    pub async fn save_crl(&self, crl: &CrlRow) -> Result<(), Error> {
        save_crl_query(crl).execute(&self.pool).await?;
        Ok(())
    }

    /// Stores an issuer's CRLs (full and shards) in one transaction, each
    /// unless a newer one is already stored.
    pub async fn save_crls(&self, crls: &[CrlRow]) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        for crl in crls {
            save_crl_query(crl).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The shared OCSP responder of an issuer, if one was stored.
    pub async fn ocsp_signer(&self, issuer_id: &str) -> Result<Option<OcspSignerRow>, Error> {
        let row = sqlx::query(
            "SELECT issuer_id, serial, cert_der, key_kind, key_data, not_after, created_at \
             FROM ocsp_signers WHERE issuer_id = $1",
        )
        .bind(issuer_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> Result<OcspSignerRow, Error> {
            Ok(OcspSignerRow {
                issuer_id: r.try_get("issuer_id")?,
                serial: r.try_get("serial")?,
                cert_der: r.try_get("cert_der")?,
                key_kind: r.try_get("key_kind")?,
                key_data: r.try_get("key_data")?,
                not_after: r.try_get("not_after")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    /// The newest stored CRL of an issuer.
    pub async fn latest_crl(&self, issuer_id: &str) -> Result<Option<CrlRow>, Error> {
        let row = sqlx::query(
            "SELECT issuer_id, number, this_update, next_update, der FROM crls WHERE issuer_id = $1",
        )
        .bind(issuer_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| crl_from_row(&r, None)).transpose()
    }

    /// The newest stored CRL of one shard of an issuer.
    pub async fn shard_crl(&self, issuer_id: &str, shard: i64) -> Result<Option<CrlRow>, Error> {
        let row = sqlx::query(
            "SELECT issuer_id, number, this_update, next_update, der FROM crl_shards \
             WHERE issuer_id = $1 AND shard = $2",
        )
        .bind(issuer_id)
        .bind(shard)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| crl_from_row(&r, Some(shard))).transpose()
    }

    /// The numbers of an issuer's newest stored CRLs, without their DER:
    /// `(None, n)` for the full CRL, `(Some(k), n)` for shard `k`.
    pub async fn crl_versions(&self, issuer_id: &str) -> Result<Vec<(Option<i64>, i64)>, Error> {
        let mut out = Vec::new();
        if let Some(r) = sqlx::query("SELECT number FROM crls WHERE issuer_id = $1")
            .bind(issuer_id)
            .fetch_optional(&self.pool)
            .await?
        {
            out.push((None, r.try_get("number")?));
        }
        let shards =
            sqlx::query("SELECT shard, number FROM crl_shards WHERE issuer_id = $1 ORDER BY shard")
                .bind(issuer_id)
                .fetch_all(&self.pool)
                .await?;
        for r in shards {
            out.push((Some(r.try_get("shard")?), r.try_get("number")?));
        }
        Ok(out)
    }

    /// The newest stored CRL of every shard of an issuer, by shard.
    pub async fn shard_crls(&self, issuer_id: &str) -> Result<Vec<CrlRow>, Error> {
        let rows = sqlx::query(
            "SELECT issuer_id, shard, number, this_update, next_update, der FROM crl_shards \
             WHERE issuer_id = $1 ORDER BY shard",
        )
        .bind(issuer_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| crl_from_row(r, Some(r.try_get("shard")?)))
            .collect()
    }

    /// Whether a bootstrap token id has been spent.
    pub async fn token_spent(&self, jti: &str) -> Result<bool, Error> {
        Ok(
            sqlx::query("SELECT 1 AS one FROM used_tokens WHERE jti = $1")
                .bind(jti)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// The certificate a spent bootstrap token was spent on (serial, hex);
    /// `None` if the token is unspent or was spent before serials were kept.
    pub async fn token_certificate(&self, jti: &str) -> Result<Option<String>, Error> {
        let row = sqlx::query("SELECT serial FROM used_tokens WHERE jti = $1")
            .bind(jti)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<Option<String>, _>("serial")?,
            None => None,
        })
    }

    /// Number of stored certificates.
    pub async fn certificate_count(&self) -> Result<i64, Error> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM certificates")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> Result<(), Error> {
        let started = std::time::Instant::now();
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        metrics::histogram!("sigil_db_query_seconds", "op" => "ping")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }
}
