//! The gRPC CSR API against the real server: a Python grpcio client generated
//! from proto/, a Rust tonic client with the refusals, and the renewal agent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_core::Clock as _;
use sigil_e2e::*;
use sigil_grpc::pb::certificate_authority_client::CertificateAuthorityClient;
use sigil_grpc::pb::rotation_notice::Kind;
use sigil_grpc::pb::{
    CertificateResponse, RenewRequest, RevokeRequest, SignRequest, TrustBundleRequest,
    WatchRotationRequest,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

struct Ca {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    server: Option<Server>,
    grpc: u16,
    config: String,
    roots: String,
}

impl Ca {
    fn start() -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().to_path_buf();
        let server = Server::start(&["--dev", "--data-dir", "data"], &work, &[]);
        let grpc = server.grpc_port.unwrap();
        let log = server.log_text();
        assert!(
            log.contains(&format!("grpc:              127.0.0.1:{grpc}")),
            "{log}"
        );
        let roots = served_root(server.port);
        std::fs::write(work.join("roots.pem"), &roots).unwrap();
        Ca {
            config: work.join("data/sigil.toml").display().to_string(),
            _tmp: tmp,
            work,
            server: Some(server),
            grpc,
            roots,
        }
    }

    /// Restarts the server after `edit` rewrites its config text.
    fn restart_with(&mut self, edit: impl FnOnce(String) -> String) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        let path = self.work.join("data/sigil.toml");
        let text = edit(std::fs::read_to_string(&path).unwrap());
        // A fresh port: the old one may have become some connection's
        // ephemeral port in the meantime.
        let old_addr = format!("addr = \"127.0.0.1:{}\"", self.grpc);
        assert!(text.contains(&old_addr), "{text}");
        self.grpc = free_port();
        let text = text.replace(&old_addr, &format!("addr = \"127.0.0.1:{}\"", self.grpc));
        std::fs::write(&path, text).unwrap();
        self.server = Some(Server::start(
            &["--config", &path.display().to_string()],
            &self.work,
            &[],
        ));
    }

    /// Serial of the certificate the gRPC listener presents now (via openssl).
    fn listener_serial(&self) -> String {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl s_client -connect 127.0.0.1:{} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial",
                self.grpc
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            text.starts_with("serial="),
            "no listener certificate: {text}"
        );
        text
    }

    fn token(&self, subject: &str, sans: &[&str]) -> String {
        let mut args = vec![
            "token",
            "create",
            "--config",
            &self.config,
            "--subject",
            subject,
        ];
        for s in sans {
            args.extend(["--san", s]);
        }
        ok(sigil(&args)).trim().to_string()
    }

    async fn channel(
        &self,
        identity: Option<(&str, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.roots))
            .domain_name("localhost");
        if let Some((chain, key)) = identity {
            tls = tls.identity(Identity::from_pem(chain, key));
        }
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.grpc))?
            .tls_config(tls)?
            .timeout(Duration::from_secs(30))
            .connect()
            .await
    }

    async fn client(&self, identity: Option<(&str, &str)>) -> CertificateAuthorityClient<Channel> {
        CertificateAuthorityClient::new(self.channel(identity).await.unwrap())
    }

    /// A first certificate for `name`, by a bootstrap token for `subject`:
    /// its key (PEM) and the CA's answer.
    async fn first_certificate(&self, subject: &str, name: &str) -> (String, CertificateResponse) {
        let token = self.token(subject, &[name]);
        self.sign_by_token(&token, name).await
    }

    /// A Sign for `name` with a fresh key, authenticated by `token`.
    async fn sign_by_token(&self, token: &str, name: &str) -> (String, CertificateResponse) {
        let (key, csr) = key_and_csr(&[name]);
        let cert = self
            .client(None)
            .await
            .sign(with_token(sign_req(csr), token))
            .await
            .unwrap()
            .into_inner();
        (key, cert)
    }

    /// Starts `sigil agent` for `NAME.internal` with a bootstrap token for
    /// NAME, writing to `out/` and logging to `agent.log` in the work dir.
    fn spawn_agent(&self, name: &str, extra: &[&str]) -> std::process::Child {
        let token_file = self.work.join("token");
        write_secret(
            &token_file,
            &self.token(name, &[&format!("{name}.internal")]),
        );
        let log_file = std::fs::File::create(self.work.join("agent.log")).unwrap();
        std::process::Command::new(sigil_bin())
            .args([
                "agent",
                "--server",
                &format!("localhost:{}", self.grpc),
                "--ca-bundle",
                &self.work.join("roots.pem").display().to_string(),
                "--token-file",
                &token_file.display().to_string(),
                "--out-dir",
                &self.work.join("out").display().to_string(),
            ])
            .args(extra)
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap()
    }

    /// A Sign by bootstrap token that must be refused: its status.
    async fn sign_fails(&self, csr: Vec<u8>, token: &str) -> tonic::Status {
        call_fails(
            self.client(None)
                .await
                .sign(with_token(sign_req(csr), token))
                .await,
        )
        .await
    }

    /// The whole rotation ceremony up to staging: a new intermediate key and
    /// CSR, signed by the dev root, installed as staged. Returns its PEM.
    fn stage_next_intermediate(&self) -> String {
        let data = self.work.join("data");
        let d = |n: &str| data.join(n).display().to_string();
        ok(sigil(&["intermediate", "rotate", "--config", &self.config]));
        ok(sigil(&[
            "root",
            "sign",
            "--dir",
            &d("DEV-ONLY-root"),
            "--csr",
            &d("intermediate-next.csr"),
            "--out",
            &d("next.crt"),
            "--passphrase-file",
            &d("DEV-ONLY-root/passphrase"),
        ]));
        ok(sigil(&[
            "intermediate",
            "install",
            "--config",
            &self.config,
            "--stage",
            "--cert",
            &d("next.crt"),
        ]));
        std::fs::read_to_string(data.join("next.crt")).unwrap()
    }

    fn audit(&self) -> String {
        ok(sigil(&[
            "audit",
            "list",
            "--config",
            &self.config,
            "--limit",
            "200",
        ]))
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

fn key_and_csr(sans: &[&str]) -> (String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    (key.serialize_pem(), csr)
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn sign_req(csr: Vec<u8>) -> SignRequest {
    SignRequest {
        csr,
        profile: String::new(),
        lifetime_seconds: 0,
    }
}

#[test]
fn python_grpcio_client_signs_renews_and_revokes() {
    let python = if have("python3") { "python3" } else { return };
    let probe = run(python, &["-c", "import grpc, grpc_tools"]);
    if !probe.status.success() {
        assert!(
            std::env::var("SIGIL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
            "grpcio/grpcio-tools missing; run ./scripts/test"
        );
        eprintln!("note: python grpcio not installed; skipping");
        return;
    }
    let ca = Ca::start();
    let token = ca.token("py-web", &["py.internal"]);
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_flow.py");
    let out = run(
        python,
        &[
            &script.display().to_string(),
            &proto.display().to_string(),
            &ca.work.display().to_string(),
            &format!("localhost:{}", ca.grpc),
            &ca.work.join("roots.pem").display().to_string(),
            &token,
            "py.internal",
        ],
    );
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(seen["bundle_has_root"], true, "{seen}");
    assert_eq!(seen["bundle_intermediates"], 1, "{seen}");
    assert_eq!(seen["sign_chain_len"], 2, "leaf + intermediate: {seen}");
    assert_eq!(seen["sign_renew_after_inside"], true, "{seen}");
    assert_eq!(seen["repeat_same_serial"], true, "{seen}");
    assert_eq!(seen["replay"], "UNAUTHENTICATED", "{seen}");
    assert_ne!(seen["renew_serial"], seen["sign_serial"], "{seen}");
    assert_eq!(seen["revoked_serial"], seen["renew_serial"], "{seen}");
    assert_eq!(seen["renew_after_revoke"], "UNAUTHENTICATED", "{seen}");
    assert!(
        seen["renew_after_revoke_detail"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{seen}"
    );
    // Python `cryptography` as a relying party: OCSP and the CRL see the
    // gRPC revocation (reason 4, superseded).
    assert_eq!(seen["ocsp"], "revoked", "{seen}");
    assert_eq!(seen["ocsp_reason"], "superseded", "{seen}");
    assert_eq!(seen["ocsp_responder_issued_by_issuer"], true, "{seen}");
    assert_eq!(seen["crl"], "listed", "{seen}");
    assert_eq!(seen["crl_signature_valid"], true, "{seen}");
    // openssl accepts what the Python client got, against the served root.
    if have("openssl") {
        let renewed = ca.work.join("py-renewed.pem");
        let blocks = pem_blocks(&std::fs::read_to_string(&renewed).unwrap());
        std::fs::write(ca.work.join("py-leaf.pem"), &blocks[0]).unwrap();
        std::fs::write(ca.work.join("py-int.pem"), blocks[1..].concat()).unwrap();
        let v = run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                &ca.work.join("roots.pem").display().to_string(),
                "-untrusted",
                &ca.work.join("py-int.pem").display().to_string(),
                &ca.work.join("py-leaf.pem").display().to_string(),
            ],
        );
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    }
    let audit = ca.audit();
    for kind in [
        "cert.issued",
        "cert.renewed",
        "cert.revoked",
        "token.repeated",
        "token.replayed",
        "grpc.auth_failed",
    ] {
        assert!(audit.contains(kind), "{kind} missing from audit:\n{audit}");
    }
    assert!(audit.contains("token:py-web"), "{audit}");
    assert!(audit.contains("mtls:py.internal"), "{audit}");
}

/// A CA of the dev data dir as an rcgen issuer: `NAME.key` (encrypted with
/// the passphrase in `pass_file`) and `NAME.crt` (PEM, also returned).
fn dev_ca_issuer(
    dir: &std::path::Path,
    name: &str,
    pass_file: &str,
) -> (rcgen::Issuer<'static, sigil_signer::SoftwareKey>, String) {
    let pass = sigil_signer::Passphrase::new(
        std::fs::read_to_string(dir.join(pass_file))
            .unwrap()
            .trim()
            .to_string(),
    );
    let key = sigil_signer::read_encrypted_key(&dir.join(format!("{name}.key")), &pass).unwrap();
    let pem = std::fs::read_to_string(dir.join(format!("{name}.crt"))).unwrap();
    let der = sigil_core::csr::decode_pem_or_der(pem.as_bytes()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&der.into(), key).unwrap();
    (issuer, pem)
}

/// A client certificate for `name` signed by the dev CA's own intermediate
/// (read from its data dir), with the given validity: lets the test present
/// an expired certificate that is otherwise genuine.
fn cert_from_dev_intermediate(
    ca: &Ca,
    name: &str,
    not_after_offset: time::Duration,
) -> (String, String) {
    let data = ca.work.join("data");
    let (issuer, int_pem) = dev_ca_issuer(&data, "intermediate", "intermediate.pass");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let now = sigil_core::SystemClock.now();
    p.not_before = now - time::Duration::hours(2);
    p.not_after = now + not_after_offset;
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer).unwrap();
    (format!("{}{int_pem}", cert.pem()), key.serialize_pem())
}

/// A client certificate for `name` from a look-alike intermediate: signed
/// by the dev root, with the dev intermediate's exact name but its own key,
/// as another deployment under the same root would have.
fn cert_from_lookalike_intermediate(ca: &Ca, name: &str) -> (String, String) {
    let (root, _) = dev_ca_issuer(&ca.work.join("data/DEV-ONLY-root"), "root", "passphrase");
    // The genuine intermediate's subject, copied attribute by attribute.
    let int_pem = std::fs::read_to_string(ca.work.join("data").join("intermediate.crt")).unwrap();
    let int_der = sigil_core::csr::decode_pem_or_der(int_pem.as_bytes()).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = sigil_core::dn::subject_of_certificate(&int_der).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.use_authority_key_identifier_extension = true;
    let int_key = rcgen::KeyPair::generate().unwrap();
    let lookalike = p.signed_by(&int_key, &root).unwrap();
    let issuer = rcgen::Issuer::new(p, int_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (
        format!("{}{}", cert.pem(), lookalike.pem()),
        key.serialize_pem(),
    )
}

/// A certificate from a CA that has nothing to do with Sigil, valid from
/// three hours ago for another hour (past two thirds of its lifetime, so
/// due for renewal).
fn cert_from_other_ca(name: &str) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_p.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_p, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let now = sigil_core::SystemClock.now();
    p.not_before = now - time::Duration::hours(3);
    p.not_after = now + time::Duration::hours(1);
    let cert = p.signed_by(&key, &issuer).unwrap();
    (
        format!("{}{}", cert.pem(), ca_cert.pem()),
        key.serialize_pem(),
    )
}

/// A token signed with the server's own token key but with chosen claims
/// (e.g. already expired), which `sigil token create` would never produce.
fn forged_token(ca: &Ca, claims: &sigil_grpc::tokens::Claims) -> String {
    use rcgen::SigningKey as _;
    let data = ca.work.join("data");
    let pass = sigil_signer::Passphrase::new(
        std::fs::read_to_string(data.join("intermediate.pass"))
            .unwrap()
            .trim()
            .to_string(),
    );
    let key = sigil_signer::read_encrypted_key(&data.join("token.key"), &pass).unwrap();
    let input = claims.signing_input("test").unwrap();
    sigil_grpc::tokens::assemble(&input, &key.sign(input.as_bytes()).unwrap())
}

async fn call_fails<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
) -> tonic::Status {
    r.expect_err("the call should have been refused")
}

/// The `sigil-refusal` metadata of a refusal, if any.
fn refusal(s: &tonic::Status) -> Option<&str> {
    s.metadata().get("sigil-refusal")?.to_str().ok()
}

/// The operator replaces a leaked token-signing key by removing it: the next
/// `sigil token create` makes a new key and its public half, and after a
/// restart the server accepts tokens of the new key only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_token_key_retires_the_old_tokens() {
    let mut ca = Ca::start();
    let leaked = ca.token("leaky", &["leaky.internal"]);
    let key = ca.work.join("data/token.key");
    assert!(key.exists(), "token key not where expected");
    std::fs::remove_file(&key).unwrap();
    // Distinct modification times even on coarse-grained filesystems.
    std::thread::sleep(Duration::from_millis(1100));
    let fresh = ca.token("leaky", &["leaky.internal"]);
    let mode = std::fs::metadata(&key).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    ca.restart_with(|t| t);
    let (csr_old, csr_new) = (
        key_and_csr(&["leaky.internal"]).1,
        key_and_csr(&["leaky.internal"]).1,
    );
    let s = ca.sign_fails(csr_old, &leaked).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let ok = ca
        .client(None)
        .await
        .sign(with_token(sign_req(csr_new), &fresh))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_client_flow_and_every_refusal() {
    let ca = Ca::start();

    // Trust bundle needs no client certificate.
    let bundle = ca
        .client(None)
        .await
        .get_trust_bundle(TrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.roots_pem.trim(), ca.roots.trim());
    // /roots.pem is the same bundle: roots, then intermediates.
    let port = ca.server.as_ref().unwrap().port;
    let served = String::from_utf8(http_get(port, "/roots.pem").unwrap().1).unwrap();
    assert_eq!(
        format!("{}{}", bundle.roots_pem, bundle.intermediates_pem).trim(),
        served.trim()
    );
    assert_eq!(bundle.active_issuer.len(), 32);

    // Server reflection lists the service.
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut r = ServerReflectionClient::new(ca.channel(None).await.unwrap());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer: {resp:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"sigil.v1.CertificateAuthority".to_string()),
            "{names:?}"
        );
    }

    // token -> Sign.
    let token = ca.token("web", &["web.internal"]);
    let (key1, csr1) = key_and_csr(&["web.internal"]);
    // Sent twice: the second time is a client whose reply was lost, and it
    // gets the same certificate; nothing new is issued.
    let mut replies = Vec::new();
    for _ in 0..2 {
        let reply = ca
            .client(None)
            .await
            .sign(with_token(sign_req(csr1.clone()), &token))
            .await
            .unwrap()
            .into_inner();
        replies.push(reply);
    }
    let (first, again) = (replies.remove(0), replies.remove(0));
    assert_eq!(first.chain_der.len(), 2);
    assert!(first.not_before < first.renew_after && first.renew_after < first.not_after);
    assert_eq!(again.serial, first.serial);
    assert_eq!(again.chain_pem, first.chain_pem);
    // Replayed token: another key.
    let (_, csr_replay) = key_and_csr(&["web.internal"]);
    let s = ca.sign_fails(csr_replay, &token).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("already used"), "{s:?}");

    // Renew over mTLS (same key), then with a new key.
    let mut as_first = ca.client(Some((&first.chain_pem, &key1))).await;
    let renewed = as_first
        .renew(RenewRequest { csr: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(renewed.serial, first.serial);
    let (key2, csr2) = key_and_csr(&["web.internal"]);
    let rekeyed = as_first
        .renew(RenewRequest { csr: csr2 })
        .await
        .unwrap()
        .into_inner();
    // Renewal may not change names.
    let (_, csr_other) = key_and_csr(&["db.internal"]);
    let s = call_fails(as_first.renew(RenewRequest { csr: csr_other }).await).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(refusal(&s), None, "the certificate itself is fine: {s:?}");

    // Revoking somebody else's certificate is refused; one's own works.
    let mut as_rekeyed = ca.client(Some((&rekeyed.chain_pem, &key2))).await;
    let s = call_fails(
        as_rekeyed
            .revoke(RevokeRequest {
                serial: first.serial.clone(),
                reason: 1,
            })
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = call_fails(
        as_rekeyed
            .revoke(RevokeRequest {
                serial: String::new(),
                reason: 7,
            })
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // A watcher for this certificate hears of its revocation at once.
    let mut watch = as_rekeyed
        .watch_rotation(WatchRotationRequest {
            serial: rekeyed.serial.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let current = watch.message().await.unwrap().unwrap();
    assert_eq!(current.kind(), Kind::Current);
    assert_eq!(current.active_issuer, bundle.active_issuer);
    as_rekeyed
        .revoke(RevokeRequest {
            serial: String::new(),
            reason: 1,
        })
        .await
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a notice within seconds")
        .unwrap()
        .unwrap();
    assert_eq!(notice.kind(), Kind::RenewNow, "{notice:?}");
    assert!(notice.message.contains(&rekeyed.serial), "{notice:?}");
    // Revoked client certificate: every call that uses it is refused.
    let mut revoked = ca.client(Some((&rekeyed.chain_pem, &key2))).await;
    let s = call_fails(revoked.renew(RenewRequest { csr: vec![] }).await).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("revoked"), "{s:?}");
    assert_eq!(refusal(&s), Some("certificate"), "{s:?}");
    let (_, csr3) = key_and_csr(&["web.internal"]);
    let s = call_fails(revoked.sign(sign_req(csr3)).await).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");

    // A token covering the certificate's names may revoke it; one that does
    // not cover them may not.
    let mut anon = ca.client(None).await;
    let other = ca.token("x", &["x.internal"]);
    let s = call_fails(
        anon.revoke(with_token(
            RevokeRequest {
                serial: renewed.serial.clone(),
                reason: 1,
            },
            &other,
        ))
        .await,
    )
    .await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let covering = ca.token("web", &["web.internal"]);
    anon.revoke(with_token(
        RevokeRequest {
            serial: renewed.serial.clone(),
            reason: 3,
        },
        &covering,
    ))
    .await
    .unwrap();

    // No client certificate and no token: refused, and audited as anonymous
    // with the caller's address. So is a malformed authorization.
    let s = call_fails(anon.renew(RenewRequest { csr: vec![] }).await).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let (_, csr4) = key_and_csr(&["web.internal"]);
    let s = call_fails(anon.sign(sign_req(csr4.clone())).await).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = call_fails(
        anon.revoke(RevokeRequest {
            serial: renewed.serial.clone(),
            reason: 1,
        })
        .await,
    )
    .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let mut basic = tonic::Request::new(sign_req(csr4));
    basic
        .metadata_mut()
        .insert("authorization", "Basic d2ViOndlYg==".parse().unwrap());
    let s = call_fails(anon.sign(basic).await).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let audit = ca.audit();
    for call in ["Sign", "Renew", "Revoke"] {
        assert!(
            audit.lines().any(|l| l.contains("grpc.auth_failed")
                && l.contains(" anonymous ")
                && l.contains(&format!("\"call\":\"{call}\""))
                && l.contains("\"peer\":\"127.0.0.1:")),
            "anonymous {call} not audited:\n{audit}"
        );
    }
    assert!(
        audit
            .lines()
            .any(|l| l.contains(" anonymous ") && l.contains("must be 'Bearer <token>'")),
        "{audit}"
    );

    // Token for other SANs.
    let t = ca.token("web2", &["web2.internal"]);
    let (_, csr5) = key_and_csr(&["other.internal"]);
    let s = call_fails(anon.sign(with_token(sign_req(csr5), &t)).await).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("other.internal"), "{s:?}");

    // Names the policy denies (the token covers them; the dev policy does not).
    let t = ca.token("ext", &["www.example.com"]);
    let (_, csr6) = key_and_csr(&["www.example.com"]);
    let s = call_fails(anon.sign(with_token(sign_req(csr6), &t)).await).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("policy"), "{s:?}");

    // Expired token, and a token with a bad signature.
    let now = sigil_core::SystemClock.now().unix_timestamp();
    let mut claims = sigil_grpc::tokens::Claims::new(
        "late",
        &["late.internal".to_string()],
        "expired-jti".into(),
        now - 3600,
        600,
    )
    .unwrap();
    let expired = forged_token(&ca, &claims);
    let (_, csr7) = key_and_csr(&["late.internal"]);
    let s = call_fails(
        anon.sign(with_token(sign_req(csr7.clone()), &expired))
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("expired"), "{s:?}");
    claims.exp = now + 600;
    let good = forged_token(&ca, &claims);
    let tampered = format!("{}A", &good[..good.len() - 1]);
    let tampered = if tampered == good {
        format!("{}B", &good[..good.len() - 1])
    } else {
        tampered
    };
    let s = call_fails(
        anon.sign(with_token(sign_req(csr7.clone()), &tampered))
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");

    // Bad and oversized CSRs.
    let t = ca.token("bad", &["bad.internal"]);
    let s = call_fails(
        anon.sign(with_token(sign_req(b"not a csr".to_vec()), &t))
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = call_fails(
        anon.sign(with_token(sign_req(vec![0x30; 20 * 1024]), &t))
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    // A message far beyond any CSR is not even decoded (tonic's code for
    // its message limit).
    let s = call_fails(
        anon.sign(with_token(sign_req(vec![0x30; 100 * 1024]), &t))
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("65536"), "{s:?}");
    // The credential is checked first: with a bad token, the same CSR is
    // an authentication failure.
    let s = call_fails(
        anon.sign(with_token(sign_req(vec![0x30; 20 * 1024]), "not.a.token"))
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    // A serial that is not one, with a token: refused and audited.
    let s = call_fails(
        anon.revoke(with_token(
            RevokeRequest {
                serial: "not-hex".into(),
                reason: 1,
            },
            &t,
        ))
        .await,
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // An expired certificate from our own intermediate: the TLS layer refuses it.
    let (chain, key) = cert_from_dev_intermediate(&ca, "old.internal", -time::Duration::hours(1));
    let refused = match ca.channel(Some((&chain, &key))).await {
        Err(_) => true,
        Ok(ch) => CertificateAuthorityClient::new(ch)
            .renew(RenewRequest { csr: vec![] })
            .await
            .is_err(),
    };
    assert!(refused, "an expired client certificate must be refused");
    // The same, still valid, is accepted by TLS but unknown to the CA's records.
    let (chain, key) = cert_from_dev_intermediate(&ca, "stray.internal", time::Duration::hours(1));
    let s = call_fails(
        ca.client(Some((&chain, &key)))
            .await
            .renew(RenewRequest { csr: vec![] })
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // A certificate from another intermediate under the same root, named
    // like this CA's: TLS accepts it, the CA does not.
    let (chain, key) = cert_from_lookalike_intermediate(&ca, "mimic.internal");
    let s = call_fails(
        ca.client(Some((&chain, &key)))
            .await
            .sign(sign_req(key_and_csr(&["mimic.internal"]).1))
            .await,
    )
    .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(
        s.message()
            .contains("not issued by one of this CA's intermediates"),
        "{s:?}"
    );

    // A certificate from another CA.
    let (chain, key) = cert_from_other_ca("web.internal");
    let refused = match ca.channel(Some((&chain, &key))).await {
        Err(_) => true,
        Ok(ch) => CertificateAuthorityClient::new(ch)
            .renew(RenewRequest { csr: vec![] })
            .await
            .is_err(),
    };
    assert!(refused, "a foreign client certificate must be refused");

    let audit = ca.audit();
    for kind in [
        "cert.denied",
        "token.replayed",
        "cert.renewal_denied",
        "grpc.auth_failed",
        "cert.revoke_denied",
        "cert.rejected",
        "grpc.refused",
    ] {
        assert!(audit.contains(kind), "{kind} missing from audit:\n{audit}");
    }
    // Each refusal names the caller: the bad CSR's token subject, the
    // certificate this CA has no record of.
    let line = |kind: &str, who: &str| audit.lines().any(|l| l.contains(kind) && l.contains(who));
    assert!(line("cert.rejected", "token:bad"), "{audit}");
    assert!(line("grpc.refused", "token:bad"), "{audit}");
    assert!(line("cert.renewal_denied", "stray.internal"), "{audit}");
    // The audit chain is intact after all of it (exit status 0).
    ok(sigil(&["audit", "verify", "--config", &ca.config]));
}

#[test]
fn agent_renews_short_lived_certificates_and_reloads() {
    let mut ca = Ca::start();
    // Short-lived listener certificate too, to see it renewed in place.
    ca.restart_with(|t| {
        assert!(t.contains("server_cert_lifetime = \"24h\""), "{t}");
        t.replace(
            "server_cert_lifetime = \"24h\"",
            "server_cert_lifetime = \"2m\"",
        )
    });
    let listener_before = have("openssl").then(|| ca.listener_serial());
    let out = ca.work.join("out");
    let reloads = ca.work.join("reloads.log");
    let metrics_port = free_port();
    let log = ca.work.join("agent.log");
    // A "service" that counts the SIGHUPs it gets, found by its PID file.
    let hups = ca.work.join("hups.log");
    let pid_file = ca.work.join("svc.pid");
    let mut service = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap 'echo hup >> {}' HUP; while :; do sleep 0.05; done",
            hups.display()
        ))
        .spawn()
        .unwrap();
    std::fs::write(&pid_file, format!("{}\n", service.id())).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the trap is set
    let mut agent = ca.spawn_agent(
        "agent",
        &[
            "--lifetime",
            "2m",
            "--reload-cmd",
            &format!("echo reloaded >> {}", reloads.display()),
            "--reload-signal",
            &format!("{}:HUP", pid_file.display()),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );

    // A reader that keeps loading the files the agent replaces: every read must
    // be a whole certificate (or key), never a partial write.
    let mut serials = std::collections::BTreeSet::new();
    let mut reads = 0u32;
    let mut combined_reads = 0u32;
    let mut set_reads = 0u32;
    let deadline = Instant::now() + Duration::from_secs(240);
    while serials.len() < 3 && Instant::now() < deadline {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!(
                "agent exited with {status}:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        if let (Ok(cert), Ok(key)) = (
            std::fs::read_to_string(out.join("cert.pem")),
            std::fs::read_to_string(out.join("key.pem")),
        ) {
            assert!(
                cert.starts_with("-----BEGIN CERTIFICATE-----")
                    && cert.trim_end().ends_with("-----END CERTIFICATE-----"),
                "partial cert: {cert}"
            );
            assert!(
                key.starts_with("-----BEGIN PRIVATE KEY-----")
                    && key.trim_end().ends_with("-----END PRIVATE KEY-----"),
                "partial key"
            );
            let der = sigil_core::csr::decode_pem_or_der(cert.as_bytes()).unwrap();
            let leaf = sigil_core::LeafInfo::from_der(&der).unwrap();
            assert_eq!(leaf.identifiers.len(), 1);
            serials.insert(leaf.serial.to_hex());
            reads += 1;
        }
        // combined.pem holds a key that matches its certificate.
        if let Ok(bundle) = std::fs::read_to_string(out.join("combined.pem")) {
            let at = bundle
                .find("-----BEGIN CERTIFICATE-----")
                .unwrap_or_else(|| panic!("bundle without a certificate: {bundle:.40}"));
            assert_same_key(&bundle[..at], &bundle[at..], "combined.pem");
            combined_reads += 1;
        }
        // The files change as one set: read through `..data` resolved once,
        // key.pem and cert.pem always match (a set is removed once the next
        // is in force, so a read may find it gone).
        if let Ok(set) = std::fs::read_link(out.join("..data")) {
            let set = out.join(set);
            if let (Ok(key), Ok(cert)) = (
                std::fs::read_to_string(set.join("key.pem")),
                std::fs::read_to_string(set.join("cert.pem")),
            ) {
                assert_same_key(&key, &cert, "one set");
                set_reads += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        serials.len() >= 3,
        "expected the first certificate and two renewals, saw {serials:?}:\n{text}"
    );
    assert!(
        reads > 100 && combined_reads > 100 && set_reads > 100,
        "the reader should have raced the writer many times ({reads}, {combined_reads}, {set_reads})"
    );
    for name in ["key.pem", "cert.pem", "chain.pem", "combined.pem"] {
        let link = std::fs::read_link(out.join(name)).unwrap();
        assert_eq!(link, Path::new("..data").join(name));
    }
    for secret in ["key.pem", "combined.pem"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(out.join(secret)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    let reload_count = std::fs::read_to_string(&reloads).unwrap().lines().count();
    assert!(
        reload_count >= 3,
        "reload command ran {reload_count} times:\n{text}"
    );
    assert!(text.matches("renewed: certificate").count() >= 2, "{text}");
    // The service named by the PID file was signalled after each install.
    let deadline = Instant::now() + Duration::from_secs(5);
    let count = || {
        std::fs::read_to_string(&hups)
            .unwrap_or_default()
            .lines()
            .count()
    };
    while count() < reload_count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = service.kill();
    let _ = service.wait();
    assert!(count() >= 3, "{} SIGHUPs:\n{text}", count());

    let (status, body) = http_get(metrics_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let body = String::from_utf8(body).unwrap();
    let expiry: i64 = body
        .lines()
        .find_map(|l| l.strip_prefix("sigil_agent_certificate_not_after_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    let now = sigil_core::SystemClock.now().unix_timestamp();
    assert!(
        expiry > now && expiry <= now + 130,
        "gauge {expiry} vs now {now}:\n{body}"
    );
    assert!(body.contains("sigil_agent_renewals_total "), "{body}");

    let _ = agent.kill();
    let _ = agent.wait();
    // The gRPC listener renewed its own certificate without a restart
    // (it renews 2/3 into 2m + 1m backdating, i.e. after about a minute).
    if let Some(before) = listener_before {
        let deadline = Instant::now() + Duration::from_secs(60);
        while ca.listener_serial() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_ne!(
            ca.listener_serial(),
            before,
            "listener certificate not renewed"
        );
        let log = ca.server.as_ref().unwrap().log_text();
        assert!(
            log.contains("renewed the gRPC listener certificate"),
            "{log}"
        );
    }
    // The certificate survives the agent: still valid files on disk.
    assert!(out.join("chain.pem").exists() && out.join("key.pem").exists());
}

/// The serial of the certificate in `dir/cert.pem`, if it holds one.
/// Panics unless the PEM key and the PEM certificate share a public key.
fn assert_same_key(key_pem: &str, cert_pem: &str, what: &str) {
    let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).unwrap();
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(),
        "{what}: a key and a certificate that do not match"
    );
}

fn serial_in(dir: &Path) -> Option<String> {
    let pem = std::fs::read_to_string(dir.join("cert.pem")).ok()?;
    let der = sigil_core::csr::decode_pem_or_der(pem.as_bytes()).ok()?;
    Some(sigil_core::LeafInfo::from_der(&der).ok()?.serial.to_hex())
}

/// The serial (hex) of the first certificate in `pem`.
fn serial_of(pem: &str) -> String {
    let der = sigil_core::csr::decode_pem_or_der(pem.as_bytes()).unwrap();
    sigil_core::LeafInfo::from_der(&der)
        .unwrap()
        .serial
        .to_hex()
}

/// The serial of the certificate in `dir/cert.pem` once there is one that is
/// not `not`; fails if `agent` exits first or none comes within 60 s.
fn agent_cert(
    dir: &Path,
    not: Option<&str>,
    agent: &mut std::process::Child,
    log: &Path,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!(
                "agent exited with {status}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Some(serial) = serial_in(dir)
            && Some(serial.as_str()) != not
        {
            return serial;
        }
        assert!(
            Instant::now() < deadline,
            "no new certificate:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A refusal that does not concern the certificate itself (here a policy
/// change denying its names for a while) is retried while the certificate is
/// valid: the agent neither stops nor spends its token after a few, and
/// renews once the policy allows it again.
#[test]
fn agent_rides_out_a_passing_policy_refusal() {
    let ca = Ca::start();
    let out = ca.work.join("out");
    let log = ca.work.join("agent.log");
    let mut agent = ca.spawn_agent("passing", &["--lifetime", "2m"]);
    let first = agent_cert(&out, None, &mut agent, &log);
    let freeze = ca.work.join("data/policies/freeze.toml");
    std::fs::write(
        &freeze,
        "[[rule]]\nname = \"freeze\"\neffect = \"deny\"\nrequesters = [\"*\"]\ndns = [\"passing.internal\"]\n",
    )
    .unwrap();
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // The renewal is due about a minute in. Three refusals in a row are
    // more than a blip.
    let deadline = Instant::now() + Duration::from_secs(110);
    while agent_log()
        .matches("renewal failed (PermissionDenied")
        .count()
        < 3
    {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!("agent exited with {status}:\n{}", agent_log());
        }
        assert!(Instant::now() < deadline, "no refusals:\n{}", agent_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(serial_in(&out), Some(first.clone()), "the files stay");
    std::fs::remove_file(&freeze).unwrap();
    let second = agent_cert(&out, Some(&first), &mut agent, &log);
    let text = agent_log();
    assert!(text.contains("renewed: certificate"), "{text}");
    assert!(!text.contains("refuses to renew"), "{text}");
    assert_ne!(second, first);
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A revoked certificate is not renewed by asking again and again: with a
/// new bootstrap token in `--token-file` the agent obtains a new certificate
/// by it; with no token it exits non-zero, says what to do, and leaves the
/// files in place.
#[test]
fn agent_replaces_a_revoked_certificate_by_token_or_says_what_to_do() {
    let ca = Ca::start();
    let out = ca.work.join("out");
    let log = ca.work.join("agent.log");
    let mut agent = ca.spawn_agent("fallen", &["--lifetime", "1h"]);
    let first = agent_cert(&out, None, &mut agent, &log);
    write_secret(
        &ca.work.join("token"),
        &ca.token("fallen", &["fallen.internal"]),
    );
    let revoke = |serial: &str| {
        ok(sigil(&[
            "revoke",
            "--config",
            &ca.config,
            "--serial",
            serial,
            "--reason",
            "superseded",
        ]))
    };
    revoke(&first);
    let second = agent_cert(&out, Some(&first), &mut agent, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("the CA refuses to renew certificate"),
        "{text}"
    );
    let _ = agent.kill();
    let _ = agent.wait();

    // No token this time: the agent starts from its files, hears that the
    // certificate was revoked, and stops instead of retrying.
    revoke(&second);
    let started = Instant::now();
    let out_arg = out.display().to_string();
    let done = sigil(&[
        "agent",
        "--server",
        &format!("localhost:{}", ca.grpc),
        "--ca-bundle",
        &ca.work.join("roots.pem").display().to_string(),
        "--out-dir",
        &out_arg,
    ]);
    let stderr = fails(done);
    assert!(started.elapsed() < Duration::from_secs(30), "{stderr}");
    assert!(
        stderr.contains("refuses to renew") && stderr.contains("--token-file"),
        "{stderr}"
    );
    assert_eq!(serial_in(&out), Some(second), "the files stay");
}

/// After a rotation the operator gives a deadline (`--renew-all-by`); a
/// running agent whose certificate would otherwise last a day renews onto
/// the new issuer before that deadline, at a moment of its own choosing.
#[test]
fn agent_renews_onto_a_new_issuer_before_the_operators_deadline() {
    renews_onto_the_new_issuer_by_the_deadline(false);
}

/// The same when the agent was not running during the rotation (restarted,
/// or its watch stream broke): on connecting it hears what it missed.
#[test]
fn an_agent_that_missed_the_rotation_still_meets_the_deadline() {
    renews_onto_the_new_issuer_by_the_deadline(true);
}

fn renews_onto_the_new_issuer_by_the_deadline(stopped_during_rotation: bool) {
    let ca = Ca::start();
    let out = ca.work.join("out");
    let log = ca.work.join("agent.log");
    let mut agent = ca.spawn_agent("edge", &["--lifetime", "24h"]);
    let chain = |agent: &mut std::process::Child| -> Option<Vec<String>> {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!(
                "agent exited with {status}:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        let text = std::fs::read_to_string(out.join("chain.pem")).ok()?;
        let blocks = pem_blocks(&text);
        (blocks.len() == 2).then_some(blocks)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(c) = chain(&mut agent) {
            break c;
        }
        assert!(Instant::now() < deadline, "no first certificate");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let the agent's rotation watch connect.
    std::thread::sleep(Duration::from_secs(2));
    if stopped_during_rotation {
        agent.kill().unwrap();
        agent.wait().unwrap();
    }

    let next = pem_blocks(&ca.stage_next_intermediate());
    let activated = Instant::now();
    ok(sigil(&[
        "intermediate",
        "activate",
        "--config",
        &ca.config,
        "--renew-all-by",
        "40s",
    ]));
    if stopped_during_rotation {
        // Restarted on the same files: it keeps its day-long certificate
        // from the replaced issuer and spends no token.
        std::thread::sleep(Duration::from_secs(2));
        agent = ca.spawn_agent("edge", &["--lifetime", "24h"]);
    }
    let deadline = activated + Duration::from_secs(75);
    let renewed = loop {
        if let Some(c) = chain(&mut agent)
            && c[0] != first[0]
        {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "not renewed by the deadline:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let waited = activated.elapsed();
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        renewed[1].trim(),
        next[0].trim(),
        "renewed onto the new issuer"
    );
    assert_ne!(first[1].trim(), next[0].trim());
    // The deadline was 40 s (the spread after a plain rotation is an hour);
    // allow for the notice's delivery and the renewal call on a busy host.
    assert!(waited < Duration::from_secs(55), "renewed after {waited:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("renewing early"), "{text}");
}

/// The CA stops answering (the process hangs: connections are accepted by
/// the kernel, nothing more) while the agent's renewal is due. The agent
/// must give up on each attempt, say so, keep the still-valid certificate
/// on disk, and renew as soon as the CA answers again, before expiry.
#[test]
fn agent_rides_out_a_hung_ca_and_renews_before_expiry() {
    let mut ca = Ca::start();
    let out = ca.work.join("out");
    let log = ca.work.join("agent.log");
    let metrics_port = free_port();
    let mut agent = ca.spawn_agent(
        "steady",
        &[
            "--lifetime",
            "2m",
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let alive = |agent: &mut std::process::Child| {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!("agent exited with {status}:\n{}", agent_log());
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        alive(&mut agent);
        if let Ok(c) = std::fs::read_to_string(out.join("cert.pem"))
            && !c.is_empty()
        {
            break c;
        }
        assert!(Instant::now() < deadline, "no first certificate");
        std::thread::sleep(Duration::from_millis(100));
    };
    let leaf = sigil_core::LeafInfo::from_der(
        &sigil_core::csr::decode_pem_or_der(first.as_bytes()).unwrap(),
    )
    .unwrap();
    let expires = Instant::now()
        + Duration::from_secs(
            u64::try_from(
                leaf.not_after.unix_timestamp() - sigil_core::SystemClock.now().unix_timestamp(),
            )
            .unwrap(),
        );
    let server_pid = ca.server.as_ref().unwrap().pid().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &server_pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");

    // The renewal is due about a minute in; each attempt must end in an
    // error the agent reports, not hang on the silent CA.
    let failed = loop {
        alive(&mut agent);
        let text = agent_log();
        if text.contains("renewal failed") {
            break text;
        }
        if Instant::now() + Duration::from_secs(15) > expires {
            signal("-CONT");
            let _ = agent.kill();
            panic!("no renewal failure reported while the CA hung:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(failed.contains("certificate still valid for"), "{failed}");
    assert_eq!(
        std::fs::read_to_string(out.join("cert.pem")).unwrap(),
        first,
        "the still-valid certificate must stay in place"
    );
    assert!(out.join("key.pem").exists() && out.join("chain.pem").exists());
    let (status, body) = http_get(metrics_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.lines()
            .any(|l| l.starts_with("sigil_agent_renewal_failures_total ") && !l.ends_with(" 0")),
        "{body}"
    );

    signal("-CONT");
    let renewed = loop {
        alive(&mut agent);
        let cert = std::fs::read_to_string(out.join("cert.pem")).unwrap();
        if cert != first {
            break cert;
        }
        assert!(
            Instant::now() < expires,
            "the certificate expired before the agent renewed it:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let next = sigil_core::LeafInfo::from_der(
        &sigil_core::csr::decode_pem_or_der(renewed.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(next.identifiers, leaf.identifiers);
    assert!(next.not_after > leaf.not_after);
    assert!(
        agent_log().contains("renewed: certificate"),
        "{}",
        agent_log()
    );

    // The server stops on SIGTERM although the agent's rotation watch is
    // open (`stop` fails if it does not exit within 20 s), and the agent,
    // whose certificate is still valid, keeps running.
    std::thread::sleep(Duration::from_secs(2));
    ca.server.take().unwrap().stop();
    std::thread::sleep(Duration::from_secs(1));
    alive(&mut agent);
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn agent_fails_clearly_without_a_server_or_with_a_bad_token() {
    let ca = Ca::start();
    let out = ca.work.join("out");
    // Not a JWT at all: refused before contacting the server.
    let garbage = ca.work.join("garbage-token");
    write_secret(&garbage, "not-a-token");
    // A well-formed token whose signature is not the CA's: refused by the server.
    let real = ca.token("a", &["a.internal"]);
    let (signed, sig) = real.rsplit_once('.').unwrap();
    let other_sig = match sig.strip_prefix('A') {
        Some(rest) => format!("B{rest}"),
        None => format!("A{}", sig.get(1..).unwrap()),
    };
    let bad = ca.work.join("bad-token");
    write_secret(&bad, &format!("{signed}.{other_sig}"));
    let args = |server: String, token: &Path| {
        vec![
            "agent".to_string(),
            "--server".into(),
            server,
            "--ca-bundle".into(),
            ca.work.join("roots.pem").display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--out-dir".into(),
            out.display().to_string(),
        ]
    };
    let a = args(format!("localhost:{}", ca.grpc), &garbage);
    let e = fails(sigil(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(e.contains("not a JWT"), "{e}");
    let a = args(format!("localhost:{}", ca.grpc), &bad);
    let e = fails(sigil(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(
        e.contains("with --token-file failed") && e.contains("Unauthenticated"),
        "{e}"
    );
    assert!(e.contains("signature"), "{e}");
    let good = ca.work.join("good-token");
    write_secret(&good, &ca.token("a", &["a.internal"]));
    let a = args(format!("localhost:{}", free_port()), &good);
    let e = fails(sigil(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(e.contains("cannot reach the CA"), "{e}");
    assert!(!out.join("cert.pem").exists());
}

/// A certificate the CA refuses in the TLS handshake (here: not from it;
/// in practice one from an intermediate retired while its host was off, or
/// expired by the CA's clock) is a refusal of that certificate, as when the
/// CA refuses it in its answer: the agent turns to its token, or without
/// one stops and says what to do, instead of retrying until it expires.
#[test]
fn agent_takes_a_handshake_refusal_as_a_refusal_of_its_certificate() {
    let ca = Ca::start();
    let out = ca.work.join("out");
    let (chain, key) = cert_from_other_ca("drifted.internal");
    let (cert_file, key_file) = (ca.work.join("seed.crt"), ca.work.join("seed.key"));
    std::fs::write(&cert_file, &chain).unwrap();
    write_secret(&key_file, &key);
    let foreign = serial_of(&chain);
    let token_file = ca.work.join("token");
    let args = |token: bool| {
        let mut a = vec![
            "agent".to_string(),
            "--once".into(),
            "--server".into(),
            format!("localhost:{}", ca.grpc),
            "--ca-bundle".into(),
            ca.work.join("roots.pem").display().to_string(),
            "--out-dir".into(),
            out.display().to_string(),
        ];
        // Seeded the first time; the second run starts from what the
        // first installed in --out-dir.
        if token {
            a.extend(["--token-file".into(), token_file.display().to_string()]);
        } else {
            a.extend(["--cert".into(), cert_file.display().to_string()]);
            a.extend(["--key".into(), key_file.display().to_string()]);
        }
        a
    };
    let started = Instant::now();
    let a = args(false);
    let e = fails(sigil(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(started.elapsed() < Duration::from_secs(30), "{e}");
    assert!(
        e.contains("refuses to renew") && e.contains("TLS handshake") && e.contains("--token-file"),
        "{e}"
    );
    assert_eq!(serial_in(&out), Some(foreign.clone()), "the files stay");

    write_secret(&token_file, &ca.token("drifted", &["drifted.internal"]));
    let a = args(true);
    let o = ok(sigil(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let now = serial_in(&out).unwrap();
    assert_ne!(now, foreign, "{o}");
    assert!(ca.audit().contains(&now), "issued by this CA: {now}");
}

/// The first Sign's reply was lost after the CA spent the token, and the
/// agent process died: restarted, the agent finds its pending key, sends the
/// same request again and installs the certificate the token was spent on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_gets_the_certificate_its_lost_reply_carried() {
    let ca = Ca::start();
    let token = ca.token("lost", &["lost.internal"]);
    let out = ca.work.join("out-lost");
    std::fs::create_dir_all(&out).unwrap();
    // What the first run left: its pending key, and a Sign the CA committed.
    let (key, spent) = ca.sign_by_token(&token, "lost.internal").await;
    write_secret(&out.join("key.pem.pending"), &key);

    let token_file = ca.work.join("lost-token");
    write_secret(&token_file, &token);
    let grpc = format!("localhost:{}", ca.grpc);
    let bundle = ca.work.join("roots.pem").display().to_string();
    let out_dir = out.display().to_string();
    let agent_once = |extra: &[&str]| {
        let mut args = vec![
            "agent",
            "--server",
            &grpc,
            "--ca-bundle",
            &bundle,
            "--out-dir",
            &out_dir,
            "--once",
        ];
        args.extend_from_slice(extra);
        ok(sigil(&args))
    };
    let token_path = token_file.display().to_string();
    let said = agent_once(&["--token-file", &token_path]);
    assert!(said.contains(&spent.serial), "{said}");
    let chain = std::fs::read_to_string(out.join("chain.pem")).unwrap();
    assert_eq!(chain, spent.chain_pem);
    assert_eq!(std::fs::read_to_string(out.join("key.pem")).unwrap(), key);
    assert!(
        !out.join("key.pem.pending").exists(),
        "the pending key is removed once installed"
    );
    let audit = ok(sigil(&[
        "audit", "list", "--config", &ca.config, "--limit", "20",
    ]));
    assert!(audit.contains("token.repeated"), "{audit}");

    // A pending key left by a crash right after its install is dropped on
    // the next start: the installed pair supersedes it.
    write_secret(&out.join("key.pem.pending"), &key);
    let again = agent_once(&[]);
    assert!(again.contains(&spent.serial), "{again}");
    assert!(!out.join("key.pem.pending").exists());
    // Another one (a replacement for a revoked certificate, cut short after
    // the CA may have spent its token) is kept for the next attempt.
    let other = key_and_csr(&["x.internal"]).0;
    write_secret(&out.join("key.pem.pending"), &other);
    agent_once(&[]);
    assert_eq!(
        std::fs::read_to_string(out.join("key.pem.pending")).unwrap(),
        other
    );
}

/// Reload hooks that fail stay owed: the agent runs them again (every 30 s
/// while it waits, and at its next start) until they succeed, so a service
/// that missed a reload does not serve the previous certificate until it
/// expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reload_hooks_run_again_at_the_next_start() {
    let ca = Ca::start();
    let token_file = ca.work.join("hooked-token");
    write_secret(&token_file, &ca.token("hooked", &["hooked.internal"]));
    let out = ca.work.join("out-hooked");
    let ready = ca.work.join("service-ready");
    let runs = ca.work.join("hook-runs");
    let cmd = format!(
        "echo run >> {}; test -e {}",
        runs.display(),
        ready.display()
    );
    let grpc = format!("localhost:{}", ca.grpc);
    let bundle = ca.work.join("roots.pem").display().to_string();
    let (token_arg, out_arg) = (token_file.display().to_string(), out.display().to_string());
    let once = || {
        sigil(&[
            "agent",
            "--server",
            &grpc,
            "--ca-bundle",
            &bundle,
            "--token-file",
            &token_arg,
            "--out-dir",
            &out_arg,
            "--reload-cmd",
            &cmd,
            "--once",
        ])
    };
    let hook_runs = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // The files are written, but a run from cron must see that the
    // service did not reload: status 3.
    let first = once();
    assert_eq!(first.status.code(), Some(3), "{first:?}");
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(said.contains("reload hooks failed"), "{said}");
    assert!(out.join("cert.pem").exists());
    assert_eq!(hook_runs(), 1);
    assert!(out.join(".reload-pending").exists(), "the reload is owed");
    // The service is back; the next start (nothing due) runs the hook.
    std::fs::write(&ready, "").unwrap();
    ok(once());
    assert_eq!(hook_runs(), 2);
    assert!(!out.join(".reload-pending").exists());
    // Nothing owed: no hook.
    ok(once());
    assert_eq!(hook_runs(), 2);
}

/// `--cert`/`--key` seed the agent: `--once` installs that pair into
/// `--out-dir` as it is, and, once the certificate is due, renews it (from
/// the installed files, which win over the seed from then on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_once_installs_a_seeded_pair_and_renews_it_when_due() {
    let ca = Ca::start();
    let token = ca.token("seed", &["seed.internal"]);
    let (key, csr) = key_and_csr(&["seed.internal"]);
    let mut req = sign_req(csr);
    req.lifetime_seconds = 60;
    let seeded = ca
        .client(None)
        .await
        .sign(with_token(req, &token))
        .await
        .unwrap()
        .into_inner();
    let (cert_file, key_file) = (ca.work.join("seed-chain.pem"), ca.work.join("seed-key.pem"));
    std::fs::write(&cert_file, &seeded.chain_pem).unwrap();
    write_secret(&key_file, &key);
    let out = ca.work.join("out-seed");
    let grpc = format!("localhost:{}", ca.grpc);
    let bundle = ca.work.join("roots.pem").display().to_string();
    let (cert_arg, key_arg, out_arg) = (
        cert_file.display().to_string(),
        key_file.display().to_string(),
        out.display().to_string(),
    );
    let once = || {
        ok(sigil(&[
            "agent",
            "--server",
            &grpc,
            "--ca-bundle",
            &bundle,
            "--cert",
            &cert_arg,
            "--key",
            &key_arg,
            "--out-dir",
            &out_arg,
            "--once",
        ]))
    };
    let first = once();
    assert!(!first.contains("renewed:"), "not due yet: {first}");
    assert_eq!(
        std::fs::read_to_string(out.join("chain.pem")).unwrap(),
        seeded.chain_pem
    );
    assert_eq!(std::fs::read_to_string(out.join("key.pem")).unwrap(), key);
    assert_eq!(serial_in(&out).as_deref(), Some(seeded.serial.as_str()));
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    // Due two thirds into its life: 20 s from now (60 s backdated, 1 min ahead).
    let now = sigil_core::SystemClock.now().unix_timestamp();
    let wait = u64::try_from(seeded.renew_after + 1 - now).unwrap_or(0);
    assert!(
        wait <= 25,
        "renew_after {} vs now {now}",
        seeded.renew_after
    );
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let second = once();
    assert!(second.contains("renewed: certificate"), "{second}");
    let renewed = serial_in(&out).unwrap();
    assert_ne!(renewed, seeded.serial);
    assert!(second.contains(&renewed), "{second}");
    // The installed key belongs to the installed certificate.
    let chain = std::fs::read_to_string(out.join("chain.pem")).unwrap();
    let leaf = sigil_core::LeafInfo::from_der(
        &sigil_core::csr::decode_pem_or_der(chain.as_bytes()).unwrap(),
    )
    .unwrap();
    let installed_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(out.join("key.pem")).unwrap()).unwrap();
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&installed_key),
        leaf.public_key.spki_der()
    );
    let combined = std::fs::read_to_string(out.join("combined.pem")).unwrap();
    assert_eq!(
        combined,
        format!(
            "{}{chain}",
            std::fs::read_to_string(out.join("key.pem")).unwrap()
        )
    );
    // An out-dir from before combined.pem: the next start writes it.
    std::fs::remove_file(out.join("combined.pem")).unwrap();
    let third = once();
    assert!(
        !third.contains("renewed:"),
        "the new certificate is not due: {third}"
    );
    assert_eq!(serial_in(&out).as_deref(), Some(renewed.as_str()));
    assert_eq!(
        std::fs::read_to_string(out.join("combined.pem")).unwrap(),
        combined
    );
}

/// Sign with a client certificate instead of a token: the requester is the
/// certificate's identity (`mtls:NAME`), so the policy decides by that name; a
/// revoked client certificate is no credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_with_a_client_certificate_is_decided_by_its_identity() {
    let ca = Ca::start();
    let (gw_key, gw) = ca.first_certificate("gw", "gw.internal").await;
    let (db_key, db) = ca.first_certificate("db", "db.internal").await;

    // Only the gateway's identity may have names under .mesh.example.
    std::fs::write(
        ca.work.join("data/policies/mesh.toml"),
        "[[rule]]\nname = \"gateway-mesh\"\neffect = \"allow\"\nrequesters = [\"mtls:gw.internal\"]\ndns = [\".mesh.example\"]\n",
    )
    .unwrap();
    let mut as_gw = ca.client(Some((&gw.chain_pem, &gw_key))).await;
    let (_, mesh_csr) = key_and_csr(&["api.mesh.example"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let issued = loop {
        match as_gw.sign(sign_req(mesh_csr.clone())).await {
            Ok(r) => break r.into_inner(),
            Err(s) => {
                assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
                assert!(Instant::now() < deadline, "policy not loaded: {s:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let leaf = sigil_core::LeafInfo::from_der(&issued.chain_der[0]).unwrap();
    assert_eq!(leaf.identity().as_deref(), Some("api.mesh.example"));

    // Another client's identity, and a token, are not the gateway.
    let mut as_db = ca.client(Some((&db.chain_pem, &db_key))).await;
    let s = call_fails(as_db.sign(sign_req(mesh_csr.clone())).await).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("api.mesh.example"), "{s:?}");
    let token = ca.token("gw.internal", &["api.mesh.example"]);
    let s = ca.sign_fails(mesh_csr.clone(), &token).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // The issuance and the refusal are audited under the mTLS identities.
    let audit = ca.audit();
    let line = |kind: &str, who: &str| {
        audit
            .lines()
            .any(|l| l.contains(kind) && l.contains(who) && l.contains("api.mesh.example"))
    };
    assert!(line("cert.issued", "mtls:gw.internal"), "{audit}");
    assert!(line("cert.denied", "mtls:db.internal"), "{audit}");

    // Once the gateway's certificate is revoked, it signs nothing.
    ok(sigil(&[
        "revoke",
        "--config",
        &ca.config,
        "--serial",
        &gw.serial,
        "--reason",
        "key-compromise",
    ]));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut as_gw = ca.client(Some((&gw.chain_pem, &gw_key))).await;
        match as_gw.sign(sign_req(mesh_csr.clone())).await {
            Err(s) if s.code() == Code::Unauthenticated => {
                assert!(s.message().contains("revoked"), "{s:?}");
                break;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "revoked certificate still signs: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }

    // A certificate with only an IP address has no identity for the policy:
    // it cannot Sign, but renews and revokes itself like any other.
    let (ip_key, ip_cert) = ca.first_certificate("ipsvc", "127.0.0.9").await;
    let ip_leaf = sigil_core::LeafInfo::from_der(&ip_cert.chain_der[0]).unwrap();
    assert_eq!(ip_leaf.identity(), None, "{:?}", ip_leaf.identifiers);
    let mut as_ip = ca.client(Some((&ip_cert.chain_pem, &ip_key))).await;
    let s = call_fails(as_ip.sign(sign_req(key_and_csr(&["127.0.0.10"]).1)).await).await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("no SPIFFE URI or DNS SAN"), "{s:?}");
    let renewed = as_ip
        .renew(RenewRequest { csr: vec![] })
        .await
        .unwrap_or_else(|s| panic!("an IP-only certificate must renew: {s:?}"))
        .into_inner();
    assert_ne!(renewed.serial, ip_cert.serial);
    as_ip
        .revoke(RevokeRequest {
            serial: String::new(),
            reason: 0,
        })
        .await
        .unwrap_or_else(|s| panic!("an IP-only certificate must revoke itself: {s:?}"));
}

/// Anyone who reaches the port can send bad credentials: each is refused,
/// but only a minute's budget of them per claimed caller reaches the audit
/// table; the rest are counted in a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_audited_within_a_budget() {
    let ca = Ca::start();
    let mut client = ca.client(None).await;
    let (_, csr) = key_and_csr(&["flood.internal"]);
    let budget = sigil_grpc::REFUSAL_AUDITS_PER_MINUTE as usize;
    for _ in 0..budget + 15 {
        let s = call_fails(
            client
                .sign(with_token(sign_req(csr.clone()), "not-a-token"))
                .await,
        )
        .await;
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    }
    let audit = ca.audit();
    let audited = audit
        .lines()
        .filter(|l| l.contains("grpc.auth_failed"))
        .count();
    assert_eq!(audited, budget, "{audit}");
    let port = ca.server.as_ref().unwrap().port;
    let metrics = String::from_utf8(http_get(port, "/metrics").unwrap().1).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("sigil_grpc_refusals_unaudited_total{kind=\"grpc.auth_failed\"} 15")),
        "{metrics}"
    );
    // A caller with its own identity still has its own budget.
    let token = ca.token("web", &["web.internal"]);
    let (_, csr) = key_and_csr(&["web.internal"]);
    let mut req = sign_req(csr);
    req.profile = "nonsense".into();
    let s = call_fails(client.sign(with_token(req, &token)).await).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let audit = ca.audit();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("grpc.refused") && l.contains("token:web")),
        "{audit}"
    );
    // Revocations asked with a (valid, perhaps spent) token, each refused
    // and audited by the authority (no such certificate): a minute's budget
    // per token subject, then ResourceExhausted, unaudited.
    let revoker = ca.token("revoker", &["rev.internal"]);
    let mut codes = Vec::new();
    for i in 0..budget + 5 {
        let s = call_fails(
            client
                .revoke(with_token(
                    RevokeRequest {
                        serial: format!("{:x}", 0xdead_0000_u64 + i as u64),
                        reason: 0,
                    },
                    &revoker,
                ))
                .await,
        )
        .await;
        codes.push(s.code());
    }
    assert_eq!(refused_then_exhausted(&codes, Code::NotFound), (budget, 5));
    assert_eq!(
        audit_lines(&ca, "cert.revoke_denied", "token:revoker"),
        budget
    );

    // A certificate holder revoking what it may not (another certificate):
    // the same budget, audited as a refusal of that serial.
    let (key, mine) = ca.first_certificate("holder", "holder.internal").await;
    let mut holder = ca.client(Some((&mine.chain_pem, &key))).await;
    let mut codes = Vec::new();
    for _ in 0..budget + 5 {
        let s = call_fails(
            holder
                .revoke(RevokeRequest {
                    serial: "dead0001".into(),
                    reason: 0,
                })
                .await,
        )
        .await;
        codes.push(s.code());
    }
    assert_eq!(
        refused_then_exhausted(&codes, Code::PermissionDenied),
        (budget, 5)
    );
    assert_eq!(
        audit_lines(&ca, "grpc.refused", "mtls:holder.internal"),
        budget
    );
}

/// How many of `codes` are `refused` and how many ResourceExhausted (any
/// other code fails the test).
fn refused_then_exhausted(codes: &[Code], refused: Code) -> (usize, usize) {
    for c in codes {
        assert!(*c == refused || *c == Code::ResourceExhausted, "{c:?}");
    }
    let n = codes.iter().filter(|c| **c == refused).count();
    (n, codes.len() - n)
}

/// Audit lines of `kind` naming `actor`.
fn audit_lines(ca: &Ca, kind: &str, actor: &str) -> usize {
    ca.audit()
        .lines()
        .filter(|l| l.contains(kind) && l.contains(actor))
        .count()
}

/// Policies reload on file change and on SIGHUP, with no restart and no
/// dropped connection; a broken policy is refused and the old one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reloads_without_restart_and_refuses_a_broken_file() {
    let ca = Ca::start();
    let server = ca.server.as_ref().unwrap();
    let mut client = ca.client(None).await;
    let (_, csr) = key_and_csr(&["api.corp.example"]);
    let token = ca.token("corp-api", &["api.corp.example"]);
    let s = call_fails(client.sign(with_token(sign_req(csr.clone()), &token)).await).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // A new policy file: picked up within seconds, on the same connection.
    let policies = ca.work.join("data/policies");
    std::fs::write(
        policies.join("corp.toml"),
        "[[rule]]\nname = \"corp\"\neffect = \"allow\"\nrequesters = [\"*\"]\ndns = [\".corp.example\"]\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let issued = loop {
        let token = ca.token("corp-api", &["api.corp.example"]);
        match client.sign(with_token(sign_req(csr.clone()), &token)).await {
            Ok(r) => break r.into_inner(),
            Err(s) => {
                assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
                assert!(Instant::now() < deadline, "policy not reloaded: {s:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert!(issued.chain_pem.contains("BEGIN CERTIFICATE"));

    // A broken file is refused and audited; the policy in force stays.
    std::fs::write(policies.join("broken.toml"), "[[rule]]\nname = \n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ca.audit().contains("policy.reload_failed") {
        assert!(Instant::now() < deadline, "refusal not audited");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let token = ca.token("corp-api", &["api.corp.example"]);
    client
        .sign(with_token(sign_req(csr.clone()), &token))
        .await
        .expect("the previous policy stays in force");

    // SIGHUP: reloads (now without the corp rule) and the server lives on.
    std::fs::remove_file(policies.join("broken.toml")).unwrap();
    std::fs::remove_file(policies.join("corp.toml")).unwrap();
    let hup = run("kill", &["-HUP", &server.pid().to_string()]);
    assert!(hup.status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let token = ca.token("corp-api", &["api.corp.example"]);
        match client.sign(with_token(sign_req(csr.clone()), &token)).await {
            Err(s) if s.code() == Code::PermissionDenied => break,
            other => {
                assert!(Instant::now() < deadline, "still allowed: {other:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    assert_eq!(http_get(server.port, "/healthz").unwrap().0, 200);
    let audit = ca.audit();
    assert!(audit.contains("policy.reloaded"), "{audit}");
    assert!(server.log_text().contains("policy reloaded"));
}

/// A rotation reaches watchers: ISSUER_ROTATED with the new issuer, and
/// RENEW_NOW when the operator asked for renewal onto it; the trust bundle
/// carries both issuers from staging on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_announced_to_watchers_and_bundle() {
    let ca = Ca::start();
    let mut client = ca.client(None).await;
    let before = client
        .get_trust_bundle(TrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pem_blocks(&before.intermediates_pem).len(), 1);
    let mut watch = client
        .watch_rotation(WatchRotationRequest {
            serial: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let current = watch.message().await.unwrap().unwrap();
    assert_eq!(current.kind(), Kind::Current);
    assert_eq!(current.active_issuer, before.active_issuer);

    ca.stage_next_intermediate();
    let staged = client
        .get_trust_bundle(TrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pem_blocks(&staged.intermediates_pem).len(), 2, "{staged:?}");
    assert_eq!(
        staged.active_issuer, before.active_issuer,
        "staged is not active"
    );
    ok(sigil(&[
        "intermediate",
        "activate",
        "--config",
        &ca.config,
        "--renew-all-by",
        "2h",
    ]));
    let rotated = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a notice within seconds")
        .unwrap()
        .unwrap();
    assert_eq!(rotated.kind(), Kind::IssuerRotated, "{rotated:?}");
    assert_ne!(rotated.active_issuer, before.active_issuer);
    let renew = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a renewal notice")
        .unwrap()
        .unwrap();
    assert_eq!(renew.kind(), Kind::RenewNow, "{renew:?}");
    assert!(renew.renew_issued_before > 0, "{renew:?}");
    // The operator's deadline travels with it, so clients spread out.
    let deadline = renew.renew_issued_before + 2 * 3600;
    assert!(
        (renew.renew_by - deadline).abs() <= 60,
        "renew_by {} vs about {deadline}",
        renew.renew_by
    );
    let after = client
        .get_trust_bundle(TrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.active_issuer, rotated.active_issuer);
    assert_eq!(pem_blocks(&after.intermediates_pem).len(), 2, "old and new");
}

/// A revocation made outside the gRPC API (here with the CLI) reaches the
/// certificate holder's rotation watch within seconds, also when the watcher
/// names its serial the way OpenSSL prints it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_by_the_cli_reaches_the_holders_watch() {
    let ca = Ca::start();
    let (key, cert) = ca.first_certificate("cli-rev", "cli-rev.internal").await;
    let openssl_form = cert
        .serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let mut watch = ca
        .client(Some((&cert.chain_pem, &key)))
        .await
        .watch_rotation(WatchRotationRequest {
            serial: openssl_form,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().kind(),
        Kind::Current
    );
    ok(sigil(&[
        "revoke",
        "--config",
        &ca.config,
        "--serial",
        &cert.serial,
        "--reason",
        "superseded",
    ]));
    let notice = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a notice within seconds")
        .unwrap()
        .unwrap();
    assert_eq!(notice.kind(), Kind::RenewNow, "{notice:?}");
    assert!(notice.message.contains(&cert.serial), "{notice:?}");
    assert_eq!(notice.renew_by, 0, "at once: {notice:?}");
}

/// A request id given by the caller (or made by the server) comes back in
/// the response and is recorded in the audit row the request wrote; the
/// JSON log of a server at debug level never shows a passphrase, a
/// bootstrap token, an EAB HMAC key or a private key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_reach_the_audit_log_and_secrets_never_reach_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().to_path_buf();
    let server = Server::start(
        &["--dev", "--data-dir", "data", "--log-json"],
        &work,
        &[("SIGIL_LOG", "debug")],
    );
    let roots = served_root(server.port);
    let ca = Ca {
        config: work.join("data/sigil.toml").display().to_string(),
        grpc: server.grpc_port.unwrap(),
        _tmp: tmp,
        work: work.clone(),
        server: Some(server),
        roots,
    };
    let mut client = ca.client(None).await;
    let token = ca.token("rid", &["rid.internal"]);
    let (key_pem, csr) = key_and_csr(&["rid.internal"]);
    let mut req = with_token(sign_req(csr), &token);
    req.metadata_mut()
        .insert("x-request-id", "trace-0042".parse().unwrap());
    let rsp = client.sign(req).await.unwrap();
    assert_eq!(rsp.metadata().get("x-request-id").unwrap(), "trace-0042");
    let issued = rsp.into_inner();
    let audit = ca.audit();
    let row = audit
        .lines()
        .find(|l| l.contains("trace-0042"))
        .unwrap_or_else(|| panic!("no audit row names the request:\n{audit}"));
    assert!(row.contains("cert.issued"), "{row}");
    // Without a header the server makes one up and still echoes it.
    let rsp = client
        .get_trust_bundle(TrustBundleRequest {})
        .await
        .unwrap();
    assert!(rsp.metadata().get("x-request-id").is_some());
    // A replayed token: refused, and the refusal is logged, not the token.
    let (_, csr2) = key_and_csr(&["rid.internal"]);
    let _ = client.sign(with_token(sign_req(csr2), &token)).await;
    // An EAB key is made (its HMAC key printed once to the operator).
    let eab = ok(sigil(&[
        "acme",
        "eab",
        "create",
        "--config",
        &ca.config,
        "--requester",
        "team-x",
    ]));
    let hmac = eab
        .lines()
        .find_map(|l| l.strip_prefix("EAB HMAC key:"))
        .map(str::trim)
        .expect("EAB HMAC key printed")
        .to_string();
    // Renew over mTLS, so the client key is in use on the wire.
    let mut mtls = ca.client(Some((&issued.chain_pem, &key_pem))).await;
    mtls.renew(RenewRequest { csr: vec![] }).await.unwrap();

    let server = ca.server.as_ref().unwrap();
    let log = server.log_text();
    // JSON lines, with the request id on the lines of that request.
    assert!(
        log.lines()
            .filter(|l| l.starts_with('{'))
            .any(|l| l.contains("trace-0042")),
        "no JSON log line carries the request id:\n{log}"
    );
    let pass = std::fs::read_to_string(ca.work.join("data/intermediate.pass")).unwrap();
    let root_pass = std::fs::read_to_string(ca.work.join("data/DEV-ONLY-root/passphrase")).unwrap();
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let secrets = [
        ("intermediate passphrase", pass.trim().to_string()),
        ("root passphrase", root_pass.trim().to_string()),
        ("bootstrap token", token.clone()),
        (
            "bootstrap token signature",
            token.rsplit('.').next().unwrap().to_string(),
        ),
        ("EAB HMAC key", hmac.clone()),
        ("client private key", key_body[..40].to_string()),
    ];
    for (what, secret) in &secrets {
        assert!(secret.len() >= 16, "{what} too short to search for");
        assert!(
            !log.contains(secret.as_str()),
            "the log contains the {what}"
        );
    }
    assert!(
        !log.contains("PRIVATE KEY"),
        "the log contains a PEM private key"
    );
}

/// `[issuance] rate_per_minute` (here 2, from SIGIL_ISSUANCE_RATE_PER_MINUTE)
/// limits each requester: the third Sign in a minute is RESOURCE_EXHAUSTED
/// with a retry time, another requester is unaffected, and the refusal is
/// counted in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_rate_limit_is_resource_exhausted_per_requester() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().to_path_buf();
    let server = Server::start(
        &["--dev", "--data-dir", "data"],
        &work,
        &[("SIGIL_ISSUANCE_RATE_PER_MINUTE", "2")],
    );
    let roots = served_root(server.port);
    let port = server.port;
    let ca = Ca {
        config: work.join("data/sigil.toml").display().to_string(),
        grpc: server.grpc_port.unwrap(),
        _tmp: tmp,
        work,
        server: Some(server),
        roots,
    };
    let mut client = ca.client(None).await;
    for i in 0..2 {
        let token = ca.token("busy", &["busy.internal"]);
        let (_, csr) = key_and_csr(&["busy.internal"]);
        client
            .sign(with_token(sign_req(csr), &token))
            .await
            .unwrap_or_else(|s| panic!("sign {i}: {s:?}"));
    }
    let token_busy = ca.token("busy", &["busy.internal"]);
    let (_, csr) = key_and_csr(&["busy.internal"]);
    let first_refusal = Instant::now();
    let s = call_fails(client.sign(with_token(sign_req(csr), &token_busy)).await).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("2 certificates per minute") && s.message().contains("retry in"),
        "{s:?}"
    );
    // When to come back, also for programs (the agent waits that long).
    let retry_after: u64 = s
        .metadata()
        .get(sigil_grpc::RETRY_AFTER_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after: {s:?}"));
    assert!((1..=60).contains(&retry_after), "{s:?}");
    let token = ca.token("other", &["other.internal"]);
    let (_, csr) = key_and_csr(&["other.internal"]);
    client
        .sign(with_token(sign_req(csr), &token))
        .await
        .expect("another requester has its own budget");
    // Each refusal is audited under the requester, up to a minute's audit
    // budget (refilled at one a second); the rest are counted. (The token
    // is not spent: the limit comes first.)
    let (_, csr) = key_and_csr(&["busy.internal"]);
    let budget = sigil_authority::RATE_LIMITED_AUDITS_PER_MINUTE as usize;
    let refusals = budget + 5;
    for _ in 1..refusals {
        let s = call_fails(
            client
                .sign(with_token(sign_req(csr.clone()), &token_busy))
                .await,
        )
        .await;
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    }
    let refill = first_refusal.elapsed().as_secs() as usize + 1;
    let audit = ca.audit();
    let limited: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("cert.rate_limited"))
        .collect();
    assert!(
        (budget..=budget + refill).contains(&limited.len()),
        "{} audited:\n{audit}",
        limited.len()
    );
    assert!(
        limited.iter().all(|l| l.contains("token:busy")
            && l.contains("busy.internal")
            && l.contains("\"retry_after\":")),
        "{audit}"
    );
    let metrics = String::from_utf8(http_get(port, "/metrics").unwrap().1).unwrap();
    assert!(
        metrics.contains("result=\"rate_limited\""),
        "refusal not counted:\n{metrics}"
    );
    let unaudited: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sigil_refusals_unaudited_total{kind=\"cert.rate_limited\"} "))
        .unwrap_or_else(|| panic!("no unaudited count:\n{metrics}"))
        .parse()
        .unwrap();
    assert_eq!(limited.len() + unaudited, refusals, "{metrics}");
}
