//! The ACME server (RFC 8555, renewal information per RFC 9773, profiles)
//! against the real binary: whole flows with the instant-acme client, whose
//! challenges are answered by an HTTP-01 responder and a DNS server run by the
//! test, and hand-signed JWS requests for each refusal, checking the exact
//! problem type.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use aws_lc_rs::{digest, hmac};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Body;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse,
    CertificateIdentifier, ChallengeType, ExternalAccountKey, HttpClient, Identifier, Key,
    NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use serde_json::{Value, json};
use sigil_e2e::*;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, Der, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};
use x509_parser::prelude::{FromDer as _, GeneralName, ParsedExtension, X509Certificate};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const JOSE: &str = "application/jose+json";

// ---------------------------------------------------------------------------
// HTTPS client trusting only the dev root: one connection per request.

#[derive(Clone)]
struct Https {
    tls: TlsConnector,
}

impl Https {
    fn trusting(root_pem: &Path) -> Https {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(root_pem).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Https {
            tls: TlsConnector::from(Arc::new(config)),
        }
    }

    async fn send<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, BoxError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        tokio::time::timeout(Duration::from_secs(60), self.send_once(req))
            .await
            .map_err(|_| "HTTPS request timed out after 60s")?
    }

    async fn send_once<B>(&self, mut req: Request<B>) -> Result<Response<Full<Bytes>>, BoxError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let uri = req.uri().clone();
        let authority = uri.authority().ok_or("URL without authority")?.clone();
        let host = authority.host().to_string();
        let port = authority.port_u16().unwrap_or(443);
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = target.parse()?;
        req.headers_mut().insert(HOST, authority.as_str().parse()?);
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        let tls = self.tls.connect(ServerName::try_from(host)?, tcp).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let rsp = sender.send_request(req).await?;
        let (parts, body) = rsp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response::from_parts(parts, Full::new(body)))
    }

    async fn get(&self, url: &str) -> Resp {
        self.call(Method::GET, url, None, Bytes::new()).await
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Resp {
        let mut req = Request::builder().method(method.clone()).uri(url);
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        let rsp = self
            .send(req.body(Full::new(body)).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let (parts, body) = rsp.into_parts();
        Resp {
            what: format!("{method} {url}"),
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

impl HttpClient for Https {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let this = self.clone();
        Box::pin(async move {
            match this.send(req).await {
                Ok(rsp) => Ok(BytesResponse::from(rsp)),
                Err(e) => Err(instant_acme::Error::Other(e)),
            }
        })
    }
}

/// A response, kept whole so a failed assertion can show it.
struct Resp {
    what: String,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: not JSON:\n{}", self.show()))
    }

    fn location(&self) -> String {
        self.header("location")
            .unwrap_or_else(|| panic!("no Location:\n{}", self.show()))
    }

    fn show(&self) -> String {
        let mut s = format!("{} -> {}\n", self.what, self.status);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        s.push('\n');
        s.push_str(&String::from_utf8_lossy(&self.body));
        s
    }

    fn expect_ok(self) -> Resp {
        assert!(
            self.status.is_success(),
            "expected success:\n{}",
            self.show()
        );
        self
    }

    /// Asserts an RFC 7807 problem document of type `urn:ietf:params:acme:error:{name}`.
    fn problem(&self, name: &str) -> Value {
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/problem+json"),
            "expected a problem document of type {name}:\n{}",
            self.show()
        );
        let v = self.json();
        assert_eq!(
            v["type"].as_str(),
            Some(format!("urn:ietf:params:acme:error:{name}").as_str()),
            "\n{}",
            self.show()
        );
        assert!(
            !self.status.is_success(),
            "a problem with a success status:\n{}",
            self.show()
        );
        v
    }
}

// ---------------------------------------------------------------------------
// Challenge responders run by the test.

type Tokens = Arc<Mutex<HashMap<String, String>>>;
type TxtRecords = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// An HTTP-01 responder: `/.well-known/acme-challenge/<token>` → key
/// authorization, or a 301 to the URL after `redirect:`.
async fn start_http01() -> (u16, Tokens) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tokens = Tokens::default();
    let map = tokens.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(answer_http01(sock, map.clone()));
        }
    });
    (port, tokens)
}

/// The same over TLS (any certificate will do for http-01 behind a
/// redirect): the target of an `https://` redirect.
async fn start_https01() -> (u16, Tokens) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let tokens = Tokens::default();
    let map = tokens.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (acceptor, map) = (acceptor.clone(), map.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(sock).await {
                    answer_http01(tls, map).await;
                }
            });
        }
    });
    (port, tokens)
}

async fn answer_http01<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S, map: Tokens) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let answer = path
        .strip_prefix("/.well-known/acme-challenge/")
        .and_then(|t| map.lock().unwrap().get(t).cloned());
    if answer.as_deref() == Some("silent") {
        // A responder that takes the request and never answers.
        tokio::time::sleep(Duration::from_secs(120)).await;
        return;
    }
    let rsp = match answer {
        Some(to) if to.starts_with("redirect:") => format!(
            "HTTP/1.1 301 Moved Permanently\r\nLocation: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            &to["redirect:".len()..]
        ),
        Some(ka) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ka}",
            ka.len()
        ),
        None => {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
        }
    };
    let _ = sock.write_all(rsp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// A DNS server answering TXT queries from a map, over UDP and TCP on one port.
async fn start_dns() -> (u16, TxtRecords) {
    let records = TxtRecords::default();
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)).await else {
            continue;
        };
        let map = records.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                if let Some(answer) = dns_answer(&buf[..n], &map) {
                    let _ = udp.send_to(&answer, peer).await;
                }
            }
        });
        let map = records.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = tcp.accept().await {
                let map = map.clone();
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if sock.read_exact(&mut len).await.is_err() {
                            break;
                        }
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if sock.read_exact(&mut q).await.is_err() {
                            break;
                        }
                        let Some(a) = dns_answer(&q, &map) else { break };
                        let mut out = u16::try_from(a.len()).unwrap().to_be_bytes().to_vec();
                        out.extend_from_slice(&a);
                        if sock.write_all(&out).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        return (port, records);
    }
}

/// The response to one DNS query: the TXT records held for the name (NOERROR
/// with no answers otherwise). `None` for what is not a one-question query.
fn dns_answer(q: &[u8], records: &TxtRecords) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    if q.len() < question_end {
        return None;
    }
    let name = labels.join(".");
    let txts = if qtype == 16 {
        records
            .lock()
            .unwrap()
            .get(&name)
            .cloned()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    out.extend_from_slice(&q[..2]);
    out.push(0x84 | (q[2] & 0x01)); // response, authoritative, RD copied
    out.push(0x80); // recursion available, NOERROR
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::try_from(txts.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q[12..question_end]);
    for t in txts {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        out.extend_from_slice(&16u16.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&u16::try_from(t.len() + 1).unwrap().to_be_bytes());
        out.push(u8::try_from(t.len()).unwrap());
        out.extend_from_slice(t.as_bytes());
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// The dev server with its ACME listener.

struct Acme {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    server: Server,
    https: Https,
    dir_url: String,
    dir: Value,
    tokens: Tokens,
    txt: TxtRecords,
    root: PathBuf,
    /// Flags pointing validation at this harness's http-01 and DNS servers.
    validation: Vec<String>,
}

impl Acme {
    /// The same CA (data, validation servers) served by a new node with
    /// `env`, after this one stops: one server per SQLite database.
    /// A new EAB key (id, HMAC key) from `sigil acme eab create` for `requester`.
    fn eab_key(&self, requester: &str) -> (String, Vec<u8>) {
        let config = self.data.join("sigil.toml").display().to_string();
        let out = tokio::task::block_in_place(|| {
            ok(sigil(&[
                "acme",
                "eab",
                "create",
                "--config",
                &config,
                "--requester",
                requester,
            ]))
        });
        let field = |label: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(label))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no '{label}' in:\n{out}"))
        };
        let hmac = URL_SAFE_NO_PAD.decode(field("EAB HMAC key:")).unwrap();
        (field("EAB key id:"), hmac)
    }

    async fn restart(self, env: &[(&str, &str)]) -> Acme {
        let data = self.data.to_string_lossy().into_owned();
        let work = self.data.parent().unwrap().join("restarted");
        std::fs::create_dir_all(&work).unwrap();
        let mut args = vec!["--dev", "--data-dir", data.as_str()];
        args.extend(self.validation.iter().map(String::as_str));
        let Acme { server, .. } = self;
        server.stop();
        let server = tokio::task::block_in_place(|| Server::start(&args, &work, env));
        let dir_url = format!(
            "https://127.0.0.1:{}/acme/directory",
            server.https_port.unwrap()
        );
        let dir = self.https.get(&dir_url).await.expect_ok().json();
        Acme {
            server,
            dir_url,
            dir,
            ..self
        }
    }

    async fn start(extra: &[&str]) -> Acme {
        Acme::start_env(extra, &[]).await
    }

    /// [`Acme::start`] with `env` (e.g. `SIGIL_ACME_*` settings) for the server.
    async fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Acme {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().to_path_buf();
        let (http_port, tokens) = start_http01().await;
        let (dns_port, txt) = start_dns().await;
        let http_port = http_port.to_string();
        let resolver = format!("127.0.0.1:{dns_port}");
        let validation = vec![
            "--validation-http-port".to_string(),
            http_port.clone(),
            "--dns-resolver".to_string(),
            resolver.clone(),
        ];
        let mut args = vec![
            "--dev",
            "--data-dir",
            "data",
            "--validation-http-port",
            &http_port,
            "--dns-resolver",
            &resolver,
        ];
        args.extend_from_slice(extra);
        let server = tokio::task::block_in_place(|| Server::start(&args, &work, env));
        let https_port = server.https_port.expect("dev server HTTPS port");
        let data = work.join("data");
        let root = data.join("DEV-ONLY-root/root.crt");
        let https = Https::trusting(&root);
        let dir_url = format!("https://127.0.0.1:{https_port}/acme/directory");
        let deadline = Instant::now() + Duration::from_secs(20);
        let dir = loop {
            let req = Request::get(&dir_url)
                .body(Full::new(Bytes::new()))
                .unwrap();
            match https.send(req).await {
                Ok(rsp) if rsp.status() == StatusCode::OK => {
                    let body = rsp.into_body().collect().await.unwrap().to_bytes();
                    break serde_json::from_slice::<Value>(&body).unwrap();
                }
                r if Instant::now() > deadline => panic!(
                    "no ACME directory at {dir_url}: {:?}\n{}",
                    r.map(|r| r.status()),
                    server.log_text()
                ),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        Acme {
            _tmp: tmp,
            data,
            server,
            https,
            dir_url,
            dir,
            tokens,
            txt,
            root,
            validation,
        }
    }

    fn url(&self, name: &str) -> String {
        self.dir[name]
            .as_str()
            .unwrap_or_else(|| panic!("directory has no {name}: {}", self.dir))
            .to_owned()
    }

    fn builder(&self) -> AccountBuilder {
        Account::builder_with_http(Box::new(self.https.clone()))
    }

    /// newAccount with `onlyReturnExisting` for the key in `creds`.
    async fn existing_account(
        &self,
        creds: &AccountCredentials,
    ) -> Result<(Account, AccountCredentials), instant_acme::Error> {
        let pkcs8 = creds.private_key().clone_key();
        let key = Key::from_pkcs8_der(pkcs8.clone_key()).unwrap();
        self.builder()
            .from_key((key, PrivateKeyDer::Pkcs8(pkcs8)), self.dir_url.clone())
            .await
    }

    async fn account(&self) -> (Account, AccountCredentials) {
        self.builder()
            .create(&new_account(), self.dir_url.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("newAccount: {e}\n{}", self.server.log_text()))
    }

    async fn restore(&self, creds: &AccountCredentials) -> Account {
        let copy = serde_json::from_value(serde_json::to_value(creds).unwrap()).unwrap();
        self.builder().from_credentials(copy).await.unwrap()
    }

    /// Answers every pending authorization of `order` with `kind` and waits until it is ready.
    async fn solve(&self, order: &mut Order, kind: ChallengeType) {
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.unwrap();
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                s => panic!("authorization {} is {s:?}", authz.url()),
            }
            let id = authz.identifier();
            let base = match id.identifier {
                Identifier::Dns(d) => d.clone(),
                Identifier::Ip(ip) => ip.to_string(),
                other => panic!("unexpected identifier {other:?}"),
            };
            let offered: Vec<_> = authz.challenges.iter().map(|c| c.r#type.clone()).collect();
            let mut ch = authz
                .challenge(kind.clone())
                .unwrap_or_else(|| panic!("{kind:?} not offered for {base}: {offered:?}"));
            let ka = ch.key_authorization();
            match kind {
                ChallengeType::Http01 => {
                    self.tokens
                        .lock()
                        .unwrap()
                        .insert(ch.token.clone(), ka.as_str().to_owned());
                }
                ChallengeType::Dns01 => {
                    self.txt
                        .lock()
                        .unwrap()
                        .entry(format!("_acme-challenge.{base}"))
                        .or_default()
                        .push(ka.dns_value());
                }
                _ => unreachable!(),
            }
            ch.set_ready().await.unwrap();
        }
        let status = order
            .poll_ready(&RetryPolicy::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "order did not become ready: {e}\n{}",
                    self.server.log_text()
                )
            });
        assert_eq!(status, OrderStatus::Ready, "{:?}", order.state());
    }

    /// Finalizes a ready order with a fresh key; returns the PEM chain.
    async fn finalize(&self, order: &mut Order) -> String {
        order.finalize().await.unwrap();
        order
            .poll_certificate(&RetryPolicy::default())
            .await
            .unwrap_or_else(|e| panic!("no certificate: {e}\n{}", self.server.log_text()))
    }

    /// Order, http-01, finalize: the PEM chain.
    async fn issue(&self, account: &Account, new_order: &NewOrder<'_>) -> String {
        let mut order = account.new_order(new_order).await.unwrap();
        self.solve(&mut order, ChallengeType::Http01).await;
        self.finalize(&mut order).await
    }

    /// `openssl verify` of a PEM chain (leaf first) against the dev root only.
    fn openssl_verify(&self, chain: &str, name: &str) {
        if !have("openssl") {
            return;
        }
        let path = self.data.join(format!("{name}.chain.pem"));
        std::fs::write(&path, chain).unwrap();
        let p = path.display().to_string();
        let out = run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                &self.root.display().to_string(),
                "-untrusted",
                &p,
                &p,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(": OK"),
            "openssl verify: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The audit rows as `kind|actor|subject|detail` lines, read with sqlite3.
    fn audit_rows(&self) -> Option<String> {
        if !have("sqlite3") {
            return None;
        }
        let db = self.data.join("sigil.db").display().to_string();
        let out = run(
            "sqlite3",
            &[&db, "select kind, actor, subject, detail from audit"],
        );
        assert!(
            out.status.success(),
            "sqlite3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn new_account() -> NewAccount<'static> {
    NewAccount {
        contact: &[],
        terms_of_service_agreed: true,
        only_return_existing: false,
    }
}

fn dns(name: &str) -> Identifier {
    Identifier::Dns(name.to_owned())
}

/// The ACME problem name (`urn:ietf:params:acme:error:` stripped) of a client error.
/// RFC 8555 §7.3.6: a deactivated account's requests get 401 unauthorized.
fn assert_unauthorized_401(err: &instant_acme::Error) {
    assert_eq!(problem_name(err), "unauthorized", "{err}");
    match err {
        instant_acme::Error::Api(p) => assert_eq!(p.status, Some(401), "{err}"),
        other => panic!("{other}"),
    }
}

fn problem_name(e: &instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Api(p) => p
            .r#type
            .as_deref()
            .unwrap_or("")
            .trim_start_matches("urn:ietf:params:acme:error:")
            .to_owned(),
        other => panic!("expected an ACME problem, got: {other}"),
    }
}

// ---------------------------------------------------------------------------
// Certificates.

fn pem_certs(chain: &str) -> Vec<Vec<u8>> {
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect();
    assert!(!certs.is_empty(), "no certificate in:\n{chain}");
    certs
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).unwrap().1
}

fn sans(der: &[u8]) -> Vec<String> {
    let cert = parse(der);
    let ext = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN extension");
    ext.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_string(),
            GeneralName::IPAddress(b) if b.len() == 4 => {
                IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string()
            }
            GeneralName::IPAddress(b) if b.len() == 16 => {
                IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string()
            }
            other => format!("{other:?}"),
        })
        .collect()
}

/// (serverAuth, clientAuth) from the extended key usage extension.
fn eku(der: &[u8]) -> (bool, bool) {
    let cert = parse(der);
    let ext = cert.extended_key_usage().unwrap().expect("EKU extension");
    (ext.value.server_auth, ext.value.client_auth)
}

/// The RFC 9773 certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial).
fn cert_id(der: &[u8]) -> CertificateIdentifier<'static> {
    let cert = parse(der);
    let aki = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0),
            _ => None,
        })
        .expect("AKI keyIdentifier");
    CertificateIdentifier::new(
        Der::from_slice(aki),
        Der::from_slice(cert.tbs_certificate.raw_serial()),
    )
    .into_owned()
}

fn csr_der(names: &[&str], key: &rcgen::KeyPair) -> Vec<u8> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(key).unwrap().der().to_vec()
}

// ---------------------------------------------------------------------------
// Hand-made JWS (ES256) for the requests a well-behaved client never sends.

fn b64(data: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

struct Raw {
    https: Https,
    dir: Value,
    key: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    kid: String,
    /// Sends requests for one node's port to another (nodes behind one
    /// base URL, as behind a load balancer); URLs in the JWS stay as issued.
    via: Mutex<Option<(String, String)>>,
}

impl Raw {
    /// A fresh key with no account yet.
    fn unregistered(ca: &Acme) -> Raw {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8).unwrap();
        Raw {
            https: ca.https.clone(),
            dir: ca.dir.clone(),
            key,
            pkcs8,
            kid: String::new(),
            via: Mutex::new(None),
        }
    }

    /// A new account (newAccount signed with the JWK).
    async fn register(ca: &Acme) -> Raw {
        let mut raw = Raw::unregistered(ca);
        let url = raw.url("newAccount");
        let protected =
            json!({"alg": "ES256", "jwk": raw.jwk(), "nonce": raw.nonce().await, "url": url});
        let body = raw.sign(&protected, Some(&json!({"termsOfServiceAgreed": true})));
        let rsp = raw.send(&url, &body).await.expect_ok();
        assert_eq!(rsp.status, StatusCode::CREATED, "{}", rsp.show());
        raw.kid = rsp.location();
        raw
    }

    fn url(&self, name: &str) -> String {
        self.dir[name].as_str().unwrap().to_owned()
    }

    /// From now on, requests for `:from/` go to `:to/`.
    fn route_via(&self, from: u16, to: u16) {
        *self.via.lock().unwrap() = Some((format!(":{from}/"), format!(":{to}/")));
    }

    fn target(&self, url: &str) -> String {
        match self.via.lock().unwrap().as_ref() {
            Some((from, to)) => url.replacen(from.as_str(), to, 1),
            None => url.to_owned(),
        }
    }

    fn jwk(&self) -> Value {
        let p = self.key.public_key().as_ref();
        json!({"crv": "P-256", "kty": "EC", "x": b64(&p[1..33]), "y": b64(&p[33..65])})
    }

    /// RFC 7638 thumbprint of the account key.
    fn thumbprint(&self) -> String {
        let p = self.key.public_key().as_ref();
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            b64(&p[1..33]),
            b64(&p[33..65])
        );
        b64(digest::digest(&digest::SHA256, canonical.as_bytes()))
    }

    async fn nonce(&self) -> String {
        let rsp = self
            .https
            .call(
                Method::HEAD,
                &self.target(&self.url("newNonce")),
                None,
                Bytes::new(),
            )
            .await;
        rsp.header("replay-nonce")
            .unwrap_or_else(|| panic!("no Replay-Nonce:\n{}", rsp.show()))
    }

    /// A flattened JWS with this key's signature; `None` payload is POST-as-GET.
    fn sign(&self, protected: &Value, payload: Option<&Value>) -> Value {
        let protected = b64(serde_json::to_vec(protected).unwrap());
        let payload = payload.map_or(String::new(), |p| b64(serde_json::to_vec(p).unwrap()));
        let sig = self
            .key
            .sign(
                &SystemRandom::new(),
                format!("{protected}.{payload}").as_bytes(),
            )
            .unwrap();
        json!({"protected": protected, "payload": payload, "signature": b64(sig)})
    }

    /// The usual protected header: ES256, kid, a fresh nonce, `url`.
    async fn header(&self, url: &str) -> Value {
        json!({"alg": "ES256", "kid": self.kid, "nonce": self.nonce().await, "url": url})
    }

    async fn send(&self, url: &str, body: &Value) -> Resp {
        self.send_bytes(url, JOSE, serde_json::to_vec(body).unwrap())
            .await
    }

    async fn send_bytes(&self, url: &str, content_type: &str, body: Vec<u8>) -> Resp {
        self.https
            .call(
                Method::POST,
                &self.target(url),
                Some(content_type),
                Bytes::from(body),
            )
            .await
    }

    /// A correctly signed POST (`None`: POST-as-GET).
    /// Finalizes `order` with a CSR (base64url DER).
    async fn finalize(&self, order: &Value, csr: &str) -> Resp {
        let url = order["finalize"]
            .as_str()
            .expect("the order has a finalize URL");
        self.post(url, Some(&json!({ "csr": csr }))).await
    }

    /// Finalizes `order` with a CSR for `names` under a new P-256 key.
    async fn finalize_new_key(&self, order: &Value, names: &[&str]) -> Resp {
        let key = rcgen::KeyPair::generate().unwrap();
        self.finalize(order, &b64(csr_der(names, &key))).await
    }

    async fn post(&self, url: &str, payload: Option<&Value>) -> Resp {
        let body = self.sign(&self.header(url).await, payload);
        self.send(url, &body).await
    }

    async fn new_order(&self, names: &[&str]) -> Resp {
        let ids: Vec<Value> = names
            .iter()
            .map(|n| json!({"type": "dns", "value": n}))
            .collect();
        self.post(&self.url("newOrder"), Some(&json!({"identifiers": ids})))
            .await
    }

    /// newAuthz (pre-authorization) for a DNS name.
    async fn new_authz(&self, name: &str) -> Resp {
        self.post(
            &self.url("newAuthz"),
            Some(&json!({"identifier": {"type": "dns", "value": name}})),
        )
        .await
    }

    /// The authorization's challenge of type `kind`.
    async fn challenge(&self, authz_url: &str, kind: &str) -> Value {
        let authz = self.post(authz_url, None).await.expect_ok().json();
        authz["challenges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} challenge: {authz}"))
            .clone()
    }

    /// Polls an authorization until it leaves `pending` (30 s at most).
    async fn settle(&self, authz_url: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let a = self.post(authz_url, None).await.expect_ok().json();
            if a["status"] != "pending" || Instant::now() > deadline {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Answers the http-01 challenge of a pending authorization and waits until it is valid.
    async fn validate_http01(&self, ca: &Acme, authz_url: &str) {
        let authz = self.post(authz_url, None).await.expect_ok().json();
        if authz["status"] == "valid" {
            return;
        }
        let ch = authz["challenges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "http-01")
            .unwrap_or_else(|| panic!("no http-01 challenge: {authz}"));
        let token = ch["token"].as_str().unwrap();
        ca.tokens
            .lock()
            .unwrap()
            .insert(token.to_owned(), format!("{token}.{}", self.thumbprint()));
        self.post(ch["url"].as_str().unwrap(), Some(&json!({})))
            .await
            .expect_ok();
        let a = self.settle(authz_url).await;
        assert_eq!(
            a["status"], "valid",
            "authorization {authz_url} did not become valid: {a}"
        );
    }

    /// A new order for `names`, validated over http-01, until it is ready: its JSON and URL.
    async fn ready_order(&self, ca: &Acme, names: &[&str]) -> (Value, String) {
        let rsp = self.new_order(names).await.expect_ok();
        let url = rsp.location();
        for authz in rsp.json()["authorizations"].as_array().unwrap() {
            self.validate_http01(ca, authz.as_str().unwrap()).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let order = self.post(&url, None).await.expect_ok().json();
            match order["status"].as_str() {
                Some("ready") => return (order, url),
                Some("pending") if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                _ => panic!("order {url} did not become ready: {order}"),
            }
        }
    }

    /// An instant-acme handle on this same account.
    async fn as_instant(&self, ca: &Acme) -> Account {
        let pkcs8 = PrivatePkcs8KeyDer::from(self.pkcs8.clone());
        let key = Key::from_pkcs8_der(pkcs8.clone_key()).unwrap();
        let (account, _) = ca
            .builder()
            .from_key((key, PrivateKeyDer::Pkcs8(pkcs8)), ca.dir_url.clone())
            .await
            .unwrap();
        assert_eq!(account.id(), self.kid);
        account
    }
}

// ===========================================================================
// A. Flows with instant-acme.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_order_finalize_chain_verifies_against_dev_root() {
    let ca = Acme::start(&[]).await;
    for name in [
        "newNonce",
        "newAccount",
        "newOrder",
        "newAuthz",
        "revokeCert",
        "keyChange",
        "renewalInfo",
    ] {
        let url = ca.url(name);
        assert!(
            url.starts_with(&format!(
                "https://127.0.0.1:{}/acme/",
                ca.server.https_port.unwrap()
            )),
            "{name}: {url}"
        );
    }
    assert_ne!(
        ca.dir["meta"]["externalAccountRequired"], true,
        "{}",
        ca.dir
    );

    let (account, _) = ca.account().await;
    let ids = [dns("web.localhost"), dns("api.web.localhost")];
    let mut order = account.new_order(&NewOrder::new(&ids)).await.unwrap();
    assert_eq!(order.state().status, OrderStatus::Pending);
    assert_eq!(order.state().authorizations.len(), 2);
    ca.solve(&mut order, ChallengeType::Http01).await;
    let chain = ca.finalize(&mut order).await;

    let certs = pem_certs(&chain);
    assert!(certs.len() >= 2, "leaf and intermediate expected:\n{chain}");
    let mut got = sans(&certs[0]);
    got.sort();
    assert_eq!(got, ["api.web.localhost", "web.localhost"]);
    ca.openssl_verify(&chain, "web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_identifier_via_http01() {
    let ca = Acme::start(&[]).await;
    let (account, _) = ca.account().await;
    let ids = [Identifier::Ip("127.0.0.1".parse().unwrap())];
    let mut order = account.new_order(&NewOrder::new(&ids)).await.unwrap();
    {
        let mut authzs = order.authorizations();
        let authz = authzs.next().await.unwrap().unwrap();
        let types: Vec<_> = authz.challenges.iter().map(|c| c.r#type.clone()).collect();
        // RFC 8738: no dns-01 for an IP address.
        assert!(!types.contains(&ChallengeType::Dns01), "{types:?}");
    }
    ca.solve(&mut order, ChallengeType::Http01).await;
    let chain = ca.finalize(&mut order).await;
    assert_eq!(sans(&pem_certs(&chain)[0]), ["127.0.0.1"]);
    ca.openssl_verify(&chain, "ip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_via_dns01() {
    let ca = Acme::start(&[]).await;
    let (account, _) = ca.account().await;
    let ids = [dns("*.wild.internal")];
    let mut order = account.new_order(&NewOrder::new(&ids)).await.unwrap();
    {
        let mut authzs = order.authorizations();
        let authz = authzs.next().await.unwrap().unwrap();
        assert!(authz.wildcard, "{:?}", *authz);
        assert_eq!(
            authz.identifier().identifier,
            &dns("wild.internal"),
            "the authorization names the base domain"
        );
    }
    ca.solve(&mut order, ChallengeType::Dns01).await;
    let chain = ca.finalize(&mut order).await;
    assert_eq!(sans(&pem_certs(&chain)[0]), ["*.wild.internal"]);
    ca.openssl_verify(&chain, "wild");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eab_required() {
    let ca = Acme::start(&["--eab-required"]).await;
    assert_eq!(
        ca.dir["meta"]["externalAccountRequired"], true,
        "{}",
        ca.dir
    );

    // Without a binding: refused.
    let err = ca
        .builder()
        .create(&new_account(), ca.dir_url.clone(), None)
        .await
        .err()
        .expect("newAccount without EAB must be refused");
    assert_eq!(problem_name(&err), "externalAccountRequired", "{err}");

    // With a key made by the CLI: the account works.
    let (kid, hmac_key) = ca.eab_key("team-web");

    // A binding made with the wrong HMAC key is refused too.
    let wrong = ExternalAccountKey::new(kid.clone(), b"not the key that was issued......");
    let err = ca
        .builder()
        .create(&new_account(), ca.dir_url.clone(), Some(&wrong))
        .await
        .err()
        .expect("newAccount with a bad EAB MAC must be refused");
    assert!(
        matches!(err, instant_acme::Error::Api(_)),
        "expected a problem document: {err}"
    );

    let eab = ExternalAccountKey::new(kid, &hmac_key);
    let (account, _) = ca
        .builder()
        .create(&new_account(), ca.dir_url.clone(), Some(&eab))
        .await
        .unwrap_or_else(|e| panic!("newAccount with EAB: {e}\n{}", ca.server.log_text()));
    let ids = [dns("eab.localhost")];
    let chain = ca.issue(&account, &NewOrder::new(&ids)).await;
    assert_eq!(sans(&pem_certs(&chain)[0]), ["eab.localhost"]);

    // Another account bound to the same team may replace the certificate
    // (RFC 9773 §5: the same external account); once it has, the first
    // account cannot replace it again.
    let (kid2, hmac2) = ca.eab_key("team-web");
    let (teammate, _) = ca
        .builder()
        .create(
            &new_account(),
            ca.dir_url.clone(),
            Some(&ExternalAccountKey::new(kid2, &hmac2)),
        )
        .await
        .unwrap();
    let id = cert_id(&pem_certs(&chain)[0]);
    teammate
        .new_order(&NewOrder::new(&ids).replaces(id.clone()))
        .await
        .expect("a teammate's account replaces the certificate");
    let again = account
        .new_order(&NewOrder::new(&ids).replaces(id))
        .await
        .err()
        .expect("already replaced by the teammate's order");
    assert_eq!(problem_name(&again), "alreadyReplaced", "{again}");

    // Each team's accounts act as that team in the naming policy: its own
    // names only.
    std::fs::write(
        ca.data.join("policies/teams.toml"),
        "[[rule]]\nname = \"web\"\neffect = \"allow\"\nrequesters = [\"eab:team-web\"]\ndns = [\".web.example\"]\n\n\
         [[rule]]\nname = \"db\"\neffect = \"allow\"\nrequesters = [\"eab:team-db\"]\ndns = [\".db.example\"]\n",
    )
    .unwrap();
    let (db_kid, db_hmac) = ca.eab_key("team-db");
    let db_eab = ExternalAccountKey::new(db_kid, &db_hmac);
    let (db_account, _) = ca
        .builder()
        .create(&new_account(), ca.dir_url.clone(), Some(&db_eab))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while account
        .new_order(&NewOrder::new(&[dns("app.web.example")]))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the team policy was not loaded");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (who, name) in [
        (&account, "app.db.example"),
        (&db_account, "app.web.example"),
    ] {
        let err = who
            .new_order(&NewOrder::new(&[dns(name)]))
            .await
            .err()
            .unwrap_or_else(|| panic!("another team's name {name} must be refused"));
        assert_eq!(problem_name(&err), "rejectedIdentifier", "{err}");
    }
    db_account
        .new_order(&NewOrder::new(&[dns("app.db.example")]))
        .await
        .expect("the db team's own name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_then_only_the_new_key_works() {
    let ca = Acme::start(&[]).await;
    let (mut account, old_creds) = ca.account().await;
    let id = account.id().to_owned();
    let new_creds = account.update_key().await.unwrap();
    assert_eq!(account.id(), id);

    // The new key signs for the same account.
    account
        .new_order(&NewOrder::new(&[dns("rolled.localhost")]))
        .await
        .unwrap();
    let again = ca.restore(&new_creds).await;
    again
        .new_order(&NewOrder::new(&[dns("rolled.localhost")]))
        .await
        .unwrap();

    // The old key, with the account URL as kid: its signature no longer verifies.
    let old = ca.restore(&old_creds).await;
    let err = old
        .new_order(&NewOrder::new(&[dns("rolled.localhost")]))
        .await
        .err()
        .expect("the old key must be refused");
    assert_eq!(problem_name(&err), "malformed", "{err}");

    // And it no longer finds any account.
    let err = ca
        .existing_account(&old_creds)
        .await
        .err()
        .expect("onlyReturnExisting with the old key must fail");
    assert_eq!(problem_name(&err), "accountDoesNotExist", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivated_account_is_refused() {
    let ca = Acme::start(&[]).await;
    let (account, creds) = ca.account().await;
    account.deactivate().await.unwrap();
    let account = ca.restore(&creds).await;
    let err = account
        .new_order(&NewOrder::new(&[dns("gone.localhost")]))
        .await
        .err()
        .expect("a deactivated account must be refused");
    assert_unauthorized_401(&err);

    // newAccount with its key does not hand the account back either.
    let err = ca
        .existing_account(&creds)
        .await
        .err()
        .expect("newAccount with a deactivated account's key must be refused");
    assert_unauthorized_401(&err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_authorization_is_reused_by_new_order() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let rsp = raw.new_authz("pre.localhost").await.expect_ok();
    assert_eq!(rsp.status, StatusCode::CREATED, "{}", rsp.show());
    let authz_url = rsp.location();
    let authz = rsp.json();
    assert_eq!(authz["status"], "pending", "{authz}");
    assert_eq!(
        authz["identifier"],
        json!({"type": "dns", "value": "pre.localhost"})
    );
    raw.validate_http01(&ca, &authz_url).await;

    let account = raw.as_instant(&ca).await;
    let mut order = account
        .new_order(&NewOrder::new(&[dns("pre.localhost")]))
        .await
        .unwrap();
    let state = order.state();
    assert_eq!(state.status, OrderStatus::Ready, "{state:?}");
    let urls: Vec<_> = state.authorizations.iter().map(|a| a.url.clone()).collect();
    assert_eq!(urls, [authz_url], "the order reuses the pre-authorization");
    let chain = ca.finalize(&mut order).await;
    assert_eq!(sans(&pem_certs(&chain)[0]), ["pre.localhost"]);
}

/// http-01 follows a redirect from the http-01 port to https on the TLS
/// validation port (RFC 8555 §8.3), and refuses one that leaves the name,
/// saying so in the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_follows_a_redirect_to_https_on_the_same_name() {
    let (tls_port, tls_tokens) = start_https01().await;
    let port = tls_port.to_string();
    let ca = Acme::start(&["--validation-tls-port", &port]).await;
    let raw = Raw::register(&ca).await;
    let challenge = |name: &'static str| {
        let raw = &raw;
        async move {
            let order = raw.new_order(&[name]).await.expect_ok().json();
            let authz_url = order["authorizations"][0].as_str().unwrap().to_string();
            let ch = raw.challenge(&authz_url, "http-01").await;
            (authz_url, ch)
        }
    };

    let (authz_url, ch) = challenge("redir.localhost").await;
    let token = ch["token"].as_str().unwrap().to_string();
    ca.tokens.lock().unwrap().insert(
        token.clone(),
        format!("redirect:https://redir.localhost:{tls_port}/.well-known/acme-challenge/{token}"),
    );
    tls_tokens
        .lock()
        .unwrap()
        .insert(token.clone(), format!("{token}.{}", raw.thumbprint()));
    raw.post(ch["url"].as_str().unwrap(), Some(&json!({})))
        .await
        .expect_ok();
    let a = raw.settle(&authz_url).await;
    assert_eq!(a["status"], "valid", "{a}");

    let (authz_url, ch) = challenge("redir2.localhost").await;
    let token = ch["token"].as_str().unwrap().to_string();
    ca.tokens.lock().unwrap().insert(
        token.clone(),
        format!(
            "redirect:https://elsewhere.localhost:{tls_port}/.well-known/acme-challenge/{token}"
        ),
    );
    raw.post(ch["url"].as_str().unwrap(), Some(&json!({})))
        .await
        .expect_ok();
    let a = raw.settle(&authz_url).await;
    assert_eq!(a["status"], "invalid", "{a}");
    let detail = a["challenges"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|c| c["error"]["detail"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("elsewhere.localhost") && detail.contains("must stay on redir2.localhost"),
        "{a}"
    );
}

/// A policy that refuses the CSR's key type (not the names, which the order
/// already passed) is a `badCSR` at finalize, and the order stays ready for
/// a CSR with another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_type_is_a_bad_csr_and_the_order_stays_ready() {
    let ca = Acme::start(&[]).await;
    std::fs::write(
        ca.data.join("policies/keys.toml"),
        "[[rule]]\nname = \"no-p384\"\neffect = \"deny\"\nrequesters = [\"*\"]\ndns = [\"keyed.localhost\"]\nkey_types = [\"ecdsa-p384\"]\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ca.server.log_text().contains("policy reloaded") {
        assert!(Instant::now() < deadline, "{}", ca.server.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let raw = Raw::register(&ca).await;
    let (order, url) = raw.ready_order(&ca, &["keyed.localhost"]).await;
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let p = raw
        .finalize(&order, &b64(csr_der(&["keyed.localhost"], &p384)))
        .await
        .problem("badCSR");
    assert!(
        p["detail"].as_str().unwrap().contains("no-p384"),
        "names the rule: {p}"
    );
    let still = raw.post(&url, None).await.expect_ok().json();
    assert_eq!(still["status"], "ready", "{still}");
    let done = raw
        .finalize_new_key(&order, &["keyed.localhost"])
        .await
        .expect_ok()
        .json();
    assert_eq!(done["status"], "valid", "{done}");
}

/// A pre-authorization is not tied to a profile: a name the policy allows
/// only under `server` can still be pre-authorized (and then ordered with
/// that profile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_authorization_of_a_name_allowed_under_another_profile() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    std::fs::write(
        ca.data.join("policies/srv.toml"),
        "[[rule]]\nname = \"srv-only\"\neffect = \"allow\"\nrequesters = [\"*\"]\ndns = [\".srv.example\"]\nprofiles = [\"server\"]\n",
    )
    .unwrap();
    // Wait for the reload: an order with the server profile is accepted.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rsp = raw
            .post(
                &raw.url("newOrder"),
                Some(&json!({
                    "identifiers": [{"type": "dns", "value": "a.srv.example"}],
                    "profile": "server",
                })),
            )
            .await;
        if rsp.status == StatusCode::CREATED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy not reloaded: {}",
            rsp.show()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The default profile (mtls) is refused for it ...
    raw.new_order(&["b.srv.example"])
        .await
        .problem("rejectedIdentifier");
    // ... but the name may be pre-authorized.
    let rsp = raw.new_authz("b.srv.example").await.expect_ok();
    assert_eq!(rsp.status, StatusCode::CREATED, "{}", rsp.show());
}

/// A client that is gone before its challenge's validation ends (here the
/// request times out after 3 s, as a disconnect would end it) does not keep
/// the authorization pending: the validation runs to its end and its failure
/// is recorded, so an attempt about to fail cannot be abandoned and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_validation_still_settles_the_authorization() {
    let first = Acme::start(&[]).await;
    let ca = first
        .restart(&[("SIGIL_SERVER_REQUEST_TIMEOUT", "3s")])
        .await;
    let raw = Raw::register(&ca).await;
    let authz_url = raw
        .new_authz("quiet.localhost")
        .await
        .expect_ok()
        .location();
    let ch = raw.challenge(&authz_url, "http-01").await;
    ca.tokens
        .lock()
        .unwrap()
        .insert(ch["token"].as_str().unwrap().to_owned(), "silent".into());
    let answered = raw
        .post(ch["url"].as_str().unwrap(), Some(&json!({})))
        .await;
    assert_eq!(
        answered.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answered.show()
    );
    // A second response while the first validation runs starts no other.
    let again = raw
        .post(ch["url"].as_str().unwrap(), Some(&json!({})))
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.show());
    // The validator gives up on the silent responder and records it.
    let settled = raw.settle(&authz_url).await;
    assert_eq!(settled["status"], "invalid", "{settled}");
}

/// The orders list (RFC 8555 §7.1.2.1) comes in pages of 1,000, newest
/// first, each linking to the next; a cursor it did not make is malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orders_list_is_paged() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let mut made = Vec::new();
    for i in 0..1001 {
        let name = format!("o{i}.localhost");
        made.push(raw.new_order(&[&name]).await.expect_ok().location());
    }
    let account = raw.post(&raw.kid, None).await.expect_ok().json();
    let list = account["orders"].as_str().unwrap().to_owned();
    let next_of = |r: &Resp| -> Option<String> {
        r.headers
            .get_all("link")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.ends_with("rel=\"next\""))
            .map(|v| v[1..v.find('>').unwrap()].to_owned())
    };
    let urls = |r: &Resp| -> Vec<String> {
        r.json()["orders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap().to_owned())
            .collect()
    };
    let first = raw.post(&list, None).await.expect_ok();
    let page1 = urls(&first);
    assert_eq!(page1.len(), 1000);
    assert_eq!(page1[0], made[1000], "newest first");
    let next = next_of(&first).expect("a Link to the next page");
    let second = raw.post(&next, None).await.expect_ok();
    assert_eq!(next_of(&second), None, "the last page links to none");
    let mut all: Vec<String> = page1.into_iter().chain(urls(&second)).collect();
    assert_eq!(all.len(), 1001);
    all.sort();
    made.sort();
    assert_eq!(all, made);
    raw.post(&format!("{list}?cursor=a%27b"), None)
        .await
        .problem("malformed");
}

/// A validation with a short `acme.authz_reuse` keeps its authorization
/// valid as long as the order it was made for: the order is finalized after
/// the reuse window has passed, while a new order no longer reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_reuse_window_does_not_end_the_order() {
    let ca = Acme::start_env(&[], &[("SIGIL_ACME_AUTHZ_REUSE", "2s")]).await;
    let raw = Raw::register(&ca).await;
    let (order, url) = raw.ready_order(&ca, &["brief.localhost"]).await;
    let authz_url = order["authorizations"][0].as_str().unwrap();
    let authz = raw.post(authz_url, None).await.expect_ok().json();
    assert_eq!(authz["status"], "valid", "{authz}");
    assert!(
        authz["expires"].as_str() >= order["expires"].as_str(),
        "the authorization outlives its order: {authz} {order}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Past the reuse window, a new order validates the name again.
    let next = raw.new_order(&["brief.localhost"]).await.expect_ok().json();
    assert_eq!(next["status"], "pending", "{next}");
    let done = raw
        .finalize_new_key(&order, &["brief.localhost"])
        .await
        .expect_ok()
        .json();
    assert_eq!(done["status"], "valid", "{done}");
    let again = raw.post(&url, None).await.expect_ok().json();
    assert!(again["certificate"].is_string(), "{again}");
}

/// A finalization whose request times out (the database is busy meanwhile)
/// still issues: the order does not stay processing with nobody issuing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_finalization_still_issues() {
    let first = Acme::start(&[]).await;
    let ca = first
        .restart(&[("SIGIL_SERVER_REQUEST_TIMEOUT", "3s")])
        .await;
    let raw = Raw::register(&ca).await;
    let (order, url) = raw.ready_order(&ca, &["slow.localhost"]).await;
    // Another process holds SQLite's write lock for 6 s.
    let mut lock = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys,time\n\
             c=sqlite3.connect(sys.argv[1],isolation_level=None)\n\
             c.execute('BEGIN IMMEDIATE')\nprint('locked',flush=True)\n\
             time.sleep(6)\nc.execute('ROLLBACK')",
        ])
        .arg(ca.data.join("sigil.db"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(lock.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let answered = raw.finalize_new_key(&order, &["slow.localhost"]).await;
    assert_eq!(
        answered.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answered.show()
    );
    assert!(lock.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let order = loop {
        let o = raw.post(&url, None).await.expect_ok().json();
        if o["status"] == "valid" || Instant::now() > deadline {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(order["status"], "valid", "{order}");
    assert!(order["certificate"].is_string(), "{order}");
}

/// A TLS server certificate given as is, for every client.
#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// tls-alpn-01 for an IP identifier (RFC 8738 §6): the certificate names
/// the IP, carries the critical acmeIdentifier; one with another name in it
/// fails, and the problem says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_for_an_ip_identifier() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ca = Acme::start(&["--validation-tls-port", &port.to_string()]).await;
    let raw = Raw::register(&ca).await;
    let certs: Arc<Mutex<Vec<Arc<rustls::ServerConfig>>>> = Arc::default();
    {
        let certs = certs.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let Some(config) = certs.lock().unwrap().last().cloned() else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = tokio_rustls::TlsAcceptor::from(config).accept(sock).await;
                });
            }
        });
    }
    // Serves a certificate for `sans` proving `key_auth`, over acme-tls/1.
    let serve = |sans: Vec<rcgen::SanType>, key_auth: String| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(
            digest::digest(&digest::SHA256, key_auth.as_bytes()).as_ref(),
        )];
        let cert = params.self_signed(&key).unwrap();
        // Served as is: rustls would refuse to load a certificate with the
        // (critical, and to it unknown) acmeIdentifier extension.
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .unwrap();
        let certified = Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert.der().clone()],
            signer,
        ));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(certified)));
        config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
        certs.lock().unwrap().push(Arc::new(config));
    };
    let attempt = |extra: Option<&'static str>| {
        let (raw, serve) = (&raw, &serve);
        async move {
            let order = raw
                .post(
                    &raw.url("newOrder"),
                    Some(&json!({"identifiers": [{"type": "ip", "value": "127.0.0.1"}]})),
                )
                .await
                .expect_ok()
                .json();
            let authz_url = order["authorizations"][0].as_str().unwrap().to_string();
            let ch = raw.challenge(&authz_url, "tls-alpn-01").await;
            let token = ch["token"].as_str().unwrap();
            let mut sans = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
            if let Some(name) = extra {
                sans.push(rcgen::SanType::DnsName(name.try_into().unwrap()));
            }
            serve(sans, format!("{token}.{}", raw.thumbprint()));
            raw.post(ch["url"].as_str().unwrap(), Some(&json!({})))
                .await
                .expect_ok();
            raw.settle(&authz_url).await
        }
    };
    // Another name beside the IP: refused (RFC 8737 §3, exactly one identifier).
    let a = attempt(Some("extra.localhost")).await;
    assert_eq!(a["status"], "invalid", "{a}");
    let text = a.to_string();
    assert!(
        text.contains("must name exactly ip:127.0.0.1") && text.contains("extra.localhost"),
        "{a}"
    );
    let a = attempt(None).await;
    assert_eq!(a["status"], "valid", "{a}");
}

/// revokeCert by an account that did not obtain the certificate (RFC 8555
/// §7.6): refused until it holds valid authorizations for every name in it,
/// and then not for keyCompromise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_cert_by_another_account_needs_authorizations_for_every_name() {
    let ca = Acme::start(&[]).await;
    let owner = Raw::register(&ca).await;
    let names = ["rv1.localhost", "rv2.localhost"];
    let (order, _) = owner.ready_order(&ca, &names).await;
    let done = owner
        .finalize_new_key(&order, &names)
        .await
        .expect_ok()
        .json();
    let chain = owner
        .post(done["certificate"].as_str().unwrap(), None)
        .await
        .expect_ok();
    let der = pem_certs(&String::from_utf8_lossy(&chain.body))[0].clone();
    let body = json!({"certificate": b64(&der), "reason": 4});

    let other = Raw::register(&ca).await;
    let revoke_url = other.url("revokeCert");
    let revoke = || other.post(&revoke_url, Some(&body));
    revoke().await.problem("unauthorized");
    let pre_authorize = |name: &'static str| {
        let other = &other;
        let ca = &ca;
        async move {
            let url = other.new_authz(name).await.expect_ok().location();
            other.validate_http01(ca, &url).await;
        }
    };
    pre_authorize("rv1.localhost").await;
    let p = revoke().await.problem("unauthorized");
    assert!(
        p["detail"].as_str().unwrap().contains("rv2.localhost"),
        "names what is missing: {p}"
    );
    pre_authorize("rv2.localhost").await;
    // Holding the names is no proof about the key: keyCompromise, which
    // blocks the key for good, is not this account's to claim.
    let compromised = json!({"certificate": b64(&der), "reason": 1});
    let p = other
        .post(&revoke_url, Some(&compromised))
        .await
        .problem("badRevocationReason");
    assert!(
        p["detail"].as_str().unwrap().contains("certificate's key"),
        "says what to do: {p}"
    );
    let rsp = revoke().await.expect_ok();
    assert_eq!(rsp.status, StatusCode::OK, "{}", rsp.show());
    revoke().await.problem("alreadyRevoked");
}

/// A valid authorization close to its end is not reused in an order that
/// also needs new challenges: that order would end with it, minutes away,
/// while the client works on the others. An order it alone completes still
/// reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_expired_authorization_is_reused_only_where_it_completes_the_order() {
    use time::format_description::well_known::Rfc3339;
    let ca = Acme::start_env(&[], &[("SIGIL_ACME_AUTHZ_REUSE", "20m")]).await;
    let a = Raw::register(&ca).await;
    a.ready_order(&ca, &["soon.localhost"]).await;
    let alone = a.new_order(&["soon.localhost"]).await.expect_ok().json();
    assert_eq!(alone["status"], "ready", "{alone}");
    let both = a
        .new_order(&["soon.localhost", "new.localhost"])
        .await
        .expect_ok()
        .json();
    assert_eq!(both["status"], "pending", "{both}");
    let expires = time::OffsetDateTime::parse(both["expires"].as_str().unwrap(), &Rfc3339).unwrap();
    let left = expires - sigil_core::Clock::now(&sigil_core::SystemClock);
    assert!(left > time::Duration::hours(1), "expires in {left}: {both}");
    for url in both["authorizations"].as_array().unwrap() {
        let z = a.post(url.as_str().unwrap(), None).await.expect_ok().json();
        assert_eq!(z["status"], "pending", "{z}");
    }
}

/// keyChange (RFC 8555 §7.3.5) refuses an inner JWS that does not match the
/// outer request, a wrong oldKey or account, and a new key that already has
/// an account (409 with its URL); the account keeps its key after all that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_refusals() {
    let ca = Acme::start(&[]).await;
    let a = Raw::register(&ca).await;
    let b = Raw::register(&ca).await;
    let fresh = Raw::unregistered(&ca);
    let url = a.url("keyChange");
    let inner = |holder: &Raw, header: Value, payload: Value| holder.sign(&header, Some(&payload));
    let header = |holder: &Raw| json!({"alg": "ES256", "jwk": holder.jwk(), "url": url});
    let good = json!({"account": a.kid, "oldKey": a.jwk()});

    let mut other_url = header(&fresh);
    other_url["url"] = json!(a.url("newOrder"));
    a.post(&url, Some(&inner(&fresh, other_url, good.clone())))
        .await
        .problem("malformed");
    let mut with_nonce = header(&fresh);
    with_nonce["nonce"] = json!(a.nonce().await);
    a.post(&url, Some(&inner(&fresh, with_nonce, good.clone())))
        .await
        .problem("malformed");
    // Signed by another key than the jwk it names.
    a.post(&url, Some(&inner(&b, header(&fresh), good.clone())))
        .await
        .problem("malformed");
    let wrong_old = json!({"account": a.kid, "oldKey": b.jwk()});
    a.post(&url, Some(&inner(&fresh, header(&fresh), wrong_old)))
        .await
        .problem("unauthorized");
    let wrong_account = json!({"account": b.kid, "oldKey": a.jwk()});
    a.post(&url, Some(&inner(&fresh, header(&fresh), wrong_account)))
        .await
        .problem("unauthorized");
    let taken = a.post(&url, Some(&inner(&b, header(&b), good))).await;
    assert_eq!(taken.status, StatusCode::CONFLICT, "{}", taken.show());
    assert_eq!(taken.header("location").as_deref(), Some(b.kid.as_str()));

    // Still the old key.
    a.new_order(&["kept.localhost"]).await.expect_ok();
}

/// An order created ready (every authorization reused) is checked again at
/// finalize: once one of its authorizations is deactivated, no certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_order_whose_authorization_was_deactivated_is_not_finalized() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let authz_url = raw
        .new_authz("gone-authz.localhost")
        .await
        .expect_ok()
        .location();
    raw.validate_http01(&ca, &authz_url).await;
    let rsp = raw
        .post(
            &raw.url("newOrder"),
            Some(&json!({"identifiers": [{"type": "dns", "value": "gone-authz.localhost"}]})),
        )
        .await
        .expect_ok();
    let order_url = rsp.location();
    let order = rsp.json();
    assert_eq!(order["status"], "ready", "{order}");
    let authz = raw
        .post(&authz_url, Some(&json!({"status": "deactivated"})))
        .await
        .expect_ok()
        .json();
    assert_eq!(authz["status"], "deactivated", "{authz}");
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = b64(csr_der(&["gone-authz.localhost"], &key));
    raw.finalize(&order, &csr).await.problem("orderNotReady");
    let now = raw.post(&order_url, None).await.expect_ok().json();
    assert_eq!(now["status"], "invalid", "{now}");
    assert!(now["certificate"].is_null(), "{now}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_info_and_replaces() {
    let ca = Acme::start(&[]).await;
    let (account, _) = ca.account().await;
    let ids = [dns("ari.localhost")];
    let chain = ca.issue(&account, &NewOrder::new(&ids)).await;
    let leaf = &pem_certs(&chain)[0];
    let id = cert_id(leaf);

    let rsp = ca
        .https
        .get(&format!("{}/{id}", ca.url("renewalInfo")))
        .await
        .expect_ok();
    let info = rsp.json();
    let at = |k: &str| {
        let s = info["suggestedWindow"][k]
            .as_str()
            .unwrap_or_else(|| panic!("no suggestedWindow.{k}:\n{}", rsp.show()));
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("suggestedWindow.{k} {s:?}: {e}"))
    };
    let (start, end) = (at("start"), at("end"));
    let not_after = parse(leaf).validity().not_after.to_datetime();
    assert!(start < end, "{info}");
    assert!(
        end <= not_after,
        "window ends after the certificate: {info}"
    );

    // An order naming the certificate it replaces (instant-acme checks the echo).
    let mut order = account
        .new_order(&NewOrder::new(&ids).replaces(id.clone()))
        .await
        .unwrap();
    assert_eq!(order.state().replaces.as_ref(), Some(&id));
    if order.state().status != OrderStatus::Ready {
        ca.solve(&mut order, ChallengeType::Http01).await;
    }
    let renewed = ca.finalize(&mut order).await;
    let renewed_leaf = &pem_certs(&renewed)[0];
    assert_ne!(cert_id(renewed_leaf), id, "a new certificate");
    assert_eq!(sans(renewed_leaf), ["ari.localhost"]);

    // RFC 9773 §5: replaced once only, and only by the same account.
    let again = account
        .new_order(&NewOrder::new(&ids).replaces(id.clone()))
        .await
        .err()
        .expect("a certificate already replaced cannot be replaced again");
    assert_eq!(problem_name(&again), "alreadyReplaced", "{again}");
    let (other, _) = ca.account().await;
    let ids2 = [dns("ari2.localhost")];
    let chain2 = ca.issue(&account, &NewOrder::new(&ids2)).await;
    let id2 = cert_id(&pem_certs(&chain2)[0]);
    let foreign = other
        .new_order(&NewOrder::new(&ids2).replaces(id2))
        .await
        .err()
        .expect("another account cannot replace this account's certificate");
    assert_eq!(problem_name(&foreign), "unauthorized", "{foreign}");
}

/// An order that failed replaces nothing (RFC 9773 §5 refuses only orders
/// that are not invalid), even while it is still stored as it was: a client
/// that gave up on it (certbot stops at the failed authorization) can try
/// again with `replaces`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replacement_does_not_block_the_next_one() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let account = raw.as_instant(&ca).await;
    let name = "ari-retry.localhost";
    let chain = ca.issue(&account, &NewOrder::new(&[dns(name)])).await;
    let id = cert_id(&pem_certs(&chain)[0]).to_string();
    let (url, body) = (
        raw.url("newOrder"),
        json!({"identifiers": [{"type": "dns", "value": name}], "replaces": id}),
    );
    let replacing = || raw.post(&url, Some(&body));
    let first = replacing().await.expect_ok().json();
    // Its (reused) authorization is given up, so the order can only fail;
    // nothing reads the order afterwards.
    let authz_url = first["authorizations"][0].as_str().unwrap();
    let gone = raw
        .post(authz_url, Some(&json!({"status": "deactivated"})))
        .await
        .expect_ok()
        .json();
    assert_eq!(gone["status"], "deactivated", "{gone}");
    let second = replacing().await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.show());
    // The live one now blocks a third.
    replacing().await.problem("alreadyReplaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_set_extended_key_usage() {
    let ca = Acme::start(&[]).await;
    let profiles = ca.dir["meta"]["profiles"]
        .as_object()
        .unwrap_or_else(|| panic!("no meta.profiles: {}", ca.dir));
    let mut names: Vec<_> = profiles.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["client", "mtls", "server"]);

    let (account, _) = ca.account().await;
    for (profile, want) in [
        ("server", (true, false)),
        ("client", (false, true)),
        ("mtls", (true, true)),
    ] {
        let ids = [dns(&format!("{profile}.profile.localhost"))];
        let mut order = account
            .new_order(&NewOrder::new(&ids).profile(profile))
            .await
            .unwrap();
        assert_eq!(order.state().profile.as_deref(), Some(profile));
        ca.solve(&mut order, ChallengeType::Http01).await;
        let chain = ca.finalize(&mut order).await;
        assert_eq!(
            eku(&pem_certs(&chain)[0]),
            want,
            "profile {profile}: (serverAuth, clientAuth)"
        );
        ca.openssl_verify(&chain, profile);
    }

    let err = account
        .new_order(&NewOrder::new(&[dns("x.localhost")]).profile("no-such-profile"))
        .await
        .err()
        .expect("an unknown profile must be refused");
    assert_eq!(problem_name(&err), "invalidProfile", "{err}");
}

// ===========================================================================
// B. Refusals, with hand-signed requests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_nonce_is_bad_nonce_with_a_fresh_one() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let nonce = raw.nonce().await;
    let body = raw.sign(
        &json!({"alg": "ES256", "kid": raw.kid, "nonce": nonce, "url": raw.kid}),
        None,
    );
    raw.send(&raw.kid, &body).await.expect_ok();
    let replay = raw.send(&raw.kid, &body).await;
    replay.problem("badNonce");
    assert_eq!(replay.status, StatusCode::BAD_REQUEST, "{}", replay.show());
    let fresh = replay
        .header("replay-nonce")
        .unwrap_or_else(|| panic!("badNonce without Replay-Nonce:\n{}", replay.show()));
    assert_ne!(fresh, nonce);
    // The nonce handed back works.
    let body = raw.sign(
        &json!({"alg": "ES256", "kid": raw.kid, "nonce": fresh, "url": raw.kid}),
        None,
    );
    raw.send(&raw.kid, &body).await.expect_ok();

    // A nonce the server never issued.
    let body = raw.sign(
        &json!({"alg": "ES256", "kid": raw.kid, "nonce": b64(b"made up by the client"), "url": raw.kid}),
        None,
    );
    raw.send(&raw.kid, &body).await.problem("badNonce");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_in_protected_header_must_match() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    // Signed for newOrder, sent to the account URL (RFC 8555 §6.4: unauthorized).
    let mut protected = raw.header(&raw.url("newOrder")).await;
    let body = raw.sign(&protected, None);
    raw.send(&raw.kid, &body).await.problem("unauthorized");
    // No url at all: malformed.
    protected = raw.header(&raw.kid).await;
    protected.as_object_mut().unwrap().remove("url");
    let body = raw.sign(&protected, None);
    raw.send(&raw.kid, &body).await.problem("malformed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_algorithms_are_bad_signature_algorithm() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;

    // alg none, no signature.
    let mut protected = raw.header(&raw.kid).await;
    protected["alg"] = json!("none");
    let p64 = b64(serde_json::to_vec(&protected).unwrap());
    let body = json!({"protected": p64, "payload": "", "signature": ""});
    let rsp = raw.send(&raw.kid, &body).await;
    let problem = rsp.problem("badSignatureAlgorithm");
    // RFC 8555 §6.2: the problem lists the algorithms the server accepts.
    let algs = problem["algorithms"]
        .as_array()
        .unwrap_or_else(|| panic!("no algorithms field:\n{}", rsp.show()));
    assert!(algs.contains(&json!("ES256")), "{}", rsp.show());

    // HS256 (a MAC is no account signature), with a valid HMAC over the input.
    let mut protected = raw.header(&raw.kid).await;
    protected["alg"] = json!("HS256");
    let p64 = b64(serde_json::to_vec(&protected).unwrap());
    let mac_key = hmac::Key::new(hmac::HMAC_SHA256, b"any shared secret");
    let tag = hmac::sign(&mac_key, format!("{p64}.").as_bytes());
    let body = json!({"protected": p64, "payload": "", "signature": b64(tag)});
    raw.send(&raw.kid, &body)
        .await
        .problem("badSignatureAlgorithm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwk_and_kid_together_are_malformed() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let mut protected = raw.header(&raw.kid).await;
    protected["jwk"] = raw.jwk();
    let body = raw.sign(&protected, None);
    raw.send(&raw.kid, &body).await.problem("malformed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_is_account_does_not_exist() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    // Same URL shape as a real account, last path segment changed.
    let (prefix, _) = raw.kid.rsplit_once('/').unwrap();
    let unknown = format!("{prefix}/{}", b64(b"no-such-account-at-all"));
    let url = raw.url("newOrder");
    let body = raw.sign(
        &json!({"alg": "ES256", "kid": unknown, "nonce": raw.nonce().await, "url": url}),
        Some(&json!({"identifiers": [{"type": "dns", "value": "a.localhost"}]})),
    );
    raw.send(&url, &body).await.problem("accountDoesNotExist");
}

/// RFC 8555 names no problem type for a signature that does not verify;
/// Boulder and Pebble both answer `malformed`, and so must Sigil.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_signature_is_malformed() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let url = raw.url("newOrder");
    let mut body = raw.sign(
        &raw.header(&url).await,
        Some(&json!({"identifiers": [{"type": "dns", "value": "t.localhost"}]})),
    );
    let mut sig = URL_SAFE_NO_PAD
        .decode(body["signature"].as_str().unwrap())
        .unwrap();
    sig[10] ^= 0x01;
    body["signature"] = json!(b64(&sig));
    raw.send(&url, &body).await.problem("malformed");

    // A payload swapped after signing fails the same way.
    let mut body = raw.sign(
        &raw.header(&url).await,
        Some(&json!({"identifiers": [{"type": "dns", "value": "t.localhost"}]})),
    );
    body["payload"] = json!(b64(serde_json::to_vec(
        &json!({"identifiers": [{"type": "dns", "value": "u.localhost"}]})
    )
    .unwrap()));
    raw.send(&url, &body).await.problem("malformed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_refused() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let url = raw.url("newOrder");
    let filler = "a".repeat(70 * 1024);
    let body = raw.sign(
        &raw.header(&url).await,
        Some(&json!({"identifiers": [{"type": "dns", "value": "big.localhost"}], "x": filler})),
    );
    let bytes = serde_json::to_vec(&body).unwrap();
    assert!(bytes.len() > 64 * 1024);
    let rsp = raw.send_bytes(&url, JOSE, bytes).await;
    assert!(
        matches!(rsp.status.as_u16(), 400 | 413),
        "expected 400 or 413:\n{}",
        rsp.show()
    );
    rsp.problem("malformed");
}

/// Unknown paths, a method a resource does not take and a malformed path
/// get problem documents too, not the framework's plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_are_problem_documents() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let new_order = raw.url("newOrder");
    let base = new_order.trim_end_matches("/acme/new-order");
    let rsp = ca.https.get(&format!("{base}/acme/no-such-thing")).await;
    assert_eq!(rsp.status, StatusCode::NOT_FOUND, "{}", rsp.show());
    let v = rsp.problem("malformed");
    assert!(
        v["detail"].as_str().unwrap().contains("/acme/directory"),
        "{v}"
    );
    let rsp = ca.https.get(&new_order).await;
    assert_eq!(rsp.status, StatusCode::METHOD_NOT_ALLOWED, "{}", rsp.show());
    rsp.problem("malformed");
    let alt = format!("{base}/acme/cert/01/alt/first");
    let body = raw.sign(&raw.header(&alt).await, None);
    let rsp = raw
        .send_bytes(&alt, JOSE, serde_json::to_vec(&body).unwrap())
        .await;
    assert_eq!(rsp.status, StatusCode::NOT_FOUND, "{}", rsp.show());
    rsp.problem("malformed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_type_is_415() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let body = raw.sign(&raw.header(&raw.kid).await, None);
    let rsp = raw
        .send_bytes(
            &raw.kid,
            "application/json",
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
    assert_eq!(
        rsp.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        rsp.show()
    );
    rsp.problem("malformed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_before_ready_is_order_not_ready() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let order = raw.new_order(&["early.localhost"]).await.expect_ok().json();
    assert_eq!(order["status"], "pending", "{order}");
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = b64(csr_der(&["early.localhost"], &key));
    raw.finalize(&order, &csr).await.problem("orderNotReady");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_must_match_the_order_and_not_use_the_account_key() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;

    // Names other than the order's.
    let (order, _) = raw.ready_order(&ca, &["csr-a.localhost"]).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let finalize = order["finalize"].as_str().unwrap();
    for names in [
        &["csr-b.localhost"][..],
        &["csr-a.localhost", "csr-b.localhost"][..],
    ] {
        let csr = b64(csr_der(names, &key));
        raw.post(finalize, Some(&json!({"csr": csr})))
            .await
            .problem("badCSR");
    }

    // A CSR whose signature does not verify: refused and audited, and the
    // order stays ready for a good one.
    let (order, _) = raw.ready_order(&ca, &["csr-d.localhost"]).await;
    let mut forged = csr_der(&["csr-d.localhost"], &key);
    *forged.last_mut().unwrap() ^= 0x01;
    let p = raw.finalize(&order, &b64(forged)).await.problem("badCSR");
    assert!(p["detail"].as_str().unwrap().contains("signature"), "{p}");
    let good = b64(csr_der(&["csr-d.localhost"], &key));
    let done = raw.finalize(&order, &good).await.expect_ok().json();
    assert_eq!(done["status"], "valid", "{done}");
    if let Some(rows) = ca.audit_rows() {
        assert!(
            rows.lines()
                .any(|r| r.starts_with("cert.rejected|acme:") && r.contains("signature")),
            "no cert.rejected audit row for the forged CSR:\n{rows}"
        );
    }

    // The account key as the certificate key (RFC 8555 §11.1).
    let (order, _) = raw.ready_order(&ca, &["csr-c.localhost"]).await;
    let account_key = rcgen::KeyPair::try_from(raw.pkcs8.as_slice()).unwrap();
    let csr = b64(csr_der(&["csr-c.localhost"], &account_key));
    raw.finalize(&order, &csr).await.problem("badCSR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_authorization_offers_only_dns01() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let order = raw.new_order(&["*.x.localhost"]).await.expect_ok().json();
    let authz_url = order["authorizations"][0].as_str().unwrap().to_owned();
    let authz = raw.post(&authz_url, None).await.expect_ok().json();
    assert_eq!(authz["wildcard"], true, "{authz}");
    assert_eq!(authz["identifier"]["value"], "x.localhost", "{authz}");
    let types: Vec<&str> = authz["challenges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["dns-01"], "{authz}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_policy_are_rejected_and_audited() {
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let rsp = raw.new_order(&["denied.example.com"]).await;
    rsp.problem("rejectedIdentifier");
    // One allowed name does not carry a denied one.
    raw.new_order(&["ok.localhost", "denied.example.com"])
        .await
        .problem("rejectedIdentifier");

    if let Some(rows) = ca.audit_rows() {
        assert!(
            rows.lines()
                .any(|r| r.starts_with("cert.denied|") && r.contains("denied.example.com")),
            "no cert.denied audit row naming denied.example.com:\n{rows}"
        );
    }

    // Every unusable identifier gets its own subproblem, not just the first.
    let p = raw
        .new_order(&["a.*.localhost", "fine.localhost", "*.*.localhost"])
        .await
        .problem("rejectedIdentifier");
    let subs = p["subproblems"].as_array().expect("subproblems");
    let named: Vec<&str> = subs
        .iter()
        .map(|s| s["identifier"]["value"].as_str().unwrap())
        .collect();
    assert_eq!(named, ["a.*.localhost", "*.*.localhost"], "{p}");
    assert!(p["detail"].as_str().unwrap().contains("2 of the 3"), "{p}");
}

/// SQLite serves one node: a second `sigil serve` on the same database is
/// refused with a message that names the way out. The server checks nonces
/// in memory, so a nonce from before a restart is refused (badNonce, which
/// clients retry) and the restarted server's own are accepted once. (Several
/// nodes share nonces on PostgreSQL: `two_nodes_on_postgres_...` below.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_serves_one_node_and_a_restart_retires_its_nonces() {
    let a = Acme::start(&[]).await;
    let port_a = a.server.https_port.unwrap();
    // Pin the public base URL, so a restarted server on other ports keeps
    // the URLs the account and the JWS name.
    let config = a.data.join("sigil.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let base = format!("https://127.0.0.1:{port_a}");
    let text = text.replacen("[acme]\n", &format!("[acme]\nbase_url = \"{base}\"\n"), 1);
    assert!(text.contains("base_url"), "no [acme] section:\n{text}");
    std::fs::write(&config, text).unwrap();
    let data = a.data.to_string_lossy().into_owned();
    let work = a.data.parent().unwrap().join("node-b");
    std::fs::create_dir_all(&work).unwrap();
    let ports: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let second = tokio::task::block_in_place(|| {
        sigil(&[
            "serve",
            "--dev",
            "--data-dir",
            &data,
            "--http-addr",
            &ports[0],
            "--grpc-addr",
            &ports[1],
            "--https-addr",
            &ports[2],
        ])
    });
    let err = fails(second);
    assert!(
        err.contains("another `sigil serve` is running on the SQLite database")
            && err.contains("PostgreSQL"),
        "{err}"
    );

    // The running server: a nonce is accepted once.
    let raw = Raw::register(&a).await;
    let stale = raw.nonce().await;
    let nonce = raw.nonce().await;
    let post_as_get = |nonce: &str| {
        raw.sign(
            &json!({"alg": "ES256", "kid": raw.kid, "nonce": nonce, "url": raw.kid}),
            None,
        )
    };
    raw.send(&raw.kid, &post_as_get(&nonce)).await.expect_ok();
    let again = raw.send(&raw.kid, &post_as_get(&nonce)).await;
    let p = again.problem("badNonce");
    assert!(
        p["detail"].as_str().unwrap().contains("already used"),
        "{p}"
    );
    assert!(again.header("replay-nonce").is_some(), "{}", again.show());

    // Restarted on the same database (the lock goes with the process).
    let Acme { server, .. } = a;
    server.stop();
    let b =
        tokio::task::block_in_place(|| Server::start(&["--dev", "--data-dir", &data], &work, &[]));
    raw.route_via(port_a, b.https_port.unwrap());
    let old = raw.send(&raw.kid, &post_as_get(&stale)).await;
    let p = old.problem("badNonce");
    assert!(p["detail"].as_str().unwrap().contains("restarted"), "{p}");
    // The account lives on; the new server's nonce is accepted once.
    let fresh = old.header("replay-nonce").unwrap();
    let got = raw.send(&raw.kid, &post_as_get(&fresh)).await.expect_ok();
    assert_eq!(got.json()["status"], "valid", "{}", got.show());
    raw.send(&raw.kid, &post_as_get(&fresh))
        .await
        .problem("badNonce");
    b.stop();
}

/// What two nodes behind one base URL must agree on: a nonce from either is
/// accepted once by the other, and accounts and orders are shared. `a` is the
/// node the base URL names; `port_b` the other node's HTTPS port.
async fn shared_state_checks(a: &Acme, port_a: u16, port_b: u16) {
    let on_b = |url: &str| url.replacen(&format!(":{port_a}/"), &format!(":{port_b}/"), 1);
    let raw = Raw::register(a).await;
    // A nonce from A, used at B: accepted once, then refused on both nodes.
    let nonce = raw.nonce().await;
    let body = raw.sign(
        &json!({"alg": "ES256", "kid": raw.kid, "nonce": nonce, "url": raw.kid}),
        None,
    );
    let got = raw.send(&on_b(&raw.kid), &body).await.expect_ok();
    assert_eq!(got.json()["status"], "valid", "{}", got.show());
    raw.send(&on_b(&raw.kid), &body).await.problem("badNonce");
    raw.send(&raw.kid, &body).await.problem("badNonce");

    // A nonce from B, used at A.
    let rsp = a
        .https
        .call(
            Method::HEAD,
            &on_b(&raw.url("newNonce")),
            None,
            Bytes::new(),
        )
        .await;
    let nonce_b = rsp.header("replay-nonce").unwrap();
    let body = raw.sign(
        &json!({"alg": "ES256", "kid": raw.kid, "nonce": nonce_b, "url": raw.kid}),
        None,
    );
    raw.send(&raw.kid, &body).await.expect_ok();
    raw.send(&on_b(&raw.kid), &body).await.problem("badNonce");

    // An order placed on A is read on B.
    let order = raw.new_order(&["two-nodes.localhost"]).await.expect_ok();
    let order_url = order.location();
    let url = order_url.clone();
    let protected = raw.header(&url).await;
    let seen = raw
        .send(&on_b(&order_url), &raw.sign(&protected, None))
        .await
        .expect_ok();
    assert_eq!(seen.json()["identifiers"], order.json()["identifiers"]);
    assert_eq!(seen.json()["status"], "pending");
}

/// notBefore and notAfter in newOrder are echoed and become the certificate's
/// validity (the lifetime counts from notBefore); too far ahead is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_validity_window_is_honoured() {
    use time::format_description::well_known::Rfc3339;
    let ca = Acme::start(&[]).await;
    let raw = Raw::register(&ca).await;
    let now = sigil_core::Clock::now(&sigil_core::SystemClock);
    let nb = (now + time::Duration::hours(1))
        .replace_nanosecond(0)
        .unwrap();
    let na = (now + time::Duration::hours(4))
        .replace_nanosecond(0)
        .unwrap();
    let (nb_s, na_s) = (nb.format(&Rfc3339).unwrap(), na.format(&Rfc3339).unwrap());
    let rsp = raw
        .post(
            &raw.url("newOrder"),
            Some(&json!({
                "identifiers": [{"type": "dns", "value": "window.localhost"}],
                "notBefore": nb_s, "notAfter": na_s,
            })),
        )
        .await
        .expect_ok();
    let order = rsp.json();
    assert_eq!(order["notBefore"], nb_s.as_str(), "{order}");
    assert_eq!(order["notAfter"], na_s.as_str(), "{order}");
    let url = rsp.location();
    raw.validate_http01(&ca, order["authorizations"][0].as_str().unwrap())
        .await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = b64(csr_der(&["window.localhost"], &key));
    let done = raw.finalize(&order, &csr).await.expect_ok().json();
    assert_eq!(done["status"], "valid", "{done}");
    let again = raw.post(&url, None).await.expect_ok().json();
    assert_eq!(again["notBefore"], nb_s.as_str(), "{again}");
    let chain = raw
        .post(done["certificate"].as_str().unwrap(), None)
        .await
        .expect_ok();
    let certs = pem_certs(&String::from_utf8_lossy(&chain.body));
    let leaf = parse(&certs[0]);
    let (got_nb, got_na) = (
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    );
    // notBefore is backdated by at most a minute; notAfter is exact.
    assert!(
        got_nb <= nb.unix_timestamp() && got_nb >= nb.unix_timestamp() - 61,
        "notBefore {got_nb} vs {}",
        nb.unix_timestamp()
    );
    assert!(
        (got_na - na.unix_timestamp()).abs() <= 1,
        "notAfter {got_na} vs {}",
        na.unix_timestamp()
    );

    // notAfter alone is the end of validity however long validation takes,
    // not a lifetime counted from the order.
    let na2 = (now + time::Duration::hours(3))
        .replace_nanosecond(0)
        .unwrap();
    let na2_s = na2.format(&Rfc3339).unwrap();
    let order = raw
        .post(
            &raw.url("newOrder"),
            Some(&json!({
                "identifiers": [{"type": "dns", "value": "window2.localhost"}],
                "notAfter": na2_s,
            })),
        )
        .await
        .expect_ok()
        .json();
    raw.validate_http01(&ca, order["authorizations"][0].as_str().unwrap())
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let csr = b64(csr_der(&["window2.localhost"], &key));
    let done = raw.finalize(&order, &csr).await.expect_ok().json();
    let chain = raw
        .post(done["certificate"].as_str().unwrap(), None)
        .await
        .expect_ok();
    let certs = pem_certs(&String::from_utf8_lossy(&chain.body));
    let got_na = parse(&certs[0]).validity().not_after.timestamp();
    assert!(
        (got_na - na2.unix_timestamp()).abs() <= 1,
        "notAfter {got_na} vs requested {}",
        na2.unix_timestamp()
    );

    // More than 30 days ahead: refused at newOrder.
    let far = (now + time::Duration::days(40)).format(&Rfc3339).unwrap();
    raw.post(
        &raw.url("newOrder"),
        Some(&json!({
            "identifiers": [{"type": "dns", "value": "far.localhost"}],
            "notBefore": far,
        })),
    )
    .await
    .problem("malformed");
}

/// `acme.orders_per_minute`: beyond it, newOrder and newAuthz are
/// `rateLimited` (HTTP 429) with a Retry-After the client can act on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_beyond_the_account_rate_are_rate_limited() {
    let first = Acme::start(&[]).await;
    let config = first.data.join("sigil.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("orders_per_minute = 0\n", "orders_per_minute = 2\n", 1);
    assert!(
        text.contains("orders_per_minute = 2"),
        "no acme.orders_per_minute:\n{text}"
    );
    std::fs::write(&config, text).unwrap();
    // A node started on the edited configuration.
    let ca = first.restart(&[]).await;
    let raw = Raw::register(&ca).await;
    raw.new_order(&["rl1.localhost"]).await.expect_ok();
    raw.new_order(&["rl2.localhost"]).await.expect_ok();
    let limited = raw.new_order(&["rl3.localhost"]).await;
    limited.problem("rateLimited");
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.show()
    );
    let wait: u64 = limited
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After:\n{}", limited.show()))
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    // Pre-authorizations draw on the same budget.
    raw.new_authz("rl5.localhost").await.problem("rateLimited");
    // Another account has its own budget.
    let other = Raw::register(&ca).await;
    other.new_order(&["rl4.localhost"]).await.expect_ok();
    other.new_authz("rl6.localhost").await.expect_ok();
    other
        .new_authz("rl7.localhost")
        .await
        .problem("rateLimited");
}

/// An issuance refused for the requester's rate (429 `rateLimited`) leaves
/// the order `ready`, so finalizing again after Retry-After can succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_finalize_leaves_the_order_ready() {
    // A node that issues one certificate a minute per requester.
    let ca = Acme::start(&[])
        .await
        .restart(&[("SIGIL_ISSUANCE_RATE_PER_MINUTE", "1")])
        .await;
    let raw = Raw::register(&ca).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let (order, _) = raw.ready_order(&ca, &["rate-a.localhost"]).await;
    raw.finalize(&order, &b64(csr_der(&["rate-a.localhost"], &key)))
        .await
        .expect_ok();

    let (order, url) = raw.ready_order(&ca, &["rate-b.localhost"]).await;
    let limited = raw
        .finalize(&order, &b64(csr_der(&["rate-b.localhost"], &key)))
        .await;
    limited.problem("rateLimited");
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.show()
    );
    assert!(
        limited.header("retry-after").is_some(),
        "{}",
        limited.show()
    );
    let after = raw.post(&url, None).await.expect_ok().json();
    assert_eq!(after["status"], "ready", "{after}");
    assert!(after.get("error").is_none(), "{after}");
}

/// Signs `protected.payload` with `sign` and posts it to `url`.
async fn signed_post(
    ca: &Acme,
    url: &str,
    header: Value,
    payload: &Value,
    sign: &dyn Fn(&[u8]) -> Vec<u8>,
) -> Resp {
    let nonce = ca
        .https
        .call(Method::HEAD, &ca.url("newNonce"), None, Bytes::new())
        .await
        .header("replay-nonce")
        .unwrap();
    let mut protected = header;
    protected["nonce"] = json!(nonce);
    protected["url"] = json!(url);
    let p64 = b64(serde_json::to_vec(&protected).unwrap());
    let body64 = if payload.is_null() {
        String::new()
    } else {
        b64(serde_json::to_vec(payload).unwrap())
    };
    let sig = sign(format!("{p64}.{body64}").as_bytes());
    let body = json!({"protected": p64, "payload": body64, "signature": b64(sig)});
    ca.https
        .call(
            Method::POST,
            url,
            Some(JOSE),
            Bytes::from(serde_json::to_vec(&body).unwrap()),
        )
        .await
}

/// Account keys of every accepted kind work: newAccount with the JWK, then a
/// request signed by kid (ES384, EdDSA, PS256 and RS256; ES256 is used everywhere else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_keys_es384_eddsa_ps256_rs256() {
    use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
    use aws_lc_rs::signature::{
        ECDSA_P384_SHA384_FIXED_SIGNING, Ed25519KeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256,
    };
    let ca = Acme::start(&[]).await;
    let rng = SystemRandom::new();

    let p384 = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P384_SHA384_FIXED_SIGNING,
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref(),
    )
    .unwrap();
    let pt = p384.public_key().as_ref().to_vec();
    let es384 = (
        "ES384",
        json!({"kty": "EC", "crv": "P-384", "x": b64(&pt[1..49]), "y": b64(&pt[49..97])}),
        Box::new(move |m: &[u8]| {
            p384.sign(&SystemRandom::new(), m)
                .unwrap()
                .as_ref()
                .to_vec()
        }) as Box<dyn Fn(&[u8]) -> Vec<u8>>,
    );
    let ed = Ed25519KeyPair::generate().unwrap();
    let eddsa = (
        "EdDSA",
        json!({"kty": "OKP", "crv": "Ed25519", "x": b64(ed.public_key().as_ref())}),
        Box::new(move |m: &[u8]| ed.sign(m).as_ref().to_vec()) as Box<dyn Fn(&[u8]) -> Vec<u8>>,
    );
    let rsa_jwk = |k: &RsaKeyPair| {
        json!({
            "kty": "RSA",
            "n": b64(k.public_key().modulus().big_endian_without_leading_zero()),
            "e": b64(k.public_key().exponent().big_endian_without_leading_zero()),
        })
    };
    let rsa_signer = |k: RsaKeyPair, pad: &'static dyn aws_lc_rs::signature::RsaEncoding| {
        Box::new(move |m: &[u8]| {
            let mut sig = vec![0u8; k.public_modulus_len()];
            k.sign(pad, &SystemRandom::new(), m, &mut sig).unwrap();
            sig
        }) as Box<dyn Fn(&[u8]) -> Vec<u8>>
    };
    let pss = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let pkcs1 = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let ps256 = ("PS256", rsa_jwk(&pss), rsa_signer(pss, &RSA_PSS_SHA256));
    let rs256 = (
        "RS256",
        rsa_jwk(&pkcs1),
        rsa_signer(pkcs1, &RSA_PKCS1_SHA256),
    );

    for (alg, jwk, sign) in [es384, eddsa, ps256, rs256] {
        let created = signed_post(
            &ca,
            &ca.url("newAccount"),
            json!({"alg": alg, "jwk": jwk}),
            &json!({"termsOfServiceAgreed": true}),
            &*sign,
        )
        .await
        .expect_ok();
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{alg}: {}",
            created.show()
        );
        let kid = created.location();
        let fetched = signed_post(
            &ca,
            &kid,
            json!({"alg": alg, "kid": kid}),
            &Value::Null,
            &*sign,
        )
        .await
        .expect_ok();
        assert_eq!(
            fetched.json()["status"],
            "valid",
            "{alg}: {}",
            fetched.show()
        );
        // The same key with an algorithm of another family is refused.
        let wrong = if alg == "ES384" { "ES256" } else { "ES384" };
        signed_post(
            &ca,
            &kid,
            json!({"alg": wrong, "kid": kid}),
            &Value::Null,
            &*sign,
        )
        .await
        .problem("badSignatureAlgorithm");
    }
}

/// The ARI window moves earlier when an operator sets a deadline
/// (`sigil acme ari`) and to now once the certificate is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_window_follows_operator_deadline_and_revocation() {
    let ca = Acme::start(&[]).await;
    let (account, _) = ca.account().await;
    let chain = ca
        .issue(&account, &NewOrder::new(&[dns("ari-move.localhost")]))
        .await;
    let leaf = pem_certs(&chain)[0].clone();
    let id = cert_id(&leaf);
    let serial = hex_serial(&leaf);
    let window = || async {
        let info = ca
            .https
            .get(&format!("{}/{id}", ca.url("renewalInfo")))
            .await
            .expect_ok()
            .json();
        let at = |k: &str| {
            time::OffsetDateTime::parse(
                info["suggestedWindow"][k].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
            .unix_timestamp()
        };
        (at("start"), at("end"))
    };
    let now = || sigil_core::Clock::now(&sigil_core::SystemClock).unix_timestamp();
    let (start, end) = window().await;
    assert!(
        start < end && end > now() + 3600,
        "default window ({start}, {end})"
    );

    let config = ca.data.join("sigil.toml");
    let config = config.to_string_lossy();
    let ari = |by: &str| {
        sigil(&[
            "acme",
            "ari",
            "--config",
            &config,
            "--serial",
            &serial,
            "--renew-by",
            by,
        ])
    };
    // A deadline in the past (a mistyped year) is refused, not applied.
    let past = fails(ari("2020-01-01T00:00:00Z"));
    assert!(past.contains("in the past"), "{past}");
    ok(ari("10m"));
    let (start, end) = window().await;
    assert!(start < end, "({start}, {end})");
    assert!(end <= now() + 600 + 5, "deadline not applied: ends {end}");

    ok(sigil(&[
        "revoke",
        "--config",
        &config,
        "--serial",
        &serial,
        "--reason",
        "superseded",
    ]));
    let (start, end) = window().await;
    assert!(start < end && end <= now() + 5, "revoked: ({start}, {end})");
    // The operator's deadline is audited.
    if let Some(audit) = ca.audit_rows() {
        assert!(audit.contains("acme.ari.renew_by"), "{audit}");
    }
}

fn hex_serial(der: &[u8]) -> String {
    hex_bytes(parse(der).tbs_certificate.raw_serial())
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Two nodes of one CA on a fresh PostgreSQL database, the public URL naming
/// the first: node A (in the returned `Acme`) and its HTTPS port, node B,
/// and the config path. `None` when no test database is configured.
async fn two_nodes_on_postgres() -> Option<(Acme, u16, Server, String)> {
    let admin = match std::env::var("TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            assert!(
                std::env::var("SIGIL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
                "SIGIL_REQUIRE_EXTERNAL=1 but TEST_DATABASE_URL is not set"
            );
            eprintln!("TEST_DATABASE_URL not set: skipped");
            return None;
        }
    };
    let pg = sigil_store::testing::fresh_postgres(&admin).await.unwrap();
    // A dev CA (made on SQLite), moved to PostgreSQL: its intermediate is
    // installed there, and every node then runs on it.
    let first = Acme::start(&[]).await;
    let config = first.data.join("sigil.toml");
    let port_a = free_port();
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replacen("url = \"sqlite://sigil.db\"", &format!("url = \"{pg}\""), 1)
        .replacen(
            "[acme]\n",
            &format!("[acme]\nbase_url = \"https://127.0.0.1:{port_a}\"\n"),
            1,
        );
    assert!(text.contains(&pg) && text.contains("base_url"), "{text}");
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_string_lossy().into_owned();
    let cert = first.data.join("intermediate.crt");
    ok(sigil(&[
        "intermediate",
        "install",
        "--config",
        &cfg,
        "--cert",
        &cert.to_string_lossy(),
    ]));
    let data = first.data.to_string_lossy().into_owned();
    let start = |name: &str, extra: &[&str]| {
        let work = first.data.parent().unwrap().join(name);
        std::fs::create_dir_all(&work).unwrap();
        let mut args = vec!["--dev", "--data-dir", &data];
        args.extend_from_slice(extra);
        args.extend(first.validation.iter().map(String::as_str));
        tokio::task::block_in_place(|| Server::start(&args, &work, &[]))
    };
    let https_a = format!("127.0.0.1:{port_a}");
    let node_a = start("pg-a", &["--https-addr", &https_a]);
    let node_b = start("pg-b", &[]);
    let dir_url = format!("https://{https_a}/acme/directory");
    let dir = first.https.get(&dir_url).await.expect_ok().json();
    let a = Acme {
        server: node_a,
        dir_url,
        dir,
        ..first
    };
    Some((a, port_a, node_b, cfg))
}

/// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_postgres_share_nonces_accounts_and_orders() {
    let Some((a, port_a, node_b, cfg)) = two_nodes_on_postgres().await else {
        return;
    };
    let port_b = node_b.https_port.unwrap();
    shared_state_checks(&a, port_a, port_b).await;

    // The other node serves the job node's CRLs: a revocation reaches its
    // /crl within seconds (it polls the stored numbers, and fetches a CRL
    // only when a newer one is stored).
    assert!(
        node_b
            .log_text()
            .contains("another node runs the background jobs")
    );
    let id = a.server.issuer_id();
    // What it holds in memory (its metrics say), once it holds one.
    let held = |port: u16| -> Option<u64> {
        let (_, body) = http_get(port, "/metrics").ok()?;
        let want = format!("sigil_crl_number{{issuer=\"{id}\"}} ");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(want.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        if let Some(n) = held(node_b.port) {
            break n;
        }
        assert!(Instant::now() < deadline, "{}", node_b.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (account, _) = a.account().await;
    let chain = a
        .issue(&account, &NewOrder::new(&[dns("follower-crl.localhost")]))
        .await;
    let serial = first_serial(&chain);
    ok(sigil(&[
        "revoke",
        "--config",
        &cfg,
        "--serial",
        &serial,
        "--reason",
        "superseded",
    ]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(held(node_b.port).is_some_and(|n| n > before) && crl_lists(node_b.port, &id, &serial)) {
        assert!(
            Instant::now() < deadline,
            "the other node does not serve a CRL listing {serial}\n{}",
            node_b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // One OCSP responder for both nodes: made by the job node, its key
    // sealed in the database, opened by the other.
    let audit = ok(sigil(&[
        "audit", "list", "--config", &cfg, "--limit", "1000",
    ]));
    let issued = audit
        .lines()
        .filter(|l| l.contains("ocsp_signer.issued"))
        .count();
    assert_eq!(issued, 1, "{audit}");
    if have("openssl") {
        let int = a.data.join("intermediate.crt").display().to_string();
        let responder = |port: u16| {
            let out = run(
                "openssl",
                &[
                    "ocsp",
                    "-issuer",
                    &int,
                    "-serial",
                    "0x1234",
                    "-url",
                    &format!("http://127.0.0.1:{port}/ocsp"),
                    "-noverify",
                    "-resp_text",
                ],
            );
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            text.lines()
                .find(|l| l.contains("Responder Id:"))
                .unwrap_or_else(|| panic!("no responder id: {text}"))
                .trim()
                .to_string()
        };
        assert_eq!(responder(a.server.port), responder(node_b.port));
    }
    node_b.stop();
}

/// gRPC `Sign` with a bootstrap token against one node.
async fn grpc_sign(
    port: u16,
    roots_pem: &str,
    token: &str,
    csr: Vec<u8>,
) -> Result<sigil_grpc::pb::CertificateResponse, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client =
        sigil_grpc::pb::certificate_authority_client::CertificateAuthorityClient::new(channel);
    let mut req = tonic::Request::new(sigil_grpc::pb::SignRequest {
        csr,
        profile: String::new(),
        lifetime_seconds: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client
        .sign(req)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{s:?}"))
}

/// Serial (lowercase hex) of the first certificate in a PEM chain.
fn first_serial(chain: &str) -> String {
    hex_bytes(parse(&pem_certs(chain)[0]).tbs_certificate.raw_serial())
        .trim_start_matches("00")
        .to_string()
}

/// Two nodes on PostgreSQL, ACME and gRPC requests alternating between them;
/// the node running the background jobs is killed (SIGKILL) mid-run with
/// requests in flight. Every acknowledged certificate is stored, the audit
/// chain verifies, the survivor takes over CRL publishing, and a revocation
/// shows in its OCSP answers and CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_run_loses_nothing_acknowledged() {
    let Some((a, port_a, node_b, cfg)) = two_nodes_on_postgres().await else {
        return;
    };
    let port_b = node_b.https_port.unwrap();
    let grpc_a = a.server.grpc_port.unwrap();
    let grpc_b = node_b.grpc_port.unwrap();
    assert!(
        a.server
            .log_text()
            .contains("this node runs the background jobs"),
        "{}",
        a.server.log_text()
    );
    assert!(
        node_b
            .log_text()
            .contains("another node runs the background jobs")
    );
    let roots = std::fs::read_to_string(&a.root).unwrap();
    let crl_before = {
        let id = a.server.issuer_id();
        (id.clone(), crl_number_at(node_b.port, &id))
    };
    let raw = Raw::register(&a).await;
    let mut acknowledged: Vec<String> = Vec::new();
    let mut a_alive = true;
    for i in 0..8u16 {
        let on_a = a_alive && i % 2 == 0;
        let (https, grpc) = if on_a {
            (port_a, grpc_a)
        } else {
            (port_b, grpc_b)
        };
        // ACME: order, http-01, finalize, download, all through one node.
        raw.route_via(port_a, https);
        let name = format!("failover-{i}.localhost");
        let (order, url) = raw.ready_order(&a, &[&name]).await;
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = b64(csr_der(&[&name], &key));
        raw.finalize(&order, &csr).await.expect_ok();
        let done = raw.post(&url, None).await.expect_ok().json();
        assert_eq!(done["status"], "valid", "{done}");
        let chain = raw
            .post(done["certificate"].as_str().unwrap(), None)
            .await
            .expect_ok();
        acknowledged.push(first_serial(&String::from_utf8_lossy(&chain.body)));
        // gRPC Sign with a bootstrap token.
        let gname = format!("grpc-{i}.internal");
        let token = ok(sigil(&[
            "token",
            "create",
            "--config",
            &cfg,
            "--subject",
            &gname,
            "--san",
            &gname,
        ]));
        let key = rcgen::KeyPair::generate().unwrap();
        let got = grpc_sign(grpc, &roots, token.trim(), csr_der(&[&gname], &key))
            .await
            .unwrap_or_else(|e| panic!("Sign on {grpc}: {e}"));
        acknowledged.push(got.serial.clone());

        if i == 3 {
            // Requests in flight to A while it is killed: each either comes
            // back with a certificate (then it must be stored) or fails.
            let mut inflight = Vec::new();
            for k in 0..6 {
                let n = format!("inflight-{k}.internal");
                let token = ok(sigil(&[
                    "token",
                    "create",
                    "--config",
                    &cfg,
                    "--subject",
                    &n,
                    "--san",
                    &n,
                ]));
                let key = rcgen::KeyPair::generate().unwrap();
                let csr = csr_der(&[&n], &key);
                let roots = roots.clone();
                inflight.push(tokio::spawn(async move {
                    grpc_sign(grpc_a, &roots, token.trim(), csr).await
                }));
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            let pid = a.server.pid().to_string();
            assert!(run("kill", &["-KILL", &pid]).status.success());
            a_alive = false;
            for h in inflight {
                if let Ok(r) = h.await.unwrap() {
                    acknowledged.push(r.serial);
                }
            }
        }
    }

    // The survivor takes over the background jobs.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node_b.log_text().contains("took over the background jobs") {
        assert!(
            Instant::now() < deadline,
            "no takeover:\n{}",
            node_b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing acknowledged is missing.
    let list = ok(sigil(&[
        "cert", "list", "--config", &cfg, "--limit", "1000",
    ]));
    for serial in &acknowledged {
        assert!(
            list.contains(serial.as_str()),
            "acknowledged {serial} missing:\n{list}"
        );
    }
    assert!(acknowledged.len() >= 16, "{acknowledged:?}");
    let out = ok(sigil(&["audit", "verify", "--config", &cfg]));
    assert!(out.contains("audit chain OK"), "{out}");

    // A certificate issued by the dead node is revoked on the survivor: its
    // OCSP answer says so within seconds, and the survivor publishes a CRL
    // with a higher number that lists it.
    let victim = acknowledged[0].clone();
    ok(sigil(&[
        "revoke",
        "--config",
        &cfg,
        "--serial",
        &victim,
        "--reason",
        "superseded",
    ]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (id, before) = crl_before;
    loop {
        let n = crl_number_at(node_b.port, &id);
        let listed = crl_lists(node_b.port, &id, &victim);
        if n > before && listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "survivor did not publish a CRL listing {victim} (number {n}, before {before})\n{}",
            node_b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    node_b.stop();
}

fn crl_der_at(port: u16, issuer: &str) -> Vec<u8> {
    let (status, der) = http_get(port, &format!("/crl/{issuer}.crl")).unwrap();
    assert_eq!(status, 200);
    der
}

fn crl_number_at(port: u16, issuer: &str) -> u64 {
    use x509_parser::prelude::*;
    let der = crl_der_at(port, issuer);
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    crl.crl_number()
        .and_then(|n| n.to_u64_digits().first().copied())
        .unwrap_or(0)
}

fn crl_lists(port: u16, issuer: &str, serial: &str) -> bool {
    use x509_parser::prelude::*;
    let der = crl_der_at(port, issuer);
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    crl.iter_revoked_certificates()
        .any(|r| hex_bytes(r.raw_serial()).trim_start_matches("00") == serial)
}

/// Root rotation: a new root, cross-signed both ways offline; the CA's
/// intermediate rotated onto the new root. ACME serves the default chain
/// (to the new root) and, by Link rel="alternate", a chain through the
/// cross-certificate that clients trusting only the old root accept; the
/// bundle carries both roots' cross-certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_cross_signs_and_acme_serves_the_alternate_chain() {
    let ca = Acme::start(&[]).await;
    let data = ca.data.clone();
    // A certificate from the intermediate about to be replaced, to follow its
    // ARI window through the rotation.
    let (account, _) = ca.account().await;
    let old_chain = ca
        .issue(
            &account,
            &NewOrder::new(&[dns("before-rotation.localhost")]),
        )
        .await;
    let old_id = cert_id(&pem_certs(&old_chain)[0]);
    let d = |n: &str| data.join(n).display().to_string();
    let cfg = d("sigil.toml");
    let old_root = d("DEV-ONLY-root");
    let old_pass = d("DEV-ONLY-root/passphrase");
    let new_root = d("new-root");
    let env = [("SIGIL_ROOT_PASSPHRASE", "the new root's passphrase")];
    tokio::task::block_in_place(|| {
        ok(sigil_env(
            &[
                "root",
                "init",
                "--dir",
                &new_root,
                "--key-type",
                "ecdsa-p384",
                "--subject",
                "CN=Corp Root CA 2,O=Corp",
            ],
            &env,
        ));
        // Offline: each root certifies the other's key.
        ok(sigil(&[
            "root",
            "cross-sign",
            "--dir",
            &old_root,
            "--cert",
            &d("new-root/root.crt"),
            "--out",
            &d("new-by-old.crt"),
            "--passphrase-file",
            &old_pass,
        ]));
        ok(sigil_env(
            &[
                "root",
                "cross-sign",
                "--dir",
                &new_root,
                "--cert",
                &d("DEV-ONLY-root/root.crt"),
                "--out",
                &d("old-by-new.crt"),
            ],
            &env,
        ));
        // Not yet configured: refused.
        let err = fails(sigil(&[
            "cross-cert",
            "install",
            "--config",
            &cfg,
            "--cert",
            &d("new-by-old.crt"),
        ]));
        assert!(err.contains("list both roots in ca.roots"), "{err}");
        // Both roots configured (the overlap), both cross-certificates installed.
        let text = std::fs::read_to_string(&cfg).unwrap();
        let text = text.replacen(
            "roots = [\"DEV-ONLY-root/root.crt\"]",
            "roots = [\"DEV-ONLY-root/root.crt\", \"new-root/root.crt\"]",
            1,
        );
        assert!(text.contains("new-root/root.crt"), "{text}");
        std::fs::write(&cfg, text).unwrap();
        for c in ["new-by-old.crt", "old-by-new.crt"] {
            ok(sigil(&[
                "cross-cert",
                "install",
                "--config",
                &cfg,
                "--cert",
                &d(c),
            ]));
        }
        // The intermediate moves to the new root (rotation with overlap).
        ok(sigil(&["intermediate", "rotate", "--config", &cfg]));
        ok(sigil_env(
            &[
                "root",
                "sign",
                "--dir",
                &new_root,
                "--csr",
                &d("intermediate-next.csr"),
                "--out",
                &d("next.crt"),
            ],
            &env,
        ));
        ok(sigil(&[
            "intermediate",
            "install",
            "--config",
            &cfg,
            "--stage",
            "--cert",
            &d("next.crt"),
        ]));
        ok(sigil(&[
            "intermediate",
            "activate",
            "--config",
            &cfg,
            "--renew-all-by",
            "30m",
        ]));
    });
    // --renew-all-by moved the old issuer's certificates' ARI window to end
    // within 30 minutes (it ended in the last third of the lifetime).
    let info = ca
        .https
        .get(&format!("{}/{old_id}", ca.url("renewalInfo")))
        .await
        .expect_ok()
        .json();
    let end = time::OffsetDateTime::parse(
        info["suggestedWindow"]["end"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let now = sigil_core::Clock::now(&sigil_core::SystemClock);
    assert!(
        end <= now + time::Duration::minutes(31),
        "window not moved: {info}"
    );
    let next_pem = std::fs::read_to_string(d("next.crt")).unwrap();
    let bundle = String::from_utf8(http_get(ca.server.port, "/bundle.pem").unwrap().1).unwrap();
    for c in ["new-by-old.crt", "old-by-new.crt", "next.crt"] {
        let pem = std::fs::read_to_string(d(c)).unwrap();
        assert!(bundle.contains(pem.trim()), "{c} missing from /bundle.pem");
    }

    // Wait for the server to follow the activation, then order.
    let raw = Raw::register(&ca).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let (chain, rsp) = loop {
        let name = "rotated-root.localhost";
        let (order, url) = raw.ready_order(&ca, &[name]).await;
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = b64(csr_der(&[name], &key));
        raw.finalize(&order, &csr).await.expect_ok();
        let done = raw.post(&url, None).await.expect_ok().json();
        let rsp = raw
            .post(done["certificate"].as_str().unwrap(), None)
            .await
            .expect_ok();
        let chain = String::from_utf8_lossy(&rsp.body).into_owned();
        if chain.contains(next_pem.trim()) {
            break (chain, rsp);
        }
        assert!(
            Instant::now() < deadline,
            "still issuing from the old intermediate"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let links: Vec<String> = rsp
        .headers
        .get_all("link")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.contains("rel=\"alternate\""))
        .map(|v| {
            v.trim_start_matches('<')
                .split('>')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(links.len(), 1, "{}", rsp.show());
    let alt = raw.post(&links[0], None).await.expect_ok();
    let alt_chain = String::from_utf8_lossy(&alt.body).into_owned();
    assert!(alt_chain.contains(next_pem.trim()));
    let cross = std::fs::read_to_string(d("new-by-old.crt")).unwrap();
    assert!(
        alt_chain.contains(cross.trim()),
        "the alternate chain ends in the cross-certificate"
    );

    // openssl: the default chain verifies against the new root only; the
    // alternate one against the old root only.
    let verify = |chain: &str, root: &str, tag: &str| {
        let blocks = pem_blocks(chain);
        let leaf = data.join(format!("{tag}-leaf.pem"));
        let rest = data.join(format!("{tag}-rest.pem"));
        std::fs::write(&leaf, &blocks[0]).unwrap();
        std::fs::write(&rest, blocks[1..].concat()).unwrap();
        run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                root,
                "-untrusted",
                &rest.display().to_string(),
                &leaf.display().to_string(),
            ],
        )
        .status
        .success()
    };
    let (old_root_crt, new_root_crt) = (d("DEV-ONLY-root/root.crt"), d("new-root/root.crt"));
    assert!(verify(&chain, &new_root_crt, "default-new"));
    assert!(
        !verify(&chain, &old_root_crt, "default-old"),
        "default chain needs the new root"
    );
    assert!(
        verify(&alt_chain, &old_root_crt, "alt-old"),
        "alternate chain reaches the old root"
    );
}

/// The retention pass (default `database.keep_expired = "7d"`): on start,
/// the job node deletes ACME orders and authorizations that expired more
/// than a week ago, keeps the ones that expired since, keeps a finalized
/// order that replaced a certificate while that certificate lives (so it
/// is still "already replaced"), and leaves certificates and the audit
/// chain alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_and_authorizations_expired_long_ago_are_deleted() {
    use time::format_description::well_known::Rfc3339;
    assert!(
        have("sqlite3"),
        "sqlite3 is needed (./scripts/test installs it)"
    );
    let ca = Acme::start(&[]).await;
    // Pinned, so the account and the JWS URLs stay valid on the restarted node.
    let old_port = ca.server.https_port.unwrap();
    let config = ca.data.join("sigil.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen(
        "[acme]\n",
        &format!("[acme]\nbase_url = \"https://127.0.0.1:{old_port}\"\n"),
        1,
    );
    assert!(text.contains("base_url"), "no [acme] section:\n{text}");
    std::fs::write(&config, text).unwrap();

    let raw = Raw::register(&ca).await;
    let issue = |body: Value, name: &'static str| {
        let raw = &raw;
        let ca = &ca;
        async move {
            let order = raw
                .post(&raw.url("newOrder"), Some(&body))
                .await
                .expect_ok()
                .json();
            raw.validate_http01(ca, order["authorizations"][0].as_str().unwrap())
                .await;
            let key = rcgen::KeyPair::generate().unwrap();
            let csr = b64(csr_der(&[name], &key));
            let done = raw.finalize(&order, &csr).await.expect_ok().json();
            assert_eq!(done["status"], "valid", "{done}");
            let chain = raw
                .post(done["certificate"].as_str().unwrap(), None)
                .await
                .expect_ok();
            pem_certs(&String::from_utf8_lossy(&chain.body)).remove(0)
        }
    };
    let ident = |name: &str| json!([{"type": "dns", "value": name}]);
    for name in ["old.localhost", "recent.localhost"] {
        issue(json!({ "identifiers": ident(name) }), name).await;
    }
    // A 20-day certificate, then an order replacing it (ARI).
    let now = sigil_core::Clock::now(&sigil_core::SystemClock);
    let na = (now + time::Duration::days(20))
        .replace_nanosecond(0)
        .unwrap();
    let long = issue(
        json!({ "identifiers": ident("ari.localhost"), "notAfter": na.format(&Rfc3339).unwrap() }),
        "ari.localhost",
    )
    .await;
    // A pending order whose authorization alone is moved back (as when
    // orders live longer than authorizations): it turns invalid, not broken.
    let pending = raw
        .post(
            &raw.url("newOrder"),
            Some(&json!({ "identifiers": ident("pending.localhost") })),
        )
        .await
        .expect_ok();
    let pending_url = pending.location();
    let long_id = cert_id(&long).to_string();
    let replacing = json!({ "identifiers": ident("ari.localhost"), "replaces": long_id });
    issue(replacing.clone(), "ari.localhost").await;

    let db = ca.data.join("sigil.db").display().to_string();
    let sql = |q: &str| -> String {
        let out = run("sqlite3", &[&db, q]);
        assert!(
            out.status.success(),
            "sqlite3 {q}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    const REPLACING: &str = "body LIKE '%\"replaces\"%'";
    // The finalized replacement is kept until the replaced certificate expires.
    let kept_until: i64 = sql(&format!(
        "SELECT expires_at FROM acme_orders WHERE {REPLACING} AND status = 'valid'"
    ))
    .parse()
    .unwrap();
    assert_eq!(kept_until, parse(&long).validity().not_after.timestamp());
    // Moved back in time: one name's order and authorization by 30 days
    // (expired 29 days ago), the other's by 3 (expired 2 days ago), and the
    // replacement by 15 (a plain order would have expired 14 days ago; it
    // expires in 5).
    let shift = |cond: &str, days: i64| {
        let secs = days * 86_400;
        for table in ["acme_orders", "acme_authzs"] {
            sql(&format!(
                "UPDATE {table} SET created_at = created_at - {secs}, \
                 expires_at = expires_at - {secs} WHERE {cond}"
            ));
        }
    };
    shift("body LIKE '%old.localhost%'", 30);
    shift("body LIKE '%recent.localhost%'", 3);
    sql("UPDATE acme_authzs SET created_at = created_at - 2592000, \
         expires_at = expires_at - 2592000 WHERE body LIKE '%pending.localhost%'");
    sql(&format!(
        "UPDATE acme_orders SET created_at = created_at - 1296000, \
         expires_at = expires_at - 1296000 WHERE {REPLACING}"
    ));
    let count = |table: &str, cond: &str| -> String {
        sql(&format!("SELECT count(*) FROM {table} WHERE {cond}"))
    };
    for table in ["acme_orders", "acme_authzs"] {
        for name in ["old.localhost", "recent.localhost"] {
            let cond = format!("body LIKE '%{name}%'");
            assert_eq!(count(table, &cond), "1", "{table} {name} before");
        }
    }

    let ca = ca.restart(&[]).await;
    raw.route_via(old_port, ca.server.https_port.unwrap());
    let port = ca.server.port;
    let deadline = Instant::now() + Duration::from_secs(30);
    let deleted = |body: &str, table: &str| -> Option<f64> {
        body.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "sigil_retention_deleted_total{{table=\"{table}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    loop {
        let body = String::from_utf8(http_get(port, "/metrics").unwrap().1).unwrap();
        let got = (deleted(&body, "acme_orders"), deleted(&body, "acme_authzs"));
        if got == (Some(1.0), Some(2.0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no retention pass within 30 s: {got:?}\n{}",
            ca.server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for table in ["acme_orders", "acme_authzs"] {
        assert_eq!(
            count(table, "body LIKE '%old.localhost%'"),
            "0",
            "{table} old"
        );
        assert_eq!(
            count(table, "body LIKE '%recent.localhost%'"),
            "1",
            "{table} recent"
        );
    }
    assert_eq!(count("acme_orders", REPLACING), "1");
    let orphan = raw.post(&pending_url, None).await.expect_ok().json();
    assert_eq!(orphan["status"], "invalid", "{orphan}");
    assert!(
        orphan["error"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("expired and was deleted")),
        "{orphan}"
    );
    raw.post(&raw.url("newOrder"), Some(&replacing))
        .await
        .problem("alreadyReplaced");
    assert_eq!(
        count(
            "certificates",
            "names LIKE '%old.localhost%' OR names LIKE '%recent.localhost%' OR names LIKE '%ari.localhost%'"
        ),
        "4"
    );
    assert!(
        ca.server
            .log_text()
            .contains("deleted rows expired before the retention cutoff"),
        "{}",
        ca.server.log_text()
    );
    let cfg = config.display().to_string();
    let Acme { server, .. } = ca;
    server.stop();
    let out = ok(sigil(&["audit", "verify", "--config", &cfg]));
    assert!(out.contains("audit chain OK"), "{out}");
}
