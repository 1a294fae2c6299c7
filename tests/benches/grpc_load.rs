//! Load driver for issuance over the network, against a running server.
//!
//!     grpc_load grpc  ADDR ROOTS.pem TOKEN SERVER_PID [CERTS] [CONNECTIONS] [RUNS]
//!     grpc_load cfssl URL SERVER_PID [CERTS] [CONNECTIONS] [RUNS]
//!     grpc_load ocsp  URL REQUEST_DIR SERVER_PID [REQUESTS] [CONNECTIONS] [RUNS]
//!     grpc_load acme  DIRECTORY_URL ROOTS.pem SERVER_PID HTTP01_PORT [CERTS] [CONCURRENCY] [RUNS]
//!
//! `grpc`: Sigil's CertificateAuthority/Sign over TLS with a client certificate
//! (obtained once with TOKEN); `cfssl`: cfssl's /api/v1/cfssl/sign; `ocsp`:
//! POSTs the DER OCSP requests in REQUEST_DIR (any responder); `acme`: the
//! whole RFC 8555 flow per certificate with http-01 answered by the driver on
//! HTTP01_PORT (any ACME server). Each
//! connection keeps one request in flight; CSRs (P-256) are made beforehand.
//! Prints per run: certificates/s, p50/p99 latency, server CPU per certificate
//! (from /proc/PID/stat) and server RSS, then the medians. Run by
//! scripts/bench-grpc, which starts both servers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark harness

use sigil_grpc::pb::SignRequest;
use sigil_grpc::pb::certificate_authority_client::CertificateAuthorityClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn csrs(n: usize) -> Vec<(Vec<u8>, String)> {
    (0..n)
        .map(|i| {
            let key = rcgen::KeyPair::generate().unwrap();
            let name = format!("svc{i}.load.internal");
            let mut p = rcgen::CertificateParams::new(vec![name]).unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            let csr = p.serialize_request(&key).unwrap();
            (csr.der().to_vec(), csr.pem().unwrap())
        })
        .collect()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn rss_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Run {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Drives `conns` workers, each calling `one(worker, i)` until `n` requests are done.
async fn drive<F, Fut>(pid: u32, n: usize, conns: usize, one: F) -> Run
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conns {
        let (one, next) = (one.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                one(w, i).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    Run {
        rate: n as f64 / secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_us: cpu / n as f64 * 1e6,
    }
}

fn report(name: &str, conns: usize, pid: u32, runs: Vec<Run>) {
    for (i, r) in runs.iter().enumerate() {
        println!(
            "{name} run {}: {:.0} per second, p50 {:.1} ms, p99 {:.1} ms, server CPU {:.0} us each ({conns} connections)",
            i + 1,
            r.rate,
            r.p50_ms,
            r.p99_ms,
            r.cpu_us
        );
    }
    let unit = if name == "ocsp" {
        "responses"
    } else {
        "certificates"
    };
    println!(
        "{name} median of {}: {:.0} {unit}/s, p50 {:.1} ms, p99 {:.1} ms, server CPU {:.0} us each; server RSS {:.1} MiB (peak {:.1} MiB)",
        runs.len(),
        median(runs.iter().map(|r| r.rate).collect()),
        median(runs.iter().map(|r| r.p50_ms).collect()),
        median(runs.iter().map(|r| r.p99_ms).collect()),
        median(runs.iter().map(|r| r.cpu_us).collect()),
        rss_mib(pid, "VmRSS:"),
        rss_mib(pid, "VmHWM:"),
    );
}

async fn grpc_mode(args: &[String]) {
    let addr = &args[0];
    let roots = std::fs::read_to_string(&args[1]).unwrap();
    let token = args[2].trim().to_string();
    let pid: u32 = args[3].parse().unwrap();
    let n: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let conns: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(32);
    let runs: usize = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(5);
    let url = format!("https://{addr}");
    let tls = |id: Option<Identity>| {
        let t = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&roots))
            .domain_name("localhost");
        match id {
            Some(i) => t.identity(i),
            None => t,
        }
    };
    // The driver's own client certificate, from the bootstrap token.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["load-driver.internal".to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    let ch = Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(tls(None))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(SignRequest {
        csr,
        profile: String::new(),
        lifetime_seconds: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let me = CertificateAuthorityClient::new(ch)
        .sign(req)
        .await
        .unwrap()
        .into_inner();
    let identity = Identity::from_pem(me.chain_pem, key.serialize_pem());

    let csrs = Arc::new(csrs(4096));
    let mut results = Vec::new();
    for _ in 0..runs {
        let mut clients: Vec<CertificateAuthorityClient<Channel>> = Vec::new();
        for _ in 0..conns {
            let ch = Endpoint::from_shared(url.clone())
                .unwrap()
                .tls_config(tls(Some(identity.clone())))
                .unwrap()
                .connect()
                .await
                .unwrap();
            clients.push(CertificateAuthorityClient::new(ch));
        }
        let clients = Arc::new(clients);
        let csrs = csrs.clone();
        results.push(
            drive(pid, n, conns, move |w, i| {
                let mut c = clients[w].clone();
                let csr = csrs[i % csrs.len()].0.clone();
                async move {
                    c.sign(SignRequest {
                        csr,
                        profile: String::new(),
                        lifetime_seconds: 0,
                    })
                    .await
                    .expect("Sign");
                }
            })
            .await,
        );
    }
    report("sigil grpc", conns, pid, results);
}

async fn cfssl_mode(args: &[String]) {
    use http_body_util::{BodyExt, Full};
    let url = format!("{}/api/v1/cfssl/sign", args[0].trim_end_matches('/'));
    let pid: u32 = args[1].parse().unwrap();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let conns: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let runs: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5);
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        csrs(4096)
            .into_iter()
            .map(|(_, pem)| {
                serde_json::to_vec(&serde_json::json!({ "certificate_request": pem })).unwrap()
            })
            .collect(),
    );
    let mut results = Vec::new();
    for _ in 0..runs {
        let clients = http_clients(conns);
        let (bodies, url) = (bodies.clone(), url.clone());
        results.push(
            drive(pid, n, conns, move |w, i| {
                let c = clients[w].clone();
                let body = bodies[i % bodies.len()].clone();
                let url = url.clone();
                async move {
                    let req = hyper::Request::post(url)
                        .header("content-type", "application/json")
                        .body(Full::new(bytes::Bytes::from(body)))
                        .unwrap();
                    let resp = c.request(req).await.expect("cfssl sign");
                    let status = resp.status();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    assert!(
                        status.is_success(),
                        "cfssl: {status} {}",
                        String::from_utf8_lossy(&body)
                    );
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(v["success"], true, "cfssl: {v}");
                }
            })
            .await,
        );
    }
    report("cfssl", conns, pid, results);
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// One HTTP/1.1 client (one keep-alive connection) per worker.
fn http_clients(conns: usize) -> Arc<Vec<HttpClient>> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    Arc::new(
        (0..conns)
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build_http()
            })
            .collect(),
    )
}

/// CPU seconds this process has used (the load generator's own cost).
fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id())
}

async fn ocsp_mode(args: &[String]) {
    use http_body_util::{BodyExt, Full};
    let url = args[0].clone();
    let dir = std::path::PathBuf::from(&args[1]);
    let pid: u32 = args[2].parse().unwrap();
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let conns: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(8);
    let runs: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut reqs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "der"))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    reqs.sort();
    assert!(!reqs.is_empty(), "no *.der requests in {}", dir.display());
    let reqs = Arc::new(reqs);
    let mut results = Vec::new();
    let mut driver_cpu = Vec::new();
    // One warm-up pass (first answers may be signed on demand), then the runs.
    for run in 0..=runs {
        let clients = http_clients(conns);
        let (reqs, url) = (reqs.clone(), url.clone());
        let count = if run == 0 { reqs.len() * 2 } else { n };
        let own0 = own_cpu_seconds();
        let r = drive(pid, count, conns, move |w, i| {
            let c = clients[w].clone();
            let body = reqs[i % reqs.len()].clone();
            let url = url.clone();
            async move {
                let req = hyper::Request::post(url)
                    .header("content-type", "application/ocsp-request")
                    .body(Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let resp = c.request(req).await.expect("OCSP request");
                assert!(resp.status().is_success(), "OCSP HTTP {}", resp.status());
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                // OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED (0 = successful), ... }
                let status = body.windows(3).position(|w| w == [0x0a, 0x01, 0x00]);
                assert!(
                    status.is_some_and(|p| p <= 4),
                    "OCSP response not successful"
                );
            }
        })
        .await;
        if run > 0 {
            driver_cpu.push((own_cpu_seconds() - own0) / n as f64 * 1e6);
            results.push(r);
        }
    }
    report("ocsp", conns, pid, results);
    println!(
        "ocsp load generator CPU: median {:.0} us/response",
        median(driver_cpu)
    );
}

/// `acme DIRECTORY ROOTS.pem SERVER_PID RESPONDER_PORT [CERTS] [CONCURRENCY] [RUNS]`
async fn acme_mode(args: &[String]) {
    let directory = args[0].clone();
    let roots = std::fs::read_to_string(&args[1]).unwrap();
    let pid: u32 = args[2].parse().unwrap();
    let port: u16 = args[3].parse().unwrap();
    let n: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let conns: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(32);
    let runs: usize = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(5);
    let tokens = acme::Tokens::default();
    tokio::spawn(acme::responder(port, tokens.clone()));
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(tokio::sync::Mutex::new(
            acme::Client::new(&directory, &roots).await,
        ));
    }
    let clients = Arc::new(clients);
    let mut results = Vec::new();
    let mut driver_cpu = Vec::new();
    for run in 0..runs {
        let orders: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
            (0..n)
                .map(|i| {
                    let name = format!("o{run}-{i}.load.localhost");
                    let key = rcgen::KeyPair::generate().unwrap();
                    let mut p = rcgen::CertificateParams::new(vec![name.clone()]).unwrap();
                    p.distinguished_name = rcgen::DistinguishedName::new();
                    let der = p.serialize_request(&key).unwrap().der().to_vec();
                    (name, der)
                })
                .collect(),
        );
        let (clients, tokens) = (clients.clone(), tokens.clone());
        let own0 = own_cpu_seconds();
        let r = drive(pid, n, conns, move |w, i| {
            let (clients, tokens, orders) = (clients.clone(), tokens.clone(), orders.clone());
            async move {
                let mut c = clients[w].lock().await;
                let (name, der) = &orders[i];
                let pem = c.obtain(name, der, &tokens).await;
                assert!(pem.contains("BEGIN CERTIFICATE"));
            }
        })
        .await;
        driver_cpu.push((own_cpu_seconds() - own0) / n as f64 * 1e6);
        results.push(r);
    }
    report("acme", conns, pid, results);
    println!(
        "acme load generator CPU: median {:.0} us/certificate",
        median(driver_cpu)
    );
}

#[path = "load/acme.rs"]
mod acme;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // The ACME driver runs on one thread: its work per certificate is a few
    // small requests, and one thread spares it the cross-thread wake-ups
    // (a tenth of its CPU on two threads), leaving more of the shared cores
    // to the server under test. The other modes keep two threads.
    let rt = if args.first().map(String::as_str) == Some("acme") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    match args.first().map(String::as_str) {
        Some("grpc") => rt.block_on(grpc_mode(&args[1..])),
        Some("cfssl") => rt.block_on(cfssl_mode(&args[1..])),
        Some("ocsp") => rt.block_on(ocsp_mode(&args[1..])),
        Some("acme") => rt.block_on(acme_mode(&args[1..])),
        _ => eprintln!(
            "usage: grpc_load grpc ADDR ROOTS TOKEN PID [N] [CONNS] [RUNS] | cfssl URL PID [N] [CONNS] [RUNS]"
        ),
    }
}
