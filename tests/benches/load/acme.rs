//! The ACME mode of the load driver: the full flow per certificate
//! (newOrder → authorization → http-01 against the driver's own loopback
//! responder → poll → finalize → download), one account and one keep-alive
//! HTTPS connection per worker. Works against any RFC 8555 server (Sigil,
//! Pebble). JWS signing is ES256 with aws-lc-rs, so the client side stays cheap.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request with no answer by then is retried on a new connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Key authorizations the responder serves, by token.
pub type Tokens = Arc<Mutex<HashMap<String, String>>>;

/// Serves `/.well-known/acme-challenge/<token>` on `port` (all addresses of 127.0.0.1).
pub async fn responder(port: u16, tokens: Tokens) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the http-01 responder");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let tokens = tokens.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tokens = tokens.clone();
                    async move {
                        let token = req
                            .uri()
                            .path()
                            .strip_prefix("/.well-known/acme-challenge/")
                            .unwrap_or("");
                        let answer = tokens.lock().unwrap().get(token).cloned();
                        let resp = match answer {
                            Some(ka) => hyper::Response::new(Full::new(Bytes::from(ka))),
                            None => {
                                let mut r = hyper::Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                                r
                            }
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// One worker: its account key, connection and last nonce.
pub struct Client {
    key: EcdsaKeyPair,
    jwk: Value,
    thumbprint: String,
    kid: Option<String>,
    nonce: Option<String>,
    conn: Option<SendRequest<Full<Bytes>>>,
    addr: SocketAddr,
    host: String,
    /// `host:port`, for the Host header.
    authority: String,
    tls: tokio_rustls::TlsConnector,
    dir: Value,
    rng: SystemRandom,
}

/// A response: status, headers we use, body.
pub struct Resp {
    pub status: u16,
    pub location: Option<String>,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn tls_connector(roots_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

use rustls_pki_types::pem::PemObject as _;

impl Client {
    /// Fetches the directory and registers an account.
    pub async fn new(directory: &str, roots_pem: &str) -> Client {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = key.public_key().as_ref().to_vec();
        let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let thumbprint = B64.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            canonical.as_bytes(),
        ));
        let rest = directory.strip_prefix("https://").unwrap();
        let authority = &rest[..rest.find('/').unwrap()];
        let addr: SocketAddr = tokio::net::lookup_host(authority)
            .await
            .unwrap()
            .next()
            .unwrap();
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_string();
        let mut c = Client {
            key,
            jwk: json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
            thumbprint,
            kid: None,
            nonce: None,
            conn: None,
            addr,
            host,
            authority: authority.to_string(),
            tls: tls_connector(roots_pem),
            dir: Value::Null,
            rng,
        };
        let d = c.send(hyper::Method::GET, directory, None).await;
        c.dir = d.json();
        let url = c.dir["newAccount"].as_str().unwrap().to_string();
        let r = c
            .post(&url, Some(json!({"termsOfServiceAgreed": true})))
            .await;
        assert!(
            r.status == 201 || r.status == 200,
            "newAccount: {}",
            String::from_utf8_lossy(&r.body)
        );
        c.kid = r.location;
        c
    }

    /// The key authorization for a token.
    pub fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", self.thumbprint)
    }

    /// A directory URL.
    pub fn dir(&self, name: &str) -> String {
        self.dir[name].as_str().unwrap().to_string()
    }

    async fn connection(&mut self) -> &mut SendRequest<Full<Bytes>> {
        let usable = self.conn.as_ref().is_some_and(|c| !c.is_closed());
        if !usable {
            let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let name = rustls_pki_types::ServerName::try_from(self.host.clone()).unwrap();
            let tls = self.tls.connect(name, tcp).await.unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            self.conn = Some(sender);
        }
        self.conn.as_mut().unwrap()
    }

    async fn send(&mut self, method: hyper::Method, url: &str, body: Option<Vec<u8>>) -> Resp {
        for _ in 0..3 {
            // Origin-form request target: the path, not the absolute URL.
            let path = url
                .strip_prefix("https://")
                .and_then(|r| r.find('/').map(|i| &r[i..]))
                .unwrap_or("/");
            let mut req = hyper::Request::builder()
                .method(method.clone())
                .uri(path)
                .header("host", &self.authority);
            if body.is_some() {
                req = req.header("content-type", "application/jose+json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
                .unwrap();
            let conn = self.connection().await;
            if conn.ready().await.is_err() {
                self.conn = None;
                continue;
            }
            let resp = match tokio::time::timeout(REQUEST_TIMEOUT, conn.send_request(req)).await {
                Ok(Ok(r)) => r,
                _ => {
                    self.conn = None;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let header = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            if let Some(n) = header("replay-nonce") {
                self.nonce = Some(n);
            }
            let location = header("location");
            let Ok(Ok(body)) =
                tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect()).await
            else {
                self.conn = None;
                continue;
            };
            let body = body.to_bytes();
            return Resp {
                status,
                location,
                body,
            };
        }
        panic!("request to {url} failed three times");
    }

    /// A signed POST (`payload` None = POST-as-GET); retries once on badNonce.
    pub async fn post(&mut self, url: &str, payload: Option<Value>) -> Resp {
        let mut last = String::new();
        for _ in 0..5 {
            if self.nonce.is_none() {
                let u = self.dir("newNonce");
                self.send(hyper::Method::HEAD, &u, None).await;
            }
            let mut protected = json!({"alg": "ES256", "nonce": self.nonce.take(), "url": url});
            match &self.kid {
                Some(k) => protected["kid"] = json!(k),
                None => protected["jwk"] = self.jwk.clone(),
            }
            let p64 = B64.encode(protected.to_string());
            let b64 = payload
                .as_ref()
                .map_or_else(String::new, |p| B64.encode(p.to_string()));
            let sig = self
                .key
                .sign(&self.rng, format!("{p64}.{b64}").as_bytes())
                .unwrap();
            let body =
                json!({"protected": p64, "payload": b64, "signature": B64.encode(sig.as_ref())});
            let r = self
                .send(
                    hyper::Method::POST,
                    url,
                    Some(body.to_string().into_bytes()),
                )
                .await;
            let bad_nonce = r.status == 400
                && r.json()["type"].as_str() == Some("urn:ietf:params:acme:error:badNonce");
            if !bad_nonce {
                return r;
            }
            last = String::from_utf8_lossy(&r.body).into_owned();
        }
        panic!("badNonce five times in a row at {url}: {last}");
    }

    /// One certificate, start to finish; returns the PEM chain.
    pub async fn obtain(&mut self, name: &str, csr_der: &[u8], tokens: &Tokens) -> String {
        let new_order = self.dir("newOrder");
        let r = self
            .post(
                &new_order,
                Some(json!({"identifiers": [{"type": "dns", "value": name}]})),
            )
            .await;
        assert_eq!(
            r.status,
            201,
            "newOrder: {}",
            String::from_utf8_lossy(&r.body)
        );
        let order_url = r.location.clone().unwrap();
        let order = r.json();
        let authz_url = order["authorizations"][0].as_str().unwrap().to_string();
        let finalize = order["finalize"].as_str().unwrap().to_string();
        let authz = self.post(&authz_url, None).await.json();
        let chall = authz["challenges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "http-01")
            .unwrap()
            .clone();
        let token = chall["token"].as_str().unwrap().to_string();
        tokens
            .lock()
            .unwrap()
            .insert(token.clone(), self.key_authorization(&token));
        let r = self
            .post(chall["url"].as_str().unwrap(), Some(json!({})))
            .await;
        assert_eq!(
            r.status,
            200,
            "challenge: {}",
            String::from_utf8_lossy(&r.body)
        );
        let mut status = r.json()["status"].as_str().unwrap_or("").to_string();
        while status != "valid" {
            assert!(
                status != "invalid",
                "validation failed: {}",
                String::from_utf8_lossy(&r.body)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
            let a = self.post(&authz_url, None).await.json();
            status = a["status"].as_str().unwrap_or("").to_string();
            assert!(status != "invalid", "authorization invalid: {a}");
        }
        tokens.lock().unwrap().remove(&token);
        let r = self
            .post(&finalize, Some(json!({"csr": B64.encode(csr_der)})))
            .await;
        assert_eq!(
            r.status,
            200,
            "finalize: {}",
            String::from_utf8_lossy(&r.body)
        );
        let mut order = r.json();
        while order["status"] != "valid" {
            assert!(order["status"] != "invalid", "order invalid: {order}");
            tokio::time::sleep(Duration::from_millis(5)).await;
            order = self.post(&order_url, None).await.json();
        }
        let cert_url = order["certificate"].as_str().unwrap().to_string();
        let r = self.post(&cert_url, None).await;
        assert_eq!(r.status, 200, "certificate download");
        String::from_utf8(r.body.to_vec()).unwrap()
    }
}
