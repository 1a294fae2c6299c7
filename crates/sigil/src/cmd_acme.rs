//! `sigil acme ...`: external-account-binding keys and ARI renewal deadlines.

use crate::cli::{AcmeCmd, EabCmd};
use crate::cmd_ca::operator_name;
use crate::config::Config;
use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::json;
use sigil_core::Clock as _;
use sigil_store::{AcmeWrite, AuditEvent, Change, EabKey, Store};
use std::process::ExitCode;

/// Runs a `sigil acme` command.
pub async fn acme(cmd: AcmeCmd) -> Result<ExitCode> {
    match cmd {
        AcmeCmd::Eab(EabCmd::Create {
            config,
            requester,
            operator,
        }) => eab_create(&config, requester.as_deref(), operator.as_deref()).await,
        AcmeCmd::Ari {
            config,
            serial,
            issuer,
            renew_by,
            operator,
        } => ari(&config, serial, issuer, &renew_by, operator.as_deref()).await,
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

async fn eab_create(
    config: &std::path::Path,
    requester: Option<&str>,
    operator: Option<&str>,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let mut id = [0u8; 12];
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    sigil_signer::random_bytes(&mut id)?;
    sigil_signer::random_bytes(key.as_mut())?;
    let kid = B64.encode(id);
    let requester = requester.unwrap_or(&kid).to_string();
    if !valid_name(&requester) {
        bail!(
            "--requester '{requester}' must be 1-128 letters, digits, '-', '_' or '.'; policies then name it eab:{requester}"
        );
    }
    let now = sigil_core::SystemClock.now();
    let store = Store::open_existing(&cfg.database_url()).await?;
    let result = store
        .commit(Change::Acme {
            write: AcmeWrite::NewEabKey(EabKey {
                kid: kid.clone(),
                hmac_key: key.to_vec(),
                requester: requester.clone(),
                created_at: now.unix_timestamp(),
                account_id: None,
            }),
            event: AuditEvent {
                ts_ms: now.unix_timestamp() * 1000,
                kind: "acme.eab.created".into(),
                actor: format!("operator:{}", operator_name(operator)),
                subject: kid.clone(),
                detail: json!({"requester": format!("eab:{requester}")}),
            },
        })
        .await;
    store.close().await;
    result?;
    println!("EAB key id:   {kid}");
    println!("EAB HMAC key: {}", B64.encode(key.as_ref()));
    eprintln!(
        "binds one ACME account; its orders are decided by policy as requester eab:{requester}. \
         Give both values to the client (certbot --eab-kid/--eab-hmac-key, lego --eab --kid/--hmac, cert-manager externalAccountBinding)."
    );
    Ok(ExitCode::SUCCESS)
}

/// `TIME` as RFC 3339, or a duration from now (`6h`).
pub(crate) fn parse_when(
    flag: &str,
    s: &str,
    now: time::OffsetDateTime,
) -> Result<time::OffsetDateTime> {
    if s.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t);
    }
    let d = sigil_core::lifetime::parse_duration(s).with_context(|| {
        format!("{flag} '{s}' is neither an RFC 3339 time (2026-12-01T00:00:00Z), a duration from now (6h), nor `now`")
    })?;
    Ok(now + d)
}

/// A renewal deadline (`--renew-by`, `--renew-all-by`): as [`parse_when`],
/// but not in the past (a mistyped year would ask every client to renew at
/// once).
pub(crate) fn parse_deadline(
    flag: &str,
    s: &str,
    now: time::OffsetDateTime,
) -> Result<time::OffsetDateTime> {
    let when = parse_when(flag, s, now)?;
    if when < now - time::Duration::minutes(1) {
        bail!(
            "{flag} {s} is in the past (it is now {now}); give a later time, or `now` to ask for renewal at once"
        );
    }
    Ok(when)
}

async fn ari(
    config: &std::path::Path,
    serial: Option<String>,
    issuer: Option<String>,
    renew_by: &str,
    operator: Option<&str>,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let now = sigil_core::SystemClock.now();
    let when = parse_deadline("--renew-by", renew_by, now)?;
    let store = Store::open_existing(&cfg.database_url()).await?;
    let scope = match (serial, issuer) {
        (Some(s), None) => {
            let serial = sigil_core::Serial::parse_hex(&s)
                .with_context(|| format!("--serial '{s}' is not a hex serial"))?
                .to_hex();
            if store.certificate(&serial).await?.is_none() {
                bail!("no certificate with serial {serial} (see `sigil cert list`)");
            }
            format!("serial:{serial}")
        }
        (None, Some(i)) => {
            if store.issuer(&i).await?.is_none() {
                bail!(
                    "no issuer with id {i} (the id is in `sigil serve`'s banner and /ca/<id>.crt)"
                );
            }
            format!("issuer:{i}")
        }
        _ => bail!("pass exactly one of --serial or --issuer"),
    };
    let result = store
        .commit(Change::Acme {
            write: AcmeWrite::RenewalHint {
                scope: scope.clone(),
                renew_by: when.unix_timestamp(),
                set_at: now.unix_timestamp(),
            },
            event: AuditEvent {
                ts_ms: now.unix_timestamp() * 1000,
                kind: "acme.ari.renew_by".into(),
                actor: format!("operator:{}", operator_name(operator)),
                subject: scope.clone(),
                detail: json!({"renew_by": when.unix_timestamp()}),
            },
        })
        .await;
    store.close().await;
    result?;
    println!("ACME clients using ARI will be asked to renew {scope} by {when}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed expectation is a failure
    use super::parse_when;

    #[test]
    fn times_are_rfc3339_durations_or_now() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_795_521_600).unwrap();
        assert_eq!(parse_when("--at", "now", now).unwrap(), now);
        assert_eq!(
            parse_when("--at", "6h", now).unwrap(),
            now + time::Duration::hours(6)
        );
        assert_eq!(
            parse_when("--at", "2026-12-01T00:00:00Z", now).unwrap(),
            time::OffsetDateTime::from_unix_timestamp(1_796_083_200).unwrap()
        );
        let e = parse_when("--at", "soon", now).unwrap_err().to_string();
        assert!(e.contains("`now`"), "{e}");
    }
}
