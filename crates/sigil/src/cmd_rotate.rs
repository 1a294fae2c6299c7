//! Intermediate rotation with overlap: `sigil intermediate rotate`,
//! `install --stage` and `activate`.
//!
//! A next key in a file lives in the key directory as `intermediate-next.key`
//! until its certificate is staged; then it is renamed
//! `intermediate-<issuer id>.key` and the database records that name, so
//! every node sharing the database finds it in its own key directory. A next
//! key in a PKCS#11 token is remembered in `intermediate-next.ref` (its URI)
//! until staged; the database then records the URI.

use crate::cmd_acme::parse_when;
use crate::cmd_ca::{check_intermediate, operator_name, write_public};
use crate::config::Config;
use crate::keys::{KeyLocation, KeyStore, key_dir, parse_location};
use anyhow::{Context, Result, bail};
use serde_json::json;
use sigil_authority::{IssuerRow, IssuerState, pem};
use sigil_core::dn::parse_subject;
use sigil_core::{Clock, IssuerInfo, KeySpec, SystemClock};
use sigil_store::{AcmeWrite, AuditEvent, Change, Store};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const NEXT_KEY: &str = "intermediate-next.key";
const NEXT_REF: &str = "intermediate-next.ref";

fn next_key_path(cfg: &Config) -> PathBuf {
    key_dir(cfg).join(NEXT_KEY)
}

fn next_ref_path(cfg: &Config) -> PathBuf {
    key_dir(cfg).join(NEXT_REF)
}

/// The key a rotation made that no certificate has claimed yet.
pub(crate) fn pending_key(cfg: &Config) -> Result<Option<KeyLocation>> {
    let file = next_key_path(cfg);
    if file.exists() {
        return Ok(Some(KeyLocation::File(file)));
    }
    let marker = next_ref_path(cfg);
    if marker.exists() {
        let uri = std::fs::read_to_string(&marker)
            .with_context(|| format!("cannot read {}", marker.display()))?;
        return Ok(Some(parse_location(uri.trim(), Path::to_path_buf)?));
    }
    Ok(None)
}

async fn active_issuer(store: &Store) -> Result<Option<IssuerRow>> {
    Ok(store
        .issuers()
        .await?
        .into_iter()
        .find(|r| r.state == IssuerState::Active))
}

/// The least validity an intermediate must have left when it is installed
/// or takes over issuance: one about to expire would leave the CA without
/// an issuer (leaf certificates are cut to their issuer's notAfter).
pub const MIN_ISSUER_LEFT: time::Duration = time::Duration::days(1);

/// Refuses while an issuer is staged: one rotation at a time, and two staged
/// issuers could not be activated.
async fn refuse_while_staged(store: &Store, what: &str) -> Result<()> {
    if let Some(r) = store
        .issuers()
        .await?
        .into_iter()
        .find(|r| r.state == IssuerState::Staged)
    {
        bail!(
            "issuer {} ({}) is staged and not yet active: activate it (`sigil intermediate activate`) \
             or withdraw it (`sigil intermediate unstage`) before you {what}",
            r.id,
            r.subject
        );
    }
    Ok(())
}

/// `sigil intermediate unstage`: withdraws the staged issuer (it leaves the
/// trust bundle; it never issued). Its key stays where it is.
pub async fn unstage(config: &Path, operator: Option<&str>) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let store = Store::open_existing(&cfg.database_url()).await?;
    let result = unstage_in(&store, operator).await;
    store.close().await;
    for (id, key_ref) in result? {
        println!(
            "issuer {id} is withdrawn: it leaves the trust bundle within seconds and will not issue"
        );
        if let Some(k) = key_ref {
            println!("its key ({k}) was left in place; delete it once you no longer need it");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn unstage_in(
    store: &Store,
    operator: Option<&str>,
) -> Result<Vec<(String, Option<String>)>> {
    let staged: Vec<IssuerRow> = store
        .issuers()
        .await?
        .into_iter()
        .filter(|r| r.state == IssuerState::Staged)
        .collect();
    if staged.is_empty() {
        bail!("no intermediate is staged; nothing to withdraw");
    }
    let actor = format!("operator:{}", operator_name(operator));
    let mut out = Vec::new();
    for r in staged {
        sigil_authority::issuers::unstage(store, &r.id, &actor, SystemClock.now()).await?;
        out.push((r.id, r.key_ref));
    }
    Ok(out)
}

/// `sigil intermediate rotate`: the next key and its CSR.
pub async fn rotate(
    config: &Path,
    key: Option<String>,
    key_type: Option<String>,
    subject: Option<String>,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let out = out.unwrap_or_else(|| cfg.resolve(Path::new("intermediate-next.csr")));
    if let Some(pending) = pending_key(&cfg)? {
        let marker = match &pending {
            KeyLocation::File(p) => p.clone(),
            KeyLocation::Token(_) => next_ref_path(&cfg),
        };
        bail!(
            "a rotation is already under way: the key in {pending} has no certificate yet. Have its \
             CSR signed offline and run `sigil intermediate install --stage`, or remove {} to start over",
            marker.display()
        );
    }
    let location = match &key {
        Some(k) => match parse_location(k, |p| cfg.resolve(p)).context("--key")? {
            KeyLocation::File(_) => bail!(
                "--key takes a pkcs11: URI; a file key is always made as {}",
                next_key_path(&cfg).display()
            ),
            token => token,
        },
        None => KeyLocation::File(next_key_path(&cfg)),
    };
    let store = Store::open_existing(&cfg.database_url()).await?;
    // A token key is found again through this marker: written first, so a
    // key is never made that nothing points at (and removed if the rotation
    // does not start).
    let marker = match (&location, &key) {
        (KeyLocation::Token(_), Some(uri)) => {
            let path = next_ref_path(&cfg);
            if let Err(e) = write_public(&path, &format!("{uri}\n")) {
                store.close().await;
                return Err(e);
            }
            Some(path)
        }
        _ => None,
    };
    let result = rotate_in(&cfg, &store, &location, key_type, subject, &out).await;
    store.close().await;
    if let Err(e) = result {
        if let Some(m) = &marker {
            let _ = std::fs::remove_file(m);
        }
        return Err(e);
    }
    match &location {
        KeyLocation::File(p) => {
            println!(
                "next intermediate key (encrypted, 0600, not active): {}",
                p.display()
            )
        }
        token => println!("next intermediate key (in the token, not active): {token}"),
    }
    println!("CSR: {}", out.display());
    println!(
        "next: on the offline root host run `sigil root sign --dir ROOT --csr {} --out next.crt`,",
        out.display()
    );
    println!(
        "      then `sigil intermediate install --config {} --stage --cert next.crt`",
        config.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn rotate_in(
    cfg: &Config,
    store: &Store,
    location: &KeyLocation,
    key_type: Option<String>,
    subject: Option<String>,
    out: &Path,
) -> Result<()> {
    refuse_while_staged(store, "start another rotation").await?;
    let current = active_issuer(store).await?;
    let current_info = current
        .as_ref()
        .map(|r| IssuerInfo::from_der(&r.cert_der))
        .transpose()?;
    let spec: KeySpec = match (&key_type, &current_info) {
        (Some(k), _) => k.parse()?,
        (None, Some(info)) => info
            .public_key
            .key_type()
            .to_string()
            .parse()
            .unwrap_or(KeySpec::EcdsaP256),
        (None, None) => KeySpec::EcdsaP256,
    };
    let subject_text = match (&subject, &current_info) {
        (Some(s), _) => s.clone(),
        (None, Some(info)) => info.subject.clone(),
        (None, None) => "CN=Sigil Issuing CA".into(),
    };
    let dn = parse_subject(&subject_text)
        .with_context(|| format!("subject '{subject_text}': pass --subject \"CN=...,O=...\""))?;
    let keys = KeyStore::new(cfg)?;
    if let Some(r) = &current {
        // The same secrets protect every issuer key: prove they open the
        // current one before making a key only they could open.
        let at = keys.location(r)?;
        keys.open(&at)
            .with_context(|| format!("cannot open the current intermediate key ({at})"))?;
    }
    let new_key = keys.generate(location, spec)?;
    let csr = sigil_signer::intermediate_csr(&new_key, dn)?;
    if let Err(e) = write_public(out, &pem("CERTIFICATE REQUEST", &csr)) {
        return Err(crate::cmd_ca::drop_unused_key(location, e));
    }
    let now = SystemClock.now();
    let recorded = store
        .commit(Change::Record(AuditEvent {
            ts_ms: now.unix_timestamp() * 1000,
            kind: "issuer.key_generated".into(),
            actor: format!("operator:{}", operator_name(None)),
            subject: location.to_string(),
            detail: json!({
                "key_type": spec.to_string(),
                "subject": subject_text,
                "csr_sha256": sigil_core::sha256_hex(&csr),
            }),
        }))
        .await;
    if let Err(e) = recorded {
        // No rotation goes ahead with a key the audit log does not know.
        let _ = std::fs::remove_file(out);
        let e = anyhow::Error::new(e);
        return Err(match location {
            KeyLocation::File(p) if std::fs::remove_file(p).is_ok() => e.context(format!(
                "the new key could not be recorded in the audit log, so it ({}) and its CSR were removed: run again once the database accepts writes",
                p.display()
            )),
            _ => e.context(format!(
                "the new key ({location}) could not be recorded in the audit log; its CSR was removed: delete the key, then run again"
            )),
        });
    }
    Ok(())
}

/// `sigil intermediate install --stage`: the certificate for the next key.
pub async fn install_staged(config: &Path, cert: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let Some(pending) = pending_key(&cfg)? else {
        bail!(
            "no key is waiting for a certificate (neither {} nor {} exists): start with `sigil intermediate rotate`",
            next_key_path(&cfg).display(),
            next_ref_path(&cfg).display()
        );
    };
    let bytes = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let key = KeyStore::new(&cfg)?.open(&pending)?;
    let (info, root) = check_intermediate(&cfg, &bytes, &key, &pending.to_string())?;
    drop(key);
    let store = Store::open_existing(&cfg.database_url()).await?;
    if store
        .issuer(info.id.as_str())
        .await?
        .is_some_and(|r| r.state != IssuerState::Retired)
    {
        store.close().await;
        bail!("issuer {} is already installed", info.id);
    }
    if let Err(e) = refuse_while_staged(&store, "stage another").await {
        store.close().await;
        return Err(e);
    }
    let now = SystemClock.now();
    let actor = format!("operator:{}", operator_name(None));
    let (key_ref, shown) = match &pending {
        KeyLocation::File(next) => {
            let key_name = format!("intermediate-{}.key", info.id);
            let dest = next.with_file_name(&key_name);
            // The key takes its final name before the database names it, so
            // a node that sees the staged row finds the key.
            if let Err(e) = std::fs::rename(next, &dest) {
                store.close().await;
                return Err(e).with_context(|| {
                    format!("cannot move {} to {}", next.display(), dest.display())
                });
            }
            (key_name, dest.display().to_string())
        }
        KeyLocation::Token(_) => {
            let uri = std::fs::read_to_string(next_ref_path(&cfg))?
                .trim()
                .to_string();
            (uri, pending.to_string())
        }
    };
    let staged = sigil_authority::issuers::stage(&store, &info, key_ref.clone(), &actor, now).await;
    store.close().await;
    match (&staged, &pending) {
        (Err(_), KeyLocation::File(next)) => {
            // Nothing refers to the renamed key: put it back for a retry.
            let _ = std::fs::rename(key_dir(&cfg).join(&key_ref), next);
        }
        (Ok(_), KeyLocation::Token(_)) => {
            let _ = std::fs::remove_file(next_ref_path(&cfg));
        }
        _ => {}
    }
    staged?;
    println!("staged issuer {} ({})", info.id, info.subject);
    println!("chains to:  {}", root.subject);
    println!("expires:    {}", info.not_after);
    println!("key:        {shown}");
    println!(
        "It is in the trust bundle (/roots.pem, gRPC GetTrustBundle) from now on; nothing issues from it yet."
    );
    println!(
        "next: `sigil intermediate activate --config {} [--at TIME] [--renew-all-by TIME]`",
        config.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `sigil intermediate activate`.
pub async fn activate(
    config: &Path,
    at: Option<String>,
    renew_all_by: Option<String>,
    operator: Option<&str>,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let now = SystemClock.now();
    let at = at.map(|s| parse_when("--at", &s, now)).transpose()?;
    let renew_by = renew_all_by
        .map(|s| crate::cmd_acme::parse_deadline("--renew-all-by", &s, now))
        .transpose()?;
    if let (Some(by), Some(at)) = (renew_by, at)
        && by < at
    {
        bail!(
            "--renew-all-by ({by}) is before --at ({at}): clients cannot renew onto an issuer that is not active yet"
        );
    }
    let store = Store::open_existing(&cfg.database_url()).await?;
    let result = activate_in(&cfg, &store, at, renew_by, operator, now).await;
    store.close().await;
    result
}

async fn activate_in(
    cfg: &Config,
    store: &Store,
    at: Option<time::OffsetDateTime>,
    renew_by: Option<time::OffsetDateTime>,
    operator: Option<&str>,
    now: time::OffsetDateTime,
) -> Result<ExitCode> {
    let rows = store.issuers().await?;
    let staged: Vec<&IssuerRow> = rows
        .iter()
        .filter(|r| r.state == IssuerState::Staged)
        .collect();
    let target = match staged.as_slice() {
        [one] => *one,
        [] if pending_key(cfg)?.is_some() => bail!(
            "the next key has no certificate yet: have {} signed offline (`sigil root sign`), \
             then run `sigil intermediate install --stage`",
            cfg.resolve(Path::new("intermediate-next.csr")).display()
        ),
        [] => bail!("no intermediate is staged: start a rotation with `sigil intermediate rotate`"),
        many => bail!(
            "{} intermediates are staged ({}); this should not happen: check `sigil status`",
            many.len(),
            many.iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let takes_over = at.unwrap_or(now);
    if target.not_after - takes_over.unix_timestamp() < MIN_ISSUER_LEFT.whole_seconds() {
        bail!(
            "issuer {} expires at {}, less than {} after it would take over: have the root sign a longer-lived certificate for its key, or withdraw it (`sigil intermediate unstage`)",
            target.id,
            time::OffsetDateTime::from_unix_timestamp(target.not_after)
                .map_or_else(|_| target.not_after.to_string(), |t| t.to_string()),
            sigil_core::lifetime::format_duration(MIN_ISSUER_LEFT.unsigned_abs()),
        );
    }
    if target.not_before > takes_over.unix_timestamp() {
        bail!(
            "issuer {} is not valid until {}: activate it at or after that time",
            target.id,
            target.not_before
        );
    }
    // The server loads the key when it activates; catch a bad key now.
    let keys = KeyStore::new(cfg)?;
    keys.open(&keys.location(target)?)
        .context("the staged issuer's key cannot be loaded")?;
    let actor = format!("operator:{}", operator_name(operator));
    sigil_authority::issuers::activate(store, &target.id, at, &actor, now).await?;
    // The renewal hint once the new issuer is (scheduled to be) active: a
    // failed activation must not push clients to renew onto the old one.
    let replaced = rows.iter().find(|r| r.state == IssuerState::Active);
    if let (Some(_), None) = (renew_by, replaced) {
        eprintln!(
            "note: no issuer was active, so --renew-all-by has no certificates to move and was not recorded"
        );
    }
    if let (Some(by), Some(old)) = (renew_by, replaced) {
        let scope = format!("issuer:{}", old.id);
        store
            .commit(Change::Acme {
                write: AcmeWrite::RenewalHint {
                    scope: scope.clone(),
                    renew_by: by.unix_timestamp(),
                    set_at: now.unix_timestamp(),
                },
                event: AuditEvent {
                    ts_ms: now.unix_timestamp() * 1000,
                    kind: "acme.ari.renew_by".into(),
                    actor: actor.clone(),
                    subject: scope,
                    detail: json!({"renew_by": by.unix_timestamp(), "rotation_to": target.id}),
                },
            })
            .await
            .with_context(|| {
                format!(
                    "issuer {} is activated, but its renewal deadline was not recorded: \
                     set it with `sigil acme ari --issuer {} --renew-by {}`",
                    target.id,
                    old.id,
                    by.format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_else(|_| by.unix_timestamp().to_string())
                )
            })?;
    }
    match at {
        Some(t) if t > now => println!(
            "issuer {} takes over issuance at {t} (running servers switch within seconds of it)",
            target.id
        ),
        _ => println!(
            "issuer {} now takes new issuance (running servers switch within seconds)",
            target.id
        ),
    }
    if let Some(old) = replaced {
        println!(
            "issuer {} keeps answering OCSP and publishing CRLs until its last certificate expires",
            old.id
        );
        if let Some(by) = renew_by {
            println!(
                "clients are asked (ACME ARI, gRPC WatchRotation) to renew its certificates by {by}"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
