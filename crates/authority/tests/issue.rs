//! The issuance path end to end in-process, on every backend: concurrency,
//! policy bypass attempts, lifetimes, and denials in the audit log.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use rcgen::{CertificateParams, CustomExtension, DnType, KeyPair, SanType};
use sigil_authority::{ActiveIssuer, Authority, Error, IssueRequest, Settings};
use sigil_core::{CaUrls, Clock, IssuerInfo, Requester, SystemClock};
use sigil_policy::Policy;
use sigil_signer::testing::TestCa;
use sigil_store::{Store, testing};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const POLICY: &str = r#"
[[rule]]
name = "internal"
effect = "allow"
requesters = ["*"]
dns = [".internal", "*.svc.internal"]
ip = ["127.0.0.0/8"]
uri = ["spiffe://corp/ns/*/sa/*"]
max_lifetime = "7d"

[[rule]]
name = "short"
effect = "allow"
requesters = ["token:short"]
dns = ["short.example"]
max_lifetime = "1h"
"#;

async fn authority(url: &str) -> Authority {
    authority_with(url, 0).await
}

async fn authority_with(url: &str, rate_per_minute: u32) -> Authority {
    let now = SystemClock.now();
    let ca = TestCa::new(now).unwrap();
    let urls = CaUrls::new("http://ca.test:8080");
    let issuer =
        ActiveIssuer::new(&ca.intermediate_der, ca.intermediate_key().unwrap(), &urls).unwrap();
    let store = Store::open(url).await.unwrap();
    sigil_authority::issuers::install(
        &store,
        &IssuerInfo::from_der(&ca.intermediate_der).unwrap(),
        None,
        "operator:test",
        now,
    )
    .await
    .unwrap();
    Authority::new(
        Arc::new(SystemClock),
        Policy::from_sources([("test.toml", POLICY)]).unwrap(),
        issuer,
        store,
        Settings {
            default_lifetime: Duration::from_secs(86400),
            max_lifetime: Duration::from_secs(30 * 86400),
            urls,
            rate_per_minute,
        },
    )
}

fn csr_with(
    key: &KeyPair,
    cn: Option<&str>,
    sans: &[&str],
    extra: Vec<CustomExtension>,
) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        p.distinguished_name.push(DnType::CommonName, cn);
    }
    p.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if s.starts_with("spiffe://") => SanType::URI(s.to_string().try_into().unwrap()),
            Err(_) => SanType::DnsName(s.to_string().try_into().unwrap()),
        })
        .collect();
    p.custom_extensions = extra;
    p.serialize_request(key).unwrap().der().to_vec()
}

fn req(csr: Vec<u8>, requester: Requester) -> IssueRequest {
    IssueRequest {
        csr: csr.into(),
        requester,
        profile: None,
        lifetime: None,
        token: None,
        not_before: None,
        completes: None,
    }
}

fn op() -> Requester {
    Requester::Operator("test".into())
}

fn sans_of(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_issuances_per_backend() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in testing::backends(dir.path()).await {
        let ca = Arc::new(authority(&url).await);
        let keys: Vec<KeyPair> = (0..8).map(|_| KeyPair::generate().unwrap()).collect();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let csr = csr_with(
                &keys[i % keys.len()],
                None,
                &[&format!("host{i}.internal")],
                vec![],
            );
            let ca = ca.clone();
            tasks.push(tokio::spawn(async move { ca.issue(req(csr, op())).await }));
        }
        let mut serials = HashSet::new();
        let mut seqs = HashSet::new();
        for t in tasks {
            let issued = t.await.unwrap().unwrap();
            serials.insert(issued.serial.to_hex());
            seqs.insert(issued.receipt.seq);
        }
        assert_eq!(serials.len(), 200, "{backend}: serials must be distinct");
        assert_eq!(
            seqs.len(),
            200,
            "{backend}: audit positions must be distinct"
        );
        assert_eq!(
            ca.store().certificate_count().await.unwrap(),
            200,
            "{backend}"
        );
        let report = ca.store().verify_audit().await.unwrap();
        assert!(
            report.first_bad.is_none(),
            "{backend}: {:?}",
            report.first_bad
        );
        assert_eq!(report.rows, 201, "{backend}");
        ca.store().close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_attempts_are_refused_or_neutralized() {
    let dir = tempfile::tempdir().unwrap();
    let url = testing::backends(dir.path()).await.remove(0).1;
    let ca = authority(&url).await;
    let key = KeyPair::generate().unwrap();

    // A CN outside the SANs is a requested name too, and is denied.
    let e = ca
        .issue(req(
            csr_with(&key, Some("evil.example"), &["ok.internal"], vec![]),
            op(),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Denied { reason, .. } if reason.contains("evil.example")),
        "{e}"
    );

    // Names smuggled in issuerAltName (or any other extension) never reach the cert.
    let ian = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_tagged_implicit(yasna::Tag::context(2), |w| {
                w.write_ia5_string("evil.example")
            });
        })
    });
    let smuggle = CustomExtension::from_oid_content(&[2, 5, 29, 18], ian);
    let basic_ca =
        CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    let issued = ca
        .issue(req(
            csr_with(&key, None, &["ok.internal"], vec![smuggle, basic_ca]),
            op(),
        ))
        .await
        .unwrap();
    assert_eq!(sans_of(&issued.der), vec!["DNSName(ok.internal)"]);
    let (_, cert) = x509_parser::parse_x509_certificate(&issued.der).unwrap();
    assert!(!cert.is_ca(), "a CSR asking for CA:TRUE still gets a leaf");
    assert!(
        cert.extensions()
            .iter()
            .all(|e| e.oid.to_id_string() != "2.5.29.18")
    );

    // Case and trailing dots are normalized before policy and in the certificate.
    let issued = ca
        .issue(req(
            csr_with(&key, None, &["OK.Svc.Internal."], vec![]),
            op(),
        ))
        .await
        .unwrap();
    assert_eq!(sans_of(&issued.der), vec!["DNSName(ok.svc.internal)"]);

    // Malformed names are refused with a reason.
    for (bad, why) in [
        ("*.*.svc.internal", "wildcard"),
        ("a.*.svc.internal", "wildcard"),
        ("127.0.0.1.", "IP address"),
    ] {
        let e = ca
            .issue(req(csr_with(&key, None, &[bad], vec![]), op()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }

    // A second SAN extension is a duplicate, not a second chance.
    let dup = CustomExtension::from_oid_content(
        &[2, 5, 29, 17],
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_tagged_implicit(yasna::Tag::context(2), |w| {
                    w.write_ia5_string("evil.example")
                });
            })
        }),
    );
    let e = ca
        .issue(req(csr_with(&key, None, &["ok.internal"], vec![dup]), op()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("more than once"), "{e}");

    // Unicode lookalike of an allowed name is a different (punycode) name.
    let e = ca
        .issue(req(
            csr_with(&key, None, &["xn--k-xmb.example"], vec![]),
            op(),
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Denied { .. }), "{e}");

    // Tampered CSR: signature no longer verifies.
    let mut csr = csr_with(&key, None, &["ok.internal"], vec![]);
    let n = csr.len();
    csr[n - 5] ^= 0x01;
    let e = ca.issue(req(csr, op())).await.unwrap_err();
    assert!(
        e.to_string().contains("does not verify") || e.to_string().contains("not PKCS#10"),
        "{e}"
    );

    // Denials are in the audit log with the reason; the chain stays intact.
    // Issuances and policy denials name the policy that decided.
    let tail = ca.store().audit_tail(50).await.unwrap();
    assert!(
        tail.iter()
            .any(|r| r.kind == "cert.denied" && r.detail.contains("evil.example"))
    );
    let digest = ca.policy().digest().to_string();
    assert_eq!(digest.len(), 64);
    let policy_of = |kind: &str| -> Vec<Option<String>> {
        tail.iter()
            .filter(|r| r.kind == kind)
            .map(|r| {
                let d: serde_json::Value = serde_json::from_str(&r.detail).unwrap();
                d["policy"].as_str().map(str::to_string)
            })
            .collect()
    };
    let issued = policy_of("cert.issued");
    assert!(!issued.is_empty());
    assert!(
        issued.iter().all(|p| p.as_deref() == Some(digest.as_str())),
        "{issued:?}"
    );
    let denied = policy_of("cert.denied");
    assert!(
        denied.iter().any(|p| p.as_deref() == Some(digest.as_str())),
        "{denied:?}"
    );
    assert!(ca.store().verify_audit().await.unwrap().first_bad.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetimes_follow_settings_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let url = testing::backends(dir.path()).await.remove(0).1;
    let ca = authority(&url).await;
    let key = KeyPair::generate().unwrap();
    let life = |i: &sigil_authority::Issued| (i.not_after - i.not_before).whole_seconds();

    let issued = ca
        .issue(req(csr_with(&key, None, &["a.internal"], vec![]), op()))
        .await
        .unwrap();
    assert_eq!(
        life(&issued),
        86400 + 60,
        "default 24h plus the 1-minute backdate"
    );
    let now = SystemClock.now().unix_timestamp();
    assert!(now - issued.not_before.unix_timestamp() <= 61);

    // Policy max (1h) lowers the default; an explicit request above it is denied.
    let short = Requester::Token("short".into());
    let issued = ca
        .issue(req(
            csr_with(&key, None, &["short.example"], vec![]),
            short.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(life(&issued), 3600 + 60);
    let mut r = req(csr_with(&key, None, &["short.example"], vec![]), short);
    r.lifetime = Some(Duration::from_secs(7200));
    let e = ca.issue(r).await.unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");

    // Above the CA-wide ceiling: refused before policy.
    let mut r = req(csr_with(&key, None, &["a.internal"], vec![]), op());
    r.lifetime = Some(Duration::from_secs(31 * 86400));
    assert!(matches!(ca.issue(r).await, Err(Error::Lifetime(_))));

    // SPIFFE IDs and IPs pass through policy into the SAN.
    let issued = ca
        .issue(req(
            csr_with(
                &key,
                None,
                &["spiffe://corp/ns/web/sa/api", "127.0.0.1"],
                vec![],
            ),
            op(),
        ))
        .await
        .unwrap();
    let sans = sans_of(&issued.der);
    assert!(
        sans.iter()
            .any(|s| s.contains("spiffe://corp/ns/web/sa/api")),
        "{sans:?}"
    );
    assert!(issued.chain_pem.matches("BEGIN CERTIFICATE").count() == 2);
}

fn grant(jti: &str, sans: &[&str]) -> sigil_authority::TokenGrant {
    sigil_authority::TokenGrant {
        jti: jti.into(),
        subject: "web".into(),
        expires_at: SystemClock.now().unix_timestamp() + 600,
        sans: sans
            .iter()
            .map(|s| sigil_core::Identifier::parse_any(s).unwrap())
            .collect(),
    }
}

async fn audit_kinds(ca: &Authority) -> Vec<String> {
    ca.store()
        .audit_rows(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_scoped_and_spent_once() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let ca = authority(&url).await;
        let key = KeyPair::generate().unwrap();
        let ask = |sans: &[&str], jti: &str, grant_sans: &[&str]| IssueRequest {
            token: Some(grant(jti, grant_sans)),
            ..req(
                csr_with(&key, None, sans, vec![]),
                Requester::Token("web".into()),
            )
        };
        // Names beyond the token's scope are refused even though policy allows them.
        let e = ca
            .issue(ask(
                &["web.internal", "db.internal"],
                "t1",
                &["web.internal"],
            ))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TokenScope(_)), "{name}: {e}");
        assert!(e.to_string().contains("db.internal"), "{name}: {e}");
        // The refused request did not spend the token.
        let first = ca
            .issue(ask(&["web.internal"], "t1", &["web.internal"]))
            .await
            .unwrap();
        // Asking again with the same key and names (the first reply was
        // lost) returns that certificate; nothing new is issued.
        let again = ca
            .issue(ask(&["web.internal"], "t1", &["web.internal"]))
            .await
            .unwrap();
        assert_eq!(again.serial, first.serial, "{name}");
        assert_eq!(again.chain_pem, first.chain_pem, "{name}");
        assert_eq!(again.not_after, first.not_after, "{name}");
        // Another key, or other names the token covers: a replay.
        let other_key = KeyPair::generate().unwrap();
        let e = ca
            .issue(IssueRequest {
                token: Some(grant("t1", &["web.internal"])),
                ..req(
                    csr_with(&other_key, None, &["web.internal"], vec![]),
                    Requester::Token("web".into()),
                )
            })
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TokenReplayed(_)), "{name}: {e}");
        let e = ca
            .issue(ask(
                &["web.internal", "api.internal"],
                "t1",
                &["web.internal", "api.internal"],
            ))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TokenReplayed(_)), "{name}: {e}");
        // Once that certificate is revoked, asking again is a replay too.
        ca.revoke(&first.serial, 4, &Requester::Operator("t".into()))
            .await
            .unwrap();
        let e = ca
            .issue(ask(&["web.internal"], "t1", &["web.internal"]))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TokenReplayed(_)), "{name}: {e}");
        let kinds = audit_kinds(&ca).await;
        assert_eq!(
            kinds.iter().filter(|k| *k == "token.repeated").count(),
            1,
            "{name}: {kinds:?}"
        );
        assert!(
            kinds.contains(&"token.replayed".to_string()),
            "{name}: {kinds:?}"
        );
        assert!(
            kinds.contains(&"cert.denied".to_string()),
            "{name}: {kinds:?}"
        );
        assert_eq!(ca.store().certificate_count().await.unwrap(), 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_compromise_revokes_every_certificate_of_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let ca = authority(&url).await;
        let caller = Requester::Mtls("api.svc.internal".into());
        let key = KeyPair::generate().unwrap();
        let first = ca
            .issue(req(
                csr_with(&key, None, &["api.svc.internal"], vec![]),
                Requester::Token("api".into()),
            ))
            .await
            .unwrap();
        // A renewal that kept the key: two live certificates of one key.
        let renewed = ca
            .renew(sigil_authority::RenewRequest {
                current: first.der.clone(),
                caller: caller.clone(),
                csr: None,
            })
            .await
            .unwrap();
        let other_key = KeyPair::generate().unwrap();
        let unrelated = ca
            .issue(req(
                csr_with(&other_key, None, &["api.svc.internal"], vec![]),
                Requester::Token("api".into()),
            ))
            .await
            .unwrap();
        let done = ca.revoke(&renewed.serial, 1, &caller).await.unwrap();
        assert_eq!(done.same_key, vec![first.serial.to_hex()], "{name}");
        assert!(ca.is_revoked(&first.serial).await.unwrap(), "{name}");
        assert!(!ca.is_revoked(&unrelated.serial).await.unwrap(), "{name}");
        let row = ca.store().revocation(&first.serial.to_hex()).await.unwrap();
        assert_eq!(row.map(|r| r.reason), Some(1), "{name}");

        // Revoked first for another reason, found compromised later: the
        // revocation stays as it was, but the key is blocked and its other
        // certificates are revoked.
        let key2 = KeyPair::generate().unwrap();
        let a = ca
            .issue(req(
                csr_with(&key2, None, &["b.svc.internal"], vec![]),
                Requester::Token("b".into()),
            ))
            .await
            .unwrap();
        let b = ca
            .issue(req(
                csr_with(&key2, None, &["b.svc.internal"], vec![]),
                Requester::Token("b".into()),
            ))
            .await
            .unwrap();
        ca.revoke(&a.serial, 4, &caller).await.unwrap();
        let pk = sigil_core::LeafInfo::from_der(&a.der).unwrap().public_key;
        assert!(!ca.key_blocked(&pk).await.unwrap(), "{name}");
        let e = ca.revoke(&a.serial, 1, &caller).await.unwrap_err();
        assert!(matches!(e, Error::AlreadyRevoked(_)), "{name}: {e}");
        assert!(
            e.to_string().contains("key is now blocked")
                && e.to_string().contains(&b.serial.to_hex()),
            "{name}: {e}"
        );
        assert!(ca.key_blocked(&pk).await.unwrap(), "{name}");
        assert!(ca.is_revoked(&b.serial).await.unwrap(), "{name}");
        let row = ca.store().revocation(&a.serial.to_hex()).await.unwrap();
        assert_eq!(
            row.map(|r| r.reason),
            Some(4),
            "{name}: the first reason stays"
        );
        let e = ca
            .issue(req(
                csr_with(&key2, None, &["b.svc.internal"], vec![]),
                Requester::Token("b".into()),
            ))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::KeyCompromised(_)), "{name}: {e}");
        let kinds = audit_kinds(&ca).await;
        assert!(kinds.contains(&"key.blocked".to_string()), "{name}");

        // Found compromised by another process (the CLI, another node)
        // after this one last read the records: its in-memory view still
        // lets the request through, and storing it refuses it.
        let key3 = KeyPair::generate().unwrap();
        let c = ca
            .issue(req(
                csr_with(&key3, None, &["c.svc.internal"], vec![]),
                Requester::Token("c".into()),
            ))
            .await
            .unwrap();
        ca.sync().await.unwrap();
        let ops = Requester::Operator("ops".into());
        sigil_authority::revoke::revoke(ca.store(), SystemClock.now(), &c.serial, 1, &ops)
            .await
            .unwrap();
        let e = ca
            .issue(req(
                csr_with(&key3, None, &["c.svc.internal"], vec![]),
                Requester::Token("c".into()),
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::KeyCompromised(m) if m.contains("while this request was being made")),
            "{name}: {e}"
        );
        assert_eq!(
            audit_kinds(&ca).await.last().map(String::as_str),
            Some("cert.denied"),
            "{name}"
        );
        assert!(ca.store().verify_audit().await.unwrap().first_bad.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_names_and_refuses_revoked_certificates() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let ca = authority(&url).await;
        let key = KeyPair::generate().unwrap();
        let first = ca
            .issue(req(
                csr_with(&key, None, &["api.svc.internal"], vec![]),
                Requester::Token("api".into()),
            ))
            .await
            .unwrap();
        let caller = Requester::Mtls("api.svc.internal".into());
        // Same key.
        let renewed = ca
            .renew(sigil_authority::RenewRequest {
                current: first.der.clone(),
                caller: caller.clone(),
                csr: None,
            })
            .await
            .unwrap();
        assert_ne!(renewed.serial, first.serial, "{name}");
        let a = sigil_core::LeafInfo::from_der(&first.der).unwrap();
        let b = sigil_core::LeafInfo::from_der(&renewed.der).unwrap();
        assert_eq!(a.public_key.spki_der(), b.public_key.spki_der(), "{name}");
        assert_eq!(a.identifiers, b.identifiers, "{name}");
        let row = ca.certificate(&renewed.serial).await.unwrap().unwrap();
        assert_eq!(
            row.requester, "token:api",
            "{name}: keeps the original requester"
        );
        // New key, same names.
        let key2 = KeyPair::generate().unwrap();
        let rekeyed = ca
            .renew(sigil_authority::RenewRequest {
                current: renewed.der.clone(),
                caller: caller.clone(),
                csr: Some(csr_with(&key2, None, &["api.svc.internal"], vec![])),
            })
            .await
            .unwrap();
        let c = sigil_core::LeafInfo::from_der(&rekeyed.der).unwrap();
        assert_ne!(c.public_key.spki_der(), b.public_key.spki_der(), "{name}");
        // Other names are not a renewal.
        let e = ca
            .renew(sigil_authority::RenewRequest {
                current: rekeyed.der.clone(),
                caller: caller.clone(),
                csr: Some(csr_with(&key2, None, &["other.svc.internal"], vec![])),
            })
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NamesChanged(_)), "{name}: {e}");
        // Revoke, then renewal is refused; revoking twice is refused too.
        ca.revoke(&rekeyed.serial, 1, &caller).await.unwrap();
        assert!(ca.is_revoked(&rekeyed.serial).await.unwrap());
        let e = ca.revoke(&rekeyed.serial, 1, &caller).await.unwrap_err();
        assert!(matches!(e, Error::AlreadyRevoked(_)), "{name}: {e}");
        let e = ca
            .renew(sigil_authority::RenewRequest {
                current: rekeyed.der.clone(),
                caller: caller.clone(),
                csr: None,
            })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("revoked"), "{name}: {e}");
        // A certificate this CA never stored is not renewable.
        let other = TestCa::new(SystemClock.now()).unwrap();
        let e = ca
            .renew(sigil_authority::RenewRequest {
                current: other.intermediate_der.clone(),
                caller: caller.clone(),
                csr: None,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotRenewable(_)), "{name}: {e}");
        let kinds = audit_kinds(&ca).await;
        for k in ["cert.renewed", "cert.revoked", "cert.renewal_denied"] {
            assert!(kinds.contains(&k.to_string()), "{name}: {k} in {kinds:?}");
        }
        assert!(ca.store().verify_audit().await.unwrap().first_bad.is_none());
    }
}

/// After the policy changes, a renewal keeps working within the new
/// maximum lifetime (cut, not refused), and a deny rule that selects the
/// caller presenting the certificate refuses it, though the renewal is
/// judged as the bootstrap token's subject that first obtained it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_follows_a_changed_policy_for_lifetime_and_the_callers_deny_rules() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let ca = authority(&url).await;
        let key = KeyPair::generate().unwrap();
        let first = ca
            .issue(IssueRequest {
                lifetime: Some(Duration::from_secs(7 * 86400)),
                ..req(
                    csr_with(&key, None, &["api.svc.internal"], vec![]),
                    Requester::Token("api".into()),
                )
            })
            .await
            .unwrap();
        let caller = Requester::Mtls("api.svc.internal".into());
        let renew = |current: Vec<u8>| {
            ca.renew(sigil_authority::RenewRequest {
                current,
                caller: caller.clone(),
                csr: None,
            })
        };
        let lowered = POLICY.replace("max_lifetime = \"7d\"", "max_lifetime = \"2d\"");
        assert_ne!(lowered, POLICY);
        let reload = |text: String| {
            let policy = Policy::from_sources([("test.toml", text.as_str())]).unwrap();
            ca.replace_policy(policy, "operator:test", serde_json::json!({}))
        };
        reload(lowered.clone()).await.unwrap();
        let renewed = renew(first.der.clone()).await.unwrap();
        let lifetime = renewed.not_after - renewed.not_before;
        assert!(
            lifetime <= time::Duration::days(2) + time::Duration::minutes(10)
                && lifetime > time::Duration::days(1),
            "{name}: {lifetime}"
        );
        // The operator blocks this workload by its mTLS identity (written
        // with other capitals than the certificate carries).
        let blocked = format!(
            "{lowered}\n[[rule]]\nname = \"block-api\"\neffect = \"deny\"\nrequesters = [\"mtls:API.svc.internal\"]\ndns = [\"api.svc.internal\"]\n"
        );
        reload(blocked).await.unwrap();
        let e = renew(renewed.der.clone()).await.unwrap_err();
        assert!(
            matches!(e, Error::Denied { .. }) && e.to_string().contains("mtls:api.svc.internal"),
            "{name}: {e}"
        );
        assert!(ca.certificate(&renewed.serial).await.unwrap().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_made_elsewhere_are_seen_after_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let here = authority(&url).await;
        let key = KeyPair::generate().unwrap();
        let cert = here
            .issue(req(
                csr_with(&key, None, &["a.internal"], vec![]),
                Requester::Token("a".into()),
            ))
            .await
            .unwrap();
        here.sync().await.unwrap();
        assert!(!here.is_revoked(&cert.serial).await.unwrap(), "{name}");
        // Another process on the same database (a node, the CLI) revokes it.
        let elsewhere = Store::open(&url).await.unwrap();
        elsewhere
            .commit(sigil_store::Change::Revoke {
                revocation: sigil_store::NewRevocation {
                    serial: cert.serial.to_hex(),
                    issuer_id: cert.issuer_id.clone(),
                    reason: 1,
                    revoked_at: SystemClock.now().unix_timestamp(),
                    revoked_by: "operator:elsewhere".into(),
                    block_key: None,
                },
                event: sigil_store::AuditEvent {
                    ts_ms: 1,
                    kind: "cert.revoked".into(),
                    actor: "operator:elsewhere".into(),
                    subject: cert.serial.to_hex(),
                    detail: serde_json::json!({}),
                },
            })
            .await
            .unwrap();
        here.sync().await.unwrap();
        assert!(here.is_revoked(&cert.serial).await.unwrap(), "{name}");
        // One revoked here is known at once, without a sync.
        let other = here
            .issue(req(
                csr_with(&key, None, &["b.internal"], vec![]),
                Requester::Token("b".into()),
            ))
            .await
            .unwrap();
        here.revoke(&other.serial, 4, &Requester::Operator("t".into()))
            .await
            .unwrap();
        assert!(here.is_revoked(&other.serial).await.unwrap(), "{name}");
        // A key blocked elsewhere with no new revocation (a certificate
        // revoked before, found compromised later) is refused after a sync.
        let later = KeyPair::generate().unwrap();
        let c = here
            .issue(req(
                csr_with(&later, None, &["c.internal"], vec![]),
                Requester::Token("c".into()),
            ))
            .await
            .unwrap();
        let fp = sigil_core::LeafInfo::from_der(&c.der)
            .unwrap()
            .public_key
            .fingerprint();
        here.sync().await.unwrap();
        elsewhere
            .commit(sigil_store::Change::BlockKey {
                fingerprint: fp,
                serial: c.serial.to_hex(),
                at: 1,
                event: sigil_store::AuditEvent {
                    ts_ms: 1,
                    kind: "key.blocked".into(),
                    actor: "operator:elsewhere".into(),
                    subject: c.serial.to_hex(),
                    detail: serde_json::json!({}),
                },
            })
            .await
            .unwrap();
        here.sync().await.unwrap();
        let e = here
            .issue(req(
                csr_with(&later, None, &["c.internal"], vec![]),
                Requester::Token("c".into()),
            ))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::KeyCompromised(_)), "{name}: {e}");
        elsewhere.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requesters_are_rate_limited_operators_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("rate.db").display());
    let ca = authority_with(&url, 2).await;
    let team = Requester::Token("team-a".into());
    let key = KeyPair::generate().unwrap();
    let csr = csr_with(&key, None, &["a.internal"], vec![]);
    ca.issue(req(csr.clone(), team.clone())).await.unwrap();
    ca.issue(req(csr.clone(), team.clone())).await.unwrap();
    match ca.issue(req(csr.clone(), team.clone())).await {
        Err(Error::RateLimited {
            message,
            retry_after,
        }) => {
            assert!((1..=30).contains(&retry_after), "{retry_after}");
            assert!(
                message.contains("token:team-a") && message.contains("2 certificates per minute"),
                "{message}"
            );
        }
        other => panic!("expected a rate limit, got {other:?}"),
    }
    // Another requester has its own budget; operators have none.
    ca.issue(req(csr.clone(), Requester::Token("team-b".into())))
        .await
        .unwrap();
    for _ in 0..5 {
        ca.issue(req(csr.clone(), op())).await.unwrap();
    }
    // Repeating a token's request (its reply lost) counts too: each repeat
    // writes an audit row.
    let token_req = || IssueRequest {
        token: Some(grant("t-rate", &["a.internal"])),
        ..req(csr.clone(), Requester::Token("team-c".into()))
    };
    let first = ca.issue(token_req()).await.unwrap();
    assert_eq!(ca.issue(token_req()).await.unwrap().serial, first.serial);
    let e = ca.issue(token_req()).await.unwrap_err();
    assert!(matches!(e, Error::RateLimited { .. }), "{e}");
}

/// A clock the test moves.
struct TestClock(std::sync::Mutex<time::OffsetDateTime>);

impl Clock for TestClock {
    fn now(&self) -> time::OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

impl TestClock {
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

/// Issuer keys by id, as the binary's key files would hold them; a key may
/// be added while the authority runs (a key file that appears later).
struct MemKeys(std::sync::Mutex<std::collections::HashMap<String, zeroize::Zeroizing<Vec<u8>>>>);

impl sigil_authority::IssuerKeys for MemKeys {
    fn load(&self, issuer: &sigil_authority::IssuerRow) -> Result<sigil_signer::CaKey, Error> {
        let keys = self.0.lock().unwrap();
        let pkcs8 = keys
            .get(&issuer.id)
            .ok_or_else(|| Error::Config(format!("no key for {}", issuer.id)))?;
        Ok(sigil_signer::SoftwareKey::from_pkcs8(pkcs8, "test issuer")?.into())
    }
}

/// An authority on a moving clock with one installed issuer (`first`) and
/// the certificate and key of a second one (`next`) made by the same root.
struct Rotation {
    _dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    store: Store,
    keys: Arc<MemKeys>,
    first: IssuerInfo,
    next: IssuerInfo,
    next_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    authority: Authority,
}

/// `with_next_key`: whether this node holds the second issuer's key.
async fn rotation(with_next_key: bool) -> Rotation {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("rotation.db").display());
    let start = SystemClock.now();
    let clock = Arc::new(TestClock(std::sync::Mutex::new(start)));
    let ca = TestCa::new(start).unwrap();
    let (next_der, next_pkcs8) = ca.another_intermediate(start).unwrap();
    let first = IssuerInfo::from_der(&ca.intermediate_der).unwrap();
    let next = IssuerInfo::from_der(&next_der).unwrap();
    let store = Store::open(&url).await.unwrap();
    sigil_authority::issuers::install(&store, &first, None, "operator:test", start)
        .await
        .unwrap();
    let mut held = vec![(first.id.to_string(), ca.intermediate_pkcs8.clone())];
    if with_next_key {
        held.push((next.id.to_string(), next_pkcs8.clone()));
    }
    let keys = Arc::new(MemKeys(std::sync::Mutex::new(held.into_iter().collect())));
    let authority = Authority::open(
        clock.clone(),
        Policy::from_sources([("test.toml", POLICY)]).unwrap(),
        store.clone(),
        Settings {
            default_lifetime: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(86400),
            urls: CaUrls::new("http://ca.test:8080"),
            rate_per_minute: 0,
        },
        keys.clone(),
    )
    .await
    .unwrap();
    Rotation {
        _dir: dir,
        clock,
        store,
        keys,
        first,
        next,
        next_pkcs8,
        authority,
    }
}

/// A rotation in one process with a moving clock: a staged issuer is loaded
/// but does not issue; a scheduled activation happens at its time; the
/// previous issuer keeps publishing until an hour after its last
/// certificate expires, then retires and leaves the trust bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_schedules_activation_and_retires_the_previous_issuer() {
    use sigil_authority::IssuerState;
    let Rotation {
        _dir,
        clock,
        store,
        first,
        next,
        authority,
        ..
    } = rotation(true).await;
    let start = clock.now();
    let key = KeyPair::generate().unwrap();
    let csr = csr_with(&key, None, &["svc.internal"], vec![]);
    let old_leaf = authority.issue(req(csr.clone(), op())).await.unwrap();
    assert_eq!(old_leaf.issuer_id, first.id.to_string());

    // Staged: loaded, trusted, not issuing.
    sigil_authority::issuers::stage(&store, &next, "next.key".into(), "operator:test", start)
        .await
        .unwrap();
    let synced = authority.sync().await.unwrap();
    assert!(synced.issuers_changed && !synced.rotated);
    let states: Vec<_> = authority
        .issuer_states()
        .into_iter()
        .map(|(s, i)| (i.info().id.to_string(), s))
        .collect();
    assert!(
        states.contains(&(next.id.to_string(), IssuerState::Staged)),
        "{states:?}"
    );
    assert_eq!(authority.trusted_issuers().await.unwrap().len(), 2);
    let still_old = authority.issue(req(csr.clone(), op())).await.unwrap();
    assert_eq!(still_old.issuer_id, first.id.to_string());

    // Scheduled for ten minutes from now: nothing changes until then.
    let at = start + Duration::from_secs(600);
    sigil_authority::issuers::activate(&store, next.id.as_str(), Some(at), "operator:test", start)
        .await
        .unwrap();
    assert!(!authority.sync().await.unwrap().rotated);
    assert_eq!(authority.active_issuer().info().id, first.id);
    clock.advance(Duration::from_secs(601));
    let synced = authority.sync().await.unwrap();
    assert!(synced.rotated, "the scheduled activation happened");
    assert_eq!(authority.active_issuer().info().id, next.id);
    let serving: Vec<_> = authority
        .serving_issuers()
        .iter()
        .map(|i| i.info().id.to_string())
        .collect();
    assert_eq!(serving, [next.id.to_string(), first.id.to_string()]);
    let new_leaf = authority.issue(req(csr.clone(), op())).await.unwrap();
    assert_eq!(new_leaf.issuer_id, next.id.to_string());
    // The previous issuer still signs CRLs.
    let crl = authority
        .publish_crl(
            first.id.as_str(),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    assert_eq!(crl.len(), 1, "no shards configured or named");
    assert_eq!(crl[0].issuer_id, first.id.to_string());
    assert_eq!(crl[0].shard, None);

    // Its last certificate expires; an hour later it retires.
    clock.advance(Duration::from_secs(3600));
    let synced = authority.sync().await.unwrap();
    assert!(
        !synced.issuers_changed,
        "within the grace period: still serving"
    );
    clock.advance(Duration::from_secs(3600 + 120));
    let synced = authority.sync().await.unwrap();
    assert!(synced.issuers_changed && !synced.rotated);
    assert_eq!(authority.serving_issuers().len(), 1);
    let row = store.issuer(first.id.as_str()).await.unwrap().unwrap();
    assert_eq!(row.state, IssuerState::Retired);
    assert_eq!(authority.trusted_issuers().await.unwrap().len(), 1);
    let kinds = audit_kinds(&authority).await;
    for k in [
        "issuer.staged",
        "issuer.activation_scheduled",
        "issuer.activated",
        "issuer.retired",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing: {kinds:?}");
    }
    assert!(store.verify_audit().await.unwrap().first_bad.is_none());
}

/// A node that cannot open the key of an issuer activated elsewhere keeps
/// issuing from the issuer it has (its `/readyz` says why and takes it out of
/// rotation), retries the key once a minute, and switches as soon as the key
/// is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_missing_the_new_key_switches_once_the_key_appears() {
    let Rotation {
        _dir,
        clock,
        store,
        keys,
        first,
        next,
        next_pkcs8,
        authority,
    } = rotation(false).await;
    let start = clock.now();
    let key = KeyPair::generate().unwrap();
    let csr = csr_with(&key, None, &["svc.internal"], vec![]);

    // Staged and activated by another node; this one has no key for it.
    sigil_authority::issuers::stage(&store, &next, "next.key".into(), "operator:test", start)
        .await
        .unwrap();
    authority.sync().await.unwrap();
    sigil_authority::issuers::activate(&store, next.id.as_str(), None, "operator:test", start)
        .await
        .unwrap();
    // Sync keeps following the database (revocations) and reports the
    // missing key in the log; the issuers here stay as they were.
    let synced = authority.sync().await.unwrap();
    assert!(!synced.rotated && !synced.issuers_changed);
    assert_eq!(authority.active_issuer().info().id, first.id);
    let leaf = authority.issue(req(csr.clone(), op())).await.unwrap();
    assert_eq!(leaf.issuer_id, first.id.to_string());

    // The key appears; it is tried again after a minute, not on every sync.
    keys.0
        .lock()
        .unwrap()
        .insert(next.id.to_string(), next_pkcs8);
    assert!(!authority.sync().await.unwrap().rotated);
    assert_eq!(authority.active_issuer().info().id, first.id);
    clock.advance(Duration::from_secs(61));
    let synced = authority.sync().await.unwrap();
    assert!(synced.rotated, "switched to the new issuer");
    assert_eq!(authority.active_issuer().info().id, next.id);
    let leaf = authority.issue(req(csr, op())).await.unwrap();
    assert_eq!(leaf.issuer_id, next.id.to_string());
}

/// A revoked certificate stays on its issuer's CRL for at least the CRL
/// validity after it expires, whatever the grace, so a regularly scheduled
/// CRL issued after the expiry lists it (RFC 5280 3.3); and thisUpdate is
/// taken when the CRL is made, backdated a minute like certificates but not
/// to before the newest revocation it lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_outlives_its_certificate_on_the_next_scheduled_crl() {
    let Rotation {
        _dir,
        clock,
        first,
        authority,
        ..
    } = rotation(false).await;
    let key = KeyPair::generate().unwrap();
    let leaf = authority
        .issue(req(csr_with(&key, None, &["gone.internal"], vec![]), op()))
        .await
        .unwrap();
    authority.revoke(&leaf.serial, 1, &op()).await.unwrap();
    let validity = Duration::from_secs(24 * 3600);
    let crl = |rows: Vec<sigil_store::CrlRow>| {
        use x509_parser::prelude::FromDer;
        let der = rows.into_iter().find(|r| r.shard.is_none()).unwrap().der;
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        (serials, crl.last_update().timestamp())
    };
    // Just after the revocation: thisUpdate is not before it.
    let (serials, this_update) = crl(authority
        .publish_crl(first.id.as_str(), validity, Duration::ZERO)
        .await
        .unwrap());
    assert_eq!(serials.len(), 1, "{serials:?}");
    assert_eq!(this_update, clock.now().unix_timestamp());
    // The certificate expired three hours ago, beyond a grace of zero.
    let expired = leaf.not_after + Duration::from_secs(3 * 3600);
    clock.advance(Duration::try_from(expired - clock.now()).unwrap());
    let (serials, this_update) = crl(authority
        .publish_crl(first.id.as_str(), validity, Duration::ZERO)
        .await
        .unwrap());
    assert_eq!(serials.len(), 1, "{serials:?}");
    assert_eq!(this_update, clock.now().unix_timestamp() - 60);
    // A CRL validity later it may go.
    clock.advance(validity);
    let (serials, _) = crl(authority
        .publish_crl(first.id.as_str(), validity, Duration::ZERO)
        .await
        .unwrap());
    assert!(serials.is_empty(), "{serials:?}");
}

/// A staged issuer whose key this node cannot open leaves its issuers as
/// they were, and syncs say so: were each sync reported as a change, every
/// CRL and OCSP answer would be signed again every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_issuer_without_its_key_is_not_a_change_on_every_sync() {
    let Rotation {
        _dir,
        clock,
        store,
        next,
        authority,
        ..
    } = rotation(false).await;
    let start = clock.now();
    sigil_authority::issuers::stage(&store, &next, "next.key".into(), "operator:test", start)
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(!authority.sync().await.unwrap().issuers_changed);
    }
    // Tried again a minute later, and still missing.
    clock.advance(Duration::from_secs(61));
    assert!(!authority.sync().await.unwrap().issuers_changed);
    assert_eq!(authority.serving_issuers().len(), 1);
}

/// An OCSP responder certificate made in its issuer's last day ends with
/// the issuer, not after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ocsp_responder_does_not_outlive_its_issuer() {
    let r = rotation(false).await;
    let id = r.first.id.to_string();
    let fresh = r
        .authority
        .new_ocsp_signer(&id, Duration::from_secs(2 * 86400), false)
        .await
        .unwrap();
    let two_days = r.clock.now() + Duration::from_secs(2 * 86400);
    assert!(fresh.not_after >= two_days - Duration::from_secs(1));
    let end = r.first.not_after;
    r.clock
        .advance(Duration::try_from(end - r.clock.now() - time::Duration::hours(12)).unwrap());
    let late = r
        .authority
        .new_ocsp_signer(&id, Duration::from_secs(2 * 86400), false)
        .await
        .unwrap();
    assert_eq!(late.not_after, end);
    r.clock.advance(Duration::from_secs(86400));
    let e = r
        .authority
        .new_ocsp_signer(&id, Duration::from_secs(2 * 86400), false)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("has expired"), "{e}");
}

/// A renewal keeps the subject: the CN the first request chose (one of the
/// certificate's DNS names), not the first DNS name in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_keeps_the_common_name() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cn.db").display());
    let ca = authority(&url).await;
    let key = KeyPair::generate().unwrap();
    let names = ["api.svc.internal", "www.svc.internal"];
    let first = ca
        .issue(req(
            csr_with(&key, Some("www.svc.internal"), &names, vec![]),
            Requester::Token("web".into()),
        ))
        .await
        .unwrap();
    let cn = |der: &[u8]| sigil_core::LeafInfo::from_der(der).unwrap().common_name;
    assert_eq!(cn(&first.der).as_deref(), Some("www.svc.internal"));
    let caller = Requester::Mtls("api.svc.internal".into());
    let renewed = ca
        .renew(sigil_authority::RenewRequest {
            current: first.der.clone(),
            caller: caller.clone(),
            csr: None,
        })
        .await
        .unwrap();
    assert_eq!(cn(&renewed.der).as_deref(), Some("www.svc.internal"));
    // A re-key CSR without a CN keeps it too; one naming the other name
    // moves it.
    let key2 = KeyPair::generate().unwrap();
    let rekeyed = ca
        .renew(sigil_authority::RenewRequest {
            current: renewed.der.clone(),
            caller: caller.clone(),
            csr: Some(csr_with(&key2, None, &names, vec![])),
        })
        .await
        .unwrap();
    assert_eq!(cn(&rekeyed.der).as_deref(), Some("www.svc.internal"));
    let moved = ca
        .renew(sigil_authority::RenewRequest {
            current: rekeyed.der.clone(),
            caller,
            csr: Some(csr_with(&key2, Some("api.svc.internal"), &names, vec![])),
        })
        .await
        .unwrap();
    assert_eq!(cn(&moved.der).as_deref(), Some("api.svc.internal"));
}

/// cACompromise and aACompromise are an operator's finding; holds do not
/// exist (a revocation is final).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_compromise_reasons_are_for_operators() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("reasons.db").display());
    let ca = authority(&url).await;
    let key = KeyPair::generate().unwrap();
    let cert = ca
        .issue(req(
            csr_with(&key, None, &["r.svc.internal"], vec![]),
            Requester::Token("r".into()),
        ))
        .await
        .unwrap();
    let holder = Requester::Mtls("r.svc.internal".into());
    for reason in [2, 10] {
        let e = ca.revoke(&cert.serial, reason, &holder).await.unwrap_err();
        assert!(matches!(e, Error::InvalidRevocation(_)), "{e}");
        assert!(e.to_string().contains("for operators"), "{e}");
    }
    let e = ca.revoke(&cert.serial, 6, &holder).await.unwrap_err();
    assert!(e.to_string().contains("final"), "{e}");
    assert!(!ca.is_revoked(&cert.serial).await.unwrap());
    ca.revoke(&cert.serial, 2, &Requester::Operator("o".into()))
        .await
        .unwrap();
    assert!(ca.is_revoked(&cert.serial).await.unwrap());
}
