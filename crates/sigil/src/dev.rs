//! `sigil serve --dev`: a complete development CA from nothing, in one directory.
//! The root key lives there too, which is acceptable only for development; the
//! directory and the banner say so.

use crate::cmd_ca::{
    create_root, install, new_intermediate_key, publish_root_crl, root_crl, sign_with_root,
    write_public,
};
use crate::config::{
    AcmeConfig, CaConfig, Config, DatabaseConfig, GrpcConfig, IssuanceConfig, PolicyConfig,
    ServerConfig,
};
use anyhow::{Context, Result};
use sigil_core::KeySpec;
use sigil_core::dn::parse_subject;
use sigil_core::template::IntermediateOptions;
use sigil_signer::Passphrase;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT_DIR: &str = "DEV-ONLY-root";

const DEV_POLICY: &str = r#"# Development CA policy: anyone may get local names.
# Not for production: write your own rules (see policies/example.toml).

[[rule]]
name = "dev-local"
description = "Any requester may have localhost names, names under .internal and loopback IPs"
effect = "allow"
requesters = ["*"]
dns = ["localhost", "*.localhost", ".localhost", ".internal"]
ip = ["127.0.0.0/8", "::1"]
max_lifetime = "30d"
"#;

/// The dev CA's ACME section: names under `.localhost` are validated on
/// 127.0.0.1 (RFC 6761), so stock clients work on one machine.
fn dev_acme(addr: SocketAddr) -> AcmeConfig {
    AcmeConfig {
        localhost_loopback: true,
        ..AcmeConfig::on(addr)
    }
}

/// Creates the dev CA in `dir` unless it exists; returns the config path.
pub async fn ensure(
    dir: &Path,
    http_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
) -> Result<PathBuf> {
    let config_path = dir.join("sigil.toml");
    if config_path.exists() {
        // The dev config is ours: follow new addresses so the URLs written into
        // certificates (AIA, CRL DP) keep pointing at this server.
        let mut cfg = Config::load(&config_path)?;
        let mut changed = false;
        if let Some(addr) = http_addr.filter(|a| *a != cfg.server.http_addr) {
            cfg.server.http_addr = addr;
            cfg.server.public_url = format!("http://{addr}");
            changed = true;
        }
        if let Some(addr) = grpc_addr.filter(|a| cfg.grpc.as_ref().map(|g| g.addr) != Some(*a)) {
            match cfg.grpc.as_mut() {
                Some(g) => g.addr = addr,
                None => cfg.grpc = Some(GrpcConfig::on(addr)),
            }
            changed = true;
        }
        if let Some(addr) =
            https_addr.filter(|a| cfg.acme.as_ref().map(|c| c.https_addr) != Some(*a))
        {
            match cfg.acme.as_mut() {
                Some(c) => c.https_addr = addr,
                None => cfg.acme = Some(dev_acme(addr)),
            }
            changed = true;
        }
        if changed {
            write_config(&cfg)?;
        }
        return Ok(config_path);
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        anyhow::bail!(
            "{} exists but holds no sigil.toml (an interrupted dev setup?); delete it or choose another --data-dir",
            dir.display()
        );
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let config_path = dir.join("sigil.toml");
    let addr = http_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));

    // Root, kept here only because this is a development CA.
    let root_dir = dir.join(ROOT_DIR);
    let root_pass = Passphrase::generate()?;
    let root_der = create_root(
        &root_dir,
        KeySpec::EcdsaP384,
        parse_subject("CN=Sigil Development Root (DEV ONLY),O=Sigil")?,
        Duration::from_secs(10 * 365 * 86400),
        &root_pass,
    )?;
    write_secret(&root_dir.join("passphrase"), root_pass.expose())?;
    write_public(
        &root_dir.join("README.txt"),
        "DEVELOPMENT ONLY. This root key sits on the server host with its passphrase\n\
         beside it. A production root is created and kept offline with `sigil root init`.\n",
    )?;

    let cfg = Config {
        server: ServerConfig {
            http_addr: addr,
            public_url: format!("http://{addr}"),
            max_connections: 10_000,
            request_timeout: "60s".into(),
            idle_timeout: "15s".into(),
        },
        database: DatabaseConfig {
            url: "sqlite://sigil.db".into(),
            keep_expired: "7d".into(),
        },
        ca: CaConfig {
            roots: vec![PathBuf::from(ROOT_DIR).join("root.crt")],
            intermediate_cert: "intermediate.crt".into(),
            intermediate_key: "intermediate.key".into(),
            passphrase_file: Some("intermediate.pass".into()),
        },
        issuance: IssuanceConfig::default(),
        policy: PolicyConfig {
            dir: "policies".into(),
        },
        revocation: Default::default(),
        grpc: Some(GrpcConfig::on(
            grpc_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9443))),
        )),
        acme: Some(dev_acme(
            https_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8443))),
        )),
        path: config_path.clone(),
    };
    std::fs::create_dir_all(dir.join("policies"))?;
    write_public(&dir.join("policies").join("dev.toml"), DEV_POLICY)?;

    let arl_url = sigil_core::CaUrls::new(&cfg.server.public_url).crl(&sigil_core::IssuerId::of(
        &sigil_core::csr::decode_pem_or_der(&root_der)?,
    ));
    let int_pass = Passphrase::generate()?;
    write_secret(&dir.join("intermediate.pass"), int_pass.expose())?;
    let csr = new_intermediate_key(
        &dir.join("intermediate.key"),
        KeySpec::EcdsaP256,
        parse_subject("CN=Sigil Development Issuing CA (DEV ONLY),O=Sigil")?,
        &int_pass,
    )?;
    let cert = sign_with_root(
        &root_dir,
        &csr,
        Duration::from_secs(3 * 365 * 86400),
        &IntermediateOptions {
            // The intermediate's CRL DP: the root's ARL as this server publishes it.
            crl_url: Some(arl_url.clone()),
            ..IntermediateOptions::default()
        },
        &root_pass,
    )?;
    install(&cfg, &cert, "operator:dev-setup").await?;
    // An initial (empty) ARL, so relying parties can check the whole chain.
    let arl = root_dir.join("arl.der");
    root_crl(
        &root_dir,
        &arl,
        None,
        "superseded",
        "365d",
        Some(&root_dir.join("passphrase")),
    )?;
    publish_root_crl(&cfg, &std::fs::read(&arl)?).await?;
    // Written last: its presence means the dev CA is complete.
    write_config(&cfg)?;
    Ok(config_path)
}

fn write_config(cfg: &Config) -> Result<()> {
    let text = toml::to_string_pretty(cfg)?;
    write_public(
        &cfg.path,
        &format!(
            "# Sigil development CA configuration (generated by `sigil serve --dev`).\n\n{text}"
        ),
    )
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}
