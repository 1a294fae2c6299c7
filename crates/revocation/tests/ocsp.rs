//! The OCSP responder in-process on a clock the test moves: answers name the
//! certificate with the hash the request used, a node that does not run the
//! background jobs never serves an answer about to expire, and nonces follow
//! RFC 8954.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_authority::{ActiveIssuer, Authority, IssueRequest, Settings};
use sigil_core::ocsp::{self, CertIdHash, IssuerHashes};
use sigil_core::{CaUrls, Clock, IssuerInfo, Requester, SystemClock};
use sigil_policy::Policy;
use sigil_revocation::{Leader, Ocsp, OcspSettings, Presigned};
use sigil_signer::testing::TestCa;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

const POLICY: &str = r#"
[[rule]]
name = "internal"
effect = "allow"
requesters = ["*"]
dns = [".internal"]
"#;

/// A clock the test moves.
struct TestClock(Mutex<OffsetDateTime>);

impl Clock for TestClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    authority: Arc<Authority>,
    hashes: IssuerHashes,
    issuer_id: String,
}

/// Keys as a server node holds them; "sealing" a responder key keeps it as
/// is (the binary encrypts it), so that every node can open it.
struct PlainKeys(Vec<u8>);

impl sigil_authority::IssuerKeys for PlainKeys {
    fn load(
        &self,
        _issuer: &sigil_authority::IssuerRow,
    ) -> Result<sigil_signer::CaKey, sigil_authority::Error> {
        Ok(sigil_signer::SoftwareKey::from_pkcs8(&self.0, "test issuer")?.into())
    }

    fn seal(&self, pkcs8: &[u8]) -> Option<Result<Vec<u8>, sigil_authority::Error>> {
        Some(Ok(pkcs8.to_vec()))
    }

    fn unseal(&self, sealed: &[u8]) -> Result<sigil_signer::CaKey, sigil_authority::Error> {
        Ok(sigil_signer::SoftwareKey::from_pkcs8(sealed, "OCSP responder")?.into())
    }
}

async fn fixture() -> Fixture {
    fixture_with(false).await
}

/// `shared`: nodes can share one OCSP responder (they hold the key store
/// its key is sealed with), as server nodes do.
async fn fixture_with(shared: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemClock.now();
    let clock = Arc::new(TestClock(Mutex::new(now)));
    let ca = TestCa::new(now).unwrap();
    let urls = CaUrls::new("http://ca.test:8080");
    let issuer =
        ActiveIssuer::new(&ca.intermediate_der, ca.intermediate_key().unwrap(), &urls).unwrap();
    let url = format!("sqlite://{}", dir.path().join("ocsp.db").display());
    let store = sigil_store::Store::open(&url).await.unwrap();
    let info = IssuerInfo::from_der(&ca.intermediate_der).unwrap();
    sigil_authority::issuers::install(&store, &info, None, "operator:test", now)
        .await
        .unwrap();
    let authority = Authority::new(
        clock.clone(),
        Policy::from_sources([("test.toml", POLICY)]).unwrap(),
        issuer,
        store,
        Settings {
            default_lifetime: Duration::from_secs(7 * 86400),
            max_lifetime: Duration::from_secs(30 * 86400),
            urls,
            rate_per_minute: 0,
        },
    );
    let authority = if shared {
        authority.with_keys(Arc::new(PlainKeys(ca.intermediate_pkcs8.to_vec())))
    } else {
        authority
    };
    Fixture {
        _dir: dir,
        clock,
        authority: Arc::new(authority),
        hashes: IssuerHashes::of(&info),
        issuer_id: info.id.to_string(),
    }
}

fn csr(name: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.serialize_request(&key).unwrap().der().to_vec()
}

/// Issues a certificate for `name` by an operator; returns its serial.
async fn issue(authority: &Authority, name: &str) -> sigil_core::Serial {
    authority
        .issue(IssueRequest {
            csr: csr(name).into(),
            requester: Requester::Operator("test".into()),
            profile: None,
            lifetime: None,
            token: None,
            not_before: None,
            completes: None,
        })
        .await
        .unwrap()
        .serial
}

/// A node not running the background jobs, with its responder.
async fn follower(authority: &Arc<Authority>) -> Arc<Ocsp> {
    let leader = Leader::default();
    leader.set(false);
    let ocsp = Ocsp::new(authority.clone(), OcspSettings::default(), leader);
    ocsp.ensure_signers().await.unwrap();
    ocsp
}

/// Issues `n` certificates, `{prefix}0.internal` and on.
async fn issue_n(authority: &Authority, prefix: &str, n: usize) -> Vec<sigil_core::Serial> {
    let mut serials = Vec::new();
    for i in 0..n {
        serials.push(issue(authority, &format!("{prefix}{i}.internal")).await);
    }
    serials
}

/// The answer `ocsp` sends about `serial` (SHA-1 CertID, no nonce), which
/// must be cacheable.
async fn cacheable(ocsp: &Ocsp, hashes: &IssuerHashes, serial: &sigil_core::Serial) -> Vec<u8> {
    let q = hashes.cert_id(serial, CertIdHash::Sha1).unwrap();
    let a = ocsp.answer(&ocsp::request(&[&q], None).unwrap()).await;
    assert!(a.headers.is_some(), "a cacheable answer");
    a.der.to_vec()
}

#[tokio::test]
async fn answers_echo_the_hash_and_never_serve_a_stale_revocation() {
    let f = fixture().await;
    let serial = issue(&f.authority, "a.internal").await;
    // A node that does not run the background jobs: it never pre-signs,
    // it answers from what it signed on demand or was told.
    let leader = Leader::default();
    leader.set(false);
    let settings = OcspSettings::default();
    let validity = settings.validity;
    let ocsp = Ocsp::new(f.authority.clone(), settings, leader);
    ocsp.ensure_signers().await.unwrap();
    let ask = |hash: CertIdHash, nonce: Option<Vec<u8>>| {
        let q = f.hashes.cert_id(&serial, hash).unwrap();
        let der = ocsp::request(&[&q], nonce.as_deref()).unwrap();
        let ocsp = ocsp.clone();
        async move {
            let a = ocsp.answer(&der).await;
            ocsp::summarize(&a.der).unwrap_or_else(|| panic!("{} answer", a.status))
        }
    };

    // Each answer names the certificate with the request's hash, also when
    // the other hash's answer is cached.
    for _ in 0..2 {
        for hash in [CertIdHash::Sha1, CertIdHash::Sha256] {
            let s = ask(hash, None).await;
            assert_eq!((s.hash, s.revoked), (Some(hash), false));
        }
    }

    // Revoked, and told so (as the sync loop does).
    f.authority
        .revoke(&serial, 1, &Requester::Operator("test".into()))
        .await
        .unwrap();
    ocsp.revoked(&[serial.to_hex()]).await;
    for hash in [CertIdHash::Sha1, CertIdHash::Sha256] {
        let s = ask(hash, None).await;
        assert_eq!((s.hash, s.revoked), (Some(hash), true));
    }

    // Most of the validity later no job node has re-signed it: the answer
    // served is signed again rather than one about to expire.
    *f.clock.0.lock().unwrap() += validity * 9 / 10;
    let now = f.authority.now().unix_timestamp();
    for hash in [CertIdHash::Sha1, CertIdHash::Sha256] {
        let s = ask(hash, None).await;
        assert!(s.revoked);
        let left = s.next_update.unwrap() - now;
        assert!(
            left > i64::try_from(validity.as_secs() / 2).unwrap(),
            "{hash:?}: {left} s left"
        );
    }
}

/// A client compares the CertID echoed with its own, parameters included:
/// one leaving out the hash algorithm's NULL parameters (RFC 5754 allows it)
/// must not get the answer cached for the usual form, nor the other way round.
#[tokio::test]
async fn answers_echo_the_hash_parameters_as_sent() {
    let f = fixture().await;
    let serial = issue(&f.authority, "p.internal").await;
    let ocsp = follower(&f.authority).await;
    for hash in [CertIdHash::Sha1, CertIdHash::Sha256] {
        for absent in [true, false, true, false, true] {
            let q = match absent {
                true => f.hashes.cert_id_without_parameters(&serial, hash),
                false => f.hashes.cert_id(&serial, hash),
            }
            .unwrap();
            let a = ocsp.answer(&ocsp::request(&[&q], None).unwrap()).await;
            let s = ocsp::summarize(&a.der).unwrap();
            assert_eq!((s.hash, s.canonical), (Some(hash), !absent), "{hash:?}");
        }
    }
}

/// Once this node knows of a revocation, a cached `good` answer is not
/// served, even before the answer is re-signed (a long list of revocations
/// is worked through one by one); then every answer says revoked, stored
/// for the other nodes.
#[tokio::test]
async fn a_known_revocation_is_never_answered_from_a_good_answer() {
    let f = fixture().await;
    let serials = issue_n(&f.authority, "m", 6).await;
    let job_node = Ocsp::new(
        f.authority.clone(),
        OcspSettings::default(),
        Leader::default(),
    );
    assert_eq!(job_node.refresh().await.unwrap().signed, 6);
    for s in &serials {
        assert!(
            !ocsp::summarize(&cacheable(&job_node, &f.hashes, s).await)
                .unwrap()
                .revoked
        );
    }
    for s in &serials[..4] {
        f.authority
            .revoke(s, 1, &Requester::Operator("test".into()))
            .await
            .unwrap();
    }
    f.authority.sync().await.unwrap();
    let revoked_at = f.clock.now().unix_timestamp();
    for (i, s) in serials.iter().enumerate() {
        let der = cacheable(&job_node, &f.hashes, s).await;
        let summary = ocsp::summarize(&der).unwrap();
        assert_eq!(summary.revoked, i < 4, "answer {i}");
        // Backdated, but never to before the revocation it reports.
        if summary.revoked {
            assert!(summary.this_update >= revoked_at, "answer {i}");
        } else {
            assert_eq!(summary.this_update, revoked_at - 60, "answer {i}");
        }
    }
    let hexes: Vec<String> = serials[..4].iter().map(|s| s.to_hex()).collect();
    job_node.revoked(&hexes).await;
    let other = follower(&f.authority).await;
    f.authority.sync().await.unwrap();
    assert_eq!(other.load_stored().await.unwrap(), 6);
    for (i, s) in serials.iter().enumerate() {
        let der = cacheable(&other, &f.hashes, s).await;
        assert_eq!(ocsp::summarize(&der).unwrap().revoked, i < 4, "answer {i}");
    }
}

/// While this node's view of the revocations is stale (its sync stopped),
/// a pre-signed `good` answer is served only once the database confirms it:
/// a revocation made elsewhere meanwhile is not hidden.
#[tokio::test]
async fn a_stale_view_does_not_hide_a_revocation_made_elsewhere() {
    let f = fixture().await;
    let serials = issue_n(&f.authority, "s", 2).await;
    let job_node = Ocsp::new(
        f.authority.clone(),
        OcspSettings::default(),
        Leader::default(),
    );
    assert_eq!(job_node.refresh().await.unwrap().signed, 2);
    f.authority.sync().await.unwrap();
    for s in &serials {
        let der = cacheable(&job_node, &f.hashes, s).await;
        assert!(!ocsp::summarize(&der).unwrap().revoked);
    }
    // Revoked through the database alone (the CLI, another node), and this
    // node's last sync is now 10 s old.
    let now = f.clock.now();
    sigil_authority::revoke::revoke(
        f.authority.store(),
        now,
        &serials[0],
        4,
        &Requester::Operator("test".into()),
    )
    .await
    .unwrap();
    *f.clock.0.lock().unwrap() = now + time::Duration::seconds(10);
    for (i, s) in serials.iter().enumerate() {
        // Asked twice: the second request is the one remembered.
        for _ in 0..2 {
            let der = cacheable(&job_node, &f.hashes, s).await;
            assert_eq!(ocsp::summarize(&der).unwrap().revoked, i == 0, "answer {i}");
        }
    }
}

#[tokio::test]
async fn nonces_of_1_to_128_bytes_are_echoed_and_empty_ones_refused() {
    let f = fixture().await;
    let ocsp = Ocsp::new(
        f.authority.clone(),
        OcspSettings::default(),
        Leader::default(),
    );
    ocsp.ensure_signers().await.unwrap();
    let serial = sigil_core::Serial::parse_hex("1234").unwrap();
    let q = f.hashes.cert_id(&serial, CertIdHash::Sha1).unwrap();
    let octets = |n: usize| {
        // OCTET STRING of n bytes (short form length: n < 128).
        let mut v = vec![0x04, u8::try_from(n).unwrap()];
        v.extend(std::iter::repeat_n(0x5a, n));
        v
    };
    for n in [16, 33, 100] {
        let a = ocsp
            .answer(&ocsp::request(&[&q], Some(&octets(n))).unwrap())
            .await;
        let s = ocsp::summarize(&a.der).unwrap();
        assert_eq!(s.nonce, Some(octets(n)), "{n} bytes");
    }
    let a = ocsp
        .answer(&ocsp::request(&[&q], Some(&octets(0))).unwrap())
        .await;
    assert_eq!(
        (a.status, a.der.as_ref()),
        ("malformed", &[0x30, 0x03, 0x0a, 0x01, 0x01][..])
    );
    // A responder that ignores nonces ignores a malformed one too.
    let ignoring = Ocsp::new(
        f.authority.clone(),
        OcspSettings {
            nonce: sigil_revocation::NoncePolicy::Ignore,
            ..OcspSettings::default()
        },
        Leader::default(),
    );
    ignoring.ensure_signers().await.unwrap();
    let a = ignoring
        .answer(&ocsp::request(&[&q], Some(&octets(0))).unwrap())
        .await;
    assert_eq!(a.status, "unknown");
    assert_eq!(ocsp::summarize(&a.der).unwrap().nonce, None);
}

/// Pre-signed answers keep the responder's certificates once, not once per
/// answer; a restarted node loads the stored answers the same way and sends
/// them byte for byte as signed.
#[tokio::test]
async fn presigned_answers_share_the_responder_certificates() {
    let f = fixture_with(true).await;
    let serials = issue_n(&f.authority, "s", 5).await;
    f.authority
        .revoke(&serials[2], 1, &Requester::Operator("test".into()))
        .await
        .unwrap();

    let ask = |ocsp: Arc<Ocsp>| {
        let (serials, hashes) = (&serials, &f.hashes);
        async move {
            let mut out = Vec::new();
            for s in serials {
                out.push(cacheable(&ocsp, hashes, s).await);
            }
            out
        }
    };

    let job_node = Ocsp::new(
        f.authority.clone(),
        OcspSettings::default(),
        Leader::default(),
    );
    assert_eq!(job_node.refresh().await.unwrap().signed, 5);
    let (answers, bytes) = job_node.cached_size();
    let sent = ask(job_node.clone()).await;
    let whole: usize = sent.iter().map(Vec::len).sum();
    assert_eq!(answers, 5);
    assert!(
        bytes * 2 < whole,
        "{bytes} bytes held for {whole} bytes of responses"
    );
    for (i, der) in sent.iter().enumerate() {
        let s = ocsp::summarize(der).unwrap();
        assert_eq!(s.revoked, i == 2, "answer {i}");
    }
    assert_eq!(
        job_node.cached_size(),
        (answers, bytes),
        "served from the cache"
    );

    // Both revoked after the job node stored their `good` answers. Ten
    // minutes later the job node has re-signed and stored 3's; 4's it has
    // not (yet).
    for i in [3, 4] {
        f.authority
            .revoke(&serials[i], 1, &Requester::Operator("test".into()))
            .await
            .unwrap();
    }
    *f.clock.0.lock().unwrap() += Duration::from_secs(600);
    job_node.revoked(&[serials[3].to_hex()]).await;

    // Another node (not running the jobs) loads what the job node stored.
    let other = follower(&f.authority).await;
    // Until this node's view of the revocations is current, nothing is
    // loaded (a stored `good` might predate a revocation), and the next load
    // reads all of them again, not only the newest.
    assert_eq!(other.load_stored().await.unwrap(), 0);
    f.authority.sync().await.unwrap();
    // 4's stale `good` answer is left out and signed afresh when asked.
    assert_eq!(other.load_new().await.unwrap(), 4);
    let (held, _) = other.cached_size();
    assert_eq!(held, 4);
    let again = ask(other.clone()).await;
    for (i, der) in again.iter().enumerate() {
        if i >= 3 {
            assert!(ocsp::summarize(der).unwrap().revoked, "answer {i}");
        } else {
            assert_eq!(der, &sent[i], "answer {i} as stored");
        }
    }
    assert!(
        other.cached_size().1 * 2 < whole,
        "loaded answers share the certificates too"
    );
}

/// A node taking over the jobs right after a pass (or the job node
/// restarting) keeps the stored answers that are still fresh and signs the
/// rest: a certificate revoked since, one issued since (answered on demand
/// meanwhile, not stored), and all of them once they have aged.
#[tokio::test]
async fn a_new_job_node_keeps_the_fresh_stored_answers() {
    let f = fixture_with(true).await;
    let serials = issue_n(&f.authority, "k", 4).await;
    let job_node = Ocsp::new(
        f.authority.clone(),
        OcspSettings::default(),
        Leader::default(),
    );
    let all_signed = Presigned { signed: 4, kept: 0 };
    assert_eq!(job_node.refresh().await.unwrap(), all_signed);
    let mut sent = Vec::new();
    for s in &serials {
        sent.push(cacheable(&job_node, &f.hashes, s).await);
    }
    // Another pass at once (as after an issuer change) signs nothing.
    assert_eq!(
        job_node.refresh().await.unwrap(),
        Presigned { signed: 0, kept: 4 }
    );

    // Five minutes on, the job node restarts: it loads the stored answers,
    // one certificate is revoked and one more issued (its answer signed on
    // demand), and then it runs a pass.
    *f.clock.0.lock().unwrap() += Duration::from_secs(300);
    let next = Ocsp::new(
        f.authority.clone(),
        OcspSettings::default(),
        Leader::default(),
    );
    next.ensure_signers().await.unwrap();
    f.authority.sync().await.unwrap();
    assert_eq!(next.load_stored().await.unwrap(), 4);
    f.authority
        .revoke(&serials[1], 1, &Requester::Operator("test".into()))
        .await
        .unwrap();
    let new = issue(&f.authority, "k4.internal").await;
    cacheable(&next, &f.hashes, &new).await;
    assert_eq!(
        next.refresh().await.unwrap(),
        Presigned { signed: 2, kept: 3 }
    );
    for i in [0, 2, 3] {
        let der = cacheable(&next, &f.hashes, &serials[i]).await;
        assert_eq!(der, sent[i], "answer {i} kept as stored");
    }
    let revoked = cacheable(&next, &f.hashes, &serials[1]).await;
    assert!(ocsp::summarize(&revoked).unwrap().revoked);
    let mut rows = Vec::new();
    f.authority
        .stored_ocsp(&f.issuer_id, Duration::ZERO, -1, |r| rows.push(r))
        .await
        .unwrap();
    let mut stored: Vec<String> = rows.iter().map(|r| r.serial.clone()).collect();
    stored.sort();
    let mut all: Vec<String> = serials.iter().chain([&new]).map(|s| s.to_hex()).collect();
    all.sort();
    assert_eq!(stored, all, "the new certificate's answer is stored too");
    let row = rows.iter().find(|r| r.serial == new.to_hex()).unwrap();
    let tail = &f
        .authority
        .ocsp_certs(Duration::from_secs(60))
        .await
        .unwrap()[0]
        .der;
    let served = cacheable(&next, &f.hashes, &new).await;
    assert_eq!(
        [&row.der[..], &tail[..]].concat(),
        served,
        "the pass's answer"
    );

    // A node whose validity setting was shortened keeps none of them:
    // they were signed with the longer one.
    let shorter = Ocsp::new(
        f.authority.clone(),
        OcspSettings {
            validity: Duration::from_secs(1800),
            ..OcspSettings::default()
        },
        Leader::default(),
    );
    shorter.ensure_signers().await.unwrap();
    assert_eq!(shorter.load_stored().await.unwrap(), 5);
    assert_eq!(
        shorter.refresh().await.unwrap(),
        Presigned { signed: 5, kept: 0 }
    );

    // Ten minutes later none is fresh enough to last past the next pass
    // with time to spare: all are signed again.
    *f.clock.0.lock().unwrap() += Duration::from_secs(600);
    assert_eq!(
        next.refresh().await.unwrap(),
        Presigned { signed: 5, kept: 0 }
    );
}

/// A node not running the jobs follows what the job node stores by when it
/// was stored, not by thisUpdate: a pass over many certificates stores its
/// answers over minutes, all with the thisUpdate of its start.
#[tokio::test]
async fn a_follower_loads_answers_stored_late_in_a_long_pass() {
    let f = fixture_with(true).await;
    issue_n(&f.authority, "f", 3).await;
    let job_node = Ocsp::new(
        f.authority.clone(),
        OcspSettings::default(),
        Leader::default(),
    );
    assert_eq!(job_node.refresh().await.unwrap().signed, 3);
    let start = f.authority.now();

    let follower = follower(&f.authority).await;
    *f.clock.0.lock().unwrap() += Duration::from_secs(300);
    f.authority.sync().await.unwrap();
    assert_eq!(follower.load_stored().await.unwrap(), 3);
    // For a while the next loads read the last minute's again.
    assert_eq!(follower.load_new().await.unwrap(), 3);

    // Five minutes on, a last batch of that same pass is stored: a
    // certificate's answer with the pass's thisUpdate.
    *f.clock.0.lock().unwrap() += Duration::from_secs(300);
    f.authority.sync().await.unwrap();
    let late = issue(&f.authority, "late.internal").await;
    let q = f.hashes.cert_id(&late, CertIdHash::Sha1).unwrap();
    let signed = job_node.answer(&ocsp::request(&[&q], None).unwrap()).await;
    let this_update = (start - Duration::from_secs(60)).unix_timestamp();
    f.authority
        .save_ocsp(
            &[sigil_store::SignedOcsp {
                serial: late.to_hex(),
                issuer_id: f.issuer_id.clone(),
                this_update,
                next_update: this_update + 3600,
                der: signed.der.to_vec(),
                certs: None,
                stored_at: f.authority.now().unix_timestamp(),
            }],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(follower.cached_size().0, 3);
    assert!(follower.load_new().await.unwrap() >= 1);
    assert_eq!(follower.cached_size().0, 4, "the late answer is loaded");
}

/// Stored answers name their responder's certificates, which are stored
/// once: each row holds only the bytes before them. A follower joins them
/// back into byte for byte what the job node serves, and an answer naming
/// certificates it has not read is left for a later load.
#[tokio::test]
async fn stored_answers_name_their_responder_certificates_once() {
    let f = fixture_with(true).await;
    let serials = issue_n(&f.authority, "c", 3).await;
    let ask = |ocsp: Arc<Ocsp>, serial: sigil_core::Serial| {
        let hashes = &f.hashes;
        async move { cacheable(&ocsp, hashes, &serial).await }
    };
    let job_node = Ocsp::new(
        f.authority.clone(),
        OcspSettings::default(),
        Leader::default(),
    );
    assert_eq!(job_node.refresh().await.unwrap().signed, 3);
    let certs = f
        .authority
        .ocsp_certs(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        certs.len(),
        1,
        "one responder, its certificates stored once"
    );
    assert_eq!(
        certs[0],
        sigil_authority::OcspCerts::new(certs[0].der.clone()),
        "named by their digest"
    );
    let mut rows = Vec::new();
    f.authority
        .stored_ocsp(&f.issuer_id, Duration::ZERO, -1, |r| rows.push(r))
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    let mut sent = Vec::new();
    for serial in &serials {
        let row = rows.iter().find(|r| r.serial == serial.to_hex()).unwrap();
        let der = ask(job_node.clone(), serial.clone()).await;
        assert_eq!(row.certs.as_deref(), Some(certs[0].digest.as_str()));
        assert_eq!([&row.der[..], &certs[0].der[..]].concat(), der);
        assert!(
            row.der.len() * 3 < der.len(),
            "{} of {} bytes stored",
            row.der.len(),
            der.len()
        );
        sent.push(der);
    }

    let follower = follower(&f.authority).await;
    f.authority.sync().await.unwrap();
    assert_eq!(follower.load_stored().await.unwrap(), 3);
    for (serial, der) in serials.iter().zip(&sent) {
        assert_eq!(&ask(follower.clone(), serial.clone()).await, der);
    }

    // An answer stored naming certificates not yet there (as when they are
    // stored between a follower's two reads) is not loaded; once they are,
    // the next load reads it.
    let late = issue(&f.authority, "late.internal").await;
    let whole = ask(job_node.clone(), late.clone()).await;
    let unknown = "ab".repeat(32);
    let stored_at = f.authority.now().unix_timestamp();
    let now = f.authority.now().unix_timestamp();
    let row = sigil_store::SignedOcsp {
        serial: late.to_hex(),
        issuer_id: f.issuer_id.clone(),
        this_update: now - 60,
        next_update: now + 3600,
        der: whole[..whole.len() - certs[0].der.len()].to_vec(),
        certs: Some(unknown.clone()),
        stored_at,
    };
    f.authority
        .save_ocsp(std::slice::from_ref(&row), &[])
        .await
        .unwrap();
    follower.load_new().await.unwrap();
    assert_eq!(follower.cached_size().0, 3, "the late answer is not loaded");
    // Named certificates that do not complete it: not loaded either.
    let short = sigil_authority::OcspCerts {
        digest: "cd".repeat(32),
        der: certs[0].der[1..].to_vec(),
    };
    let wrong = sigil_store::SignedOcsp {
        certs: Some(short.digest.clone()),
        ..row.clone()
    };
    f.authority.save_ocsp(&[wrong], &[short]).await.unwrap();
    follower.load_new().await.unwrap();
    assert_eq!(follower.cached_size().0, 3, "a wrong join is not loaded");
    f.authority
        .save_ocsp(
            &[row],
            &[sigil_authority::OcspCerts {
                digest: unknown,
                der: certs[0].der.clone(),
            }],
        )
        .await
        .unwrap();
    assert!(follower.load_new().await.unwrap() >= 1);
    assert_eq!(follower.cached_size().0, 4, "the late answer is loaded");
    assert_eq!(ask(follower.clone(), late).await, whole);
}
