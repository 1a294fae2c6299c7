//! Issuance throughput: parse + verify CSR, policy, build, sign, durable commit of
//! certificate + audit row, with P-256 CSRs and a P-256 intermediate.
//!
//!     cargo bench -p sigil-authority --bench issuance -- [N] [CONCURRENCY] [RUNS]
//!
//! Defaults: 20000 certificates, concurrency 32, 5 runs, on SQLite in a temp dir.
//! With BENCH_DATABASE_URL=postgres://... each run also uses a fresh PostgreSQL
//! database next to that one. Prints each run (certificates/s and the process's
//! CPU time per certificate), the medians and the peak RSS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark harness

use rcgen::{CertificateParams, KeyPair, SanType};

// The same allocator as the `sigil` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sigil_authority::{ActiveIssuer, Authority, IssueRequest, Settings};
use sigil_core::{CaUrls, Clock, IssuerInfo, Requester, SystemClock};
use sigil_policy::Policy;
use sigil_signer::testing::TestCa;
use sigil_store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const POLICY: &str = r#"
[[rule]]
name = "bench"
effect = "allow"
requesters = ["*"]
dns = [".internal"]
"#;

async fn authority(url: &str, ca: &TestCa) -> Authority {
    let urls = CaUrls::new("http://ca.bench:8080");
    let issuer =
        ActiveIssuer::new(&ca.intermediate_der, ca.intermediate_key().unwrap(), &urls).unwrap();
    let store = Store::open(url).await.unwrap();
    let info = IssuerInfo::from_der(&ca.intermediate_der).unwrap();
    sigil_authority::issuers::install(&store, &info, None, "operator:bench", SystemClock.now())
        .await
        .unwrap();
    Authority::new(
        Arc::new(SystemClock),
        Policy::from_sources([("bench.toml", POLICY)]).unwrap(),
        issuer,
        store,
        Settings {
            default_lifetime: Duration::from_secs(86400),
            max_lifetime: Duration::from_secs(86400 * 30),
            urls,
            rate_per_minute: 0,
        },
    )
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// This process's CPU time (user + system, all threads) in seconds, from
/// /proc/self/stat in clock ticks (100 per second on Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command name: state is field 3, utime 14 and stime 15.
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    (ticks(14).unwrap_or(0.0) + ticks(15).unwrap_or(0.0)) / 100.0
}

/// Issues `n` certificates from `conc` tasks; returns certificates per second
/// and CPU microseconds per certificate (the whole process).
async fn run_once(
    ca: Arc<Authority>,
    csrs: Arc<Vec<Vec<u8>>>,
    n: usize,
    conc: usize,
) -> (f64, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let cpu = cpu_seconds();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (ca, csrs, next) = (ca.clone(), csrs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let req = IssueRequest {
                    csr: csrs[i % csrs.len()].clone().into(),
                    requester: Requester::Operator("bench".into()),
                    profile: None,
                    lifetime: None,
                    token: None,
                    not_before: None,
                    completes: None,
                };
                ca.issue(req).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    (rate, (cpu_seconds() - cpu) * 1e6 / n as f64)
}

/// Raw single-core aws-lc P-256 sign and verify rates on this host right now, so
/// the issuance figure can be read against what the hardware does today.
fn raw_p256_rates() -> (f64, f64) {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
        UnparsedPublicKey,
    };
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let msg = [7u8; 400];
    let n = 3000;
    let start = Instant::now();
    let mut sig = key.sign(&rng, &msg).unwrap();
    for _ in 1..n {
        sig = key.sign(&rng, &msg).unwrap();
    }
    let sign = n as f64 / start.elapsed().as_secs_f64();
    let public = key.public_key().as_ref().to_vec();
    let start = Instant::now();
    for _ in 0..n {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &public)
            .verify(&msg, sig.as_ref())
            .unwrap();
    }
    let verify = n as f64 / start.elapsed().as_secs_f64();
    (sign, verify)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let conc: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ca = TestCa::new(SystemClock.now()).unwrap();
        let (sign, verify) = raw_p256_rates();
        println!("host: raw aws-lc P-256 on one core: sign {sign:.0}/s, verify {verify:.0}/s");

        let csrs: Vec<Vec<u8>> = (0..256)
            .map(|i| {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::default();
                p.subject_alt_names = vec![SanType::DnsName(
                    format!("svc{i}.bench.internal").try_into().unwrap(),
                )];
                p.serialize_request(&key).unwrap().der().to_vec()
            })
            .collect();
        let csrs = Arc::new(csrs);

        let mut backends = vec![("sqlite", None)];
        if let Ok(url) = std::env::var("BENCH_DATABASE_URL") {
            backends.push(("postgres", Some(url)));
        }
        for (name, admin) in backends {
            let mut rates = Vec::new();
            let mut cpus = Vec::new();
            for run in 0..runs {
                let dir = tempfile::tempdir().unwrap();
                let url = match &admin {
                    None => format!("sqlite://{}", dir.path().join("bench.db").display()),
                    Some(a) => sigil_store::testing::fresh_postgres(a).await.unwrap(),
                };
                let authority = Arc::new(authority(&url, &ca).await);
                // As `sigil serve` does: keep the in-memory revocation and
                // blocked-key view fresh.
                authority.sync().await.unwrap();
                let syncer = {
                    let a = authority.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(sigil_authority::SYNC_INTERVAL).await;
                            let _ = a.sync().await;
                        }
                    })
                };
                let (rate, cpu) = run_once(authority.clone(), csrs.clone(), n, conc).await;
                syncer.abort();
                let report = authority.store().verify_audit().await.unwrap();
                assert!(report.first_bad.is_none());
                assert_eq!(
                    authority.store().certificate_count().await.unwrap() as usize,
                    n
                );
                authority.store().close().await;
                println!(
                    "{name} run {}: {:.0} certificates/s, {:.0} us CPU each ({n} certs, concurrency {conc})",
                    run + 1,
                    rate,
                    cpu
                );
                rates.push(rate);
                cpus.push(cpu);
            }
            println!(
                "{name} median of {runs}: {:.0} certificates/s, {:.0} us CPU each; peak RSS so far {:.1} MiB",
                median(rates),
                median(cpus),
                peak_rss_mib()
            );
        }
    });
}
