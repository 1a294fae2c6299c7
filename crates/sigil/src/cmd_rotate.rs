//! Intermediate rotation with overlap: `sigil intermediate rotate`,
//! `install --stage` and `activate`, and where issuer keys are found.
//!
//! The next key lives beside the configured intermediate key as
//! `intermediate-next.key` until its certificate is staged; then it is renamed
//! `intermediate-<issuer id>.key` and the database records that name, so every
//! node sharing the database finds it in its own key directory.

use crate::cmd_acme::parse_when;
use crate::cmd_ca::{
    check_intermediate, key_passphrase, new_intermediate_key, operator_name, write_public,
};
use crate::config::Config;
use crate::passphrase;
use anyhow::{Context, Result, bail};
use serde_json::json;
use sigil_authority::{Error as AuthorityError, IssuerKeys, IssuerRow, IssuerState, pem};
use sigil_core::dn::parse_subject;
use sigil_core::{Clock, IssuerInfo, KeySpec, SystemClock};
use sigil_signer::{Passphrase, SoftwareKey, read_encrypted_key};
use sigil_store::{AcmeWrite, AuditEvent, Change, Store};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const NEXT_KEY: &str = "intermediate-next.key";

/// Where issuer keys are: `ca.intermediate_key` and the files beside it.
struct KeyPaths {
    default_key: PathBuf,
    dir: PathBuf,
}

impl KeyPaths {
    fn new(cfg: &Config) -> KeyPaths {
        let default_key = cfg.resolve(&cfg.ca.intermediate_key);
        KeyPaths {
            dir: key_dir(&default_key),
            default_key,
        }
    }

    fn path_of(&self, issuer: &IssuerRow) -> Result<PathBuf, AuthorityError> {
        match &issuer.key_ref {
            None => Ok(self.default_key.clone()),
            Some(name) if valid_key_name(name) => Ok(self.dir.join(name)),
            Some(name) => Err(AuthorityError::Config(format!(
                "issuer {} names key '{name}', which is not a file name in the key directory {}",
                issuer.id,
                self.dir.display()
            ))),
        }
    }

    fn load(&self, issuer: &IssuerRow, pass: &Passphrase) -> Result<SoftwareKey, AuthorityError> {
        let path = self.path_of(issuer)?;
        read_encrypted_key(&path, pass).map_err(|e| {
            AuthorityError::Config(format!(
                "key of issuer {} ({}): {e}",
                issuer.id,
                path.display()
            ))
        })
    }
}

/// Loads issuer keys from the key directory with the intermediate passphrase,
/// which a server keeps for keys staged while it runs.
pub struct FileKeys {
    paths: KeyPaths,
    pass: Passphrase,
}

impl FileKeys {
    /// Keys as configured.
    pub fn new(cfg: &Config, pass: Passphrase) -> FileKeys {
        FileKeys {
            paths: KeyPaths::new(cfg),
            pass,
        }
    }
}

impl IssuerKeys for FileKeys {
    fn load(&self, issuer: &IssuerRow) -> Result<SoftwareKey, AuthorityError> {
        self.paths.load(issuer, &self.pass)
    }
}

/// Checks that `pass` opens the key of `issuer`.
fn check_key(cfg: &Config, issuer: &IssuerRow, pass: &Passphrase) -> Result<(), AuthorityError> {
    KeyPaths::new(cfg).load(issuer, pass).map(|_| ())
}

fn key_dir(default_key: &Path) -> PathBuf {
    default_key
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn next_key_path(cfg: &Config) -> PathBuf {
    key_dir(&cfg.resolve(&cfg.ca.intermediate_key)).join(NEXT_KEY)
}

async fn active_issuer(store: &Store) -> Result<Option<IssuerRow>> {
    Ok(store
        .issuers()
        .await?
        .into_iter()
        .find(|r| r.state == IssuerState::Active))
}

/// `sigil intermediate rotate`: the next key and its CSR.
pub async fn rotate(
    config: &Path,
    key_type: Option<String>,
    subject: Option<String>,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let next = next_key_path(&cfg);
    let out = out.unwrap_or_else(|| cfg.resolve(Path::new("intermediate-next.csr")));
    if next.exists() {
        bail!(
            "a rotation is already under way: {} exists. Have its CSR signed offline and run \
             `sigil intermediate install --stage`, or move the key away to start over",
            next.display()
        );
    }
    let store = Store::open(&cfg.database_url()).await?;
    let current = active_issuer(&store).await?;
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
    let file = cfg.ca.passphrase_file.as_ref().map(|p| cfg.resolve(p));
    let pass = passphrase::obtain(file.as_deref(), passphrase::KEY_ENV, "intermediate key")?;
    if let Some(r) = &current {
        // The same passphrase protects every issuer key: prove it is the one
        // the server uses before making a key only it could open.
        check_key(&cfg, r, &pass)
            .context("the passphrase does not open the current intermediate key")?;
    }
    let csr = new_intermediate_key(&next, spec, dn, &pass)?;
    write_public(&out, &pem("CERTIFICATE REQUEST", &csr))?;
    let now = SystemClock.now();
    let recorded = store
        .commit(Change::Record(AuditEvent {
            ts_ms: now.unix_timestamp() * 1000,
            kind: "issuer.key_generated".into(),
            actor: format!("operator:{}", operator_name(None)),
            subject: NEXT_KEY.into(),
            detail: json!({
                "key_type": spec.to_string(),
                "subject": subject_text,
                "csr_sha256": sigil_core::sha256_hex(&csr),
            }),
        }))
        .await;
    store.close().await;
    recorded?;
    println!(
        "next intermediate key (encrypted, 0600, not active): {}",
        next.display()
    );
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

/// `sigil intermediate install --stage`: the certificate for the next key.
pub async fn install_staged(config: &Path, cert: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let next = next_key_path(&cfg);
    if !next.exists() {
        bail!(
            "no key is waiting for a certificate ({} does not exist): start with `sigil intermediate rotate`",
            next.display()
        );
    }
    let bytes = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let pass = key_passphrase(&cfg)?;
    let (info, root) = check_intermediate(&cfg, &bytes, &next, &pass)?;
    let key_name = format!("intermediate-{}.key", info.id);
    let dest = next.with_file_name(&key_name);
    let store = Store::open(&cfg.database_url()).await?;
    if store
        .issuer(info.id.as_str())
        .await?
        .is_some_and(|r| r.state != IssuerState::Retired)
    {
        store.close().await;
        bail!("issuer {} is already installed", info.id);
    }
    // The key takes its final name before the database names it, so a node
    // that sees the staged row finds the key.
    std::fs::rename(&next, &dest)
        .with_context(|| format!("cannot move {} to {}", next.display(), dest.display()))?;
    let now = SystemClock.now();
    let actor = format!("operator:{}", operator_name(None));
    let staged = sigil_authority::issuers::stage(&store, &info, key_name, &actor, now).await;
    store.close().await;
    if let Err(e) = staged {
        // Nothing refers to the renamed key: put it back for a retry.
        let _ = std::fs::rename(&dest, &next);
        return Err(e.into());
    }
    println!("staged issuer {} ({})", info.id, info.subject);
    println!("chains to:  {}", root.subject);
    println!("expires:    {}", info.not_after);
    println!("key:        {}", dest.display());
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
        .map(|s| parse_when("--renew-all-by", &s, now))
        .transpose()?;
    if let (Some(by), Some(at)) = (renew_by, at)
        && by < at
    {
        bail!(
            "--renew-all-by ({by}) is before --at ({at}): clients cannot renew onto an issuer that is not active yet"
        );
    }
    let store = Store::open(&cfg.database_url()).await?;
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
        [] if next_key_path(cfg).exists() => bail!(
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
    if target.not_before > at.unwrap_or(now).unix_timestamp() {
        bail!(
            "issuer {} is not valid until {}: activate it at or after that time",
            target.id,
            target.not_before
        );
    }
    // The server loads the key when it activates; catch a bad key now.
    check_key(cfg, target, &key_passphrase(cfg)?)
        .context("the staged issuer's key cannot be loaded")?;
    let actor = format!("operator:{}", operator_name(operator));
    let replaced = rows.iter().find(|r| r.state == IssuerState::Active);
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
            .await?;
    }
    sigil_authority::issuers::activate(store, &target.id, at, &actor, now).await?;
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
