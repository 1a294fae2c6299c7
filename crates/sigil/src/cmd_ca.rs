//! Key ceremonies: the offline root and the online intermediate.

use crate::cli::{IntermediateCmd, RootCmd};
use crate::config::Config;
use crate::passphrase::{self, KEY_ENV, ROOT_ENV};
use anyhow::{Context, Result, bail};
use sigil_authority::pem;
use sigil_core::dn::{Dn, parse_subject};
use sigil_core::lifetime::parse_duration;
use sigil_core::template::{IntermediateOptions, verify_issued_by};
use sigil_core::{CaRequest, Clock, IssuerInfo, KeySpec, SystemClock};
use sigil_signer::{
    CaSigner, Passphrase, SoftwareKey, intermediate_csr, random_serial, read_encrypted_key,
    self_signed_root, sign_intermediate, write_encrypted_key,
};
use sigil_store::Store;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Runs a `sigil root` command.
pub fn root(cmd: RootCmd) -> Result<ExitCode> {
    match cmd {
        RootCmd::Init {
            dir,
            key_type,
            subject,
            validity,
            passphrase_file,
        } => {
            let spec: KeySpec = key_type.parse()?;
            let subject = parse_subject(&subject)?;
            let validity = ca_validity(&validity)?;
            if dir.join("root.key").exists() {
                bail!(
                    "{} already exists; a root is created once (use another --dir)",
                    dir.join("root.key").display()
                );
            }
            let pass = passphrase::obtain_new(passphrase_file.as_deref(), ROOT_ENV, "root key")?;
            let der = create_root(&dir, spec, subject, validity, &pass)?;
            let info = IssuerInfo::from_der(&der)?;
            println!("root certificate: {}", dir.join("root.crt").display());
            println!(
                "root key (encrypted, 0600): {}",
                dir.join("root.key").display()
            );
            println!("subject: {}", info.subject);
            println!("expires: {}", info.not_after);
            println!("SHA-256 fingerprint: {}", sigil_core::sha256_hex(&der));
            Ok(ExitCode::SUCCESS)
        }
        RootCmd::Sign {
            dir,
            csr,
            out,
            validity,
            path_len,
            permitted_dns,
            permitted_ip,
            passphrase_file,
            crl_url,
        } => {
            let validity = ca_validity(&validity)?;
            not_a_root_file(&dir, &out)?;
            let permitted_ip = permitted_ip
                .iter()
                .map(|s| {
                    s.parse()
                        .with_context(|| format!("--permitted-ip {s}: not a CIDR"))
                })
                .collect::<Result<Vec<_>>>()?;
            let opts = IntermediateOptions {
                path_len,
                permitted_dns,
                permitted_ip,
                crl_url,
                subject_key_id: None,
            };
            let pass = passphrase::obtain(passphrase_file.as_deref(), ROOT_ENV, "root key")?;
            let csr_bytes =
                std::fs::read(&csr).with_context(|| format!("cannot read {}", csr.display()))?;
            let der = sign_with_root(&dir, &csr_bytes, validity, &opts, &pass)?;
            write_public(&out, &pem("CERTIFICATE", &der))?;
            let info = IssuerInfo::from_der(&der)?;
            println!("intermediate certificate: {}", out.display());
            println!("subject: {}", info.subject);
            println!("expires: {}", info.not_after);
            println!("SHA-256 fingerprint: {}", sigil_core::sha256_hex(&der));
            Ok(ExitCode::SUCCESS)
        }
        RootCmd::CrossSign {
            dir,
            cert,
            out,
            validity,
            passphrase_file,
        } => {
            not_a_root_file(&dir, &out)?;
            let other =
                std::fs::read(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let pass = passphrase::obtain(passphrase_file.as_deref(), ROOT_ENV, "root key")?;
            let der = cross_sign(&dir, &other, ca_validity(&validity)?, &pass)?;
            write_public(&out, &pem("CERTIFICATE", &der))?;
            let info = IssuerInfo::from_der(&der)?;
            println!("cross-certificate: {}", out.display());
            println!("subject: {} (the other root's key)", info.subject);
            println!("issuer:  {}", info.issuer);
            println!("expires: {}", info.not_after);
            println!(
                "next: `sigil cross-cert install --config sigil.toml --cert {}` on the online host",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        RootCmd::Crl {
            dir,
            out,
            revoke,
            reason,
            validity,
            passphrase_file,
        } => root_crl(
            &dir,
            &out,
            revoke.as_deref(),
            &reason,
            &validity,
            passphrase_file.as_deref(),
        ),
    }
}

/// One entry of the root's ARL state (`ROOT/arl.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ArlEntry {
    serial: String,
    revoked_at: i64,
    reason: i32,
}

/// The root's ARL state: its revocations and the last CRL number.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ArlState {
    number: u64,
    revoked: Vec<ArlEntry>,
}

pub fn root_crl(
    dir: &Path,
    out: &Path,
    revoke: Option<&str>,
    reason: &str,
    validity: &str,
    passphrase_file: Option<&Path>,
) -> Result<ExitCode> {
    use sigil_core::Clock as _;
    not_a_root_file(dir, out)?;
    let validity = parse_duration(validity)?;
    let root_der = std::fs::read(dir.join("root.crt"))
        .with_context(|| format!("no root certificate in {}", dir.display()))?;
    let info = IssuerInfo::parse(&root_der)?;
    let state_path = dir.join("arl.json");
    let mut state: ArlState = match std::fs::read(&state_path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{} is corrupt", state_path.display()))?,
        Err(_) => ArlState::default(),
    };
    let now = sigil_core::SystemClock.now();
    if let Some(s) = revoke {
        let serial = sigil_core::Serial::parse_hex(s)
            .with_context(|| format!("--revoke '{s}' is not a hex serial"))?;
        let code = sigil_core::revocation::parse_reason(reason)
            .filter(|c| sigil_core::revocation::is_valid_reason(*c))
            .with_context(|| {
                format!("--reason '{reason}' is not an RFC 5280 reason this CA accepts")
            })?;
        if state.revoked.iter().any(|e| e.serial == serial.to_hex()) {
            bail!("{} is already in this root's ARL", serial.to_hex());
        }
        state.revoked.push(ArlEntry {
            serial: serial.to_hex(),
            revoked_at: now.unix_timestamp(),
            reason: code,
        });
    }
    let entries = state
        .revoked
        .iter()
        .map(|e| {
            Ok(sigil_core::crl::CrlEntry {
                serial: sigil_core::Serial::parse_hex(&e.serial)
                    .with_context(|| format!("{} holds a bad serial", state_path.display()))?,
                revoked_at: time::OffsetDateTime::from_unix_timestamp(e.revoked_at)?,
                reason: e.reason,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    state.number += 1;
    let template = sigil_core::crl::CrlTemplate::new(&sigil_core::crl::CrlSpec {
        issuer: &info,
        number: state.number,
        this_update: now,
        next_update: now + validity,
        entries: &entries,
        url: String::new(),
        only_ca_certs: true,
    })?;
    let pass = passphrase::obtain(passphrase_file, ROOT_ENV, "root key")?;
    let key = read_encrypted_key(&dir.join("root.key"), &pass)?;
    let der = CaSigner::new(&info.der, key)?.sign_crl(template)?;
    write_replacing(&state_path, &serde_json::to_vec_pretty(&state)?)?;
    write_replacing(out, &der)?;
    println!(
        "ARL number {} with {} revoked CA certificate(s), valid until {}: {}",
        state.number,
        entries.len(),
        now + validity,
        out.display()
    );
    println!(
        "publish it on the server: sigil crl install --config sigil.toml {}",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn write_replacing(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `sigil crl install`: verify a root's ARL and publish it.
pub async fn install_crl(config: &Path, crl: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let bytes = std::fs::read(crl).with_context(|| format!("cannot read {}", crl.display()))?;
    println!("{}", publish_root_crl(&cfg, &bytes).await?);
    Ok(ExitCode::SUCCESS)
}

/// Verifies a root's ARL against the configured roots and stores it for the
/// server to publish (unless a newer one is already there).
pub async fn publish_root_crl(cfg: &Config, bytes: &[u8]) -> Result<String> {
    let roots = load_roots(cfg)?;
    let mut last_err = None;
    for root in &roots {
        let (facts, der) = match sigil_core::crl::verify_crl(bytes, root) {
            Ok(v) => v,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        let store = Store::open_existing(&cfg.database_url()).await?;
        let id = root.id.to_string();
        let current = store.latest_crl(&id).await?;
        if let Some(cur) = current
            && u64::try_from(cur.number).unwrap_or(0) >= facts.number
        {
            store.close().await;
            bail!(
                "the published ARL of this root already has number {} (this one: {}); sign a newer one",
                cur.number,
                facts.number
            );
        }
        let saved = store
            .save_crl(&sigil_store::CrlRow {
                issuer_id: id,
                shard: None,
                number: i64::try_from(facts.number)?,
                this_update: facts.this_update.unix_timestamp(),
                next_update: facts.next_update.unix_timestamp(),
                der,
            })
            .await;
        store.close().await;
        saved?;
        return Ok(format!(
            "installed ARL number {} of {} ({} entries, next update {}): served at {}",
            facts.number,
            root.subject,
            facts.entries,
            facts.next_update,
            sigil_core::CaUrls::new(&cfg.server.public_url).crl(&root.id)
        ));
    }
    match last_err {
        Some(e) => Err(anyhow::anyhow!(e)).context("the CRL is not from a configured root"),
        None => bail!("no roots configured"),
    }
}

/// Creates `dir/root.key` (encrypted) and `dir/root.crt`; returns the cert DER.
pub fn create_root(
    dir: &Path,
    spec: KeySpec,
    subject: Dn,
    validity: Duration,
    pass: &Passphrase,
) -> Result<Vec<u8>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let (key, pkcs8) = SoftwareKey::generate(spec)?;
    let der = self_signed_root(
        &key,
        subject,
        &random_serial()?,
        SystemClock.now(),
        validity,
    )?;
    write_encrypted_key(&dir.join("root.key"), &pkcs8, pass)?;
    if let Err(e) = write_public(&dir.join("root.crt"), &pem("CERTIFICATE", &der)) {
        // A key without its certificate is of no use, and would make the
        // next `root init` in this directory refuse: it goes.
        let _ = std::fs::remove_file(dir.join("root.key"));
        return Err(e);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.join("issued"))?;
    Ok(der)
}

/// The root in `dir` signs a CA request; a copy is kept in `dir/issued/`.
pub fn sign_with_root(
    dir: &Path,
    csr: &[u8],
    validity: Duration,
    opts: &IntermediateOptions,
    pass: &Passphrase,
) -> Result<Vec<u8>> {
    let root_pem = std::fs::read(dir.join("root.crt")).with_context(|| {
        format!(
            "no root certificate in {}: run `sigil root init --dir {}` first",
            dir.display(),
            dir.display()
        )
    })?;
    let root_info = IssuerInfo::parse(&root_pem)?;
    let key = read_encrypted_key(&dir.join("root.key"), pass)?;
    let root = CaSigner::new(&root_info.der, key)?;
    let request = CaRequest::parse(csr).context("intermediate CSR rejected")?;
    let serial = random_serial()?;
    let der = sign_intermediate(&root, &request, &serial, SystemClock.now(), validity, opts)?;
    let issued = dir.join("issued");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&issued)?;
    write_public(
        &issued.join(format!("{serial}.crt")),
        &pem("CERTIFICATE", &der),
    )?;
    Ok(der)
}

/// The root in `dir` certifies another root's subject and key: a CA
/// certificate (pathLen 1, so the other root's intermediates chain through
/// it) valid no longer than either root.
pub fn cross_sign(
    dir: &Path,
    other_pem: &[u8],
    validity: Duration,
    pass: &Passphrase,
) -> Result<Vec<u8>> {
    let other = IssuerInfo::parse(other_pem).context("--cert is not a certificate")?;
    if !other.is_ca || other.subject != other.issuer {
        bail!(
            "{} is not a root certificate (self-issued CA)",
            other.subject
        );
    }
    let root_pem = std::fs::read(dir.join("root.crt"))
        .with_context(|| format!("no root certificate in {}", dir.display()))?;
    let root_info = IssuerInfo::parse(&root_pem)?;
    if root_info.public_key == other.public_key {
        bail!("a root cannot cross-sign its own key");
    }
    let key = read_encrypted_key(&dir.join("root.key"), pass)?;
    let root = CaSigner::new(&root_info.der, key)?;
    let now = SystemClock.now();
    let end = root_info.not_after.min(other.not_after);
    let room = (end - now - time::Duration::hours(1)).max(time::Duration::ZERO);
    let validity = validity.min(Duration::try_from(room).unwrap_or(Duration::ZERO));
    if validity < Duration::from_secs(86400) {
        bail!("one of the roots expires within a day: nothing to cross-sign for");
    }
    let subject = sigil_core::dn::subject_of_certificate(&other.der)?;
    let request = CaRequest {
        public_key: other.public_key.clone(),
        subject,
        subject_text: other.subject.clone(),
    };
    // The cross-certificate names the other root's key with that root's own
    // identifier, which its intermediates' authority key identifiers carry.
    let opts = IntermediateOptions {
        path_len: 1,
        subject_key_id: Some(other.key_id.clone()),
        ..IntermediateOptions::default()
    };
    let serial = random_serial()?;
    Ok(sign_intermediate(
        &root, &request, &serial, now, validity, &opts,
    )?)
}

/// `sigil cross-cert install`: checks a cross-certificate against the
/// configured roots and records it.
pub async fn install_cross(config: &Path, cert: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let bytes = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let info = IssuerInfo::parse(&bytes).context("not a certificate")?;
    let roots = load_roots(&cfg)?;
    let signer = roots
        .iter()
        .find(|r| verify_issued_by(&info.der, r).is_ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not signed by any configured root (ca.roots)",
                info.subject
            )
        })?;
    let subject_root = roots
        .iter()
        .find(|r| r.public_key == info.public_key && r.subject_der == info.subject_der)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} certifies a key that is not a configured root: list both roots in ca.roots",
                info.subject
            )
        })?;
    if !info.is_ca {
        bail!("{} is not a CA certificate", info.subject);
    }
    let now = SystemClock.now();
    if info.not_after <= now {
        bail!("the cross-certificate expired at {}", info.not_after);
    }
    let store = Store::open_existing(&cfg.database_url()).await?;
    let done = sigil_authority::issuers::install_cross(
        &store,
        &info,
        &format!("operator:{}", operator_name(None)),
        now,
    )
    .await;
    store.close().await;
    done?;
    println!(
        "installed cross-certificate: {} certified by {}",
        subject_root.subject, signer.subject
    );
    println!("expires: {}", info.not_after);
    Ok(ExitCode::SUCCESS)
}

/// Writes a public file (certificate, CSR) atomically: temp file, then rename.
pub fn write_public(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    // A fresh name, created exclusively: nothing already at that path (a
    // symlink planted in a shared directory) is written through.
    let mut r = [0u8; 8];
    sigil_signer::random_bytes(&mut r)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{:016x}.tmp~", u64::from_le_bytes(r)));
    let tmp = path.with_file_name(name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir_of(path)
}

/// Reads a file that decides whom this CA trusts (a root, the public key
/// that verifies bootstrap tokens). Refused when any user may change it; a
/// group that may is reported.
pub fn read_trusted(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o002 != 0 {
        bail!(
            "{} may be changed by any user (mode {mode:o}), and it decides whom this CA trusts; run `chmod o-w {}`",
            path.display(),
            path.display()
        );
    }
    if mode & 0o020 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "a file that decides whom this CA trusts may be changed by its group");
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Makes the renames in `path`'s directory durable: until then a crash can
/// bring back the directory's previous entries.
pub fn sync_dir_of(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Loads the configured roots.
pub fn load_roots(cfg: &Config) -> Result<Vec<IssuerInfo>> {
    cfg.ca
        .roots
        .iter()
        .map(|p| {
            let p = cfg.resolve(p);
            let bytes = read_trusted(&p).with_context(|| format!("root {}", p.display()))?;
            IssuerInfo::parse(&bytes).with_context(|| format!("root {}", p.display()))
        })
        .collect()
}

/// The intermediate key passphrase per config (file, env, prompt).
pub fn key_passphrase(cfg: &Config) -> Result<Passphrase> {
    let file = cfg.ca.passphrase_file.as_ref().map(|p| cfg.resolve(p));
    passphrase::obtain(file.as_deref(), KEY_ENV, "intermediate key")
}

/// Runs a `sigil intermediate` command.
pub async fn intermediate(cmd: IntermediateCmd) -> Result<ExitCode> {
    match cmd {
        IntermediateCmd::Csr {
            config,
            key_type,
            subject,
            out,
        } => {
            let cfg = Config::load(&config)?;
            let location = crate::keys::configured(&cfg)?;
            let out = out.unwrap_or_else(|| cfg.resolve(Path::new("intermediate.csr")));
            let spec: KeySpec = key_type.parse()?;
            let subject = parse_subject(&subject)?;
            let key = crate::keys::KeyStore::new(&cfg)?.generate(&location, spec)?;
            let csr = intermediate_csr(&key, subject)?;
            if let Err(e) = write_public(&out, &pem("CERTIFICATE REQUEST", &csr)) {
                return Err(drop_unused_key(&location, e));
            }
            match &location {
                crate::keys::KeyLocation::File(p) => {
                    println!("intermediate key (encrypted, 0600): {}", p.display())
                }
                token => println!("intermediate key (in the token, not extractable): {token}"),
            }
            println!("CSR: {}", out.display());
            println!(
                "next: on the offline root host run `sigil root sign --dir ROOT --csr {} --out intermediate.crt`,",
                out.display()
            );
            println!(
                "      then `sigil intermediate install --config {} --cert intermediate.crt`",
                config.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        IntermediateCmd::Install {
            config,
            cert,
            stage: true,
        } => crate::cmd_rotate::install_staged(&config, &cert).await,
        IntermediateCmd::Rotate {
            config,
            key,
            key_type,
            subject,
            out,
        } => crate::cmd_rotate::rotate(&config, key, key_type, subject, out).await,
        IntermediateCmd::Activate {
            config,
            at,
            renew_all_by,
            operator,
        } => crate::cmd_rotate::activate(&config, at, renew_all_by, operator.as_deref()).await,
        IntermediateCmd::Unstage { config, operator } => {
            crate::cmd_rotate::unstage(&config, operator.as_deref()).await
        }
        IntermediateCmd::Install {
            config,
            cert,
            stage: false,
        } => {
            let cfg = Config::load(&config)?;
            let bytes =
                std::fs::read(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let info = install(&cfg, &bytes, &format!("operator:{}", operator_name(None))).await?;
            println!("installed issuer {} ({})", info.id, info.subject);
            println!("expires: {}", info.not_after);
            println!(
                "certificate: {}",
                cfg.resolve(&cfg.ca.intermediate_cert).display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Generates and stores the intermediate key; returns its CSR DER.
pub fn new_intermediate_key(
    key_path: &Path,
    spec: KeySpec,
    subject: Dn,
    pass: &Passphrase,
) -> Result<Vec<u8>> {
    if let Some(dir) = key_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let (key, pkcs8) = SoftwareKey::generate(spec)?;
    let csr = intermediate_csr(&key, subject)?;
    write_encrypted_key(key_path, &pkcs8, pass)?;
    Ok(csr)
}

/// Checks an intermediate certificate (CA, chains to a configured root, matches
/// the configured key, currently valid), stores it and records the install.
pub async fn install(cfg: &Config, cert: &[u8], actor: &str) -> Result<IssuerInfo> {
    let location = crate::keys::configured(cfg)?;
    let keys = crate::keys::KeyStore::new(cfg)?;
    let key = keys.open(&location)?;
    // The certificate for a rotation's next key, installed as if it were the
    // first intermediate: say what to run rather than "does not match".
    if let (Ok(info), Some(next)) = (
        IssuerInfo::parse(cert),
        crate::cmd_rotate::pending_key(cfg)?,
    ) && key.public_key() != &info.public_key
        && keys
            .open(&next)
            .is_ok_and(|k| k.public_key() == &info.public_key)
    {
        bail!(
            "this certificate is for the rotation's next key ({next}): install it with `sigil intermediate install --stage`"
        );
    }
    let (info, root) = check_intermediate(cfg, cert, &key, &location.to_string())?;
    // Database first: a certificate file never names an issuer the database lacks.
    let store = Store::open(&cfg.database_url()).await?;
    let now = SystemClock.now();
    let recorded = sigil_authority::issuers::install(&store, &info, None, actor, now).await;
    store.close().await;
    recorded?;
    let dest = cfg.resolve(&cfg.ca.intermediate_cert);
    write_public(&dest, &pem("CERTIFICATE", &info.der))?;
    tracing::info!(issuer = %info.id, root = %root.subject, "intermediate installed");
    Ok(info)
}

/// After the CSR for a key just made could not be written: removes a key
/// file (nothing else knows of it; run again to make another), so that the
/// next run does not find a key without a CSR. A key in a token stays.
pub(crate) fn drop_unused_key(
    location: &crate::keys::KeyLocation,
    e: anyhow::Error,
) -> anyhow::Error {
    match location {
        crate::keys::KeyLocation::File(p) if std::fs::remove_file(p).is_ok() => e.context(format!(
            "the CSR could not be written, so the new key {} was removed: give a writable --out and run again",
            p.display()
        )),
        _ => e.context(format!(
            "the CSR could not be written; the new key ({location}) stays: remove it, then run again with a writable --out"
        )),
    }
}

/// A CA certificate's `--validity`: at least a day. (`m` is minutes, `M`
/// months: `3m` is a typo worth stopping.)
fn ca_validity(text: &str) -> Result<Duration> {
    let validity = parse_duration(text)?;
    if validity < Duration::from_secs(86_400) {
        bail!(
            "--validity {text} is {}; a CA certificate needs at least a day \
             (months are written M or months: 3M, 3months; years y)",
            sigil_core::lifetime::format_duration(validity)
        );
    }
    Ok(validity)
}

/// Refuses an `--out` that is the root's own key or certificate.
fn not_a_root_file(dir: &Path, out: &Path) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    for name in ["root.key", "root.crt", "arl.json"] {
        if same(&dir.join(name), out) {
            bail!(
                "--out {} is the root's {name}: write to another file",
                out.display()
            );
        }
    }
    Ok(())
}

/// Checks that `cert` is a currently valid CA certificate, chains to a
/// configured root and certifies the key in `key_path`. Returns it and its root.
pub fn check_intermediate(
    cfg: &Config,
    cert: &[u8],
    key: &sigil_signer::CaKey,
    key_shown: &str,
) -> Result<(IssuerInfo, IssuerInfo)> {
    let info = IssuerInfo::parse(cert).context("not a certificate")?;
    if !info.is_ca {
        bail!(
            "{} is not a CA certificate (basicConstraints cA is not set)",
            info.subject
        );
    }
    let roots = load_roots(cfg)?;
    let mut errors = Vec::new();
    let root = roots.iter().find(|r| match verify_issued_by(&info.der, r) {
        Ok(()) => true,
        Err(e) => {
            errors.push(e.to_string());
            false
        }
    });
    let Some(root) = root else {
        bail!(
            "certificate does not chain to any configured root ({}): {}",
            cfg.ca
                .roots
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            errors.join("; ")
        );
    };
    let now = SystemClock.now();
    if info.not_after <= now || info.not_before > now + time::Duration::minutes(5) {
        bail!(
            "certificate is not currently valid ({} to {})",
            info.not_before,
            info.not_after
        );
    }
    let least = crate::cmd_rotate::MIN_ISSUER_LEFT;
    if info.not_after - now < least {
        bail!(
            "certificate expires at {}, in less than {}: an issuer must outlive the certificates it signs; \
             have the root sign it again with a longer --validity",
            info.not_after,
            sigil_core::lifetime::format_duration(least.unsigned_abs())
        );
    }
    if key.public_key() != &info.public_key {
        bail!(
            "certificate does not match the key in {key_shown} (was the CSR made from another key?)"
        );
    }
    let root = root.clone();
    Ok((info, root))
}

/// The operator's name for audit records.
pub fn operator_name(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A root whose certificate cannot be written leaves nothing behind:
    /// no key (which would make the next attempt refuse) and no temporary
    /// file.
    #[test]
    fn a_root_whose_certificate_cannot_be_written_leaves_no_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("root");
        // A directory where the certificate goes: the rename over it fails.
        std::fs::create_dir_all(dir.join("root.crt")).unwrap();
        let e = create_root(
            &dir,
            KeySpec::EcdsaP256,
            parse_subject("CN=Test Root").unwrap(),
            Duration::from_secs(365 * 86_400),
            &Passphrase::new("a long enough passphrase".into()),
        );
        assert!(e.is_err());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("root.crt")]);
    }

    #[test]
    fn a_trust_file_anyone_may_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("root.crt");
        std::fs::write(&p, "x").unwrap();
        for (mode, ok) in [
            (0o644, true),
            (0o664, true),
            (0o600, true),
            (0o666, false),
            (0o646, false),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = read_trusted(&p);
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("chmod o-w"), "{e}");
            }
        }
    }
}
