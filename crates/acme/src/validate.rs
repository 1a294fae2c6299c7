//! Challenge validation: http-01 (RFC 8555 §8.3), dns-01 (§8.4) and
//! tls-alpn-01 (RFC 8737), over a configurable resolver and ports. A failure's
//! detail says what was contacted and what came back.

use crate::problem::Problem;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The challenge types Sigil offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeType {
    /// RFC 8555 §8.3.
    Http01,
    /// RFC 8555 §8.4.
    Dns01,
    /// RFC 8737.
    TlsAlpn01,
}

impl ChallengeType {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            ChallengeType::Http01 => "http-01",
            ChallengeType::Dns01 => "dns-01",
            ChallengeType::TlsAlpn01 => "tls-alpn-01",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<ChallengeType> {
        [
            ChallengeType::Http01,
            ChallengeType::Dns01,
            ChallengeType::TlsAlpn01,
        ]
        .into_iter()
        .find(|c| c.name() == s)
    }
}

/// Where and how validation connects.
#[derive(Debug, Clone)]
pub struct ValidationSettings {
    /// Port for http-01 (80 in production).
    pub http_port: u16,
    /// Port for tls-alpn-01 (443 in production).
    pub tls_port: u16,
    /// DNS server for dns-01 and name lookups; `None` uses the system's.
    pub resolver: Option<SocketAddr>,
    /// Resolve names under `.localhost` to 127.0.0.1 (RFC 6761; development).
    pub localhost_loopback: bool,
    /// Per-attempt timeout.
    pub timeout: Duration,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        ValidationSettings {
            http_port: 80,
            tls_port: 443,
            resolver: None,
            localhost_loopback: false,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What a challenge is about.
#[derive(Debug, Clone)]
pub struct Target {
    /// `dns` or `ip`.
    pub kind: String,
    /// The name or address (without `*.`).
    pub value: String,
}

/// Performs validations.
pub struct Validator {
    settings: ValidationSettings,
    resolver: TokioResolver,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Whether validation may contact `ip`: not link-local (where cloud
/// metadata services answer), multicast, broadcast or unspecified.
fn contactable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_link_local() || v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified())
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => contactable(IpAddr::V4(v4)),
            None => !(v6.is_unicast_link_local() || v6.is_multicast() || v6.is_unspecified()),
        },
    }
}

const MAX_BODY: usize = 8 * 1024;
const MAX_REDIRECTS: usize = 10;
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// id-pe-acmeIdentifier (RFC 8737 §6.1).
const ACME_IDENTIFIER_OID: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.31");

impl Validator {
    /// Builds the resolver.
    pub fn new(settings: ValidationSettings) -> Result<Validator, String> {
        let builder = match settings.resolver {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(|e| {
                format!("cannot read the system DNS configuration (set acme.dns_resolver): {e}")
            })?,
        };
        let mut builder = builder;
        let opts = builder.options_mut();
        opts.timeout = settings.timeout;
        opts.attempts = 2;
        // A validation must see the record as it is now.
        opts.cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Validator { settings, resolver })
    }

    /// Validates one challenge; `key_auth` is `token.thumbprint`.
    pub async fn validate(
        &self,
        kind: ChallengeType,
        target: &Target,
        token: &str,
        key_auth: &str,
    ) -> Result<(), Problem> {
        let work = async {
            match kind {
                ChallengeType::Http01 => self.http01(target, token, key_auth).await,
                ChallengeType::Dns01 => self.dns01(target, key_auth).await,
                ChallengeType::TlsAlpn01 => self.tls_alpn01(target, key_auth).await,
            }
        };
        match tokio::time::timeout(self.settings.timeout * 3, work).await {
            Ok(r) => r,
            Err(_) => Err(Problem::connection(format!(
                "{}: validation of {} timed out after {} s",
                kind.name(),
                target.value,
                (self.settings.timeout * 3).as_secs()
            ))),
        }
    }

    /// The addresses to contact for `target`.
    async fn addresses(&self, target: &Target) -> Result<Vec<IpAddr>, Problem> {
        if target.kind == "ip" {
            let ip = target.value.parse::<IpAddr>().map_err(|_| {
                Problem::malformed(format!("'{}' is not an IP address", target.value))
            })?;
            if !contactable(ip) {
                return Err(Problem::connection(format!(
                    "{ip} is not an address validation contacts (link-local, multicast or unspecified)"
                )));
            }
            return Ok(vec![ip]);
        }
        let name = target.value.as_str();
        if self.settings.localhost_loopback && (name == "localhost" || name.ends_with(".localhost"))
        {
            return Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        }
        let lookup = self
            .resolver
            .lookup_ip(format!("{name}."))
            .await
            .map_err(|e| Problem::dns(format!("DNS lookup of {name} failed: {e}")))?;
        let ips: Vec<IpAddr> = lookup.iter().collect();
        if ips.is_empty() {
            return Err(Problem::dns(format!("{name} has no A or AAAA records")));
        }
        let (ok, refused): (Vec<IpAddr>, Vec<IpAddr>) =
            ips.into_iter().partition(|ip| contactable(*ip));
        if ok.is_empty() {
            return Err(Problem::connection(format!(
                "{name} resolves only to addresses validation does not contact (link-local, multicast or unspecified): {}",
                refused
                    .iter()
                    .map(|ip| ip.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(ok)
    }

    /// Connects to the first of `ips` that answers on `port`.
    async fn connect(
        &self,
        target: &Target,
        ips: &[IpAddr],
        port: u16,
    ) -> Result<(tokio::net::TcpStream, SocketAddr), Problem> {
        let mut errors = Vec::new();
        for &ip in ips {
            let addr = SocketAddr::new(ip, port);
            match tokio::time::timeout(self.settings.timeout, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(s)) => return Ok((s, addr)),
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: timed out")),
            }
        }
        Err(Problem::connection(format!(
            "cannot connect to {} ({})",
            target.value,
            errors.join("; ")
        )))
    }

    async fn http01(&self, target: &Target, token: &str, key_auth: &str) -> Result<(), Problem> {
        use http_body_util::{BodyExt, Empty};
        let host = match target.value.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => target.value.clone(),
        };
        let ports = (self.settings.http_port, self.settings.tls_port);
        let mut hop = Hop {
            https: false,
            path: format!("/.well-known/acme-challenge/{token}"),
        };
        // Every hop goes to the address the first one reached: a redirect
        // may change the path and scheme, never the machine (a name that
        // resolves differently on the next lookup cannot steer validation
        // to another host).
        let mut ips = self.addresses(target).await?;
        for _ in 0..=MAX_REDIRECTS {
            let (scheme, port, default_port) = if hop.https {
                ("https", ports.1, 443)
            } else {
                ("http", ports.0, 80)
            };
            let authority = if port == default_port {
                host.clone()
            } else {
                format!("{host}:{port}")
            };
            let url = format!("{scheme}://{authority}{}", hop.path);
            let (tcp, addr) = self.connect(target, &ips, port).await?;
            ips = vec![addr.ip()];
            let fail = |kind: fn(String) -> Problem, what: String| {
                kind(format!("http-01: GET {url} (at {addr}): {what}"))
            };
            let io: Box<dyn Io> = if hop.https {
                Box::new(
                    self.tls(target.value.clone(), tcp, &[b"http/1.1"])
                        .await
                        .map_err(|e| fail(Problem::tls, e))?,
                )
            } else {
                Box::new(tcp)
            };
            let io = hyper_util::rt::TokioIo::new(io);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| fail(Problem::connection, format!("HTTP handshake failed: {e}")))?;
            let driver = tokio::spawn(conn);
            let req = hyper::Request::get(hop.path.as_str())
                .header(hyper::header::HOST, authority.as_str())
                .header(hyper::header::USER_AGENT, "Sigil-ACME-validator")
                .header(hyper::header::ACCEPT, "*/*")
                .body(Empty::<hyper::body::Bytes>::new())
                .map_err(|e| fail(Problem::connection, format!("unusable request: {e}")))?;
            let resp = tokio::time::timeout(self.settings.timeout, sender.send_request(req))
                .await
                .map_err(|_| fail(Problem::connection, "no response within the timeout".into()))?
                .map_err(|e| fail(Problem::connection, format!("request failed: {e}")))?;
            let status = resp.status();
            if status.is_redirection() {
                driver.abort();
                let location = resp
                    .headers()
                    .get(hyper::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                hop = follow(&location, &hop.path, &host, hop.https, ports).map_err(|why| {
                    fail(
                        Problem::connection,
                        format!("redirect ({status}) to '{location}' not followed: {why}"),
                    )
                })?;
                continue;
            }
            let mut body = Vec::new();
            let mut stream = resp.into_body();
            while let Some(frame) = tokio::time::timeout(self.settings.timeout, stream.frame())
                .await
                .map_err(|_| {
                    fail(
                        Problem::connection,
                        "body not received within the timeout".into(),
                    )
                })?
            {
                let frame = frame
                    .map_err(|e| fail(Problem::connection, format!("reading the body: {e}")))?;
                if let Some(data) = frame.data_ref() {
                    body.extend_from_slice(data);
                    if body.len() > MAX_BODY {
                        break;
                    }
                }
            }
            driver.abort();
            let excerpt: String =
                String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            if !status.is_success() {
                return Err(fail(
                    Problem::unauthorized,
                    format!("status {status}, body {excerpt:?}"),
                ));
            }
            if body.len() > MAX_BODY {
                return Err(fail(
                    Problem::unauthorized,
                    format!("the body is longer than {MAX_BODY} bytes"),
                ));
            }
            let got = String::from_utf8_lossy(&body);
            if got.trim_end() == key_auth {
                return Ok(());
            }
            return Err(fail(
                Problem::incorrect_response,
                format!(
                    "status {status}, body {excerpt:?}; expected the key authorization {key_auth:?}"
                ),
            ));
        }
        Err(Problem::connection(format!(
            "http-01: more than {MAX_REDIRECTS} redirects for {}",
            target.value
        )))
    }

    /// A TLS client session to `sni` (a name, or an IP, which sends none)
    /// that accepts any certificate: what validation checks is the content
    /// behind it (RFC 8555 §8.3, RFC 8737). Offers `alpn`. On failure, what
    /// went wrong.
    async fn tls(
        &self,
        sni: String,
        tcp: tokio::net::TcpStream,
        alpn: &[&[u8]],
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let server_name = rustls_pki_types::ServerName::try_from(sni.clone())
            .map_err(|e| format!("invalid SNI {sni}: {e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        tokio::time::timeout(self.settings.timeout, connector.connect(server_name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake failed: {e}"))
    }

    async fn dns01(&self, target: &Target, key_auth: &str) -> Result<(), Problem> {
        if target.kind != "dns" {
            return Err(Problem::malformed("dns-01 validates DNS names only"));
        }
        let v = target.value.to_ascii_lowercase();
        if v == "localhost" || v.ends_with(".localhost") {
            return Err(Problem::dns(format!(
                "dns-01: names under .localhost never reach DNS (RFC 6761), so {} cannot be validated by dns-01; use http-01 or tls-alpn-01, or a name under another zone (e.g. .internal) for wildcards",
                target.value
            )));
        }
        let want = B64.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            key_auth.as_bytes(),
        ));
        let name = format!("_acme-challenge.{}.", target.value);
        let server = self
            .settings
            .resolver
            .map_or_else(|| "the system resolver".to_string(), |a| a.to_string());
        let lookup = self.resolver.txt_lookup(name.as_str()).await.map_err(|e| {
            Problem::dns(format!(
                "dns-01: TXT lookup of {name} via {server} failed: {e}"
            ))
        })?;
        let mut found = Vec::new();
        for record in lookup.answers() {
            if let RData::TXT(txt) = &record.data {
                let value: Vec<u8> = txt
                    .txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect();
                let value = String::from_utf8_lossy(&value).into_owned();
                if value == want {
                    return Ok(());
                }
                found.push(value);
            }
        }
        Err(Problem::unauthorized(format!(
            "dns-01: TXT {name} via {server} holds {found:?}; expected {want:?}"
        )))
    }

    async fn tls_alpn01(&self, target: &Target, key_auth: &str) -> Result<(), Problem> {
        let port = self.settings.tls_port;
        let ips = self.addresses(target).await?;
        let (tcp, addr) = self.connect(target, &ips, port).await?;
        let fail = |kind: fn(String) -> Problem, what: String| {
            kind(format!("tls-alpn-01: {} (at {addr}): {what}", target.value))
        };
        // For an IP, the reverse name (RFC 8738 §6).
        let sni = match target.value.parse::<IpAddr>() {
            Ok(ip) => reverse_name(ip),
            Err(_) => target.value.clone(),
        };
        let tls = self
            .tls(sni, tcp, &[ACME_TLS_ALPN])
            .await
            .map_err(|e| fail(Problem::tls, e))?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(ACME_TLS_ALPN) {
            return Err(fail(
                Problem::tls,
                "the server did not negotiate ALPN acme-tls/1".into(),
            ));
        }
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| fail(Problem::tls, "no certificate presented".into()))?;
        let want = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key_auth.as_bytes());
        check_alpn_cert(cert.as_ref(), target, want.as_ref())
            .map_err(|why| fail(Problem::unauthorized, why))
    }
}

/// Where an http-01 request goes next.
#[derive(Debug, PartialEq, Eq)]
struct Hop {
    /// Over TLS on the TLS validation port (else plain HTTP on the http-01 port).
    https: bool,
    /// Path and query.
    path: String,
}

/// The transport under one http-01 request: TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The redirect rules of http-01 validation: a relative reference (resolved
/// against `from`, the path it answers), or an absolute URL to the same
/// name, by `http://` on the http-01 port or `https://` on the TLS
/// validation port (`ports`); anything else is refused with why.
fn follow(
    location: &str,
    from: &str,
    host: &str,
    https: bool,
    ports: (u16, u16),
) -> Result<Hop, String> {
    let lower = location.get(..8).unwrap_or(location).to_ascii_lowercase();
    let absolute = lower.starts_with("http://") || lower.starts_with("https://");
    let scheme = location
        .find([':', '/', '?', '#'])
        .is_some_and(|i| location[i..].starts_with(':'));
    if !absolute && !scheme && !location.starts_with("//") && !location.is_empty() {
        return Ok(Hop {
            https,
            path: resolve(from, location)?,
        });
    }
    let (https, rest, port, default) = if lower.starts_with("http://") {
        (false, &location[7..], ports.0, 80)
    } else if lower.starts_with("https://") {
        (true, &location[8..], ports.1, 443)
    } else {
        return Err(format!(
            "only redirects to http://{host} (port {}) or https://{host} (port {}) are followed",
            ports.0, ports.1
        ));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let mut allowed = vec![format!("{host}:{port}")];
    if port == default {
        allowed.push(host.to_string());
    }
    if !allowed.iter().any(|a| a.eq_ignore_ascii_case(authority)) {
        return Err(format!(
            "redirects must stay on {host} (the name being validated), on port {port} for {}",
            if https { "https" } else { "http" }
        ));
    }
    Ok(Hop {
        https,
        path: match path {
            "" => "/".into(),
            p if p.starts_with('?') => resolve("/", &format!("/{p}"))?,
            p => resolve("/", p)?,
        },
    })
}

/// `reference` resolved against the path `from` (RFC 3986 §5.2): the path
/// and query to request, with characters a request line cannot hold
/// percent-encoded.
fn resolve(from: &str, reference: &str) -> Result<String, String> {
    const BASE: &str = "http://validation.invalid/";
    let unusable = |e: url::ParseError| format!("not a usable URL ({e})");
    let url = url::Url::parse(BASE)
        .and_then(|b| b.join(from))
        .and_then(|b| b.join(reference))
        .map_err(unusable)?;
    if url.host_str() != Some("validation.invalid") || url.scheme() != "http" {
        return Err("a relative redirect must stay on the name being validated".into());
    }
    Ok(match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    })
}

/// The reverse-mapping name of an IP (RFC 8738 §6).
fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// RFC 8737 §3: exactly the one identifier in the SAN, and a critical
/// acmeIdentifier extension holding SHA-256 of the key authorization.
fn check_alpn_cert(der: &[u8], target: &Target, want: &[u8]) -> Result<(), String> {
    use der::Decode;
    use x509_cert::Certificate;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let cert = Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let exts = cert
        .tbs_certificate()
        .extensions()
        .map(|e| e.as_slice())
        .unwrap_or(&[]);
    let acme = exts
        .iter()
        .find(|e| e.extn_id == ACME_IDENTIFIER_OID)
        .ok_or("the certificate has no acmeIdentifier extension")?;
    if !acme.critical {
        return Err("the acmeIdentifier extension is not critical".into());
    }
    let value = der::asn1::OctetString::from_der(acme.extn_value.as_bytes())
        .map_err(|_| "the acmeIdentifier extension is not an OCTET STRING")?;
    if value.as_bytes() != want {
        return Err(format!(
            "acmeIdentifier holds {} but SHA-256 of the key authorization is {}",
            hex::encode(value.as_bytes()),
            hex::encode(want)
        ));
    }
    let san = exts
        .iter()
        .find(|e| e.extn_id == const_oid_san())
        .ok_or("the certificate has no subjectAltName")?;
    let san = SubjectAltName::from_der(san.extn_value.as_bytes())
        .map_err(|e| format!("unreadable subjectAltName: {e}"))?;
    // A DNS identifier must be the one dNSName, an IP identifier the one
    // iPAddress (RFC 8738 §6): the same text in the other type does not count.
    let names: Vec<(&str, String)> = san
        .0
        .iter()
        .map(|g| match g {
            GeneralName::DnsName(d) => ("dns", d.to_string().to_ascii_lowercase()),
            GeneralName::IpAddress(ip) => ("ip", ip_text(ip.as_bytes())),
            _ => ("other", "(other name)".into()),
        })
        .collect();
    let wanted = (target.kind.as_str(), target.value.to_ascii_lowercase());
    if names.len() != 1 || (names[0].0, names[0].1.as_str()) != (wanted.0, wanted.1.as_str()) {
        let shown: Vec<String> = names.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        return Err(format!(
            "the certificate must name exactly {}:{} in its subjectAltName; it names {shown:?}",
            target.kind, target.value
        ));
    }
    Ok(())
}

fn const_oid_san() -> der::asn1::ObjectIdentifier {
    der::asn1::ObjectIdentifier::new_unwrap("2.5.29.17")
}

/// An iPAddress SAN as written: 4 octets as IPv4, 16 as IPv6 (an
/// IPv4-mapped IPv6 address stays IPv6, so it does not stand for the IPv4
/// address it maps).
fn ip_text(octets: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        std::net::Ipv4Addr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(octets) {
        std::net::Ipv6Addr::from(v6).to_string()
    } else {
        "(bad IP)".into()
    }
}

/// tls-alpn-01 checks the certificate's content, not its chain (RFC 8737 §3:
/// the certificate is self-signed by the applicant).
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        // Exactly what `check_signature` verifies, so a responder is never
        // offered a scheme it then fails with.
        SCHEMES.to_vec()
    }
}

/// Checks the handshake signature against the certificate's key. The
/// challenge certificate carries the critical acmeIdentifier extension, which
/// a general-purpose path validator refuses, so its key is read directly.
/// In TLS 1.3 an ECDSA scheme names the curve as well as the hash; in TLS 1.2
/// it names only the hash, and the curve is the key's.
fn verify_handshake_signature(
    message: &[u8],
    cert: &rustls_pki_types::CertificateDer<'_>,
    dss: &rustls::DigitallySignedStruct,
    tls13: bool,
) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
    check_signature(message, cert.as_ref(), dss.scheme, dss.signature(), tls13)
        .map_err(|why| rustls::Error::General(format!("challenge certificate: {why}")))?;
    Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
}

/// The handshake signature schemes tls-alpn-01 accepts.
const SCHEMES: [rustls::SignatureScheme; 10] = [
    rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
    rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
    rustls::SignatureScheme::ECDSA_NISTP521_SHA512,
    rustls::SignatureScheme::ED25519,
    rustls::SignatureScheme::RSA_PSS_SHA256,
    rustls::SignatureScheme::RSA_PSS_SHA384,
    rustls::SignatureScheme::RSA_PSS_SHA512,
    rustls::SignatureScheme::RSA_PKCS1_SHA256,
    rustls::SignatureScheme::RSA_PKCS1_SHA384,
    rustls::SignatureScheme::RSA_PKCS1_SHA512,
];

/// [`verify_handshake_signature`] on its parts; `Err` says what is wrong.
fn check_signature(
    message: &[u8],
    cert: &[u8],
    scheme: rustls::SignatureScheme,
    signature: &[u8],
    tls13: bool,
) -> Result<(), &'static str> {
    use aws_lc_rs::signature as sig;
    use der::Decode;
    use rustls::SignatureScheme as S;
    let bad = |why: &'static str| why;
    let parsed = x509_cert::Certificate::from_der(cert).map_err(|_| bad("unreadable"))?;
    let spki = parsed.tbs_certificate().subject_public_key_info();
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| bad("key is not octet-aligned"))?;
    let curve = ec_curve(spki);
    let ecdsa = |hash: usize| -> Result<&'static dyn sig::VerificationAlgorithm, &'static str> {
        let curve = curve.ok_or_else(|| {
            bad("an ECDSA signature from a key that is not P-256, P-384 or P-521")
        })?;
        if tls13 && curve != hash {
            return Err(bad(
                "in TLS 1.3 the signature scheme must match the key's curve",
            ));
        }
        Ok(match (curve, hash) {
            (256, 256) => &sig::ECDSA_P256_SHA256_ASN1,
            (256, 384) => &sig::ECDSA_P256_SHA384_ASN1,
            (256, _) => &sig::ECDSA_P256_SHA512_ASN1,
            (384, 256) => &sig::ECDSA_P384_SHA256_ASN1,
            (384, 384) => &sig::ECDSA_P384_SHA384_ASN1,
            (384, _) => &sig::ECDSA_P384_SHA512_ASN1,
            (_, 256) => &sig::ECDSA_P521_SHA256_ASN1,
            (_, 384) => &sig::ECDSA_P521_SHA384_ASN1,
            _ => &sig::ECDSA_P521_SHA512_ASN1,
        })
    };
    let alg: &dyn sig::VerificationAlgorithm = match scheme {
        S::ECDSA_NISTP256_SHA256 => ecdsa(256)?,
        S::ECDSA_NISTP384_SHA384 => ecdsa(384)?,
        S::ECDSA_NISTP521_SHA512 => ecdsa(521)?,
        S::ED25519 => &sig::ED25519,
        S::RSA_PSS_SHA256 => &sig::RSA_PSS_2048_8192_SHA256,
        S::RSA_PSS_SHA384 => &sig::RSA_PSS_2048_8192_SHA384,
        S::RSA_PSS_SHA512 => &sig::RSA_PSS_2048_8192_SHA512,
        // RFC 8446 §4.4.3: not in a TLS 1.3 CertificateVerify.
        S::RSA_PKCS1_SHA256 | S::RSA_PKCS1_SHA384 | S::RSA_PKCS1_SHA512 if tls13 => {
            return Err("RSA PKCS#1 v1.5 signatures are not allowed in TLS 1.3");
        }
        S::RSA_PKCS1_SHA256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        S::RSA_PKCS1_SHA384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        S::RSA_PKCS1_SHA512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        _ => return Err(bad("unsupported signature scheme")),
    };
    sig::UnparsedPublicKey::new(alg, key)
        .verify(message, signature)
        .map_err(|_| bad("handshake signature does not verify"))
}

/// The size of an EC key's named curve (256, 384 or 521), if it is one of those.
fn ec_curve(spki: &x509_cert::spki::SubjectPublicKeyInfoOwned) -> Option<usize> {
    use der::asn1::ObjectIdentifier as Oid;
    const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    const P384: Oid = Oid::new_unwrap("1.3.132.0.34");
    const P521: Oid = Oid::new_unwrap("1.3.132.0.35");
    if spki.algorithm.oid != EC_PUBLIC_KEY {
        return None;
    }
    let curve: Oid = spki.algorithm.parameters.as_ref()?.decode_as().ok()?;
    [(P256, 256), (P384, 384), (P521, 521)]
        .into_iter()
        .find(|(oid, _)| *oid == curve)
        .map(|(_, bits)| bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: (u16, u16) = (5002, 5001);

    fn hop(https: bool, path: &str) -> Result<Hop, String> {
        Ok(Hop {
            https,
            path: path.into(),
        })
    }

    /// A DNS server on 127.0.0.1 answering every A query with `ips`
    /// (TTL 0) and AAAA queries with nothing.
    async fn dns_answering(ips: Vec<Ipv4Addr>) -> SocketAddr {
        use hickory_resolver::proto::op::Message;
        use hickory_resolver::proto::rr::{Record, RecordType, rdata::A};
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                r.metadata.authoritative = true;
                r.metadata.recursion_desired = q.metadata.recursion_desired;
                r.add_queries(q.queries.iter().cloned());
                if let Some(query) = q.queries.first()
                    && query.query_type() == RecordType::A
                {
                    for ip in &ips {
                        r.add_answer(Record::from_rdata(
                            query.name().clone(),
                            0,
                            RData::A(A(*ip)),
                        ));
                    }
                }
                let _ = sock.send_to(&r.to_vec().unwrap(), peer).await;
            }
        });
        addr
    }

    /// Serves one HTTP connection on `listener`, then stops listening: the
    /// key authorization at `/next`, a redirect there for any other path.
    async fn serve_once(
        listener: tokio::net::TcpListener,
        key_auth: &'static str,
    ) -> tokio::task::JoinHandle<usize> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tokio::spawn(async move {
            let Ok((mut conn, _)) = listener.accept().await else {
                return 0;
            };
            drop(listener);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return 1,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let reply = if req.starts_with(b"GET /next ") {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{key_auth}",
                    key_auth.len()
                )
            } else {
                "HTTP/1.1 302 Found\r\nLocation: /next\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            };
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
            1
        })
    }

    /// A name with two addresses: the one that answered the first request
    /// stops listening after redirecting, and the other would serve the
    /// redirect's target. Validation stays on the first machine, so it
    /// fails, and the second is never asked.
    #[tokio::test]
    async fn redirects_stay_on_the_address_the_first_request_reached() {
        const KEY_AUTH: &str = "tok.thumbprint";
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let second = tokio::net::TcpListener::bind(("127.0.0.2", port))
            .await
            .unwrap();
        let served = [
            serve_once(first, KEY_AUTH).await,
            serve_once(second, KEY_AUTH).await,
        ];
        let dns = dns_answering(vec![
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(127, 0, 0, 2),
        ])
        .await;
        let v = Validator::new(ValidationSettings {
            http_port: port,
            tls_port: port,
            resolver: Some(dns),
            localhost_loopback: false,
            timeout: Duration::from_secs(3),
        })
        .unwrap();
        let target = Target {
            kind: "dns".into(),
            value: "two.internal".into(),
        };
        let e = v
            .validate(ChallengeType::Http01, &target, "tok", KEY_AUTH)
            .await
            .unwrap_err();
        assert!(e.detail.contains("cannot connect"), "{}", e.detail);
        let mut asked = 0;
        for s in served {
            s.abort();
            asked += s.await.unwrap_or(0);
        }
        assert_eq!(asked, 1, "only the first address was contacted");
    }

    #[test]
    fn link_local_and_unspecified_addresses_are_not_contacted() {
        for ip in [
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "fe80::1",
            "::",
            "::ffff:169.254.169.254",
        ] {
            assert!(!contactable(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "10.1.2.3", "192.168.0.1", "fd00::1", "::1"] {
            assert!(contactable(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn redirects_stay_on_the_name_and_the_validation_ports() {
        let f = |loc: &str| {
            follow(
                loc,
                "/.well-known/acme-challenge/t",
                "a.internal",
                false,
                PORTS,
            )
        };
        assert_eq!(f("/elsewhere?x=1"), hop(false, "/elsewhere?x=1"));
        // Relative references resolve against the path they answer, and
        // what a request line cannot hold is percent-encoded.
        assert_eq!(f("t2"), hop(false, "/.well-known/acme-challenge/t2"));
        assert_eq!(f("../x#frag"), hop(false, "/.well-known/x"));
        assert_eq!(f("/a b"), hop(false, "/a%20b"));
        assert_eq!(f("?q=1"), hop(false, "/.well-known/acme-challenge/t?q=1"));
        assert_eq!(f("https://a.internal:5001/p q"), hop(true, "/p%20q"));
        assert_eq!(f("http://a.internal:5002/p"), hop(false, "/p"));
        assert_eq!(f("HTTPS://A.internal:5001/p"), hop(true, "/p"));
        assert_eq!(f("https://a.internal:5001"), hop(true, "/"));
        assert_eq!(f("https://a.internal:5001?q"), hop(true, "/?q"));
        // A relative path keeps the scheme of the request it answers.
        assert_eq!(
            follow("/x", "/", "a.internal", true, PORTS),
            hop(true, "/x")
        );
        for bad in [
            "https://b.internal:5001/p",
            "https://a.internal/p",
            "http://a.internal:5001/p",
            "https://a.internal:5001@evil.internal/p",
            "//a.internal:5002/p",
            "ftp://a.internal/p",
            "mailto:x@a.internal",
            "",
        ] {
            assert!(f(bad).is_err(), "{bad}");
        }
        // On the standard ports the port may be left out.
        let std = |loc: &str| follow(loc, "/", "a.internal", false, (80, 443));
        assert_eq!(std("https://a.internal/p"), hop(true, "/p"));
        assert_eq!(std("http://a.internal:80/p"), hop(false, "/p"));
    }

    /// A self-signed certificate for `san` with `key`'s public half.
    fn self_signed(key: &rcgen::KeyPair, san: rcgen::SanType) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![san];
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&[7; 32])];
        params.self_signed(key).unwrap().der().to_vec()
    }

    #[test]
    fn an_alpn_certificate_names_the_identifier_in_its_own_type() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ip = Target {
            kind: "ip".into(),
            value: "127.0.0.1".into(),
        };
        let as_ip = self_signed(&key, rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        assert_eq!(check_alpn_cert(&as_ip, &ip, &[7; 32]), Ok(()));
        let as_dns = self_signed(
            &key,
            rcgen::SanType::DnsName("127.0.0.1".try_into().unwrap()),
        );
        let err = check_alpn_cert(&as_dns, &ip, &[7; 32]).unwrap_err();
        assert!(
            err.contains("ip:127.0.0.1") && err.contains("dns:127.0.0.1"),
            "{err}"
        );
        let dns = Target {
            kind: "dns".into(),
            value: "a.example".into(),
        };
        // An IPv4-mapped IPv6 address is another address than the IPv4 one.
        let mapped = self_signed(
            &key,
            rcgen::SanType::IpAddress("::ffff:127.0.0.1".parse().unwrap()),
        );
        assert!(check_alpn_cert(&mapped, &ip, &[7; 32]).is_err());
        let named = self_signed(
            &key,
            rcgen::SanType::DnsName("A.example".try_into().unwrap()),
        );
        assert_eq!(check_alpn_cert(&named, &dns, &[7; 32]), Ok(()));
        assert!(check_alpn_cert(&named, &dns, &[8; 32]).is_err());
    }

    #[test]
    fn handshake_signatures_from_every_nist_curve_verify() {
        use aws_lc_rs::signature::{self as sig, EcdsaKeyPair};
        use rustls::SignatureScheme as S;
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let curves: [(&rcgen::SignatureAlgorithm, &sig::EcdsaSigningAlgorithm, S); 3] = [
            (
                &rcgen::PKCS_ECDSA_P256_SHA256,
                &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
                S::ECDSA_NISTP256_SHA256,
            ),
            (
                &rcgen::PKCS_ECDSA_P384_SHA384,
                &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
                S::ECDSA_NISTP384_SHA384,
            ),
            (
                &rcgen::PKCS_ECDSA_P521_SHA512,
                &sig::ECDSA_P521_SHA512_ASN1_SIGNING,
                S::ECDSA_NISTP521_SHA512,
            ),
        ];
        for (i, (rc, signing, scheme)) in curves.iter().enumerate() {
            let key = rcgen::KeyPair::generate_for(rc).unwrap();
            let cert = self_signed(
                &key,
                rcgen::SanType::DnsName("a.example".try_into().unwrap()),
            );
            let pair = EcdsaKeyPair::from_pkcs8(signing, &key.serialize_der()).unwrap();
            let signature = pair.sign(&rng, b"handshake").unwrap().as_ref().to_vec();
            for tls13 in [false, true] {
                assert_eq!(
                    check_signature(b"handshake", &cert, *scheme, &signature, tls13),
                    Ok(()),
                    "{scheme:?}"
                );
            }
            // In TLS 1.3 another curve's scheme is refused.
            let other = curves[(i + 1) % 3].2;
            assert!(check_signature(b"handshake", &cert, other, &signature, true).is_err());
            // RSA PKCS#1 v1.5 has no place in TLS 1.3 whatever the key.
            assert!(
                check_signature(b"handshake", &cert, S::RSA_PKCS1_SHA256, &signature, true)
                    .unwrap_err()
                    .contains("TLS 1.3")
            );
        }
        assert!(
            SCHEMES
                .iter()
                .all(|s| !matches!(s, S::ML_DSA_44 | S::ML_DSA_65 | S::ML_DSA_87))
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let cert = self_signed(
            &key,
            rcgen::SanType::DnsName("a.example".try_into().unwrap()),
        );
        let sign = |alg: &'static sig::EcdsaSigningAlgorithm| {
            let pair = EcdsaKeyPair::from_pkcs8(alg, &key.serialize_der()).unwrap();
            pair.sign(&rng, b"handshake").unwrap().as_ref().to_vec()
        };
        let sha512 = sign(&sig::ECDSA_P521_SHA512_ASN1_SIGNING);
        assert_eq!(
            check_signature(b"handshake", &cert, S::ECDSA_NISTP521_SHA512, &sha512, true),
            Ok(())
        );
        assert!(
            check_signature(b"tampered", &cert, S::ECDSA_NISTP521_SHA512, &sha512, true).is_err()
        );
        // TLS 1.2 names only the hash: SHA-256 with a P-521 key is fine there,
        // and not in TLS 1.3, where the scheme names the curve too.
        let sha256 = sign(&sig::ECDSA_P521_SHA256_ASN1_SIGNING);
        assert_eq!(
            check_signature(
                b"handshake",
                &cert,
                S::ECDSA_NISTP256_SHA256,
                &sha256,
                false
            ),
            Ok(())
        );
        assert!(
            check_signature(b"handshake", &cert, S::ECDSA_NISTP256_SHA256, &sha256, true)
                .unwrap_err()
                .contains("TLS 1.3")
        );
    }
}
