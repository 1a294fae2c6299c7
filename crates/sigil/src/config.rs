//! `sigil.toml`: one file, paths relative to it, validated at load with errors
//! that name the key.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and public URL.
    pub server: ServerConfig,
    /// Database.
    pub database: DatabaseConfig,
    /// Trust anchors and the online issuer.
    pub ca: CaConfig,
    /// Leaf lifetimes.
    #[serde(default)]
    pub issuance: IssuanceConfig,
    /// Naming policy location.
    pub policy: PolicyConfig,
    /// CRL and OCSP publishing.
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// The gRPC CSR API; absent means no gRPC listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcConfig>,
    /// The ACME server (HTTPS listener); absent means no ACME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeConfig>,
    /// Where this file was read from (not serialized).
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Plain-HTTP listener for /healthz, /readyz, /roots.pem, /ca, later OCSP/CRL.
    pub http_addr: SocketAddr,
    /// Base URL written into certificates (AIA, CRL DP); plain http by RFC practice.
    pub public_url: String,
    /// Open connections per listener (HTTP, HTTPS); more wait in the backlog.
    #[serde(default = "max_connections")]
    pub max_connections: usize,
    /// Longest a request may take on any listener before it is answered
    /// 503 (HTTP, ACME) or cancelled (gRPC unary calls: CANCELLED, "Timeout expired").
    #[serde(default = "request_timeout")]
    pub request_timeout: String,
    /// How long an HTTP or ACME connection may take to send a request's
    /// headers, counted from when it is ready for one (new, or done with its
    /// previous request); then it is closed.
    #[serde(default = "idle_timeout")]
    pub idle_timeout: String,
}

/// Largest count setting accepted (connections, concurrent signings).
const MAX_COUNT: usize = 1_000_000;

fn max_connections() -> usize {
    10_000
}

fn request_timeout() -> String {
    "60s".into()
}

/// The shortest certificate lifetime the CA issues.
const MIN_LIFETIME: Duration = Duration::from_secs(60);

fn idle_timeout() -> String {
    "15s".into()
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (relative to this file) or `postgres://...`.
    pub url: String,
    /// How long after they expired ACME orders and authorizations, spent
    /// bootstrap tokens and pre-signed OCSP responses are deleted, or `off`.
    #[serde(default = "keep_expired")]
    pub keep_expired: String,
}

fn keep_expired() -> String {
    "7d".into()
}

/// Shortest `database.keep_expired`: well past any expiry check's leeway.
const MIN_KEEP_EXPIRED: Duration = Duration::from_secs(3600);

/// `[ca]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// Root certificates (PEM) that issuers must chain to.
    pub roots: Vec<PathBuf>,
    /// The online intermediate's certificate (PEM).
    pub intermediate_cert: PathBuf,
    /// The online intermediate's encrypted PKCS#8 key.
    pub intermediate_key: PathBuf,
    /// File holding the key passphrase; else `SIGIL_KEY_PASSPHRASE`, else a prompt.
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
}

/// `[issuance]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuanceConfig {
    /// Leaf lifetime when a request names none (policy may lower it).
    #[serde(default = "default_lifetime")]
    pub default_lifetime: String,
    /// Ceiling for every leaf, whatever policy says.
    #[serde(default = "max_lifetime")]
    pub max_lifetime: String,
    /// Certificates per minute per requester, per node (burst: one
    /// minute's worth); 0 turns the limit off. Operators are not limited.
    #[serde(default = "rate_per_minute")]
    pub rate_per_minute: u32,
}

fn rate_per_minute() -> u32 {
    600
}

fn default_lifetime() -> String {
    "24h".into()
}
fn max_lifetime() -> String {
    "90d".into()
}

impl Default for IssuanceConfig {
    fn default() -> Self {
        IssuanceConfig {
            default_lifetime: default_lifetime(),
            max_lifetime: max_lifetime(),
            rate_per_minute: rate_per_minute(),
        }
    }
}

/// `[revocation]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// nextUpdate − thisUpdate of every CRL (refreshed at half of it).
    #[serde(default = "crl_validity")]
    pub crl_validity: String,
    /// How long a revoked certificate stays on CRLs after it expires (at
    /// least `crl_validity`, so a scheduled CRL issued after the expiry lists
    /// it, as RFC 5280 3.3 requires).
    #[serde(default = "crl_grace")]
    pub crl_grace: String,
    /// Time-sharded CRLs: number of shards (0: off, one full CRL per issuer).
    #[serde(default)]
    pub crl_shards: u32,
    /// notAfter time each shard covers before the shards repeat.
    #[serde(default = "crl_shard_width")]
    pub crl_shard_width: String,
    /// nextUpdate − thisUpdate of every OCSP response (pre-signed ones are
    /// refreshed before it).
    #[serde(default = "ocsp_validity")]
    pub ocsp_validity: String,
    /// Lifetime of the delegated OCSP responder certificates.
    #[serde(default = "ocsp_signer_lifetime")]
    pub ocsp_signer_lifetime: String,
    /// `sign`: a request with a nonce gets a freshly signed response echoing
    /// it; `ignore`: it gets the pre-signed one (RFC 5019).
    #[serde(default = "ocsp_nonces")]
    pub ocsp_nonces: String,
    /// Freshly signed (nonce) responses in progress at once; more get tryLater.
    #[serde(default = "ocsp_max_fresh")]
    pub ocsp_max_fresh: usize,
}

fn crl_validity() -> String {
    "24h".into()
}
fn crl_grace() -> String {
    "1h".into()
}
fn crl_shard_width() -> String {
    "6h".into()
}
fn ocsp_validity() -> String {
    "1h".into()
}
fn ocsp_signer_lifetime() -> String {
    "48h".into()
}
fn ocsp_nonces() -> String {
    "sign".into()
}
fn ocsp_max_fresh() -> usize {
    64
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            crl_validity: crl_validity(),
            crl_grace: crl_grace(),
            crl_shards: 0,
            crl_shard_width: crl_shard_width(),
            ocsp_validity: ocsp_validity(),
            ocsp_signer_lifetime: ocsp_signer_lifetime(),
            ocsp_nonces: ocsp_nonces(),
            ocsp_max_fresh: ocsp_max_fresh(),
        }
    }
}

/// `[grpc]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// TLS listener for the CSR API (client certificates verified against ca.roots).
    pub addr: SocketAddr,
    /// Names in the listener's own certificate (issued by this CA, renewed in place).
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// Lifetime of the listener's certificate.
    #[serde(default = "default_server_cert_lifetime")]
    pub server_cert_lifetime: String,
    /// Bootstrap-token signing key (Ed25519, encrypted with the intermediate key's
    /// passphrase; created on first use).
    #[serde(default = "default_token_key")]
    pub token_key: PathBuf,
    /// mTLS identities (SPIFFE IDs only) that may revoke any certificate.
    #[serde(default)]
    pub operators: Vec<String>,
}

fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_server_cert_lifetime() -> String {
    "24h".into()
}
fn default_token_key() -> PathBuf {
    "token.key".into()
}

impl GrpcConfig {
    /// Defaults for a listener on `addr`.
    pub fn on(addr: SocketAddr) -> GrpcConfig {
        GrpcConfig {
            addr,
            server_names: default_server_names(),
            server_cert_lifetime: default_server_cert_lifetime(),
            token_key: default_token_key(),
            operators: Vec::new(),
        }
    }
}

/// `[acme]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// HTTPS listener for the ACME directory (`/acme/directory`).
    pub https_addr: SocketAddr,
    /// Public base URL clients use (`https://ca.corp.internal:8443`); default
    /// `https://<https_addr>`. JWS `url` values must match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Names in the listener's own certificate (issued by this CA, renewed in place).
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// Lifetime of the listener's certificate.
    #[serde(default = "default_server_cert_lifetime")]
    pub server_cert_lifetime: String,
    /// New accounts must carry an external account binding (`sigil acme eab create`).
    #[serde(default)]
    pub eab_required: bool,
    /// Port contacted for http-01.
    #[serde(default = "default_http01_port")]
    pub validation_http_port: u16,
    /// Port contacted for tls-alpn-01.
    #[serde(default = "default_tls_alpn_port")]
    pub validation_tls_port: u16,
    /// DNS server (`IP:PORT`) for dns-01 and name lookups; default: the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_resolver: Option<SocketAddr>,
    /// Resolve names under `.localhost` to 127.0.0.1 when validating (development).
    #[serde(default)]
    pub localhost_loopback: bool,
    /// How long a valid authorization is reused for new orders.
    #[serde(default = "default_authz_reuse")]
    pub authz_reuse: String,
    /// How long pending orders and authorizations live.
    #[serde(default = "default_authz_reuse")]
    pub order_lifetime: String,
    /// `meta.termsOfService` in the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms_of_service: Option<String>,
    /// `meta.website` in the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub website: Option<String>,
    /// New orders per account per minute, per node (0: no limit). Beyond it
    /// clients get `rateLimited` with `Retry-After`.
    #[serde(default)]
    pub orders_per_minute: u32,
}

fn default_http01_port() -> u16 {
    80
}
fn default_tls_alpn_port() -> u16 {
    443
}
fn default_authz_reuse() -> String {
    "24h".into()
}

impl AcmeConfig {
    /// Defaults for a listener on `addr`.
    pub fn on(addr: SocketAddr) -> AcmeConfig {
        AcmeConfig {
            https_addr: addr,
            base_url: None,
            server_names: default_server_names(),
            server_cert_lifetime: default_server_cert_lifetime(),
            eab_required: false,
            validation_http_port: default_http01_port(),
            validation_tls_port: default_tls_alpn_port(),
            dns_resolver: None,
            localhost_loopback: false,
            authz_reuse: default_authz_reuse(),
            order_lifetime: default_authz_reuse(),
            terms_of_service: None,
            website: None,
            orders_per_minute: 0,
        }
    }

    /// The base URL JWS `url` values are checked against.
    pub fn base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.https_addr))
    }
}

/// `[policy]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.toml` policy files.
    pub dir: PathBuf,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read config {}: create one (see deploy/sigil.example.toml) or run `sigil serve --dev`",
                path.display()
            )
        })?;
        let mut table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("config {} is invalid", path.display()))?;
        let applied = apply_env(&mut table, std::env::vars())?;
        for name in unmatched_env(std::env::vars()) {
            eprintln!(
                "warning: {name} is not a setting and was ignored (settings are SIGIL_<SECTION>_<KEY>, section one of {})",
                SECTIONS.join(", ")
            );
        }
        let mut cfg: Config = table.try_into().with_context(|| {
            if applied.is_empty() {
                format!("config {} is invalid", path.display())
            } else {
                format!(
                    "config {} with overrides from {} is invalid",
                    path.display(),
                    applied.join(", ")
                )
            }
        })?;
        cfg.path = path.to_path_buf();
        cfg.validate()?;
        Ok(cfg)
    }

    /// `server.request_timeout`, parsed.
    pub fn request_timeout(&self) -> Result<Duration> {
        self.server_timeout("request_timeout", &self.server.request_timeout)
    }

    /// `server.request_timeout` and `server.idle_timeout`, parsed.
    pub fn timeouts(&self) -> Result<crate::limits::Timeouts> {
        Ok(crate::limits::Timeouts {
            request: self.request_timeout()?,
            idle: self.server_timeout("idle_timeout", &self.server.idle_timeout)?,
        })
    }

    /// A `[server]` timeout of at least a second.
    fn server_timeout(&self, key: &str, value: &str) -> Result<Duration> {
        let p = self.path.display();
        let d = sigil_core::lifetime::parse_duration(value)
            .with_context(|| format!("{p}: server.{key}"))?;
        if d < Duration::from_secs(1) {
            bail!("{p}: server.{key} must be at least 1s");
        }
        Ok(d)
    }

    /// Checks the settings as a whole; run again after command-line flags
    /// change them.
    pub fn validate(&self) -> Result<()> {
        let p = self.path.display();
        self.timeouts()?;
        if !(1..=MAX_COUNT).contains(&self.server.max_connections) {
            bail!("{p}: server.max_connections must be from 1 to {MAX_COUNT}");
        }
        if self.ca.roots.is_empty() {
            bail!("{p}: ca.roots is empty: list the root certificate(s) issuers must chain to");
        }
        if !(self.server.public_url.starts_with("http://")
            || self.server.public_url.starts_with("https://"))
        {
            bail!(
                "{p}: server.public_url must be an http:// (or https://) URL (got '{}')",
                self.server.public_url
            );
        }
        if let Some(g) = &self.grpc {
            if g.server_names.is_empty() {
                bail!(
                    "{p}: grpc.server_names is empty: list the names clients use to reach the gRPC listener"
                );
            }
            if let Some(o) = g
                .operators
                .iter()
                .find(|o| sigil_core::SpiffeId::parse(o).is_err())
            {
                bail!(
                    "{p}: grpc.operators entry '{o}' is not a SPIFFE ID (spiffe://TRUST-DOMAIN/PATH); operators are identified by SPIFFE ID only"
                );
            }
            sigil_core::lifetime::parse_duration(&g.server_cert_lifetime)
                .with_context(|| format!("{p}: grpc.server_cert_lifetime"))?;
        }
        if let Some(a) = &self.acme {
            if a.server_names.is_empty() {
                bail!(
                    "{p}: acme.server_names is empty: list the names ACME clients use to reach the HTTPS listener"
                );
            }
            if let Some(u) = a.base_url.as_ref().filter(|u| !u.starts_with("https://")) {
                bail!("{p}: acme.base_url must be an https:// URL (got '{u}')");
            }
            if a.base_url.is_none() && a.https_addr.ip().is_unspecified() {
                bail!(
                    "{p}: acme.https_addr listens on {} (every address), which ACME clients cannot use in URLs: set acme.base_url to the URL they use (https://NAME:{})",
                    a.https_addr.ip(),
                    a.https_addr.port()
                );
            }
            for (key, value) in [
                ("acme.server_cert_lifetime", &a.server_cert_lifetime),
                ("acme.authz_reuse", &a.authz_reuse),
                ("acme.order_lifetime", &a.order_lifetime),
            ] {
                sigil_core::lifetime::parse_duration(value)
                    .with_context(|| format!("{p}: {key}"))?;
            }
        }
        self.crl_settings()?;
        self.ocsp_settings()?;
        self.crl_sharding()?;
        self.keep_expired()?;
        let d = self.default_lifetime()?;
        let m = self.max_lifetime()?;
        if d > m {
            bail!(
                "{p}: issuance.default_lifetime ({}) exceeds issuance.max_lifetime ({})",
                self.issuance.default_lifetime,
                self.issuance.max_lifetime
            );
        }
        // The CA issues nothing shorter than a minute (renewals ask for
        // at most the lifetime they had): a shorter setting refuses everything.
        let mut lifetimes = vec![
            ("issuance.default_lifetime", &self.issuance.default_lifetime),
            ("issuance.max_lifetime", &self.issuance.max_lifetime),
        ];
        if let Some(g) = &self.grpc {
            lifetimes.push(("grpc.server_cert_lifetime", &g.server_cert_lifetime));
        }
        if let Some(a) = &self.acme {
            lifetimes.push(("acme.server_cert_lifetime", &a.server_cert_lifetime));
        }
        for (key, value) in lifetimes {
            let l = sigil_core::lifetime::parse_duration(value)
                .with_context(|| format!("{p}: {key}"))?;
            if l < MIN_LIFETIME {
                bail!("{p}: {key} ({value}) must be at least 1m: the CA issues nothing shorter");
            }
            if l > m {
                bail!(
                    "{p}: {key} ({value}) exceeds issuance.max_lifetime ({}); lower it or raise the maximum",
                    self.issuance.max_lifetime
                );
            }
        }
        Ok(())
    }

    /// A path from the file, resolved against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// The database URL with a relative SQLite path resolved.
    pub fn database_url(&self) -> String {
        let url = &self.database.url;
        match url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            Some(rest) if !rest.starts_with('/') => {
                format!("sqlite://{}", self.resolve(Path::new(rest)).display())
            }
            _ => url.clone(),
        }
    }

    fn revocation_duration(&self, key: &str, value: &str, min: Duration) -> Result<Duration> {
        let p = self.path.display();
        let d = sigil_core::lifetime::parse_duration(value)
            .with_context(|| format!("{p}: revocation.{key}"))?;
        if d < min {
            bail!(
                "{p}: revocation.{key} must be at least {}s (got '{value}')",
                min.as_secs()
            );
        }
        Ok(d)
    }

    /// `database.keep_expired`: `None` when set to `off`.
    pub fn keep_expired(&self) -> Result<Option<Duration>> {
        let value = self.database.keep_expired.trim();
        if value.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let p = self.path.display();
        let d = sigil_core::lifetime::parse_duration(value).with_context(|| {
            format!("{p}: database.keep_expired (a duration such as 7d, or off)")
        })?;
        if d < MIN_KEEP_EXPIRED {
            bail!("{p}: database.keep_expired must be at least 1h, or off (got '{value}')");
        }
        Ok(Some(d))
    }

    /// `[revocation]` CRL timing.
    pub fn crl_settings(&self) -> Result<sigil_revocation::CrlSettings> {
        let r = &self.revocation;
        Ok(sigil_revocation::CrlSettings {
            validity: self.revocation_duration(
                "crl_validity",
                &r.crl_validity,
                Duration::from_secs(300),
            )?,
            grace: self.revocation_duration("crl_grace", &r.crl_grace, Duration::ZERO)?,
            ..sigil_revocation::CrlSettings::default()
        })
    }

    /// `[revocation]` time-sharded CRLs, if turned on.
    pub fn crl_sharding(&self) -> Result<Option<sigil_core::CrlSharding>> {
        let r = &self.revocation;
        let width = self.revocation_duration(
            "crl_shard_width",
            &r.crl_shard_width,
            Duration::from_secs(60),
        )?;
        if r.crl_shards == 0 {
            return Ok(None);
        }
        sigil_core::CrlSharding::new(r.crl_shards, width)
            .map(Some)
            .with_context(|| format!("{}: revocation.crl_shards", self.path.display()))
    }

    /// `[revocation]` OCSP responder settings.
    pub fn ocsp_settings(&self) -> Result<sigil_revocation::OcspSettings> {
        let r = &self.revocation;
        let p = self.path.display();
        let nonce = match r.ocsp_nonces.as_str() {
            "sign" => sigil_revocation::NoncePolicy::Honour,
            "ignore" => sigil_revocation::NoncePolicy::Ignore,
            other => {
                bail!("{p}: revocation.ocsp_nonces must be \"sign\" or \"ignore\" (got '{other}')")
            }
        };
        if !(1..=MAX_COUNT).contains(&r.ocsp_max_fresh) {
            bail!("{p}: revocation.ocsp_max_fresh must be from 1 to {MAX_COUNT}");
        }
        let validity =
            self.revocation_duration("ocsp_validity", &r.ocsp_validity, Duration::from_secs(60))?;
        let signer_lifetime = self.revocation_duration(
            "ocsp_signer_lifetime",
            &r.ocsp_signer_lifetime,
            Duration::from_secs(3600),
        )?;
        if signer_lifetime < validity * 2 {
            bail!(
                "{p}: revocation.ocsp_signer_lifetime ({}) must be at least twice revocation.ocsp_validity ({})",
                r.ocsp_signer_lifetime,
                r.ocsp_validity
            );
        }
        Ok(sigil_revocation::OcspSettings {
            validity,
            signer_lifetime,
            nonce,
            max_fresh: r.ocsp_max_fresh,
        })
    }

    /// Parsed default lifetime.
    pub fn default_lifetime(&self) -> Result<Duration> {
        sigil_core::lifetime::parse_duration(&self.issuance.default_lifetime)
            .with_context(|| format!("{}: issuance.default_lifetime", self.path.display()))
    }

    /// Parsed max lifetime.
    pub fn max_lifetime(&self) -> Result<Duration> {
        sigil_core::lifetime::parse_duration(&self.issuance.max_lifetime)
            .with_context(|| format!("{}: issuance.max_lifetime", self.path.display()))
    }
}

/// Config sections that `SIGIL_<SECTION>_<KEY>` environment variables may set.
const SECTIONS: [&str; 8] = [
    "server",
    "database",
    "ca",
    "issuance",
    "policy",
    "revocation",
    "grpc",
    "acme",
];

/// Applies `SIGIL_<SECTION>_<KEY>=VALUE` overrides (e.g. `SIGIL_DATABASE_URL`,
/// `SIGIL_ACME_EAB_REQUIRED=true`) to the parsed file. A value replacing a
/// string is taken as text; anything else is parsed as a TOML value
/// (`true`, `30`, `["a", "b"]`). Variables naming other sections (such as
/// `SIGIL_KEY_PASSPHRASE`) are not config and are left alone. Returns the
/// variables applied; unknown keys fail the load, naming the variable.
pub fn apply_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<Vec<String>> {
    let mut applied = Vec::new();
    let mut vars: Vec<(String, String)> = vars.collect();
    vars.sort();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("SIGIL_") else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let Some((section, key)) = SECTIONS.iter().find_map(|s| {
            lower
                .strip_prefix(s)
                .and_then(|k| k.strip_prefix('_'))
                .filter(|k| !k.is_empty())
                .map(|k| (*s, k.to_string()))
        }) else {
            continue;
        };
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(sect) = entry else {
            bail!("{name}: [{section}] in the config file is not a table");
        };
        let v = match sect.get(&key) {
            Some(toml::Value::String(_)) => toml::Value::String(value),
            // The value is not repeated: it may be a secret.
            _ => parse_value(&value).with_context(|| {
                format!(
                    "{name} is not a valid value for {section}.{key} (a number, true/false, a word, or TOML)"
                )
            })?,
        };
        sect.insert(key, v);
        applied.push(name);
    }
    Ok(applied)
}

/// `SIGIL_*` variables Sigil reads that are not config settings (secrets,
/// the HSM module, logging, test switches), by prefix after `SIGIL_`.
const NOT_CONFIG: [&str; 6] = [
    "KEY_PASSPHRASE",
    "ROOT_PASSPHRASE",
    "PKCS11_",
    "LOG",
    "TEST_",
    "REQUIRE_EXTERNAL",
];

/// `SIGIL_*` variables that are neither a setting's section nor one Sigil
/// reads otherwise: most likely a misspelt section (`SIGIL_DATABSE_URL`),
/// which would otherwise be ignored without a word.
pub fn unmatched_env(vars: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let mut names: Vec<String> = vars
        .map(|(name, _)| name)
        .filter(|name| {
            let Some(rest) = name.strip_prefix("SIGIL_") else {
                return false;
            };
            let lower = rest.to_ascii_lowercase();
            let section = SECTIONS
                .iter()
                .any(|s| lower.strip_prefix(s).is_some_and(|k| k.starts_with('_')));
            !section && !NOT_CONFIG.iter().any(|p| rest.starts_with(p))
        })
        .collect();
    names.sort();
    names
}

/// A TOML value from an environment string; bare words are strings.
fn parse_value(text: &str) -> Result<toml::Value> {
    let doc: Result<toml::Table, _> = toml::from_str(&format!("v = {text}"));
    match doc.ok().and_then(|mut t| t.remove("v")) {
        Some(v) => Ok(v),
        None if !text.contains(['[', '{', '"', '\n']) => Ok(toml::Value::String(text.to_string())),
        None => bail!("not a TOML value"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure
    use super::*;

    /// The documented example loads and validates, every section included.
    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sigil.example.toml");
        let cfg = Config::load(&path).unwrap();
        let acme = cfg.acme.expect("[acme] in the example");
        assert_eq!(acme.base_url(), "https://ca.internal:8443");
        assert!(acme.eab_required);
        assert!(cfg.grpc.is_some());
    }

    #[test]
    fn environment_overrides_name_the_variable() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sigil.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut table: toml::Table = toml::from_str(&text).unwrap();
        let vars = [
            ("SIGIL_DATABASE_URL", "postgres://sigil@db.internal/sigil"),
            ("SIGIL_ACME_EAB_REQUIRED", "false"),
            ("SIGIL_ACME_ORDERS_PER_MINUTE", "7"),
            ("SIGIL_SERVER_HTTP_ADDR", "0.0.0.0:8080"),
            ("SIGIL_KEY_PASSPHRASE", "not config"),
            ("SIGIL_REQUIRE_EXTERNAL", "1"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let applied = apply_env(&mut table, vars.clone().into_iter()).unwrap();
        assert_eq!(applied.len(), 4, "{applied:?}");
        // A misspelt section is reported; what Sigil reads otherwise is not.
        let mut more = vars.to_vec();
        more.push(("SIGIL_DATABSE_URL".into(), "postgres://x".into()));
        more.push(("SIGIL_PKCS11_PIN_FILE".into(), "/run/pin".into()));
        more.push(("SIGIL_LOG".into(), "debug".into()));
        assert_eq!(unmatched_env(more.into_iter()), ["SIGIL_DATABSE_URL"]);
        let cfg: Config = table.try_into().unwrap();
        assert_eq!(cfg.database.url, "postgres://sigil@db.internal/sigil");
        assert_eq!(cfg.server.http_addr.to_string(), "0.0.0.0:8080");
        let acme = cfg.acme.unwrap();
        assert!(!acme.eab_required);
        assert_eq!(acme.orders_per_minute, 7);

        // An unknown key fails the load, and the message names the variable.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sigil.toml");
        std::fs::write(&file, &text).unwrap();
        let mut table: toml::Table = toml::from_str(&text).unwrap();
        let applied = apply_env(
            &mut table,
            [("SIGIL_ACME_NO_SUCH_KEY".to_string(), "1".to_string())].into_iter(),
        )
        .unwrap();
        assert_eq!(applied, ["SIGIL_ACME_NO_SUCH_KEY"]);
        let e = format!("{:#}", table.try_into::<Config>().unwrap_err());
        assert!(e.contains("no_such_key"), "{e}");
        // A value of the wrong type is refused with the variable's name.
        let mut table: toml::Table = toml::from_str(&text).unwrap();
        let e = apply_env(
            &mut table,
            [(
                "SIGIL_ACME_ORDERS_PER_MINUTE".to_string(),
                "[s3cret,".to_string(),
            )]
            .into_iter(),
        )
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("SIGIL_ACME_ORDERS_PER_MINUTE"), "{e}");
        assert!(!e.contains("s3cret"), "the value may be a secret: {e}");
    }

    /// `[revocation]`: defaults match the example, sharding turns on with a
    /// shard count, and bad values are refused naming the key.
    #[test]
    fn revocation_settings_are_checked() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sigil.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert!(cfg.crl_sharding().unwrap().is_none());
        let crl = cfg.crl_settings().unwrap();
        assert_eq!(crl.validity, Duration::from_secs(24 * 3600));
        let ocsp = cfg.ocsp_settings().unwrap();
        assert_eq!(ocsp.nonce, sigil_revocation::NoncePolicy::Honour);
        assert_eq!(ocsp.validity, Duration::from_secs(3600));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sigil.toml");
        let load = |from: &str, to: &str| {
            assert!(text.contains(from), "{from}");
            std::fs::write(&file, text.replace(from, to)).unwrap();
            Config::load(&file).map_err(|e| format!("{e:#}"))
        };
        let sharded = load("crl_shards = 0", "crl_shards = 16").unwrap();
        let s = sharded.crl_sharding().unwrap().unwrap();
        assert_eq!(s.count(), 16);
        let ignoring = load("ocsp_nonces = \"sign\"", "ocsp_nonces = \"ignore\"").unwrap();
        assert_eq!(
            ignoring.ocsp_settings().unwrap().nonce,
            sigil_revocation::NoncePolicy::Ignore
        );
        for (from, to, key) in [
            (
                "crl_shards = 0",
                "crl_shards = 100000",
                "revocation.crl_shards",
            ),
            (
                "crl_shard_width = \"6h\"",
                "crl_shard_width = \"10s\"",
                "revocation.crl_shard_width",
            ),
            (
                "ocsp_nonces = \"sign\"",
                "ocsp_nonces = \"maybe\"",
                "revocation.ocsp_nonces",
            ),
            (
                "crl_validity = \"24h\"",
                "crl_validity = \"soon\"",
                "revocation.crl_validity",
            ),
            (
                "ocsp_signer_lifetime = \"48h\"",
                "ocsp_signer_lifetime = \"1h\"",
                "revocation.ocsp_signer_lifetime",
            ),
        ] {
            let e = load(from, to).unwrap_err();
            assert!(e.contains(key), "{to}: {e}");
        }
    }

    #[test]
    fn keep_expired_is_a_duration_of_an_hour_or_more_or_off() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sigil.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(
            cfg.keep_expired().unwrap(),
            Some(Duration::from_secs(7 * 86400))
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sigil.toml");
        let load = |to: &str| {
            let from = "keep_expired = \"7d\"";
            assert!(text.contains(from));
            std::fs::write(&file, text.replace(from, to)).unwrap();
            Config::load(&file).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            load("keep_expired = \"off\"")
                .unwrap()
                .keep_expired()
                .unwrap(),
            None
        );
        assert_eq!(
            load("keep_expired = \"36h\"")
                .unwrap()
                .keep_expired()
                .unwrap(),
            Some(Duration::from_secs(36 * 3600))
        );
        // Absent: the default week.
        assert_eq!(
            load("").unwrap().keep_expired().unwrap(),
            Some(Duration::from_secs(7 * 86400))
        );
        for bad in ["keep_expired = \"10m\"", "keep_expired = \"forever\""] {
            let e = load(bad).unwrap_err();
            assert!(e.contains("database.keep_expired"), "{bad}: {e}");
        }
    }

    /// Lifetimes the CA could never issue are refused when the file is
    /// loaded, naming the key, instead of every request being refused later.
    #[test]
    fn lifetimes_outside_what_the_ca_issues_are_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sigil.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sigil.toml");
        let load = |from: &str, to: &str, nth: usize| {
            let at = text.match_indices(from).nth(nth).unwrap().0;
            let edited = format!("{}{to}{}", &text[..at], &text[at + from.len()..]);
            std::fs::write(&file, edited).unwrap();
            Config::load(&file).map_err(|e| format!("{e:#}"))
        };
        let short = "at least 1m";
        let long = "exceeds issuance.max_lifetime";
        for (from, to, nth, key, why) in [
            (
                "default_lifetime = \"24h\"",
                "default_lifetime = \"59s\"",
                0,
                "issuance.default_lifetime",
                short,
            ),
            (
                "server_cert_lifetime = \"24h\"",
                "server_cert_lifetime = \"10s\"",
                0,
                "grpc.server_cert_lifetime",
                short,
            ),
            (
                "server_cert_lifetime = \"24h\"",
                "server_cert_lifetime = \"100d\"",
                1,
                "acme.server_cert_lifetime",
                long,
            ),
        ] {
            let e = load(from, to, nth).unwrap_err();
            assert!(e.contains(key) && e.contains(why), "{to}: {e}");
        }
        assert!(load("max_lifetime = \"90d\"", "max_lifetime = \"24h\"", 0).is_ok());
    }

    #[test]
    fn acme_base_url_defaults_to_the_listener_and_must_be_https() {
        let acme = AcmeConfig::on("127.0.0.1:8443".parse().unwrap());
        assert_eq!(acme.base_url(), "https://127.0.0.1:8443");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sigil.example.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("base_url = \"https://", "base_url = \"http://");
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("sigil.toml");
        std::fs::write(&bad, text).unwrap();
        let e = Config::load(&bad).unwrap_err().to_string();
        assert!(e.contains("acme.base_url must be an https:// URL"), "{e}");
        // Listening on every address, the URL clients use must be given.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("base_url = \"https://", "# base_url = \"https://");
        std::fs::write(&bad, text).unwrap();
        let e = Config::load(&bad).unwrap_err().to_string();
        assert!(
            e.contains("0.0.0.0") && e.contains("set acme.base_url"),
            "{e}"
        );
    }

    #[test]
    fn counts_are_bounded() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sigil.example.toml");
        let base = std::fs::read_to_string(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sigil.toml");
        for key in ["max_connections", "ocsp_max_fresh"] {
            for (value, ok) in [
                ("1", true),
                ("1000000", true),
                ("0", false),
                ("9223372036854775807", false),
            ] {
                let text: Vec<String> = base
                    .lines()
                    .map(|l| match l.starts_with(&format!("{key} = ")) {
                        true => format!("{key} = {value}"),
                        false => l.to_string(),
                    })
                    .collect();
                let text = text.join("\n");
                assert!(
                    text.contains(&format!("\n{key} = {value}\n")),
                    "{key} is in the example"
                );
                std::fs::write(&file, text).unwrap();
                let got = Config::load(&file);
                assert_eq!(got.is_ok(), ok, "{key} = {value}: {got:?}");
                if let Err(e) = got {
                    assert!(e.to_string().contains(key), "{e}");
                }
            }
        }
    }
}
