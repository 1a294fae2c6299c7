//! Revocation as relying parties see it: the CRL at the URL in every
//! certificate, checked by `openssl verify -crl_check` and pkilint, and
//! keyCompromise blocking the key.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_e2e::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// A running dev CA that has issued one P-256 leaf for `name`: `root.pem`,
/// `leaf.pem` and `int.pem` are written in the work dir, and the CSR
/// (`leaf.csr`) is kept for re-use.
struct Fixture {
    server: Server,
    config: String,
    /// Id of the issuing intermediate (from the server banner).
    issuer: String,
    csr: std::path::PathBuf,
}

fn dev_ca_with_leaf(work: &Path, name: &str) -> Fixture {
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let issuer = server.issuer_id();
    let config = work.join("data/sigil.toml").display().to_string();
    std::fs::write(work.join("root.pem"), served_root(server.port)).unwrap();
    let csr = openssl_csr(
        work,
        "leaf",
        "ec:P-256",
        &format!("/CN={name}"),
        &[&format!("DNS:{name}")],
    );
    let blocks = pem_blocks(&ok(cert_issue(&config, &csr, &[])));
    std::fs::write(work.join("leaf.pem"), &blocks[0]).unwrap();
    std::fs::write(work.join("int.pem"), blocks[1..].concat()).unwrap();
    Fixture {
        server,
        config,
        issuer,
        csr,
    }
}

/// stdout followed by stderr.
fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn crl_number(crl_pem: &Path) -> String {
    let out = run(
        "openssl",
        &[
            "crl",
            "-in",
            &crl_pem.display().to_string(),
            "-noout",
            "-crlnumber",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Downloads the CRL (DER) at `path` and writes it as PEM for openssl.
fn fetch_crl(port: u16, path: &str, dir: &Path, name: &str) -> std::path::PathBuf {
    let (status, der) = http_get(port, path).unwrap();
    assert_eq!(status, 200, "{path}");
    let der_path = dir.join(format!("{name}.der"));
    std::fs::write(&der_path, &der).unwrap();
    let pem = dir.join(format!("{name}.pem"));
    let out = run(
        "openssl",
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            &der_path.display().to_string(),
            "-out",
            &pem.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pem
}

/// Fetches the CRL at `path` until its number differs from `before`
/// (regenerated after a revocation); fails after 10 s.
fn next_crl(port: u16, path: &str, dir: &Path, name: &str, before: &str) -> std::path::PathBuf {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = fetch_crl(port, path, dir, name);
        if crl_number(&c) != before {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{path} not regenerated within 10 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn verify_with_crl(dir: &Path, crl: &Path) -> (bool, String) {
    verify_leaf_with_crl(dir, "leaf.pem", crl)
}

fn verify_leaf_with_crl(dir: &Path, leaf: &str, crl: &Path) -> (bool, String) {
    let out = run(
        "openssl",
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            &dir.join("root.pem").display().to_string(),
            "-untrusted",
            &dir.join("int.pem").display().to_string(),
            "-CRLfile",
            &crl.display().to_string(),
            &dir.join(leaf).display().to_string(),
        ],
    );
    (out.status.success(), text(&out))
}

/// `openssl <args>` succeeds; its stdout.
fn openssl_text(args: &[&str]) -> String {
    let out = run("openssl", args);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// pkilint finds no ERROR or FATAL in a DER CRL.
fn pkilint_crl_clean(der: &Path) {
    if !have("lint_crl") {
        return;
    }
    let out = run(
        "lint_crl",
        &[
            "lint",
            "-t",
            "CRL",
            "-p",
            "PKIX",
            "-s",
            "ERROR",
            &der.display().to_string(),
        ],
    );
    let findings = String::from_utf8_lossy(&out.stdout);
    assert!(
        findings.trim().is_empty(),
        "pkilint findings on {}:\n{findings}\n{}",
        der.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Time-sharded CRLs: each leaf's CRL DP names its shard, the shard CRL
/// carries that URL in its IDP, lists only its own certificates, verifies
/// with `openssl verify -crl_check` and passes pkilint; the full CRL lists
/// everything.
#[test]
fn sharded_crls_name_the_shard_and_list_only_its_certificates() {
    if !have("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let args = ["--dev", "--data-dir", "data"];
    let server = Server::start(&args, work, &[]);
    server.stop();
    let config = work.join("data/sigil.toml").display().to_string();
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(toml.contains("crl_shards = 0"), "{toml}");
    let toml = toml
        .replace("crl_shards = 0", "crl_shards = 4")
        .replace("crl_shard_width = \"6h\"", "crl_shard_width = \"1h\"");
    std::fs::write(&config, toml).unwrap();
    let server = Server::start(&args, work, &[]);
    let issuer = server.issuer_id();
    std::fs::write(work.join("root.pem"), served_root(server.port)).unwrap();

    // Two leaves expiring 22 h apart: with 4 one-hour shards they land in
    // shards two apart.
    let mut leaves = Vec::new();
    for (name, lifetime) in [("a", "24h"), ("b", "2h")] {
        let csr = openssl_csr(
            work,
            name,
            "ec:P-256",
            &format!("/CN={name}.internal"),
            &[&format!("DNS:{name}.internal")],
        );
        let blocks = pem_blocks(&ok(cert_issue(&config, &csr, &["--lifetime", lifetime])));
        std::fs::write(work.join(format!("{name}.pem")), &blocks[0]).unwrap();
        std::fs::write(work.join("int.pem"), blocks[1..].concat()).unwrap();
        let pem = work.join(format!("{name}.pem")).display().to_string();
        let dump = openssl_text(&["x509", "-in", &pem, "-noout", "-text", "-serial"]);
        let prefix = format!("/crl/{issuer}/");
        let shard: u32 = dump
            .split(&prefix)
            .nth(1)
            .and_then(|rest| rest.split_once(".crl"))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or_else(|| panic!("CDP names a shard of {issuer}: {dump}"));
        assert!(shard < 4);
        let serial = dump
            .lines()
            .find_map(|l| l.strip_prefix("serial="))
            .unwrap()
            .to_uppercase();
        leaves.push((name, shard, serial));
    }
    let (a, b) = (&leaves[0], &leaves[1]);
    assert_eq!((a.1 + 2) % 4, b.1, "{leaves:?}");

    // Every shard is published, before any revocation.
    for k in 0..4 {
        let (status, _) = http_get(server.port, &format!("/crl/{issuer}/{k}.crl")).unwrap();
        assert_eq!(status, 200, "shard {k}");
    }
    assert_eq!(
        http_get(server.port, &format!("/crl/{issuer}/9999.crl"))
            .unwrap()
            .0,
        404
    );
    let shard_a = format!("/crl/{issuer}/{}.crl", a.1);
    let before = fetch_crl(server.port, &shard_a, work, "shard-before");
    let (good, out) = verify_leaf_with_crl(work, "a.pem", &before);
    assert!(good, "{out}");
    let n_before = crl_number(&before);

    let out = ok(sigil(&[
        "revoke",
        "--config",
        &config,
        "--serial",
        &a.2,
        "--reason",
        "superseded",
    ]));
    assert!(out.contains("revoked"), "{out}");
    let after = next_crl(server.port, &shard_a, work, "shard-after", &n_before);
    let (good, out) = verify_leaf_with_crl(work, "a.pem", &after);
    assert!(!good && out.contains("error 23"), "{out}");
    let listing = openssl_text(&[
        "crl",
        "-in",
        &after.display().to_string(),
        "-noout",
        "-text",
    ]);
    assert!(listing.to_uppercase().contains(&a.2), "{listing}");
    assert!(
        listing.contains(&format!("{}{shard_a}", "http://")) || listing.contains(&shard_a),
        "the IDP names the shard URL: {listing}"
    );
    pkilint_crl_clean(&work.join("shard-after.der"));

    // The other leaf's shard does not list it, and still verifies b.
    let shard_b = format!("/crl/{issuer}/{}.crl", b.1);
    let other = fetch_crl(server.port, &shard_b, work, "shard-b");
    let listing = openssl_text(&[
        "crl",
        "-in",
        &other.display().to_string(),
        "-noout",
        "-text",
    ]);
    assert!(!listing.to_uppercase().contains(&a.2), "{listing}");
    let (good, out) = verify_leaf_with_crl(work, "b.pem", &other);
    assert!(good, "{out}");
    pkilint_crl_clean(&work.join("shard-b.der"));

    // The full CRL lists every revocation of the issuer.
    let full = fetch_crl(server.port, &format!("/crl/{issuer}.crl"), work, "full");
    let listing = openssl_text(&["crl", "-in", &full.display().to_string(), "-noout", "-text"]);
    assert!(listing.to_uppercase().contains(&a.2), "{listing}");
    server.stop();
}

#[test]
fn crl_shows_a_revocation_within_seconds_and_key_compromise_blocks_the_key() {
    if !have("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let Fixture {
        server,
        config,
        issuer,
        csr,
    } = dev_ca_with_leaf(work, "crl.internal");
    let text = String::from_utf8_lossy(
        &run(
            "openssl",
            &[
                "x509",
                "-in",
                &work.join("leaf.pem").display().to_string(),
                "-noout",
                "-text",
                "-serial",
            ],
        )
        .stdout,
    )
    .to_string();
    assert!(
        text.contains(&format!("/crl/{issuer}.crl")),
        "CDP names this CRL: {text}"
    );
    let serial = text
        .lines()
        .find_map(|l| l.strip_prefix("serial="))
        .unwrap()
        .to_string();

    // Before: the CRL verifies and does not list the certificate.
    let path = format!("/crl/{issuer}.crl");
    let before = fetch_crl(server.port, &path, work, "before");
    let (ok_before, out) = verify_with_crl(work, &before);
    assert!(ok_before, "{out}");
    let n_before = crl_number(&before);

    // Revoke with the CLI while the server runs.
    let out = ok(sigil(&[
        "revoke",
        "--config",
        &config,
        "--serial",
        &serial,
        "--reason",
        "keyCompromise",
    ]));
    assert!(out.contains("blocked"), "{out}");
    let after = next_crl(server.port, &path, work, "after", &n_before);
    let (ok_after, out) = verify_with_crl(work, &after);
    assert!(!ok_after, "{out}");
    assert!(out.contains("error 23") && out.contains("revoked"), "{out}");
    let listing = String::from_utf8_lossy(
        &run(
            "openssl",
            &[
                "crl",
                "-in",
                &after.display().to_string(),
                "-noout",
                "-text",
            ],
        )
        .stdout,
    )
    .to_string();
    assert!(
        listing.to_uppercase().contains(&serial.to_uppercase()),
        "{listing}"
    );
    assert!(listing.contains("Key Compromise"), "{listing}");
    assert!(listing.contains("Issuing Distribution Point"), "{listing}");
    assert!(listing.contains("Authority Key Identifier"), "{listing}");

    // Revoking again is refused; the same key cannot be certified again.
    let e = fails(sigil(&["revoke", "--config", &config, "--serial", &serial]));
    assert!(e.contains("already revoked"), "{e}");
    let e = fails(cert_issue(&config, &csr, &[]));
    assert!(e.contains("keyCompromise"), "{e}");

    // pkilint: no ERROR or FATAL on the CRL.
    pkilint_crl_clean(&work.join("after.der"));
    server.stop();
}

fn ocsp(args: &[&str]) -> String {
    text(&run("openssl", &[&["ocsp"], args].concat()))
}

#[test]
fn ocsp_answers_good_then_revoked_by_post_and_get_with_and_without_nonce() {
    if !have("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let Fixture { server, config, .. } = dev_ca_with_leaf(work, "ocsp.internal");
    let p = |n: &str| work.join(n).display().to_string();
    let url = format!("http://127.0.0.1:{}/ocsp", server.port);
    let base = [
        "-issuer",
        &p("int.pem"),
        "-cert",
        &p("leaf.pem"),
        "-url",
        &url,
        "-CAfile",
        &p("root.pem"),
    ];

    // good, with a nonce (fresh) and without (pre-signed / cached), POST.
    let out = ocsp(&base);
    assert!(
        out.contains("Response verify OK") && out.contains("leaf.pem: good"),
        "{out}"
    );
    let good_der = p("good.der");
    let out = ocsp(&[&base[..], &["-no_nonce", "-respout", &good_der]].concat());
    assert!(
        out.contains("Response verify OK") && out.contains("leaf.pem: good"),
        "{out}"
    );
    // A SHA-256 CertID (the SHA-1 answer is cached by now): answered with
    // its own CertID, or openssl finds no status for the certificate.
    let sha256 = [
        "-issuer",
        &p("int.pem"),
        "-sha256",
        "-cert",
        &p("leaf.pem"),
        "-url",
        &url,
        "-CAfile",
        &p("root.pem"),
        "-no_nonce",
    ];
    for _ in 0..2 {
        let out = ocsp(&sha256);
        assert!(
            out.contains("Response verify OK") && out.contains("leaf.pem: good"),
            "{out}"
        );
    }

    // Revoke with the CLI; within 5 s OCSP says revoked, with the reason.
    let serial = String::from_utf8_lossy(
        &run(
            "openssl",
            &["x509", "-in", &p("leaf.pem"), "-noout", "-serial"],
        )
        .stdout,
    )
    .trim()
    .trim_start_matches("serial=")
    .to_string();
    ok(sigil(&[
        "revoke",
        "--config",
        &config,
        "--serial",
        &serial,
        "--reason",
        "cessationOfOperation",
    ]));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = ocsp(&[&base[..], &["-no_nonce"]].concat());
        if out.contains("leaf.pem: revoked") {
            assert!(out.contains("Response verify OK"), "{out}");
            assert!(out.contains("cessationOfOperation"), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still not revoked after 5 s: {out}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = ocsp(&base);
    assert!(
        out.contains("Response verify OK") && out.contains("leaf.pem: revoked"),
        "nonce: {out}"
    );

    // GET /ocsp/<base64>, then verified offline.
    ocsp(&[
        "-issuer",
        &p("int.pem"),
        "-cert",
        &p("leaf.pem"),
        "-no_nonce",
        "-reqout",
        &p("req.der"),
    ]);
    let req = std::fs::read(work.join("req.der")).unwrap();
    let b64 = {
        use std::io::Write;
        let mut child = std::process::Command::new("base64")
            .arg("-w0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&req).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let (status, resp) = http_get(server.port, &format!("/ocsp/{b64}")).unwrap();
    assert_eq!(status, 200);
    std::fs::write(work.join("revoked.der"), &resp).unwrap();
    let out = ocsp(&[
        "-respin",
        &p("revoked.der"),
        "-issuer",
        &p("int.pem"),
        "-cert",
        &p("leaf.pem"),
        "-CAfile",
        &p("root.pem"),
        "-no_nonce",
    ]);
    assert!(
        out.contains("Response verify OK") && out.contains("leaf.pem: revoked"),
        "{out}"
    );

    // A serial this CA never issued: unknown. Another issuer: unauthorized.
    let out = ocsp(&[
        "-issuer",
        &p("int.pem"),
        "-serial",
        "0x1234567890",
        "-url",
        &url,
        "-CAfile",
        &p("root.pem"),
        "-no_nonce",
        "-respout",
        &p("unknown.der"),
    ]);
    assert!(
        out.contains("Response verify OK") && out.contains(": unknown"),
        "{out}"
    );
    let out = ocsp(&[
        "-issuer",
        &p("root.pem"),
        "-serial",
        "0x01",
        "-url",
        &url,
        "-CAfile",
        &p("root.pem"),
        "-no_nonce",
    ]);
    assert!(
        out.contains("unauthorized") || out.contains("Unauthorized"),
        "{out}"
    );

    // Garbage, truncated and oversized requests: an OCSP error status, and the
    // responder keeps answering.
    for body in [b"garbage".to_vec(), req[..req.len() / 2].to_vec()] {
        let (status, resp) = http_post(server.port, "/ocsp", &body).unwrap();
        assert_eq!(
            (status, resp),
            (200, vec![0x30, 0x03, 0x0a, 0x01, 0x01]),
            "malformedRequest"
        );
    }
    let (status, _) = http_post(server.port, "/ocsp", &vec![0u8; 64 * 1024]).unwrap();
    assert_eq!(status, 413, "oversized body refused");
    let out = ocsp(&[&base[..], &["-no_nonce"]].concat());
    assert!(out.contains("leaf.pem: revoked"), "{out}");

    // pkilint: no ERROR or FATAL on revoked and unknown responses.
    if have("lint_ocsp_response") {
        for f in ["good.der", "revoked.der", "unknown.der"] {
            let out = run("lint_ocsp_response", &["lint", "-s", "ERROR", &p(f)]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.trim().is_empty(), "pkilint on {f}:\n{text}");
        }
    }
    // A restarted node answers from the stored pre-signed responses at once
    // (those its previous run signed; revoked ones are re-signed on demand).
    let csr2 = openssl_csr(
        work,
        "second",
        "ec:P-256",
        "/CN=ocsp2.internal",
        &["DNS:ocsp2.internal"],
    );
    ok(cert_issue(&config, &csr2, &[]));
    server.stop();
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    std::thread::sleep(Duration::from_secs(2)); // its first pre-signing pass stores them
    server.stop();
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    // Loaded while the server already serves.
    let mut log = server.log_text();
    for _ in 0..100 {
        if log.contains("OCSP responses loaded from the database") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        log = server.log_text();
    }
    let loaded = log
        .lines()
        .find(|l| l.contains("OCSP responses loaded from the database"))
        .and_then(|l| {
            // The count ends the line (log styling may precede it).
            let digits: String = l
                .trim_end()
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.chars().rev().collect::<String>().parse::<u32>().ok()
        })
        .unwrap_or(0);
    assert!(loaded >= 1, "{log}");
    let url = format!("http://127.0.0.1:{}/ocsp", server.port);
    let out = ocsp(&[
        "-issuer",
        &p("int.pem"),
        "-cert",
        &p("leaf.pem"),
        "-url",
        &url,
        "-CAfile",
        &p("root.pem"),
        "-no_nonce",
    ]);
    assert!(
        out.contains("Response verify OK") && out.contains("leaf.pem: revoked"),
        "{out}"
    );
    server.stop();
}

#[test]
fn root_arl_signed_offline_is_published_and_checked_by_openssl() {
    if !have("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let Fixture {
        server,
        config,
        issuer,
        ..
    } = dev_ca_with_leaf(work, "arl.internal");
    let p = |n: &str| work.join(n).display().to_string();
    let root_dir = p("data/DEV-ONLY-root");
    let root_pass = p("data/DEV-ONLY-root/passphrase");
    // The dev intermediate's CRL DP names the root's ARL on this server.
    let int_text = String::from_utf8_lossy(
        &run(
            "openssl",
            &["x509", "-in", &p("int.pem"), "-noout", "-text"],
        )
        .stdout,
    )
    .to_string();
    let cdp = int_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("URI:"))
        .expect("intermediate has a CRL distribution point")
        .to_string();
    let arl_path = p("arl.der");
    let arl = |extra: &[&str]| {
        let mut args = vec!["root", "crl", "--dir", &root_dir, "--out", &arl_path];
        args.extend(["--passphrase-file", &root_pass]);
        args.extend(extra);
        let out = ok(sigil(&args));
        let installed = ok(sigil(&[
            "crl",
            "install",
            "--config",
            &config,
            &p("arl.der"),
        ]));
        let url = installed
            .rsplit_once("served at ")
            .unwrap()
            .1
            .trim()
            .to_string();
        (out, url)
    };
    let check = || {
        let (_, der) = http_get(server.port, &format!("/crl/{issuer}.crl")).unwrap();
        std::fs::write(work.join("int-crl.der"), der).unwrap();
        let pem = |der: &str, pem: &str| {
            run(
                "openssl",
                &["crl", "-inform", "DER", "-in", &p(der), "-out", &p(pem)],
            );
        };
        pem("int-crl.der", "int-crl.pem");
        pem("arl-served.der", "arl.pem");
        let out = run(
            "openssl",
            &[
                "verify",
                "-crl_check_all",
                "-CAfile",
                &p("root.pem"),
                "-untrusted",
                &p("int.pem"),
                "-CRLfile",
                &p("int-crl.pem"),
                "-CRLfile",
                &p("arl.pem"),
                &p("leaf.pem"),
            ],
        );
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    // The ARL is never written over the root's own files.
    for name in ["root.key", "root.crt", "arl.json"] {
        let own = format!("{root_dir}/{name}");
        let before = std::fs::read(&own).unwrap();
        let e = fails(sigil(&[
            "root",
            "crl",
            "--dir",
            &root_dir,
            "--out",
            &own,
            "--passphrase-file",
            &root_pass,
        ]));
        assert!(e.contains(&format!("the root's {name}")), "{e}");
        assert_eq!(std::fs::read(&own).unwrap(), before, "{name} unchanged");
    }

    // An empty ARL: the whole chain checks out with -crl_check_all.
    let (out, url) = arl(&[]);
    // The dev CA installed number 1 at setup; this is the next.
    assert!(out.contains("ARL number 2"), "{out}");
    assert_eq!(url, cdp);
    let root_id = url
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(".crl")
        .to_string();
    let (status, served) = http_get(server.port, &format!("/crl/{root_id}.crl")).unwrap();
    assert_eq!(status, 200);
    assert_eq!(served, std::fs::read(work.join("arl.der")).unwrap());
    std::fs::write(work.join("arl-served.der"), &served).unwrap();
    let (ok_before, text) = check();
    assert!(ok_before, "{text}");

    // Revoke the intermediate in the ARL: every leaf under it now fails.
    let int_serial = String::from_utf8_lossy(
        &run(
            "openssl",
            &["x509", "-in", &p("int.pem"), "-noout", "-serial"],
        )
        .stdout,
    )
    .trim()
    .trim_start_matches("serial=")
    .to_string();
    let (out, _) = arl(&["--revoke", &int_serial, "--reason", "cACompromise"]);
    assert!(
        out.contains("ARL number 3") && out.contains("1 revoked"),
        "{out}"
    );
    let (_, served) = http_get(server.port, &format!("/crl/{root_id}.crl")).unwrap();
    std::fs::write(work.join("arl-served.der"), &served).unwrap();
    let (ok_after, text) = check();
    assert!(!ok_after && text.contains("revoked"), "{text}");

    // An older ARL is not installed over a newer one.
    std::fs::write(
        work.join("old.der"),
        std::fs::read(work.join("arl.der")).unwrap(),
    )
    .unwrap();
    let e = fails(sigil(&[
        "crl",
        "install",
        "--config",
        &config,
        &p("old.der"),
    ]));
    assert!(e.contains("already has number"), "{e}");
    if have("lint_crl") {
        let out = run(
            "lint_crl",
            &[
                "lint",
                "-t",
                "ARL",
                "-p",
                "PKIX",
                "-s",
                "ERROR",
                &p("arl-served.der"),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.trim().is_empty(), "pkilint on the ARL:\n{text}");
    }
    server.stop();
}
