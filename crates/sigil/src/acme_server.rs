//! The HTTPS listener for ACME: TLS with a certificate from this CA's own
//! intermediate (renewed in place), handshakes off the accept loop, and the
//! `sigil-acme` router behind it.

use crate::config::AcmeConfig;
use crate::tls_cert::{ServerCert, accept_loop, provider};
use anyhow::{Context, Result};
use sigil_acme::{Acme, AcmeSettings, ValidationSettings};
use sigil_authority::Authority;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Everything `serve` needs to run the ACME listener.
pub struct AcmeListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    acme: Arc<Acme>,
    limit: crate::limits::ConnectionLimit,
    timeouts: crate::limits::Timeouts,
    certificate: Arc<ServerCert>,
}

/// ACME settings from the `[acme]` section.
pub fn settings(cfg: &AcmeConfig) -> Result<AcmeSettings> {
    let parse = |key: &str, v: &str| {
        sigil_core::lifetime::parse_duration(v).with_context(|| format!("acme.{key}"))
    };
    let mut s = AcmeSettings::new(&cfg.base_url());
    s.eab_required = cfg.eab_required;
    s.authz_reuse = parse("authz_reuse", &cfg.authz_reuse)?;
    s.order_lifetime = parse("order_lifetime", &cfg.order_lifetime)?;
    s.terms_of_service = cfg.terms_of_service.clone();
    s.website = cfg.website.clone();
    s.orders_per_minute = cfg.orders_per_minute;
    s.validation = ValidationSettings {
        http_port: cfg.validation_http_port,
        tls_port: cfg.validation_tls_port,
        resolver: cfg.dns_resolver,
        localhost_loopback: cfg.localhost_loopback,
        ..ValidationSettings::default()
    };
    Ok(s)
}

impl AcmeListener {
    /// Binds, issues the listener certificate and prepares the ACME state.
    pub async fn start(
        cfg: &AcmeConfig,
        authority: Arc<Authority>,
        limit: crate::limits::ConnectionLimit,
        timeouts: crate::limits::Timeouts,
    ) -> Result<AcmeListener> {
        let lifetime = sigil_core::lifetime::parse_duration(&cfg.server_cert_lifetime)
            .context("acme.server_cert_lifetime")?;
        let cert =
            ServerCert::start(authority.clone(), &cfg.server_names, lifetime, "HTTPS").await?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acme = Acme::new(authority, settings(cfg)?)
            .await
            .map_err(|e| anyhow::anyhow!("ACME: {e}"))?;
        let listener = TcpListener::bind(cfg.https_addr).await.with_context(|| {
            format!(
                "cannot listen on {} (acme.https_addr or --https-addr)",
                cfg.https_addr
            )
        })?;
        Ok(AcmeListener {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            acme,
            limit,
            timeouts,
            certificate: cert,
        })
    }

    /// Its TLS certificate (renewed in place).
    pub fn certificate(&self) -> Arc<ServerCert> {
        self.certificate.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let addr = self.listener.local_addr()?;
        let (tx, rx) = mpsc::channel(128);
        let accept = tokio::spawn(accept_loop(self.listener, self.acceptor, tx, "HTTPS"));
        // New connections stop as soon as the shutdown starts, not after
        // the open ones drained.
        let stop_accepting = accept.abort_handle();
        let shutdown = async move {
            shutdown.await;
            stop_accepting.abort();
        };
        let pruner = {
            let acme = self.acme.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    acme.prune().await;
                }
            })
        };
        let timeouts = self.timeouts;
        let app = sigil_acme::router(self.acme, timeouts.request)
            .layer(axum::middleware::from_fn(crate::request_id::http));
        let incoming = TlsIncoming {
            rx,
            addr,
            limit: self.limit,
        };
        crate::limits::serve(incoming, app, timeouts, shutdown).await;
        accept.abort();
        pruner.abort();
        Ok(())
    }
}

/// Completed TLS connections, as an axum listener.
struct TlsIncoming {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    limit: crate::limits::ConnectionLimit,
}

impl axum::serve::Listener for TlsIncoming {
    type Io = crate::limits::Limited<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Over the limit, handshaken connections wait in the channel, and
        // once their handshake slots are all taken, the accept loop stops
        // taking new ones.
        let rx = &mut self.rx;
        let mut peer = None;
        let admitted = self
            .limit
            .admit(async {
                match rx.recv().await {
                    Some((io, addr)) => {
                        peer = Some(addr);
                        Some(io)
                    }
                    None => None,
                }
            })
            .await;
        match admitted.and_then(|l| l.transpose()).zip(peer) {
            Some(c) => c,
            // The accept loop is gone (shutting down): never yield again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
