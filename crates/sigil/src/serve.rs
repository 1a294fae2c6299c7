//! `sigil serve`: wire config, authority and listeners; stop cleanly on signals.

use crate::acme_server::AcmeListener;
use crate::cli::ServeArgs;
use crate::cmd_ca::{key_passphrase, load_roots};
use crate::cmd_ops::build_authority;
use crate::cmd_token::server_verifier;
use crate::config::Config;
use crate::config::{AcmeConfig, GrpcConfig};
use crate::grpc_server::GrpcListener;
use crate::{dev, http};
use anyhow::{Context, Result};
use sigil_authority::Authority;
use sigil_grpc::{Notice, Notifier};
use sigil_revocation::{Leader, Ocsp, Revocation};
use std::process::ExitCode;
use std::sync::Arc;

/// Runs the server until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let config_path = match (&args.config, args.dev) {
        (_, true) => {
            dev::ensure(
                &args.data_dir(),
                args.http_addr,
                args.grpc_addr,
                args.https_addr,
            )
            .await?
        }
        (Some(p), false) => p.clone(),
        (None, false) => anyhow::bail!("pass --config sigil.toml, or --dev for a development CA"),
    };
    let mut cfg = Config::load(&config_path)?;
    if let Some(addr) = args.http_addr {
        cfg.server.http_addr = addr;
    }
    if let Some(addr) = args.grpc_addr {
        match cfg.grpc.as_mut() {
            Some(g) => g.addr = addr,
            None => cfg.grpc = Some(GrpcConfig::on(addr)),
        }
    }
    if let Some(addr) = args.https_addr {
        match cfg.acme.as_mut() {
            Some(a) => a.https_addr = addr,
            None => cfg.acme = Some(AcmeConfig::on(addr)),
        }
    }
    let acme_flags = args.validation_http_port.is_some()
        || args.validation_tls_port.is_some()
        || args.dns_resolver.is_some()
        || args.eab_required;
    match cfg.acme.as_mut() {
        Some(a) => {
            if let Some(p) = args.validation_http_port {
                a.validation_http_port = p;
            }
            if let Some(p) = args.validation_tls_port {
                a.validation_tls_port = p;
            }
            if let Some(r) = args.dns_resolver {
                a.dns_resolver = Some(r);
            }
            a.eab_required |= args.eab_required;
        }
        None if acme_flags => anyhow::bail!(
            "ACME flags need an ACME listener: add an [acme] section to the config or pass --https-addr"
        ),
        None => {}
    }
    // Flags may have added listeners or changed ports: checked as a whole.
    cfg.validate()?;
    // Held until this function returns: one server per SQLite database.
    let _one_server = sigil_store::ServerLock::take(&cfg.database_url())?;
    let metrics_handle = install_metrics();
    let authority = Arc::new(
        build_authority(&cfg, sigil_store::Store::open(&cfg.database_url()).await?).await?,
    );
    let roots = load_roots(&cfg)?;
    authority.sync().await?;
    let leader = Leader::default();
    let lease = authority.store().try_lead().await?;
    leader.set(lease.is_some());
    if lease.is_some() {
        tracing::info!(
            "this node runs the background jobs (CRL publishing, OCSP pre-signing, retention)"
        );
    } else {
        tracing::info!("another node runs the background jobs; this one takes over if it stops");
    }
    let revocation = Revocation::new(authority.clone(), cfg.crl_settings()?, leader.clone());
    revocation.publish_now().await?;
    tokio::spawn(revocation.clone().run());
    let responder = Ocsp::new(authority.clone(), cfg.ocsp_settings()?, leader.clone());
    responder.ensure_signers().await?;
    // The answers stored by the last run are loaded while the server already
    // serves (a CA with millions of unexpired certificates takes a while);
    // until then OCSP answers are signed on demand, within `max_fresh`.
    tokio::spawn({
        let (responder, authority) = (responder.clone(), authority.clone());
        async move {
            // Stored answers are checked against the revocations as synced
            // (below): wait for a current view, a few seconds at most.
            for _ in 0..50 {
                if authority.revocations_current() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            match responder.load_stored().await {
                Ok(n) => tracing::info!(responses = n, "OCSP responses loaded from the database"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "loading the stored OCSP responses failed; answers are signed on demand until the next pre-signing pass"
                ),
            }
            responder.run().await
        }
    });
    tokio::spawn(hold_job_lock(authority.clone(), lease, leader.clone()));
    if let Some(keep) = cfg.keep_expired()? {
        tokio::spawn(crate::retention::run(
            authority.clone(),
            leader.clone(),
            keep,
            cfg.ocsp_settings()?.validity,
        ));
    }
    tokio::spawn(crate::reload::watch(
        authority.clone(),
        cfg.resolve(&cfg.policy.dir),
    ));
    let notifier = Notifier::default();
    {
        let (authority, revocation, responder, notifier) = (
            authority.clone(),
            revocation.clone(),
            responder.clone(),
            notifier.clone(),
        );
        // Re-signing the answers of a long list of revocations takes a
        // while: it runs beside the sync loop, which must keep the view of
        // revocations current (until their answers are re-signed, cached
        // `good` answers for them are not served).
        let (resign, mut lists) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
        let signer = responder.clone();
        tokio::spawn(async move {
            while let Some(list) = lists.recv().await {
                signer.revoked(&list).await;
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sigil_authority::SYNC_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match authority.sync().await {
                    Ok(synced) => {
                        if synced.issuers_changed {
                            issuers_changed(
                                &authority,
                                &revocation,
                                &responder,
                                &notifier,
                                synced.rotated,
                            )
                            .await;
                        }
                        // New revocations (here, on another node, or by the CLI).
                        if !synced.revoked.is_empty() {
                            revocation.revocations_changed();
                            for serial in &synced.revoked {
                                notifier.send(Notice::Revoked {
                                    serial: serial.clone(),
                                });
                            }
                            let _ = resign.send(synced.revoked);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sync with the database failed; client-certificate checks fall back to it")
                    }
                }
            }
        });
    }
    let issuer = authority.active_issuer();
    authority
        .record(
            "server.started",
            "system",
            issuer.info().id.as_str(),
            serde_json::json!({
                "config": config_path.display().to_string(),
                "config_sha256": sigil_core::sha256_hex(&std::fs::read(&config_path).unwrap_or_default()),
                "policy_rules": authority.policy().rules().len(),
                "version": env!("CARGO_PKG_VERSION"),
            }),
        )
        .await?;

    let listener = tokio::net::TcpListener::bind(cfg.server.http_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (server.http_addr or --http-addr)",
                cfg.server.http_addr
            )
        })?;
    let addr = listener.local_addr()?;
    let timeouts = cfg.timeouts()?;
    // Each listener counts its own connections.
    let connection_limit =
        || crate::limits::ConnectionLimit::new(cfg.server.max_connections, timeouts.idle);
    let grpc = match &cfg.grpc {
        Some(g) => {
            let tokens = server_verifier(&cfg, g, || key_passphrase(&cfg))?;
            Some(
                GrpcListener::start(
                    g,
                    authority.clone(),
                    &roots,
                    tokens,
                    notifier.clone(),
                    cfg.request_timeout()?,
                    connection_limit(),
                )
                .await?,
            )
        }
        None => None,
    };
    let acme = match &cfg.acme {
        Some(a) => {
            Some(AcmeListener::start(a, authority.clone(), connection_limit(), timeouts).await?)
        }
        None => None,
    };
    let config_abs = config_path.canonicalize().unwrap_or(config_path.clone());
    if args.dev {
        println!(
            "Sigil development CA (DEV ONLY: its root key is in {})",
            args.data_dir().display()
        );
    } else {
        println!("Sigil CA");
    }
    for r in &roots {
        println!("root:              {}", r.subject);
        println!(
            "root fingerprint:  SHA256 {}",
            sigil_core::sha256_hex(&r.der)
        );
    }
    println!(
        "issuer:            {} ({})",
        issuer.info().subject,
        issuer.info().id
    );
    println!(
        "http:              http://{addr}  (/healthz /readyz /roots.pem /ca/<id>.crt /crl/<id>.crl /ocsp)"
    );
    if let Some(g) = &grpc {
        println!(
            "grpc:              {}  (mTLS; sigil.v1.CertificateAuthority, reflection on)",
            g.local_addr()?
        );
        println!(
            "bootstrap token:   sigil token create --config {} --subject NAME --san NAME",
            config_abs.display()
        );
    }
    if let Some(a) = &acme {
        println!(
            "acme:              {}/acme/directory  (listening on {})",
            cfg.acme.as_ref().map(|c| c.base_url()).unwrap_or_default(),
            a.local_addr()?
        );
        println!(
            "eab key:           sigil acme eab create --config {} [--requester NAME]",
            config_abs.display()
        );
    }
    println!("config:            {}", config_abs.display());
    println!(
        "issue a cert:      sigil cert issue --config {} --csr leaf.csr",
        config_abs.display()
    );
    tracing::info!(%addr, "listening");

    let state = Arc::new(http::HttpState {
        authority: authority.clone(),
        roots,
        revocation: revocation.clone(),
        responder: responder.clone(),
        metrics: metrics_handle,
        listeners: grpc
            .iter()
            .map(GrpcListener::certificate)
            .chain(acme.iter().map(AcmeListener::certificate))
            .collect(),
        readiness: tokio::sync::Mutex::new(None),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let timeout = timeouts.request;
    // OCSP and CRL routes are merged after the request-id layer, so the hot
    // path skips it (they write no audit rows); the responder bounds its own
    // work (answers from memory, fresh signatures under a concurrency limit),
    // and the timeout bounds a request body sent slowly.
    let within = move |req, next| crate::limits::request_timeout(timeout, req, next);
    let app = http::router(state)
        .layer(axum::middleware::from_fn(within))
        .layer(axum::middleware::from_fn(crate::request_id::http))
        .merge(
            sigil_revocation::router(revocation, responder)
                .layer(axum::middleware::from_fn(within)),
        );
    let listener = crate::limits::LimitedTcp {
        listener,
        limit: connection_limit(),
    };
    let http = crate::limits::serve(listener, app, timeouts, stopped(stop_rx.clone()));
    let grpc_task = grpc.map(|g| tokio::spawn(g.serve(stopped(stop_rx.clone()))));
    let acme_task = acme.map(|a| tokio::spawn(a.serve(stopped(stop_rx.clone()))));
    let http_task = tokio::spawn(async move {
        http.await;
        Ok(())
    });
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    // The listeners drain together, within their request and idle timeouts
    // and one deadline short of the usual 30 s stop timeouts (systemd,
    // Kubernetes), so the store is always closed cleanly before the process
    // would be killed; connections still open then end with the process.
    let deadline =
        tokio::time::Instant::now() + (timeouts.request + timeouts.idle).min(SHUTDOWN_GRACE);
    let mut failed = None;
    let tasks: [(&str, Option<tokio::task::JoinHandle<Result<()>>>); 3] = [
        ("HTTP", Some(http_task)),
        ("gRPC", grpc_task),
        ("HTTPS", acme_task),
    ];
    for (name, task) in tasks {
        let Some(task) = task else { continue };
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::error!(listener = name, error = %e, "listener failed");
                failed.get_or_insert(e);
            }
            Ok(Err(e)) => {
                tracing::error!(listener = name, error = %e, "listener task failed");
                failed.get_or_insert(anyhow::anyhow!("{name} listener task failed: {e}"));
            }
            Err(_) => tracing::warn!(
                listener = name,
                "connections still open at the shutdown deadline; closing them with the process"
            ),
        }
    }
    // Closing waits for connections still in use (a background pass's long
    // read): bounded too, so the process still stops before it is killed.
    if tokio::time::timeout(STORE_CLOSE_GRACE, authority.store().close())
        .await
        .is_err()
    {
        tracing::warn!(
            "database connections still in use at shutdown; closing them with the process"
        );
    }
    tracing::info!("stopped");
    match failed {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The longest a stopping server waits for its connections to finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(25);
/// The longest it then waits for the database pool to close.
const STORE_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Keeps or takes the background-job lock: checks it every 2 s, and when
/// another node's lock goes away (that node stopped or died), takes over
/// and publishes at once.
async fn hold_job_lock(
    authority: Arc<Authority>,
    mut lease: Option<sigil_store::Leadership>,
    leader: Leader,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match lease.as_mut() {
            Some(l) => {
                if !l.still_held().await {
                    tracing::warn!(
                        "lost the background-job lock (database connection broke); retrying"
                    );
                    lease = None;
                    leader.set(false);
                }
            }
            None => match tokio::time::timeout(
                sigil_store::LEASE_CHECK_TIMEOUT,
                authority.store().try_lead(),
            )
            .await
            .unwrap_or(Ok(None))
            {
                Ok(Some(l)) => {
                    tracing::info!(
                        "took over the background jobs (CRL publishing, OCSP pre-signing, retention)"
                    );
                    lease = Some(l);
                    // The CRL publisher and the OCSP pre-signer wake on the
                    // change and run their jobs at once.
                    leader.set(true);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reach the database for the job lock"),
            },
        }
        metrics::gauge!("sigil_job_leader").set(if leader.is_leading() { 1.0 } else { 0.0 });
    }
}

/// After a rotation step (here or on another node): responders for the
/// serving issuers, their CRLs, and word to gRPC watchers.
async fn issuers_changed(
    authority: &Authority,
    revocation: &Revocation,
    responder: &Arc<Ocsp>,
    notifier: &Notifier,
    rotated: bool,
) {
    if let Err(e) = responder.ensure_signers().await {
        tracing::error!(error = %e, "OCSP responders for the new issuers failed; retrying with the next refresh");
    }
    revocation.revocations_changed();
    let r = responder.clone();
    tokio::spawn(async move {
        if let Err(e) = r.refresh().await {
            tracing::error!(error = %e, "pre-signing OCSP responses after an issuer change failed");
        }
    });
    if !rotated {
        return;
    }
    let active = authority.active_issuer().info().id.to_string();
    notifier.send(Notice::IssuerRotated {
        issuer: active.clone(),
    });
    // When the operator asked (`activate --renew-all-by`), certificates of
    // the replaced issuers should move to the new one now.
    for old in authority.serving_issuers().iter().skip(1) {
        let scope = format!("issuer:{}", old.info().id);
        match authority.store().acme_renewal_hint(&[scope]).await {
            Ok(Some(by)) => notifier.send(Notice::RenewIssuedBefore {
                before: authority.now().unix_timestamp(),
                by,
                reason: format!(
                    "issuer {} replaced {}: renew onto it by {by} (unix time)",
                    active,
                    old.info().id
                ),
            }),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reading renewal hints failed"),
        }
    }
}

/// Installs the Prometheus recorder (once per process); `None` if another
/// recorder is already installed.
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    const LATENCY: [f64; 12] = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
    ];
    // Gauges set at scrape time for things that can go away (a retired
    // issuer's CRL and expiry) vanish when no longer set.
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&LATENCY)
        .ok()?
        .idle_timeout(
            metrics_util::MetricKindMask::GAUGE,
            Some(std::time::Duration::from_secs(600)),
        );
    match builder.install_recorder() {
        Ok(h) => {
            // Histogram samples queue until drained; drain them even when
            // nobody scrapes, so memory stays flat under load.
            let upkeep = h.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(h)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed; /metrics is off");
            None
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
