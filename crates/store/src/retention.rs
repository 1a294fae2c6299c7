//! Rows that outlive their use: ACME orders and authorizations, spent
//! bootstrap tokens, pre-signed OCSP responses and their responders'
//! certificates, deleted in small batches
//! some time after they expired (the job node's retention pass).
//! Certificates, revocations, CRLs, accounts and the audit table are never
//! deleted.

use crate::{Error, Store};

/// A kind of row the retention pass deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expired {
    /// ACME orders, by their `expires` (a finalized order that replaced a
    /// certificate expires with that certificate, so ARI's "replaced once"
    /// holds while it matters).
    AcmeOrders,
    /// ACME authorizations, by their `expires`. An order still in use that
    /// names a deleted one (only when orders live longer than reused
    /// authorizations) becomes invalid.
    AcmeAuthzs,
    /// Spent bootstrap-token ids, by the token's expiry (an expired token
    /// is refused before its id is looked up).
    UsedTokens,
    /// Pre-signed OCSP responses stored whole, as versions before
    /// `ocsp_answers` did (no longer written), by their nextUpdate.
    OcspResponses,
    /// Pre-signed OCSP answers, by their nextUpdate. Answers are re-signed
    /// until the certificate expires, so an old nextUpdate means an expired
    /// certificate (or an issuer no longer served).
    OcspAnswers,
    /// The responder certificates stored answers name, by when answers
    /// naming them were last stored. Pass a cutoff at least the response
    /// validity back: every answer still valid was stored since.
    OcspCerts,
}

impl Expired {
    /// Every kind, in the order the pass takes them (orders before the
    /// authorizations they name).
    pub const ALL: [Expired; 6] = [
        Expired::AcmeOrders,
        Expired::AcmeAuthzs,
        Expired::UsedTokens,
        Expired::OcspResponses,
        Expired::OcspAnswers,
        Expired::OcspCerts,
    ];

    /// The table (also the metric label).
    pub fn table(self) -> &'static str {
        match self {
            Expired::AcmeOrders => "acme_orders",
            Expired::AcmeAuthzs => "acme_authzs",
            Expired::UsedTokens => "used_tokens",
            Expired::OcspResponses => "ocsp_responses",
            Expired::OcspAnswers => "ocsp_answers",
            Expired::OcspCerts => "ocsp_certs",
        }
    }

    /// Deletes up to `$2` rows that expired before `$1`. Each finds its rows
    /// by an index: authorizations by creation time (never after their
    /// expiry), responses per issuer by nextUpdate, the others by expiry.
    fn sql(self) -> &'static str {
        match self {
            Expired::AcmeOrders => {
                // Kept: finalized replacements from before `replaced_until`
                // was recorded (their expiry was never moved).
                "DELETE FROM acme_orders WHERE id IN (SELECT id FROM acme_orders \
                 WHERE expires_at < $1 AND NOT (status = 'valid' \
                 AND body LIKE '%\"replaces\":%' AND body NOT LIKE '%\"replaced_until\":%') \
                 LIMIT $2)"
            }
            Expired::AcmeAuthzs => {
                "DELETE FROM acme_authzs WHERE id IN (SELECT id FROM acme_authzs \
                 WHERE created_at < $1 AND expires_at < $1 LIMIT $2)"
            }
            Expired::UsedTokens => {
                "DELETE FROM used_tokens WHERE jti IN (SELECT jti FROM used_tokens \
                 WHERE expires_at < $1 LIMIT $2)"
            }
            Expired::OcspResponses => {
                // CROSS JOIN: SQLite then takes the (few) issuers first and
                // each one's responses by index, instead of scanning them all.
                "DELETE FROM ocsp_responses WHERE serial IN (SELECT o.serial FROM issuers i \
                 CROSS JOIN ocsp_responses o WHERE o.issuer_id = i.id AND o.next_update < $1 LIMIT $2)"
            }
            Expired::OcspAnswers => {
                "DELETE FROM ocsp_answers WHERE serial IN (SELECT o.serial FROM issuers i \
                 CROSS JOIN ocsp_answers o WHERE o.issuer_id = i.id AND o.next_update < $1 LIMIT $2)"
            }
            Expired::OcspCerts => {
                // `used_at` again outside the subquery: on PostgreSQL a row
                // that answers stored meanwhile marked used (and locked) is
                // checked again after the wait, and kept.
                "DELETE FROM ocsp_certs WHERE used_at < $1 AND digest IN \
                 (SELECT digest FROM ocsp_certs WHERE used_at < $1 LIMIT $2)"
            }
        }
    }
}

impl Store {
    /// Deletes at most `limit` rows of one kind that expired before `before`
    /// (unix s); returns how many went. Call again until fewer than `limit`
    /// go: each call is one short transaction, so writers wait little.
    pub async fn delete_expired(
        &self,
        what: Expired,
        before: i64,
        limit: u32,
    ) -> Result<u64, Error> {
        let deleted = sqlx::query(what.sql())
            .bind(before)
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?
            .rows_affected();
        if deleted > 0
            && matches!(what, Expired::AcmeOrders | Expired::AcmeAuthzs)
            && let Some(c) = &self.objects
        {
            c.forget_expired(before);
        }
        Ok(deleted)
    }
}
