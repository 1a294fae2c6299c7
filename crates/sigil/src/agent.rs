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
    /// Where key.pem (0600), cert.pem, chain.pem and combined.pem (the key
    /// then the chain, 0600) are written, as links into `..data`, which
    /// changes to a new set of files in one step.
    #[arg(long)]
    out_dir: PathBuf,
    /// Shell command run after each new certificate is written.
    #[arg(long)]
    reload_cmd: Option<String>,
    /// Signal a process after each new certificate: PID:SIGNAL (e.g.
    /// 1234:HUP), or PIDFILE:SIGNAL (e.g. /run/nginx.pid:HUP; the PID is read
    /// from the file at each reload, so it follows restarts).
    #[arg(long, value_parser = parse_reload_signal)]
    reload_signal: Option<ReloadSignal>,
    /// Serve Prometheus metrics (certificate expiry) on this address.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Certificate profile for the first certificate. Only profiles with
    /// clientAuth can renew themselves over mTLS, so: mtls or client.
    #[arg(long, default_value = "mtls", value_parser = ["mtls", "client"])]
    profile: String,
    /// Attempts at the first certificate before giving up (transient errors only).
    #[arg(long, default_value_t = 4)]
    first_attempts: u32,
    /// Requested certificate lifetime (e.g. 2m, 24h); default: the CA's.
    #[arg(long)]
    lifetime: Option<String>,
    /// Obtain (or load) the certificate, write it, and exit instead of renewing forever.
    #[arg(long)]
    once: bool,
}

/// `--reload-signal`: which process gets which signal.
#[derive(Debug, Clone)]
struct ReloadSignal {
    target: SignalTarget,
    signal: String,
}

/// The process a reload signal goes to.
#[derive(Debug, Clone, PartialEq)]
enum SignalTarget {
    Pid(u32),
    /// A file holding the PID (as daemons write it), read at each reload.
    PidFile(PathBuf),
}

/// Signals a reload can be asked with (names as `kill -s` takes them).
const SIGNALS: [&str; 6] = ["HUP", "USR1", "USR2", "INT", "QUIT", "TERM"];

/// Parses PID:SIGNAL or PIDFILE:SIGNAL (a path, with a `/`); refuses PIDs
/// that name a process group or every process (0, negative), and signals
/// other than [`SIGNALS`].
fn parse_reload_signal(spec: &str) -> Result<ReloadSignal, String> {
    let (pid, signal) = spec.rsplit_once(':').ok_or_else(|| {
        format!("expected PID:SIGNAL or PIDFILE:SIGNAL, e.g. 1234:HUP (got '{spec}')")
    })?;
    let target = if pid.contains('/') {
        SignalTarget::PidFile(PathBuf::from(pid))
    } else {
        SignalTarget::Pid(parse_pid(pid).ok_or_else(|| {
            format!(
                "'{pid}' is not a process id (a positive number) or a PID file's path (with a '/')"
            )
        })?)
    };
    let upper = signal.to_ascii_uppercase();
    let signal = upper.strip_prefix("SIG").unwrap_or(&upper).to_string();
    if !SIGNALS.contains(&signal.as_str()) {
        return Err(format!(
            "unknown signal '{signal}'; one of {}",
            SIGNALS.join(", ")
        ));
    }
    Ok(ReloadSignal { target, signal })
}

/// A PID that names one process: positive, and within `pid_t`.
fn parse_pid(text: &str) -> Option<u32> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|p| *p > 0 && i32::try_from(*p).is_ok())
}

/// Sends the reload signal: to the fixed PID, or to the one the PID file
/// holds now. A PID file that cannot be read or holds no PID is reported
/// and nothing is signalled.
async fn send_reload_signal(r: &ReloadSignal) -> bool {
    let pid = match &r.target {
        SignalTarget::Pid(pid) => *pid,
        SignalTarget::PidFile(path) => {
            let read = std::fs::read_to_string(path);
            match read.as_deref().map(parse_pid) {
                Ok(Some(pid)) => pid,
                Ok(None) => {
                    eprintln!(
                        "warning: {} holds no process id; no {} sent",
                        path.display(),
                        r.signal
                    );
                    return false;
                }
                Err(e) => {
                    eprintln!(
                        "warning: cannot read PID file {}: {e}; no {} sent",
                        path.display(),
                        r.signal
                    );
                    return false;
                }
            }
        }
    };
    let signal = &r.signal;
    run_hook(
        tokio::process::Command::new("kill")
            .arg("-s")
            .arg(signal)
            .arg(pid.to_string()),
        &format!("kill -s {signal} {pid}"),
    )
    .await
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
    /// The out-dir's [`RELOAD_PENDING`] marker, reported as a gauge.
    reload_marker: Option<PathBuf>,
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
    // Held until the agent exits (the lock goes with the open file).
    let _lock = lock_out_dir(&args.out_dir)?;
    let client = Client {
        url: format!("https://{}", args.server),
        host,
        bundle,
    };
    let metrics = Arc::new(Metrics {
        reload_marker: Some(args.out_dir.join(RELOAD_PENDING)),
        ..Metrics::default()
    });
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, metrics.clone()).await?;
    }

    // Reload hooks a previous run owed (they failed, or it stopped before
    // running them).
    let owed = reload_pending(&args);
    // Start from: files already in out-dir (a restart), --cert/--key, or a token.
    let mut held = match load_existing(&args)? {
        Some((h, seeded)) => {
            // A first attempt's key left behind by a crash right after its
            // install: the installed pair supersedes it. Another one (a
            // replacement for a revoked certificate, interrupted after the
            // CA spent the token) is kept, so the next attempt with that
            // token gets the certificate issued to it.
            let pending = args.out_dir.join(PENDING_KEY);
            if std::fs::read_to_string(&pending).is_ok_and(|k| k.trim() == h.key_pem.trim()) {
                let _ = std::fs::remove_file(&pending);
            }
            if seeded {
                install(&args, &h).await?;
            } else if current_set(&args.out_dir).is_none() {
                // Files written before `..data` (and perhaps before
                // combined.pem): the same contents, as a set. Nothing
                // changes for the service, so nothing is reloaded.
                write_set(&args.out_dir, &h)?;
                eprintln!(
                    "note: the files in {} are now links into {}/..data, which changes in one step at each renewal; a watcher of the files themselves should watch the directory",
                    args.out_dir.display(),
                    args.out_dir.display()
                );
            }
            h
        }
        None => bootstrap(&args, &client).await?,
    };
    if owed && reload_pending(&args) {
        reload(&args).await;
    }
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
        if SystemClock.now().unix_timestamp() >= held.renew_after {
            // One run has no history to weigh a handshake refusal against:
            // it is acted on as the CA's own refusal is.
            let h = match client.renew(&held).await {
                Err(e) if refused_for_good(&e) || refused_in_tls(&e) => {
                    after_refusal(&args, &client, &held, e).await?
                }
                r => {
                    let h = r.context("renewing the certificate failed")?;
                    install(&args, &h).await?;
                    h
                }
            };
            println!(
                "renewed: certificate {} valid until {}",
                h.leaf.serial, h.leaf.not_after
            );
        }
        // The files are in place but the service may still use the old
        // ones: a run from cron or a timer must see that.
        if reload_pending(&args) {
            eprintln!(
                "error: the reload hooks failed; the service may still use the previous certificate. The next agent run tries them again"
            );
            return Ok(ExitCode::from(3));
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut failures = 0u32;
    // A renewed certificate whose files could not be written: installing it
    // is retried, rather than asking the CA for yet another one.
    let mut unsaved: Option<Held> = None;
    // Not before this (unix s): a certificate just obtained is not renewed at
    // once even when this host's clock says it is due.
    let mut earliest = 0i64;
    // Drawn once per certificate: a failed attempt is retried after its
    // backoff, not at another random time.
    let mut planned = jittered(&held);
    let mut tls_refusals = Persisting::default();
    loop {
        let (renewed, installed) = match unsaved.take() {
            Some(h) => (Ok(h), false),
            None => {
                let due = planned.max(earliest);
                let now = SystemClock.now().unix_timestamp();
                if now < due {
                    wait_until_due(&args, &client, &held, due).await;
                }
                // The CA refusing this certificate itself (revoked,
                // expired, not its own) is acted on at once; refusing it in
                // the TLS handshake, once that has lasted (one node with a
                // wrong clock or configuration must not make a fleet spend
                // its tokens or stop). Any other failure, refusals included
                // (a policy being changed, a proxy in front of the CA being
                // redeployed), is retried while the certificate is valid.
                let result = client.renew(&held).await;
                let now = SystemClock.now().unix_timestamp();
                let left = held.leaf.not_after.unix_timestamp() - now;
                match result {
                    Err(e) if refused_for_good(&e) => {
                        (Ok(after_refusal(&args, &client, &held, e).await?), true)
                    }
                    Err(e) if refused_in_tls(&e) && tls_refusals.lasted(now, left) => {
                        (Ok(after_refusal(&args, &client, &held, e).await?), true)
                    }
                    Err(e) if refused_in_tls(&e) => {
                        eprintln!(
                            "warning: the CA refuses certificate {} in the TLS handshake; if it still does after {} s, the agent acts on it as a refusal (a new certificate with --token-file, or it stops)",
                            held.leaf.serial,
                            tls_refusals.span(left)
                        );
                        (Err(e), false)
                    }
                    r => {
                        tls_refusals = Persisting::default();
                        (r, false)
                    }
                }
            }
        };
        let renewed = match renewed {
            Ok(h) if installed => Ok(h),
            Ok(h) => match install(&args, &h).await {
                Ok(()) => Ok(h),
                Err(e) => {
                    let e = e.context(format!(
                        "certificate {} was issued but could not be installed",
                        h.leaf.serial
                    ));
                    unsaved = Some(h);
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match renewed {
            Ok(h) => {
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
                let now = SystemClock.now().unix_timestamp();
                if h.renew_after <= now {
                    eprintln!(
                        "warning: the new certificate is already due for renewal by this host's clock; is the clock right?"
                    );
                }
                earliest = now + min_gap(&h.leaf);
                planned = jittered(&h);
                held = h;
            }
            Err(e) => {
                failures += 1;
                metrics.failures.fetch_add(1, Ordering::Relaxed);
                let now = SystemClock.now().unix_timestamp();
                // A renewed certificate not yet written is the one to keep
                // trying with, even after the installed one has expired.
                let newest = unsaved.as_ref().unwrap_or(&held);
                let left = newest.leaf.not_after.unix_timestamp() - now;
                if left <= 0 {
                    bail!(
                        "certificate {} expired and renewal keeps failing ({e:#}); obtain a new one with a bootstrap token",
                        newest.leaf.serial
                    );
                }
                let wait = renewal_backoff(failures, left, retry_hint(&e));
                eprintln!(
                    "renewal failed ({e:#}); certificate still valid for {left} s; retrying within {} s",
                    wait.as_secs_f64().ceil()
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The first certificate, by the bootstrap token in `--token-file`
/// (installed when this returns).
async fn bootstrap(args: &AgentArgs, client: &Client) -> Result<Held> {
    let token_file = args.token_file.as_ref().context(
        "no certificate in --out-dir yet: pass --token-file (first certificate) or --cert/--key",
    )?;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read --token-file {}", token_file.display()))?;
    // Not refused: secret volumes are often group-readable, and the token is
    // spent once used. Until then it obtains certificates (and may revoke
    // them), so say so.
    if let Ok(Some(mode)) = crate::passphrase::readable_by_others(token_file) {
        eprintln!(
            "warning: --token-file {} is readable by group or others (mode {mode:o}); until it is used, whoever reads it can obtain this certificate: chmod 600 {}",
            token_file.display(),
            token_file.display()
        );
    }
    let lifetime = match &args.lifetime {
        Some(l) => sigil_core::lifetime::parse_duration(l)
            .context("--lifetime")?
            .as_secs(),
        None => 0,
    };
    // One key for every attempt, kept on disk until the certificate is
    // installed: if a reply was lost after the CA spent the token (even if
    // this process then died), the same key and names get that certificate.
    let key_pem = pending_key(&args.out_dir)?;
    let csr = csr_for(&key_pem, token_sans(token.trim())?)?;
    let mut attempt = 1;
    let h = loop {
        let sent = client
            .sign(token.trim(), &key_pem, &csr, &args.profile, lifetime)
            .await;
        match sent {
            Ok(h) => break h,
            Err(e) if attempt < args.first_attempts && is_transient(&e) => {
                // As the CA asks when it is a rate limit (up to a minute).
                let wait = (1u64 << (attempt - 1).min(5)).max(retry_hint(&e).unwrap_or(0).min(60));
                eprintln!("first certificate: {e:#}; retrying in {wait} s");
                // Up to a quarter more at random: agents refused together
                // (a rate limit) do not come back together.
                let wait = Duration::from_secs(wait);
                tokio::time::sleep(wait + random_duration(wait / 4)).await;
                attempt += 1;
            }
            Err(e) => return Err(e.context("obtaining a certificate with --token-file failed")),
        }
    };
    install(args, &h).await?;
    let pending = args.out_dir.join(PENDING_KEY);
    if let Err(e) = std::fs::remove_file(&pending) {
        eprintln!(
            "warning: cannot remove {} ({e}); remove it by hand",
            pending.display()
        );
    }
    Ok(h)
}

/// When the CA refuses `held` itself for good (it was revoked, expired or
/// is not the CA's): a new certificate by `--token-file` when one was
/// given, else an error that ends the agent. The files stay either way.
async fn after_refusal(
    args: &AgentArgs,
    client: &Client,
    held: &Held,
    e: anyhow::Error,
) -> Result<Held> {
    let refused = format!(
        "the CA refuses to renew certificate {} ({e:#})",
        held.leaf.serial
    );
    if args.token_file.is_none() {
        bail!(
            "{refused}; its files stay in {} until it expires on {}. Restart the agent with --token-file holding a new bootstrap token",
            args.out_dir.display(),
            held.leaf.not_after
        );
    }
    eprintln!("{refused}; obtaining a new certificate with --token-file");
    bootstrap(args, client).await.with_context(|| {
        format!("{refused}; write a new bootstrap token to --token-file and restart the agent")
    })
}

/// The least time between obtaining a certificate and renewing it:
/// a twentieth of its lifetime, at least 30 s, at most half of it.
fn min_gap(leaf: &LeafInfo) -> i64 {
    let lifetime = (leaf.not_after - leaf.not_before).whole_seconds().max(0);
    (lifetime / 20).max(30).min(lifetime / 2)
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
    h.renew_after - random_below(lifetime / 10)
}

/// A uniformly random number in `0..n` (0 when `n <= 0`).
fn random_below(n: i64) -> i64 {
    let Ok(n) = u64::try_from(n) else {
        return 0;
    };
    if n == 0 {
        return 0;
    }
    let mut b = [0u8; 8];
    let _ = sigil_signer::random_bytes(&mut b);
    i64::try_from(u64::from_le_bytes(b) % n).unwrap_or(0)
}

/// Over how long a fleet spreads its renewals after an issuer rotation
/// (never later than each certificate's own renewal time).
const ROTATION_SPREAD: i64 = 3600;

/// Why, and by when, the CA asks for an early renewal.
struct Early {
    reason: String,
    /// Renew at a random moment before this (unix s); `None`: at once.
    by: Option<i64>,
}

/// Sleeps until `due`, or until the CA asks for an early renewal: at once
/// when this certificate was revoked, else at a random moment before the
/// CA's deadline, so a whole fleet does not renew in the same second. Keeps
/// listening while it waits: a later, more urgent notice (the operator's
/// deadline after a rotation, a revocation) moves the renewal earlier.
/// Meanwhile runs owed reload hooks again every [`RELOAD_RETRY`].
async fn wait_until_due(args: &AgentArgs, client: &Client, held: &Held, due: i64) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Early>(4);
    let watcher = async {
        let mut failures = 0u32;
        loop {
            let started = std::time::Instant::now();
            let ended = client.watch(held, &tx).await;
            // A watch that lasted is a fresh start; quick ends back off, so
            // a fleet does not reconnect in step to a CA that keeps failing.
            if started.elapsed() >= WATCH_HEALTHY {
                failures = 0;
            }
            failures += 1;
            let wait = watch_backoff(failures);
            match ended {
                Err(e) if failures == WATCH_WARN_AFTER => eprintln!(
                    "warning: the rotation watch keeps failing ({e:#}); early renewals may be missed until it reconnects (retrying every few minutes)"
                ),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "rotation watch ended; reconnecting")
                }
                Ok(()) => tracing::debug!("rotation watch closed by the CA; reconnecting"),
            }
            tokio::time::sleep(wait).await;
        }
    };
    tokio::pin!(watcher);
    let mut at = due;
    let mut last_reload = std::time::Instant::now();
    loop {
        let pending = reload_pending(args);
        if pending && last_reload.elapsed() >= RELOAD_RETRY {
            reload(args).await;
            last_reload = std::time::Instant::now();
        }
        let now = SystemClock.now().unix_timestamp();
        if at <= now {
            return;
        }
        // In steps of at most a minute, each checked against the wall clock:
        // the monotonic clock stops while the host is suspended.
        let mut step = u64::try_from((at - now).min(WALL_CLOCK_STEP)).unwrap_or(0);
        if pending {
            step = step.min(RELOAD_RETRY.as_secs());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(step)) => {}
            _ = &mut watcher => return,
            Some(early) = rx.recv() => {
                let now = SystemClock.now().unix_timestamp();
                let when = early.by.map_or(now, |by| now + random_below(by.min(at) - now));
                if when < at {
                    at = when;
                    if at > now {
                        println!("renewing early at {}: {}", fmt_unix(at), early.reason);
                    } else {
                        println!("renewing early: {}", early.reason);
                    }
                }
            }
        }
    }
}

/// A rotation watch that lasted this long resets the reconnect backoff.
const WATCH_HEALTHY: Duration = Duration::from_secs(60);
/// Consecutive quick watch failures after which a warning is printed.
const WATCH_WARN_AFTER: u32 = 4;

/// The wait before reconnecting the rotation watch after `failures` quick
/// ends in a row: 5 s doubling to at most 5 minutes, the latter half of it
/// random (a CA restart ends every watch at once).
fn watch_backoff(failures: u32) -> Duration {
    let ceiling = (5u64 << failures.saturating_sub(1).min(6)).min(300);
    let half = Duration::from_secs(ceiling / 2);
    Duration::from_secs(ceiling) - half + random_duration(half)
}

/// `d` with its latter half random (to the millisecond).
fn spread(d: Duration) -> Duration {
    d - d / 2 + random_duration(d / 2)
}

/// A random duration from zero to `max`, in milliseconds.
fn random_duration(max: Duration) -> Duration {
    let ms = i64::try_from(max.as_millis()).unwrap_or(i64::MAX - 1);
    Duration::from_millis(u64::try_from(random_below(ms + 1)).unwrap_or(0))
}

/// Longest sleep (s) before the wall clock is read again.
const WALL_CLOCK_STEP: i64 = 60;

/// Longest wait for a connection to the CA, TLS handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the answer to one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle connection to the CA is checked.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Longest wait for the answer to a keepalive ping.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(15);

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
        // Keepalive pings: a CA that vanishes without closing the
        // connection (power loss, a dropped flow) ends the rotation watch
        // within a minute instead of leaving it waiting for ever.
        let endpoint = Endpoint::from_shared(self.url.clone())?
            .tls_config(tls)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .tcp_keepalive(Some(KEEPALIVE))
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        // The connect timeout covers TCP only: a CA that accepts connections
        // but never completes the TLS handshake must not hang the agent.
        match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(channel) => channel.with_context(|| format!("cannot reach the CA at {}", self.url)),
            Err(_) => bail!(
                "cannot reach the CA at {}: no TLS handshake within {} s",
                self.url,
                CONNECT_TIMEOUT.as_secs()
            ),
        }
    }

    async fn sign(
        &self,
        token: &str,
        key_pem: &str,
        csr: &[u8],
        profile: &str,
        lifetime_seconds: u64,
    ) -> Result<Held> {
        let mut client = CertificateAuthorityClient::new(self.channel(None).await?);
        let mut req = tonic::Request::new(SignRequest {
            csr: csr.to_vec(),
            profile: profile.into(),
            lifetime_seconds,
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .context("the token holds characters that cannot be sent")?,
        );
        let resp = client.sign(req).await.map_err(refused)?;
        held_from(resp.into_inner(), key_pem.to_string())
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
        let answer = async {
            let mut client = CertificateAuthorityClient::new(self.channel(Some(current)).await?);
            client.renew(RenewRequest { csr }).await.map_err(refused)
        };
        match answer.await.map_err(refused_in_handshake) {
            Ok(resp) => held_from(resp.into_inner(), key_pem),
            // The connection failed without an answer from the CA: ask
            // whether it refuses the certificate itself.
            Err(e) if lost_connection(&e) => match self.handshake_refuses(current).await {
                Some(alert) => Err(handshake_refusal(alert)),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The alert by which the CA refuses `held` as a client certificate, if
    /// it does, asked in a TLS connection of its own. Over TLS 1.3 the CA
    /// judges the certificate after the client has finished its handshake,
    /// and a gRPC call on that connection may only see that the connection
    /// went away; here the alert is what the first read returns.
    async fn handshake_refuses(&self, held: &Held) -> Option<rustls::AlertDescription> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let attempt = async {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(self.bundle.as_bytes()) {
                roots.add(c.ok()?).ok()?;
            }
            let chain = CertificateDer::pem_slice_iter(held.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_slice(held.key_pem.as_bytes()).ok()?;
            let mut config =
                rustls::ClientConfig::builder_with_provider(crate::tls_cert::provider())
                    .with_safe_default_protocol_versions()
                    .ok()?
                    .with_root_certificates(roots)
                    .with_client_auth_cert(chain, key)
                    .ok()?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            let name = ServerName::try_from(self.host.clone()).ok()?;
            let addr = self.url.trim_start_matches("https://");
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let mut tls = match connector.connect(name, tcp).await {
                Ok(t) => t,
                Err(e) => return handshake_alert(&e),
            };
            // The HTTP/2 preface and an empty SETTINGS frame: a CA that
            // accepts the certificate answers with its own SETTINGS.
            let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            if let Err(e) = tls.write_all(&hello).await {
                return handshake_alert(&e);
            }
            let mut buf = [0u8; 64];
            match tls.read(&mut buf).await {
                Err(e) => handshake_alert(&e),
                Ok(_) => None,
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .ok()
            .flatten()
    }

    /// Passes on each request of the CA's to renew this holder early, until
    /// the stream ends.
    async fn watch(&self, current: &Held, early: &tokio::sync::mpsc::Sender<Early>) -> Result<()> {
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
            let now = SystemClock.now().unix_timestamp();
            let notice = match n.kind() {
                Kind::IssuerRotated => Early {
                    reason: format!("issuer rotated to {}", n.active_issuer),
                    by: Some(now + ROTATION_SPREAD),
                },
                Kind::RenewNow if n.renew_issued_before == 0 || issued < n.renew_issued_before => {
                    Early {
                        reason: n.message,
                        by: (n.renew_by > now).then_some(n.renew_by),
                    }
                }
                _ => continue,
            };
            if early.send(notice).await.is_err() {
                return Ok(());
            }
        }
        bail!("the CA closed the rotation watch")
    }
}

/// The seconds a rate-limited CA asked the caller to wait, if it did.
fn retry_hint(e: &anyhow::Error) -> Option<u64> {
    e.downcast_ref::<Refused>().and_then(|r| r.retry_after)
}

/// How long to wait after the `failures`-th failed renewal in a row, with
/// `left` seconds of validity: doubling from 2 s to a minute, the latter
/// half at random (to the millisecond: agents that failed together, at a
/// CA restart, do not retry together); not before the CA's `hint` when it
/// gave one; and always within a quarter of the time left, so attempts
/// continue until the certificate expires.
fn renewal_backoff(failures: u32, left: i64, hint: Option<u64>) -> Duration {
    let quarter = u64::try_from(left / 4).unwrap_or(1).max(1);
    let backoff = (1u64 << failures.min(6)).min(60).min(quarter);
    match hint {
        Some(h) if h > backoff / 2 => {
            let waited = Duration::from_secs(h) + random_duration(Duration::from_secs(h / 4 + 1));
            waited.min(Duration::from_secs(quarter))
        }
        _ => spread(Duration::from_secs(backoff)),
    }
}

/// Worth retrying: the server was unreachable or briefly unable to answer.
fn is_transient(e: &anyhow::Error) -> bool {
    if let Some(s) = e.downcast_ref::<Refused>() {
        return matches!(
            s.code,
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
        );
    }
    // Not a gRPC status: connecting or TLS failed.
    true
}

/// The CA refused the presented certificate itself (it says so in the
/// `sigil-refusal` metadata): asking again with it cannot help.
fn refused_for_good(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>().is_some_and(|r| r.certificate)
}

/// A gRPC refusal, kept typed so the caller can tell transient from final.
#[derive(Debug)]
struct Refused {
    code: tonic::Code,
    message: String,
    /// Of the presented certificate itself (see [`refused_for_good`]).
    certificate: bool,
    /// Refused in the TLS handshake (an alert, not an answer): see
    /// [`refused_in_handshake`].
    in_tls: bool,
    /// Seconds until the CA expects to accept the call (a rate limit).
    retry_after: Option<u64>,
    /// No answer came from the CA: the connection failed under the call.
    transport: bool,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Refused {}

fn refused(s: tonic::Status) -> anyhow::Error {
    if let Some(alert) = handshake_alert(&s) {
        return handshake_refusal(alert);
    }
    let certificate = s
        .metadata()
        .get(sigil_grpc::REFUSAL_KEY)
        .is_some_and(|v| v == sigil_grpc::REFUSAL_CERTIFICATE);
    let retry_after = s
        .metadata()
        .get(sigil_grpc::RETRY_AFTER_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    // The CA answers with a status of its own; tonic makes one (with the
    // failure as its source, or as Cancelled/Unknown) when the connection
    // failed under the call.
    let transport = std::error::Error::source(&s).is_some()
        || matches!(s.code(), tonic::Code::Cancelled | tonic::Code::Unknown);
    Refused {
        code: s.code(),
        message: s.message().to_string(),
        certificate,
        in_tls: false,
        retry_after,
        transport,
    }
    .into()
}

/// A CA that does not accept the presented certificate at all (expired by
/// its clock, from an intermediate it no longer trusts, not from it) says
/// so with a TLS alert, during the handshake (TLS 1.2) or as the first
/// thing it sends (TLS 1.3): that is a refusal of the certificate itself,
/// like the one the CA makes in its answer. Other errors pass unchanged.
fn refused_in_handshake(e: anyhow::Error) -> anyhow::Error {
    match handshake_alert(e.as_ref()) {
        Some(alert) => handshake_refusal(alert),
        None => e,
    }
}

/// The call failed without an answer from the CA: no connection, or one
/// that ended under it.
fn lost_connection(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<Refused>() {
        Some(r) => r.transport && !r.certificate && !r.in_tls,
        // Connecting failed.
        None => true,
    }
}

/// The CA refused the certificate in the TLS handshake (see
/// [`refused_in_handshake`]).
fn refused_in_tls(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>().is_some_and(|r| r.in_tls)
}

/// Least time a refusal in the TLS handshake must last before it is acted
/// on (s), unless a quarter of the certificate's validity is less.
const TLS_REFUSAL_LASTS: i64 = 600;

/// Consecutive refusals in the TLS handshake: when the first came, and how
/// many.
#[derive(Debug, Default)]
struct Persisting {
    first: Option<i64>,
    count: u32,
}

impl Persisting {
    /// Counts one at `now` with `left` s of validity; true once there have
    /// been three over at least [`Persisting::span`].
    fn lasted(&mut self, now: i64, left: i64) -> bool {
        let first = *self.first.get_or_insert(now);
        self.count += 1;
        self.count >= 3 && now - first >= self.span(left)
    }

    /// How long they must last: [`TLS_REFUSAL_LASTS`], or a quarter of the
    /// time left when that is less.
    fn span(&self, left: i64) -> i64 {
        TLS_REFUSAL_LASTS.min(left.max(0) / 4)
    }
}

fn handshake_refusal(alert: rustls::AlertDescription) -> anyhow::Error {
    Refused {
        code: tonic::Code::Unauthenticated,
        message: format!(
            "the CA does not accept this certificate: it ended the TLS handshake with alert {alert:?}"
        ),
        certificate: false,
        in_tls: true,
        retry_after: None,
        transport: false,
    }
    .into()
}

/// Alerts by which a TLS peer refuses the certificate presented to it.
const CERTIFICATE_ALERTS: [rustls::AlertDescription; 7] = [
    rustls::AlertDescription::BadCertificate,
    rustls::AlertDescription::UnsupportedCertificate,
    rustls::AlertDescription::CertificateRevoked,
    rustls::AlertDescription::CertificateExpired,
    rustls::AlertDescription::CertificateUnknown,
    rustls::AlertDescription::UnknownCA,
    rustls::AlertDescription::CertificateRequired,
];

/// The alert, if a TLS peer refused the certificate presented to it,
/// somewhere in `e`'s chain of causes. The TLS stream under the gRPC
/// client reports an alert received after the handshake as an I/O error
/// carrying rustls' text ("received fatal alert: UnknownCA"), not the
/// typed error, so both are read.
fn handshake_alert(e: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref::<rustls::Error>()
            && CERTIFICATE_ALERTS.contains(alert)
        {
            return Some(*alert);
        }
        let text = e.to_string();
        if let Some(name) = text.strip_prefix("received fatal alert: ") {
            let name = name.trim();
            if let Some(alert) = CERTIFICATE_ALERTS.iter().find(|a| format!("{a:?}") == name) {
                return Some(*alert);
            }
        }
        // An io::Error's `source` skips the error it wraps.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
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

/// The key of a first certificate not yet installed: read from
/// [`PENDING_KEY`] in `dir` if an earlier run left one, else made and
/// written there (0600, synced) before anything is sent.
fn pending_key(dir: &Path) -> Result<String> {
    let path = dir.join(PENDING_KEY);
    match std::fs::read_to_string(&path) {
        Ok(pem) if rcgen::KeyPair::from_pem(&pem).is_ok() => {
            eprintln!(
                "using the key of an earlier first attempt ({})",
                path.display()
            );
            return Ok(pem);
        }
        Ok(_) => eprintln!(
            "warning: {} is not a private key; making a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let pem = rcgen::KeyPair::generate()
        .context("generating a key")?
        .serialize_pem();
    write_synced(&path, pem.as_bytes(), 0o600)?;
    Ok(pem)
}

fn new_key_and_csr(sans: Vec<String>) -> Result<(String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let pem = key.serialize_pem();
    let csr = csr_for(&pem, sans)?;
    Ok((pem, csr))
}

/// A CSR for `sans` signed by the key in `key_pem`.
fn csr_for(key_pem: &str, sans: Vec<String>) -> Result<Vec<u8>> {
    use sigil_core::Identifier;
    let key = rcgen::KeyPair::from_pem(key_pem).context("reading the private key")?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let ia5 = |s: &str| {
        rcgen::string::Ia5String::try_from(s).with_context(|| format!("invalid name '{s}'"))
    };
    for s in &sans {
        let id = Identifier::parse_any(s).with_context(|| format!("invalid name '{s}'"))?;
        params.subject_alt_names.push(match id {
            Identifier::Dns(d) => rcgen::SanType::DnsName(ia5(d.as_str())?),
            Identifier::Ip(ip) => rcgen::SanType::IpAddress(ip),
            Identifier::Uri(u) => rcgen::SanType::URI(ia5(u.as_str())?),
            Identifier::Email(e) => rcgen::SanType::Rfc822Name(ia5(&e)?),
            other => bail!("cannot request a {} name in a CSR", other.kind()),
        });
    }
    Ok(params.serialize_request(&key)?.der().to_vec())
}

/// Whether `leaf` is a certificate for `key`.
fn certifies(leaf: &LeafInfo, key: &rcgen::KeyPair) -> bool {
    rcgen::PublicKeyData::subject_public_key_info(key) == leaf.public_key.spki_der()
}

fn held_from(resp: CertificateResponse, key_pem: String) -> Result<Held> {
    let leaf_der = resp
        .chain_der
        .first()
        .context("the CA returned an empty chain")?;
    let leaf = LeafInfo::from_der(leaf_der).context("the CA returned an unreadable certificate")?;
    // Installing a certificate for another key would break the service at
    // its next reload; the current files stay instead.
    let key = rcgen::KeyPair::from_pem(&key_pem).context("reading the private key")?;
    if !certifies(&leaf, &key) {
        bail!(
            "the CA returned certificate {} for another key than the one this agent sent; nothing was written",
            leaf.serial
        );
    }
    // The files are written from the DER the check above read (the PEM
    // field of the same answer is not trusted to say the same).
    let chain_pem: String = resp
        .chain_der
        .iter()
        .map(|der| sigil_authority::pem("CERTIFICATE", der))
        .collect();
    Ok(Held {
        chain_pem,
        key_pem,
        leaf,
        renew_after: resp.renew_after,
    })
}

/// The certificate and key to start from, and whether they came from
/// `--cert`/`--key` (not yet in `--out-dir`).
fn load_existing(args: &AgentArgs) -> Result<Option<(Held, bool)>> {
    finish_interrupted_install(&args.out_dir)?;
    // What the agent last wrote wins over --cert/--key (those only seed it).
    let ours = (args.out_dir.join("chain.pem"), args.out_dir.join("key.pem"));
    let (chain_path, key_path, seeded) = match (&args.cert, &args.key) {
        (Some(c), Some(k)) if !(ours.0.exists() && ours.1.exists()) => (c.clone(), k.clone(), true),
        _ => (ours.0, ours.1, false),
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
    let key = rcgen::KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} is not a readable PKCS#8 key", key_path.display()))?;
    if !certifies(&leaf, &key) {
        bail!(
            "{} does not belong to the certificate in {}; restore the matching pair, or move both aside and start over with --token-file",
            key_path.display(),
            chain_path.display()
        );
    }
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
    let held = Held {
        chain_pem,
        key_pem,
        leaf,
        renew_after,
    };
    Ok(Some((held, seeded)))
}

/// What `install` writes. Each is a link in `--out-dir`, `NAME ->
/// ..data/NAME`, and `..data` links to the directory holding the current
/// set, so the set changes in one rename: a reader that opens the files
/// after the change sees the new key with the new certificate, and a
/// watcher of the directory (Envoy's `watched_directory`, inotify) sees one
/// event once all of them are in place. combined.pem holds the key, then
/// the chain, for readers that want both from one open.
const FILES: [&str; 4] = ["key.pem", "cert.pem", "chain.pem", "combined.pem"];
/// The link to the directory holding the current set.
const DATA_LINK: &str = "..data";
/// Prefix of the directories that hold one set each.
const SET_PREFIX: &str = "..set-";
/// The key of a first certificate being requested, until it is installed.
const PENDING_KEY: &str = "key.pem.pending";
/// How long a reload hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes the set for `h` (see [`write_set`]), then runs the reload hooks.
async fn install(args: &AgentArgs, h: &Held) -> Result<()> {
    // The marker first: a crash once the new set is in place must still
    // reload on the next start.
    if args.reload_cmd.is_some() || args.reload_signal.is_some() {
        write_synced(&args.out_dir.join(RELOAD_PENDING), b"", 0o600)?;
    }
    write_set(&args.out_dir, h)?;
    reload(args).await;
    Ok(())
}

/// Writes key, leaf, chain and combined file into a new directory in
/// `dir`, each whole and fsynced, then points `..data` at it in one rename
/// and removes the previous set. A crash before that rename leaves the
/// previous set in force (the new directory is removed on the next start,
/// see `finish_interrupted_install`); after it, the new one.
fn write_set(dir: &Path, h: &Held) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let leaf_pem = first_pem_block(&h.chain_pem);
    let combined = combined_pem(&h.key_pem, &h.chain_pem);
    let contents: [(&[u8], u32); 4] = [
        (h.key_pem.as_bytes(), 0o600),
        (leaf_pem.as_bytes(), 0o644),
        (h.chain_pem.as_bytes(), 0o644),
        (combined.as_bytes(), 0o600),
    ];
    let ms = SystemClock.now().unix_timestamp_nanos() / 1_000_000;
    let (name, set) = (0..)
        .map(|n| {
            let name = format!("{SET_PREFIX}{ms}-{n}");
            let path = dir.join(&name);
            (name, path)
        })
        .find(|(_, path)| !path.exists())
        .context("no free name for a new set of files")?;
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&set)
        .with_context(|| format!("cannot create {}", set.display()))?;
    for (file, (data, mode)) in FILES.iter().zip(contents) {
        let path = set.join(file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    crate::cmd_ca::sync_dir_of(&set.join(FILES[0]))?;
    let link = dir.join(DATA_LINK);
    replace_link(&link, Path::new(&name))?;
    crate::cmd_ca::sync_dir_of(&link)?;
    link_names(dir)?;
    remove_sets_but(dir, Some(&name));
    Ok(())
}

/// Points the link `path` at `target`, replacing what is there in one
/// rename.
fn replace_link(path: &Path, target: &Path) -> Result<()> {
    let tmp = tmp_path(path);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot link {} to {}", path.display(), target.display()))
}

/// Makes each name in [`FILES`] the link `NAME -> ..data/NAME` (files of
/// the layout before `..data` are replaced, each in one rename).
fn link_names(dir: &Path) -> Result<()> {
    let mut changed = false;
    for n in FILES {
        let path = dir.join(n);
        let target = Path::new(DATA_LINK).join(n);
        if std::fs::read_link(&path).is_ok_and(|t| t == target) {
            continue;
        }
        replace_link(&path, &target)?;
        changed = true;
    }
    if changed {
        crate::cmd_ca::sync_dir_of(&dir.join(FILES[0]))?;
    }
    Ok(())
}

/// Removes the set directories in `dir` other than `keep`: previous sets,
/// and one a crash left before it was put in force.
fn remove_sets_but(dir: &Path, keep: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(SET_PREFIX)
            && Some(name) != keep
            && let Err(err) = std::fs::remove_dir_all(e.path())
        {
            eprintln!(
                "warning: cannot remove {} ({err}); remove it by hand",
                e.path().display()
            );
        }
    }
}

/// The set directory `..data` points at, if any.
fn current_set(dir: &Path) -> Option<String> {
    let target = std::fs::read_link(dir.join(DATA_LINK)).ok()?;
    target.to_str().map(str::to_string)
}

/// Lock file in `--out-dir`: one agent at a time writes a directory.
const LOCK_FILE: &str = ".lock";

/// Takes the directory's lock: two agents on one directory would interleave
/// their writes (one's key beside the other's certificate) and both renew.
fn lock_out_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another sigil agent is using --out-dir {} (it holds {}); stop it, or give this one its own directory",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// combined.pem: the key, then the chain.
fn combined_pem(key_pem: &str, chain_pem: &str) -> String {
    let mut combined = key_pem.to_string();
    if !combined.ends_with('\n') {
        combined.push('\n');
    }
    combined.push_str(chain_pem);
    combined
}

/// Runs a reload hook with a timeout; a failing hook is reported, not fatal.
async fn run_hook(cmd: &mut tokio::process::Command, what: &str) -> bool {
    cmd.kill_on_drop(true);
    match tokio::time::timeout(HOOK_TIMEOUT, cmd.status()).await {
        Ok(Ok(s)) if s.success() => return true,
        Ok(Ok(s)) => eprintln!("warning: reload hook '{what}' exited with {s}"),
        Ok(Err(e)) => eprintln!("warning: cannot run reload hook '{what}': {e}"),
        Err(_) => eprintln!(
            "warning: reload hook '{what}' still running after {} s; killed",
            HOOK_TIMEOUT.as_secs()
        ),
    }
    false
}

/// Marker in `--out-dir`: the files changed and the reload hooks have not
/// all succeeded since. Written before the files are replaced, removed once
/// the hooks succeed; while it is there they are run again every
/// [`RELOAD_RETRY`], also after a restart, so a service that missed a reload
/// does not keep serving the previous certificate until it expires.
const RELOAD_PENDING: &str = ".reload-pending";

/// How often failed reload hooks are run again.
const RELOAD_RETRY: Duration = Duration::from_secs(30);

/// Runs the reload hooks (command, then signal); once all succeed (or none
/// are set), clears [`RELOAD_PENDING`]. Returns whether it is clear.
async fn reload(args: &AgentArgs) -> bool {
    let mut ok = true;
    if let Some(cmd) = &args.reload_cmd {
        ok &= run_hook(tokio::process::Command::new("sh").arg("-c").arg(cmd), cmd).await;
    }
    if let Some(r) = &args.reload_signal {
        ok &= send_reload_signal(r).await;
    }
    let marker = args.out_dir.join(RELOAD_PENDING);
    if ok {
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("warning: cannot remove {} ({e})", marker.display()),
        }
    } else {
        eprintln!(
            "reload hooks failed; trying again every {} s",
            RELOAD_RETRY.as_secs()
        );
    }
    ok
}

/// Whether reload hooks are owed (see [`RELOAD_PENDING`]).
fn reload_pending(args: &AgentArgs) -> bool {
    args.out_dir.join(RELOAD_PENDING).exists()
}

/// After a crash during `install`: a set directory not yet in force is
/// removed (the previous set stays), and one in force is completed.
fn finish_interrupted_install(dir: &Path) -> Result<()> {
    finish_legacy_install(dir)?;
    let _ = std::fs::remove_file(tmp_path(&dir.join(DATA_LINK)));
    match current_set(dir) {
        // A crash after the switch, while the names were being linked
        // (the first install over files of the previous layout).
        Some(set) => {
            link_names(dir)?;
            remove_sets_but(dir, Some(&set));
        }
        None => remove_sets_but(dir, None),
    }
    Ok(())
}

/// The same for an install by a version that renamed `*.new` files over
/// the old ones one by one.
fn finish_legacy_install(dir: &Path) -> Result<()> {
    let new = |n: &str| dir.join(format!("{n}.new"));
    // A `.new.tmp` was still being written: never complete, never used.
    for n in FILES {
        let _ = std::fs::remove_file(tmp_path(&new(n)));
    }
    // Written by a version without combined.pem: the three are the whole set.
    if FILES[..3].iter().all(|n| new(n).exists()) && !new("combined.pem").exists() {
        let key = std::fs::read_to_string(new("key.pem"))?;
        let chain = std::fs::read_to_string(new("chain.pem"))?;
        write_synced(
            &new("combined.pem"),
            combined_pem(&key, &chain).as_bytes(),
            0o600,
        )?;
    }
    let complete = FILES.iter().all(|n| new(n).exists());
    let any = FILES.iter().any(|n| new(n).exists());
    if complete {
        for n in FILES {
            std::fs::rename(new(n), dir.join(n))
                .with_context(|| format!("cannot finish replacing {}", dir.join(n).display()))?;
        }
        crate::cmd_ca::sync_dir_of(&dir.join(FILES[0]))?;
        eprintln!(
            "finished an interrupted certificate update in {}",
            dir.display()
        );
    } else if any {
        // Renames go in `FILES` order, key first: a missing key.pem.new with
        // others present means the key was already moved; finish the rest.
        if !new("key.pem").exists() {
            for n in &FILES[1..] {
                if new(n).exists() {
                    std::fs::rename(new(n), dir.join(n))?;
                }
            }
        } else {
            for n in FILES {
                let _ = std::fs::remove_file(new(n));
            }
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

/// Writes a file completely and fsyncs it (created fresh with `mode`) under
/// a `.tmp` name, then renames it to `path`: a file at `path` is always
/// whole, even after a crash while writing.
fn write_synced(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = tmp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    crate::cmd_ca::sync_dir_of(path)
}

fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The agent's metrics at `now` (unix s), in the Prometheus text format.
fn render_metrics(m: &Metrics, now: i64) -> String {
    let not_after = m.not_after.load(Ordering::Relaxed);
    // No certificate yet: no expiry to report (not a false alarm).
    let expiry = if not_after == 0 {
        String::new()
    } else {
        format!(
            "sigil_agent_certificate_not_after_seconds {not_after}\n\
             sigil_agent_certificate_expires_in_seconds {}\n",
            not_after - now
        )
    };
    format!(
        "# HELP sigil_agent_certificate_not_after_seconds Expiry of the current certificate (unix time).\n\
         # TYPE sigil_agent_certificate_not_after_seconds gauge\n\
         # HELP sigil_agent_certificate_expires_in_seconds Seconds until the current certificate expires.\n\
         # TYPE sigil_agent_certificate_expires_in_seconds gauge\n\
         {expiry}\
         # HELP sigil_agent_renewals_total Successful renewals.\n\
         # TYPE sigil_agent_renewals_total counter\n\
         sigil_agent_renewals_total {}\n\
         # HELP sigil_agent_renewal_failures_total Failed renewal attempts.\n\
         # TYPE sigil_agent_renewal_failures_total counter\n\
         sigil_agent_renewal_failures_total {}\n\
         # HELP sigil_agent_reload_pending 1 while the reload hooks have not succeeded since the files last changed.\n\
         # TYPE sigil_agent_reload_pending gauge\n\
         sigil_agent_reload_pending {}\n",
        m.renewals.load(Ordering::Relaxed),
        m.failures.load(Ordering::Relaxed),
        u8::from(m.reload_marker.as_ref().is_some_and(|p| p.exists()))
    )
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
            async move { render_metrics(&m, SystemClock.now().unix_timestamp()) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn csr_carries_spiffe_ip_and_dns_names_as_such() {
        let (_, csr) = new_key_and_csr(vec![
            "spiffe://corp/ns/a/sa/b".into(),
            "10.0.0.1".into(),
            "a.internal".into(),
        ])
        .unwrap();
        let parsed = sigil_core::Csr::parse(&csr).unwrap();
        let mut kinds: Vec<&str> = parsed.identifiers().iter().map(|i| i.kind()).collect();
        kinds.sort();
        assert_eq!(kinds, ["dns", "ip", "uri"]);
    }

    #[test]
    fn certificate_alerts_are_found_typed_or_as_text_and_others_are_not() {
        use rustls::AlertDescription as A;
        let typed = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(A::CertificateExpired),
        );
        assert_eq!(handshake_alert(&typed), Some(A::CertificateExpired));
        let text = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: UnknownCA",
        );
        let status = tonic::Status::from_error(Box::new(text));
        assert_eq!(handshake_alert(&status), Some(A::UnknownCA));
        let wrapped = anyhow::Error::new(typed).context("cannot reach the CA");
        assert_eq!(
            handshake_alert(wrapped.as_ref()),
            Some(A::CertificateExpired)
        );
        for other in [
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(A::HandshakeFailure),
            ),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "received fatal alert: ProtocolVersion",
            ),
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
        ] {
            assert_eq!(handshake_alert(&other), None, "{other}");
        }
        let e = refused_in_handshake(wrapped);
        assert!(refused_in_tls(&e) && !refused_for_good(&e), "{e:#}");
        assert!(!lost_connection(&e), "no second probe");
        // A lost connection is probed; the CA's own answers are not.
        let lost = refused(tonic::Status::cancelled("operation was canceled"));
        assert!(lost_connection(&lost));
        let answered = refused(tonic::Status::unavailable("the CA is shutting down; retry"));
        assert!(!lost_connection(&answered));
        assert!(e.to_string().contains("CertificateExpired"), "{e:#}");
    }

    #[test]
    fn a_refusal_in_the_handshake_is_acted_on_once_it_has_lasted() {
        let mut p = Persisting::default();
        // A day left: three refusals over ten minutes.
        assert!(!p.lasted(1_000, 86_400));
        assert!(!p.lasted(1_002, 86_400));
        assert!(!p.lasted(1_100, 86_400), "three, but not ten minutes yet");
        assert!(p.lasted(1_600, 86_400));
        // Ten minutes left: a quarter of it (150 s) is enough.
        let mut p = Persisting::default();
        assert!(!p.lasted(0, 600));
        assert!(!p.lasted(100, 500));
        assert!(p.lasted(150, 450));
    }

    #[test]
    fn renewal_retries_back_off_and_wait_as_long_as_the_ca_asks() {
        let secs = |d: Duration| d.as_secs_f64();
        for _ in 0..50 {
            // Doubling to a minute, the latter half at random.
            let w = secs(renewal_backoff(1, 86_400, None));
            assert!((1.0..=2.0).contains(&w), "{w}");
            let w = secs(renewal_backoff(9, 86_400, None));
            assert!((30.0..=60.0).contains(&w), "{w}");
            // A rate limit's hint: not before it, a little after at most.
            let w = secs(renewal_backoff(1, 86_400, Some(40)));
            assert!((40.0..=51.0).contains(&w), "{w}");
            // A hint shorter than the backoff changes nothing.
            let w = secs(renewal_backoff(9, 86_400, Some(3)));
            assert!((30.0..=60.0).contains(&w), "{w}");
            // Near expiry, within a quarter of what is left, hint or not.
            let w = secs(renewal_backoff(9, 40, Some(300)));
            assert!(w == 10.0, "{w}");
            let w = secs(renewal_backoff(9, 40, None));
            assert!((5.0..=10.0).contains(&w), "{w}");
        }
        let limited = refused({
            let mut s = tonic::Status::resource_exhausted("slow down");
            s.metadata_mut()
                .insert(sigil_grpc::RETRY_AFTER_KEY, "17".parse().unwrap());
            s
        });
        assert_eq!(retry_hint(&limited), Some(17));
        assert_eq!(
            retry_hint(&refused(tonic::Status::unavailable("down"))),
            None
        );
    }

    #[test]
    fn watch_reconnects_back_off_to_five_minutes_with_jitter() {
        let range = |n: u32| {
            let waits: Vec<u64> = (0..200).map(|_| watch_backoff(n).as_secs()).collect();
            (*waits.iter().min().unwrap(), *waits.iter().max().unwrap())
        };
        let (lo, hi) = range(1);
        assert!(lo >= 3 && hi <= 5, "{lo}..{hi}");
        let (lo, hi) = range(3);
        assert!(lo >= 10 && hi <= 20 && lo < hi, "{lo}..{hi}");
        for n in [7, 8, 1000] {
            let (lo, hi) = range(n);
            assert!(lo >= 150 && hi <= 300 && lo < hi, "{n}: {lo}..{hi}");
        }
        // To the millisecond, not in whole seconds.
        let ms: std::collections::HashSet<u32> =
            (0..50).map(|_| watch_backoff(1).subsec_millis()).collect();
        assert!(ms.len() > 10, "{ms:?}");
        let d = Duration::from_secs(8);
        for _ in 0..100 {
            let s = spread(d);
            assert!(s >= d / 2 && s <= d, "{s:?}");
        }
    }

    #[test]
    fn reload_signals_name_one_process_and_a_known_signal() {
        let ok = parse_reload_signal("1234:sighup").unwrap();
        assert_eq!(
            (ok.target, ok.signal.as_str()),
            (SignalTarget::Pid(1234), "HUP")
        );
        assert_eq!(parse_reload_signal("1:USR1").unwrap().signal, "USR1");
        let file = parse_reload_signal("/run/a:b/nginx.pid:HUP").unwrap();
        assert_eq!(
            file.target,
            SignalTarget::PidFile("/run/a:b/nginx.pid".into())
        );
        assert_eq!(
            parse_reload_signal("./app.pid:USR2").unwrap().target,
            SignalTarget::PidFile("./app.pid".into())
        );
        for bad in [
            "1234HUP",
            "0:HUP",
            "-1:HUP",
            "x:HUP",
            "app.pid:HUP",
            "1234:KILL",
            "/run/app.pid:KILL",
            "1234:",
            "4294967295:HUP",
        ] {
            assert!(parse_reload_signal(bad).is_err(), "{bad}");
        }
    }

    /// Agent arguments as clap parses them from `argv`.
    fn agent_args(argv: &[&str]) -> AgentArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            agent: AgentArgs,
        }
        let mut all = vec!["agent"];
        all.extend_from_slice(argv);
        <Cli as clap::Parser>::parse_from(all).agent
    }

    #[tokio::test]
    async fn a_failed_reload_stays_owed_until_the_hooks_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let (ready, runs) = (dir.path().join("ready"), dir.path().join("runs"));
        let cmd = format!(
            "echo run >> {}; test -e {}",
            runs.display(),
            ready.display()
        );
        let out = dir.path().display().to_string();
        let base = [
            "--server",
            "ca:9443",
            "--ca-bundle",
            "roots.pem",
            "--out-dir",
            &out,
        ];
        let args = agent_args(&[&base[..], &["--reload-cmd", &cmd]].concat());
        std::fs::write(dir.path().join(RELOAD_PENDING), b"").unwrap();
        let metrics = Metrics {
            reload_marker: Some(dir.path().join(RELOAD_PENDING)),
            ..Metrics::default()
        };
        assert!(!reload(&args).await, "the hook fails");
        assert!(reload_pending(&args));
        assert!(render_metrics(&metrics, 0).contains("sigil_agent_reload_pending 1\n"));
        std::fs::write(&ready, b"").unwrap();
        assert!(reload(&args).await);
        assert!(!reload_pending(&args));
        assert!(render_metrics(&metrics, 0).contains("sigil_agent_reload_pending 0\n"));
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 2);
        // Owed by a run that had hooks, cleared by one that has none.
        std::fs::write(dir.path().join(RELOAD_PENDING), b"").unwrap();
        assert!(reload(&agent_args(&base)).await);
        assert!(!reload_pending(&args));
    }

    /// A process that appends a line to `log` at each SIGHUP; its PID.
    fn hup_counter(log: &Path) -> std::process::Child {
        let script = format!(
            "trap 'echo hup >> {}' HUP; echo ready >> {0}; while :; do sleep 0.05; done",
            log.display()
        );
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(log).is_ok_and(|t| t.contains("ready")) {
            assert!(std::time::Instant::now() < deadline, "trap not set");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn hups(log: &Path) -> usize {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("hup")
            .count()
    }

    async fn wait_for_hups(log: &Path, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hups(log) < n && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// With a PID file, each reload signals the process the file names
    /// then (a restarted service has a new PID); a missing file sends nothing.
    #[tokio::test]
    async fn a_pid_file_is_read_at_each_reload() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("svc.pid");
        let r = parse_reload_signal(&format!("{}:HUP", pid_file.display())).unwrap();
        send_reload_signal(&r).await; // no file yet: nothing to signal
        let (log1, log2) = (dir.path().join("one.log"), dir.path().join("two.log"));
        let mut first = hup_counter(&log1);
        std::fs::write(&pid_file, format!("{}\n", first.id())).unwrap();
        send_reload_signal(&r).await;
        wait_for_hups(&log1, 1).await;
        assert_eq!(hups(&log1), 1);
        // The service restarts with a new PID.
        let mut second = hup_counter(&log2);
        std::fs::write(&pid_file, format!("{}\n", second.id())).unwrap();
        send_reload_signal(&r).await;
        wait_for_hups(&log2, 1).await;
        assert_eq!(hups(&log2), 1, "the new process gets the signal");
        assert_eq!(hups(&log1), 1, "the old one does not");
        std::fs::write(&pid_file, "not a pid\n").unwrap();
        send_reload_signal(&r).await;
        for c in [&mut first, &mut second] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!((hups(&log1), hups(&log2)), (1, 1));
    }

    /// Before the first certificate the expiry gauges are left out (an
    /// alert on them must not fire on a zero); after it they are there.
    #[test]
    fn expiry_gauges_appear_with_the_first_certificate() {
        let m = Metrics::default();
        m.failures.store(2, Ordering::Relaxed);
        let before = render_metrics(&m, 1_000);
        assert!(
            !before
                .lines()
                .any(|l| l.starts_with("sigil_agent_certificate_")),
            "{before}"
        );
        assert!(
            before.contains("sigil_agent_renewal_failures_total 2\n"),
            "{before}"
        );
        m.not_after.store(4_600, Ordering::Relaxed);
        let after = render_metrics(&m, 1_000);
        assert!(
            after.contains("sigil_agent_certificate_not_after_seconds 4600\n")
                && after.contains("sigil_agent_certificate_expires_in_seconds 3600\n"),
            "{after}"
        );
    }

    #[test]
    fn a_new_certificate_is_kept_a_while_before_renewing() {
        let leaf = |secs: i64| {
            let mut l = LeafInfo::from_der(&held_der()).unwrap();
            l.not_after = l.not_before + time::Duration::seconds(secs);
            l
        };
        assert_eq!(min_gap(&leaf(120)), 30);
        assert_eq!(min_gap(&leaf(40)), 20, "at most half the lifetime");
        assert_eq!(min_gap(&leaf(86_400)), 4_320);
    }

    #[test]
    fn a_certificate_for_another_key_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.internal".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let reply = || CertificateResponse {
            chain_pem: cert.pem(),
            chain_der: vec![cert.der().to_vec()],
            ..CertificateResponse::default()
        };
        let held = held_from(reply(), key.serialize_pem()).unwrap();
        assert_eq!(held.leaf.identifiers.len(), 1);
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let e = held_from(reply(), other).err().unwrap();
        assert!(format!("{e:#}").contains("for another key"), "{e:#}");
        // What is written comes from the DER that was checked, whatever the
        // answer's PEM field says.
        let other_cert = params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let mismatched = CertificateResponse {
            chain_pem: other_cert.pem(),
            ..reply()
        };
        let held = held_from(mismatched, key.serialize_pem()).unwrap();
        use rustls_pki_types::pem::PemObject;
        let written = rustls_pki_types::CertificateDer::pem_slice_iter(held.chain_pem.as_bytes())
            .map(|c| c.unwrap().to_vec())
            .collect::<Vec<_>>();
        assert_eq!(written, vec![cert.der().to_vec()]);
    }

    #[test]
    fn one_agent_at_a_time_writes_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_out_dir(dir.path()).unwrap();
        let e = lock_out_dir(dir.path()).err().unwrap();
        assert!(format!("{e:#}").contains("another sigil agent"), "{e:#}");
        drop(first);
        lock_out_dir(dir.path()).unwrap();
    }

    /// Any certificate, to derive `LeafInfo`s from.
    fn held_der() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.internal".to_string()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// A key and a self-signed certificate for it, as the agent holds them.
    fn held(name: &str) -> Held {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        Held {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            leaf: LeafInfo::from_der(cert.der()).unwrap(),
            renew_after: 0,
        }
    }

    #[test]
    fn the_files_change_as_one_set() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sets = || {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with(SET_PREFIX))
                .collect();
            v.sort();
            v
        };
        let read = |n: &str| std::fs::read_to_string(d.join(n)).unwrap();
        let is_link = |n: &str| {
            std::fs::symlink_metadata(d.join(n))
                .unwrap()
                .file_type()
                .is_symlink()
        };
        let mode = |n: &str| {
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(d.join(n)).unwrap().permissions(),
            ) & 0o777
        };
        // Files of the layout before `..data`: replaced by links to a set
        // with the same contents.
        let a = held("a.internal");
        for (n, text) in FILES
            .iter()
            .zip(["old key", "old leaf", "old chain", "old both"])
        {
            std::fs::write(d.join(n), text).unwrap();
        }
        write_set(d, &a).unwrap();
        assert!(FILES.iter().all(|n| is_link(n)));
        assert_eq!(read("key.pem"), a.key_pem);
        assert_eq!(read("chain.pem"), a.chain_pem);
        assert_eq!(read("cert.pem"), a.chain_pem);
        assert_eq!(read("combined.pem"), combined_pem(&a.key_pem, &a.chain_pem));
        assert_eq!((mode("key.pem"), mode("combined.pem")), (0o600, 0o600));
        assert_eq!(mode("cert.pem"), 0o644);
        let first = sets();
        assert_eq!(first.len(), 1);
        assert_eq!(current_set(d).as_deref(), Some(first[0].as_str()));

        // The next set replaces it, and the previous one is removed.
        let b = held("b.internal");
        write_set(d, &b).unwrap();
        assert_eq!(read("key.pem"), b.key_pem);
        assert_eq!(read("cert.pem"), b.chain_pem);
        let second = sets();
        assert_eq!(second.len(), 1);
        assert_ne!(second, first);

        // A crash while a set was being written, before the switch: the
        // partial set and the half-made link go, the current set stays.
        std::fs::create_dir(d.join(format!("{SET_PREFIX}1-0"))).unwrap();
        std::fs::write(d.join(format!("{SET_PREFIX}1-0/key.pem")), "partial").unwrap();
        std::os::unix::fs::symlink(format!("{SET_PREFIX}1-0"), tmp_path(&d.join(DATA_LINK)))
            .unwrap();
        finish_interrupted_install(d).unwrap();
        assert_eq!(sets(), second);
        assert!(!tmp_path(&d.join(DATA_LINK)).exists());
        assert_eq!(read("key.pem"), b.key_pem);

        // A crash after the switch, before a file of the previous layout
        // was made a link: it is made one.
        std::fs::remove_file(d.join("chain.pem")).unwrap();
        std::fs::write(d.join("chain.pem"), "old chain").unwrap();
        finish_interrupted_install(d).unwrap();
        assert!(is_link("chain.pem"));
        assert_eq!(read("chain.pem"), b.chain_pem);

        // A set never switched to, with no `..data` at all: removed, the
        // files of the previous layout stay.
        let fresh = tempfile::tempdir().unwrap();
        let f = fresh.path();
        std::fs::write(f.join("key.pem"), "old key").unwrap();
        std::fs::create_dir(f.join(format!("{SET_PREFIX}2-0"))).unwrap();
        finish_interrupted_install(f).unwrap();
        assert!(!f.join(format!("{SET_PREFIX}2-0")).exists());
        assert_eq!(
            std::fs::read_to_string(f.join("key.pem")).unwrap(),
            "old key"
        );
    }

    #[test]
    fn an_interrupted_install_is_finished_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let put = |n: &str, t: &str| std::fs::write(d.join(n), t).unwrap();
        let get = |n: &str| std::fs::read_to_string(d.join(n)).unwrap();
        for n in FILES {
            put(n, "old");
        }
        // All three new files written, crash before any rename: finished.
        for n in FILES {
            put(&format!("{n}.new"), "new");
        }
        finish_interrupted_install(d).unwrap();
        assert!(
            FILES
                .iter()
                .all(|n| get(n) == "new" && !d.join(format!("{n}.new")).exists())
        );
        // Crash after renaming the key: the rest follows.
        put("cert.pem.new", "newer");
        put("chain.pem.new", "newer");
        put("combined.pem.new", "newer");
        put("key.pem", "newer");
        finish_interrupted_install(d).unwrap();
        assert!(FILES.iter().all(|n| get(n) == "newer"));
        // Crash while writing the new files: they are dropped, the old stay.
        put("key.pem.new", "partial");
        finish_interrupted_install(d).unwrap();
        assert!(FILES.iter().all(|n| get(n) == "newer"));
        assert!(!d.join("key.pem.new").exists());
        // Crash while writing the last one: two whole `.new` files and a
        // partial `.new.tmp` are not an install to finish.
        write_synced(&d.join("key.pem.new"), b"newest", 0o600).unwrap();
        write_synced(&d.join("cert.pem.new"), b"newest", 0o644).unwrap();
        put("chain.pem.new.tmp", "part");
        assert!(!d.join("key.pem.new.tmp").exists(), "renamed once whole");
        finish_interrupted_install(d).unwrap();
        assert!(FILES.iter().all(|n| get(n) == "newer"));
        let left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".new") || n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // Written by a version without combined.pem, crash before any
        // rename: the three are the whole set, and combined.pem follows them.
        put("key.pem.new", "KEY\n");
        put("cert.pem.new", "LEAF\n");
        put("chain.pem.new", "LEAF\nCA\n");
        finish_interrupted_install(d).unwrap();
        assert_eq!(
            (get("key.pem"), get("cert.pem"), get("combined.pem")),
            ("KEY\n".into(), "LEAF\n".into(), "KEY\nLEAF\nCA\n".into())
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.join("combined.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
