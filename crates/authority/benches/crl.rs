//! Building and signing one CRL with many entries (P-256 issuer).
//!
//!     cargo bench -p sigil-authority --bench crl -- [ENTRIES] [RUNS]
//!
//! Defaults: 1,000,000 entries, 5 runs. Prints each run (build + sign time,
//! DER size), the median, and the process's peak RSS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark harness

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sigil_core::crl::{CrlEntry, CrlSpec, CrlTemplate};
use sigil_core::{Clock, IssuerInfo, Serial, SystemClock};
use sigil_signer::CaSigner;
use sigil_signer::testing::TestCa;
use std::time::{Duration, Instant};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let now = SystemClock.now();
    let ca = TestCa::new(now).unwrap();
    let info = IssuerInfo::from_der(&ca.intermediate_der).unwrap();
    let signer = CaSigner::new(&ca.intermediate_der, ca.intermediate_key().unwrap()).unwrap();
    let reasons = [1, 3, 4, 5, 0];
    let entries: Vec<CrlEntry> = (0..n)
        .map(|i| {
            let mut b = [0u8; 16];
            sigil_signer::random_bytes(&mut b).unwrap();
            b[0] |= 0x40;
            CrlEntry {
                serial: Serial::from_random(b).unwrap(),
                revoked_at: now - Duration::from_secs((i % 86_400) as u64),
                reason: reasons[i % reasons.len()],
            }
        })
        .collect();
    let base_rss = peak_rss_mib();
    let mut times = Vec::new();
    for run in 0..runs {
        let start = Instant::now();
        let template = CrlTemplate::new(&CrlSpec {
            issuer: &info,
            number: run as u64 + 1,
            this_update: now,
            next_update: now + Duration::from_secs(86_400),
            entries: &entries,
            url: "http://ca.bench/crl/x.crl".into(),
            only_ca_certs: false,
        })
        .unwrap();
        let der = signer.sign_crl(template).unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "run {}: {n} entries built and signed in {secs:.2} s ({:.1} MB DER)",
            run + 1,
            der.len() as f64 / 1e6
        );
        times.push(secs);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "median of {runs}: {:.2} s; peak RSS {:.0} MiB (of which {:.0} MiB the {n} input entries)",
        times[times.len() / 2],
        peak_rss_mib(),
        base_rss
    );
}
