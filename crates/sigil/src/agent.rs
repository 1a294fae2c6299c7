//! `sigil agent`: obtains a certificate over the gRPC CSR API and keeps it
//! fresh. Renews at the server's suggested time (with jitter, earlier on a
//! WatchRotation notice), retries with backoff, writes key/cert/chain
//! atomically, runs a reload hook, and exports its certificate's expiry as a
//! Prometheus gauge. A still-valid certificate is never removed on failure.

use anyhow::{Context, Result, bail};
use clap::Args;
use sigil_core::{Clock as _, LeafInfo, SystemClock};
use sigil_grpc::pb::certificate_authority_client::CertificateAuthorityClient;
use sigil_grpc::pb::{CertificateResponse, RenewRequest, SignRequest, WatchRotationRequest};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// `sigil agent` arguments.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// gRPC address of the CA, HOST:PORT (HOST must be in its certificate).
    #[arg(long)]
    server: String,
    /// PEM file with the CA's root certificate(s).
    #[arg(long)]
    ca_bundle: PathBuf,
    /// File holding a one-time bootstrap token, for the first certificate.
    #[arg(long, conflicts_with_all = ["cert", "key"])]
    token_file: Option<PathBuf>,
    /// An existing Sigil certificate (chain PEM) to renew from.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The private key (PKCS#8 PEM) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Where key.pem (0600), cert.pem and chain.pem are written.
    #[arg(long)]
    out_dir: PathBuf,
    /// Shell command run after each new certificate is written.
    #[arg(long)]
    reload_cmd: Option<String>,
    /// Signal a process after each new certificate: PID:SIGNAL (e.g. 1234:HUP).
    #[arg(long)]
    reload_signal: Option<String>,
    /// Serve Prometheus metrics (certificate expiry) on this address.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Certificate profile for the first certificate: mtls, server or client.
    #[arg(long, default_value = "mtls")]
    profile: String,
    /// Requested certificate lifetime (e.g. 2m, 24h); default: the CA's.
    #[arg(long)]
    lifetime: Option<String>,
    /// Obtain (or load) the certificate, write it, and exit instead of renewing forever.
    #[arg(long)]
    once: bool,
}

/// What the agent currently holds.
struct Held {
    chain_pem: String,
    key_pem: String,
    leaf: LeafInfo,
    renew_after: i64,
}

#[derive(Default)]
struct Metrics {
    not_after: AtomicI64,
    renewals: AtomicU64,
    failures: AtomicU64,
}

/// Runs the agent.
pub async fn run(args: AgentArgs) -> Result<ExitCode> {
    let bundle = std::fs::read_to_string(&args.ca_bundle)
        .with_context(|| format!("cannot read --ca-bundle {}", args.ca_bundle.display()))?;
    let (host, _) = args
        .server
        .rsplit_once(':')
        .with_context(|| format!("--server must be HOST:PORT (got '{}')", args.server))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create --out-dir {}", args.out_dir.display()))?;
    let client = Client {
        url: format!("https://{}", args.server),
        host,
        bundle,
    };
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, metrics.clone()).await?;
    }

    // Start from: files already in out-dir (a restart), --cert/--key, or a token.
    let mut held = match load_existing(&args)? {
        Some(h) => h,
        None => {
            let token_file = args.token_file.as_ref().context(
                "no certificate in --out-dir yet: pass --token-file (first certificate) or --cert/--key",
            )?;
            let token = std::fs::read_to_string(token_file)
                .with_context(|| format!("cannot read --token-file {}", token_file.display()))?;
            let lifetime = match &args.lifetime {
                Some(l) => sigil_core::lifetime::parse_duration(l)
                    .context("--lifetime")?
                    .as_secs(),
                None => 0,
            };
            let h = client
                .sign(token.trim(), &args.profile, lifetime)
                .await
                .context("obtaining the first certificate failed")?;
            install(&args, &h)?;
            h
        }
    };
    metrics
        .not_after
        .store(held.leaf.not_after.unix_timestamp(), Ordering::Relaxed);
    println!(
        "certificate {} for {} valid until {}; renewing after {}",
        held.leaf.serial,
        names(&held.leaf),
        held.leaf.not_after,
        fmt_unix(held.renew_after)
    );
    if args.once {
        return Ok(ExitCode::SUCCESS);
    }

    let mut failures = 0u32;
    loop {
        let due = jittered(&held);
        let now = SystemClock.now().unix_timestamp();
        if now < due {
            wait_until_due(&client, &held, due).await;
        }
        match client.renew(&held).await {
            Ok(h) => {
                install(&args, &h)?;
                failures = 0;
                metrics.renewals.fetch_add(1, Ordering::Relaxed);
                metrics
                    .not_after
                    .store(h.leaf.not_after.unix_timestamp(), Ordering::Relaxed);
                println!(
                    "renewed: certificate {} valid until {}; next renewal after {}",
                    h.leaf.serial,
                    h.leaf.not_after,
                    fmt_unix(h.renew_after)
                );
                held = h;
            }
            Err(e) => {
                failures += 1;
                metrics.failures.fetch_add(1, Ordering::Relaxed);
                let now = SystemClock.now().unix_timestamp();
                let left = held.leaf.not_after.unix_timestamp() - now;
                if left <= 0 {
                    bail!(
                        "certificate {} expired and renewal keeps failing ({e:#}); obtain a new one with a bootstrap token",
                        held.leaf.serial
                    );
                }
                let backoff = (1u64 << failures.min(6))
                    .min(60)
                    .min(u64::try_from(left / 4).unwrap_or(1).max(1));
                eprintln!(
                    "renewal failed ({e:#}); certificate still valid for {left} s; retrying in {backoff} s"
                );
                tokio::time::sleep(Duration::from_secs(backoff)).await;
            }
        }
    }
}

fn names(leaf: &LeafInfo) -> String {
    leaf.identifiers
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_unix(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// The renewal time moved earlier by up to 10% of the lifetime, so a fleet
/// issued at once does not renew at once.
fn jittered(h: &Held) -> i64 {
    let lifetime = (h.leaf.not_after - h.leaf.not_before)
        .whole_seconds()
        .max(1);
    let mut b = [0u8; 8];
    let _ = sigil_signer::random_bytes(&mut b);
    let spread = lifetime / 10;
    let jitter = if spread > 0 {
        i64::try_from(u64::from_le_bytes(b) % u64::try_from(spread).unwrap_or(1)).unwrap_or(0)
    } else {
        0
    };
    h.renew_after - jitter
}

/// Sleeps until `due`, or until the CA says to renew now.
async fn wait_until_due(client: &Client, held: &Held, due: i64) {
    let now = SystemClock.now().unix_timestamp();
    let sleep = tokio::time::sleep(Duration::from_secs(u64::try_from(due - now).unwrap_or(0)));
    tokio::pin!(sleep);
    let notice = async {
        loop {
            match client.watch(held).await {
                Ok(reason) => return reason,
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "rotation watch ended; reconnecting");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    };
    tokio::select! {
        _ = &mut sleep => {}
        reason = notice => println!("renewing early: {reason}"),
    }
}

struct Client {
    url: String,
    host: String,
    bundle: String,
}

impl Client {
    async fn channel(&self, identity: Option<&Held>) -> Result<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.bundle))
            .domain_name(self.host.clone());
        if let Some(h) = identity {
            tls = tls.identity(Identity::from_pem(&h.chain_pem, &h.key_pem));
        }
        Endpoint::from_shared(self.url.clone())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .with_context(|| format!("cannot reach the CA at {}", self.url))
    }

    async fn sign(&self, token: &str, profile: &str, lifetime_seconds: u64) -> Result<Held> {
        let (key_pem, csr) = new_key_and_csr(token_sans(token)?)?;
        let mut client = CertificateAuthorityClient::new(self.channel(None).await?);
        let mut req = tonic::Request::new(SignRequest {
            csr,
            profile: profile.into(),
            lifetime_seconds,
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .context("the token holds characters that cannot be sent")?,
        );
        let resp = client
            .sign(req)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()))?;
        held_from(resp.into_inner(), key_pem)
    }

    /// Renews with a new key (re-key on every renewal).
    async fn renew(&self, current: &Held) -> Result<Held> {
        let sans = current
            .leaf
            .identifiers
            .iter()
            .map(|i| i.to_string())
            .collect();
        let (key_pem, csr) = new_key_and_csr(sans)?;
        let mut client = CertificateAuthorityClient::new(self.channel(Some(current)).await?);
        let resp = client
            .renew(RenewRequest { csr })
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()))?;
        held_from(resp.into_inner(), key_pem)
    }

    /// Returns when the CA tells this holder to renew.
    async fn watch(&self, current: &Held) -> Result<String> {
        use sigil_grpc::pb::rotation_notice::Kind;
        let mut client = CertificateAuthorityClient::new(self.channel(Some(current)).await?);
        let mut stream = client
            .watch_rotation(WatchRotationRequest {
                serial: current.leaf.serial.to_hex(),
            })
            .await?
            .into_inner();
        let issued = current.leaf.not_before.unix_timestamp();
        while let Some(n) = stream.message().await? {
            match n.kind() {
                Kind::IssuerRotated => return Ok(format!("issuer rotated to {}", n.active_issuer)),
                Kind::RenewNow if n.renew_issued_before == 0 || issued < n.renew_issued_before => {
                    return Ok(n.message);
                }
                _ => {}
            }
        }
        bail!("the CA closed the rotation watch")
    }
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}

/// The names a token grants (read, not verified: the CA verifies it).
fn token_sans(token: &str) -> Result<Vec<String>> {
    use base64::Engine;
    let payload = token
        .split('.')
        .nth(1)
        .context("the bootstrap token is not a JWT (expected header.payload.signature)")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .context("the bootstrap token's payload is not base64url")?;
    let claims: sigil_grpc::tokens::Claims =
        serde_json::from_slice(&bytes).context("the bootstrap token's claims are unreadable")?;
    Ok(claims.sans)
}

fn new_key_and_csr(sans: Vec<String>) -> Result<(String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let mut params = rcgen::CertificateParams::new(sans).context("invalid name for the CSR")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?.der().to_vec();
    Ok((key.serialize_pem(), csr))
}

fn held_from(resp: CertificateResponse, key_pem: String) -> Result<Held> {
    let leaf_der = resp
        .chain_der
        .first()
        .context("the CA returned an empty chain")?;
    let leaf = LeafInfo::from_der(leaf_der).context("the CA returned an unreadable certificate")?;
    Ok(Held {
        chain_pem: resp.chain_pem,
        key_pem,
        leaf,
        renew_after: resp.renew_after,
    })
}

fn load_existing(args: &AgentArgs) -> Result<Option<Held>> {
    let (chain_path, key_path) = match (&args.cert, &args.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (args.out_dir.join("chain.pem"), args.out_dir.join("key.pem")),
    };
    if !chain_path.exists() || !key_path.exists() {
        if args.cert.is_some() {
            bail!(
                "--cert {} or --key {} does not exist",
                chain_path.display(),
                key_path.display()
            );
        }
        return Ok(None);
    }
    let chain_pem = std::fs::read_to_string(&chain_path)
        .with_context(|| format!("cannot read {}", chain_path.display()))?;
    let key_pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let der = sigil_core::csr::decode_pem_or_der(chain_pem.as_bytes())
        .with_context(|| format!("{} holds no certificate", chain_path.display()))?;
    let leaf = LeafInfo::from_der(&der)
        .with_context(|| format!("{} is not a readable certificate", chain_path.display()))?;
    if leaf.not_after <= SystemClock.now() {
        if args.token_file.is_some() {
            eprintln!(
                "certificate in {} has expired; using the bootstrap token",
                chain_path.display()
            );
            return Ok(None);
        }
        bail!(
            "certificate {} in {} has expired; obtain a new one with --token-file",
            leaf.serial,
            chain_path.display()
        );
    }
    let renew_after = sigil_grpc::renew_after(
        leaf.not_before.unix_timestamp(),
        leaf.not_after.unix_timestamp(),
    );
    Ok(Some(Held {
        chain_pem,
        key_pem,
        leaf,
        renew_after,
    }))
}

/// Writes key, leaf and chain atomically, then runs the reload hooks.
fn install(args: &AgentArgs, h: &Held) -> Result<()> {
    let leaf_pem = first_pem_block(&h.chain_pem);
    // Key first: a reader that sees the new certificate also finds its key.
    write_atomic(&args.out_dir.join("key.pem"), h.key_pem.as_bytes(), 0o600)?;
    write_atomic(&args.out_dir.join("cert.pem"), leaf_pem.as_bytes(), 0o644)?;
    write_atomic(
        &args.out_dir.join("chain.pem"),
        h.chain_pem.as_bytes(),
        0o644,
    )?;
    if let Some(cmd) = &args.reload_cmd {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .with_context(|| format!("cannot run --reload-cmd '{cmd}'"))?;
        if !status.success() {
            eprintln!("warning: --reload-cmd '{cmd}' exited with {status}");
        }
    }
    if let Some(spec) = &args.reload_signal {
        let (pid, sig) = spec
            .split_once(':')
            .with_context(|| format!("--reload-signal must be PID:SIGNAL (got '{spec}')"))?;
        let status = std::process::Command::new("kill")
            .arg("-s")
            .arg(sig)
            .arg(pid)
            .status()
            .context("cannot run kill for --reload-signal")?;
        if !status.success() {
            eprintln!("warning: signalling {pid} with {sig} failed ({status})");
        }
    }
    Ok(())
}

fn first_pem_block(chain: &str) -> String {
    const END: &str = "-----END CERTIFICATE-----";
    match chain.find(END) {
        Some(i) => format!("{}\n", &chain[..i + END.len()]),
        None => chain.to_string(),
    }
}

/// Writes `path` via a temporary file in the same directory, fsync and rename,
/// so readers see the old or the new content, never a mix.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

async fn serve_metrics(addr: std::net::SocketAddr, m: Arc<Metrics>) -> Result<()> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {addr}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = m.clone();
            async move {
                let not_after = m.not_after.load(Ordering::Relaxed);
                let now = SystemClock.now().unix_timestamp();
                format!(
                    "# HELP sigil_agent_certificate_not_after_seconds Expiry of the current certificate (unix time).\n\
                     # TYPE sigil_agent_certificate_not_after_seconds gauge\n\
                     sigil_agent_certificate_not_after_seconds {not_after}\n\
                     # HELP sigil_agent_certificate_expires_in_seconds Seconds until the current certificate expires.\n\
                     # TYPE sigil_agent_certificate_expires_in_seconds gauge\n\
                     sigil_agent_certificate_expires_in_seconds {}\n\
                     # HELP sigil_agent_renewals_total Successful renewals.\n\
                     # TYPE sigil_agent_renewals_total counter\n\
                     sigil_agent_renewals_total {}\n\
                     # HELP sigil_agent_renewal_failures_total Failed renewal attempts.\n\
                     # TYPE sigil_agent_renewal_failures_total counter\n\
                     sigil_agent_renewal_failures_total {}\n",
                    not_after - now,
                    m.renewals.load(Ordering::Relaxed),
                    m.failures.load(Ordering::Relaxed)
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok(())
}
