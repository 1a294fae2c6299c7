//! The quickstart: `sigil serve --dev` from nothing, certificates for every key
//! type checked by openssl and pkilint, and the HTTP endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_e2e::*;
use std::path::Path;

fn issue(config: &str, csr: &Path, extra: &[&str]) -> String {
    ok(cert_issue(config, csr, extra))
}

#[test]
fn dev_ca_issues_certificates_openssl_and_pkilint_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let log = server.log_text();
    assert!(log.contains("root fingerprint:  SHA256 "), "{log}");
    assert!(log.contains("DEV ONLY"), "{log}");
    let config = work.join("data/sigil.toml").display().to_string();
    assert!(log.contains(&config), "banner names the config path: {log}");

    // HTTP endpoints.
    assert_eq!(http_get(server.port, "/readyz").unwrap().0, 200);
    let (status, roots) = http_get(server.port, "/roots.pem").unwrap();
    assert_eq!(status, 200);
    let root = std::fs::read_to_string(work.join("data/DEV-ONLY-root/root.crt")).unwrap();
    let bundle = String::from_utf8(roots).unwrap();
    assert!(
        bundle.starts_with(&root),
        "/roots.pem starts with the configured root: {bundle}"
    );
    // Then the active issuer (the dev intermediate).
    let blocks = pem_blocks(&bundle);
    assert_eq!(blocks.len(), 2, "{bundle}");
    // The served root alone is the trust anchor below.
    let roots_path = work.join("root.pem");
    std::fs::write(&roots_path, &blocks[0]).unwrap();
    assert_eq!(http_get(server.port, "/ca/nothex.crt").unwrap().0, 404);

    // Every CSR key type, verified by openssl against the served root only.
    let have_openssl = have("openssl");
    let have_pkilint = have("lint_pkix_cert");
    if !have_openssl {
        return;
    }
    let cases = [
        ("p256", "ec:P-256"),
        ("p384", "ec:P-384"),
        ("ed25519", "ed25519"),
        ("rsa2048", "rsa:2048"),
        ("rsa3072", "rsa:3072"),
        ("rsa4096", "rsa:4096"),
    ];
    let mut caissuers_url = String::new();
    for (name, alg) in cases {
        let csr = openssl_csr(
            work,
            name,
            alg,
            &format!("/CN={name}.internal"),
            &["DNS:app.localhost", "IP:127.0.0.1"],
        );
        let chain = issue(&config, &csr, &[]);
        let blocks = pem_blocks(&chain);
        assert_eq!(blocks.len(), 2, "leaf followed by the intermediate");
        let leaf = work.join(format!("{name}.crt"));
        let chain_path = work.join(format!("{name}-chain.pem"));
        std::fs::write(&leaf, &blocks[0]).unwrap();
        std::fs::write(&chain_path, &chain).unwrap();
        let v = run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                &roots_path.display().to_string(),
                "-untrusted",
                &chain_path.display().to_string(),
                &leaf.display().to_string(),
            ],
        );
        assert!(
            v.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        let text = ok(run(
            "openssl",
            &[
                "x509",
                "-in",
                &leaf.display().to_string(),
                "-noout",
                "-text",
                "-ext",
                "subjectAltName",
            ],
        ));
        assert!(
            text.contains(&format!("DNS:{name}.internal"))
                && text.contains("DNS:app.localhost")
                && text.contains("IP Address:127.0.0.1"),
            "{text}"
        );
        let full = ok(run(
            "openssl",
            &[
                "x509",
                "-in",
                &leaf.display().to_string(),
                "-noout",
                "-text",
            ],
        ));
        assert!(
            full.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
            "default profile is mtls: {full}"
        );
        assert!(full.contains("OCSP - URI:http://127.0.0.1:"), "{full}");
        let serial = ok(run(
            "openssl",
            &[
                "x509",
                "-in",
                &leaf.display().to_string(),
                "-noout",
                "-serial",
            ],
        ));
        let hex = serial.trim().trim_start_matches("serial=");
        assert!(
            hex.len() == 32 || hex.len() == 34,
            "128-bit serial, got {hex}"
        );
        if let Some(line) = full.lines().find(|l| l.contains("CA Issuers - URI:")) {
            caissuers_url = line.split("URI:").nth(1).unwrap().trim().to_string();
        }
        if have_pkilint {
            assert_eq!(pkilint_errors(&leaf), Vec::<String>::new(), "{name} leaf");
        }
    }

    // The caIssuers URL in the leaf serves the intermediate (DER).
    let path = &caissuers_url[caissuers_url.find("/ca/").unwrap()..];
    let (status, der) = http_get(server.port, path).unwrap();
    assert_eq!(status, 200, "{path}");
    let der_path = work.join("int.der");
    std::fs::write(&der_path, der).unwrap();
    let int_text = ok(run(
        "openssl",
        &[
            "x509",
            "-inform",
            "DER",
            "-in",
            &der_path.display().to_string(),
            "-noout",
            "-subject",
        ],
    ));
    assert!(int_text.contains("Issuing CA"), "{int_text}");

    // Each profile's EKU, and pkilint on root and intermediate.
    for (profile, eku) in [
        ("server", "TLS Web Server Authentication"),
        ("client", "TLS Web Client Authentication"),
    ] {
        let csr = openssl_csr(work, profile, "ec:P-256", "/CN=svc.internal", &[]);
        let chain = issue(&config, &csr, &["--profile", profile, "--lifetime", "2h"]);
        let leaf = work.join(format!("{profile}.crt"));
        std::fs::write(&leaf, &pem_blocks(&chain)[0]).unwrap();
        let full = ok(run(
            "openssl",
            &[
                "x509",
                "-in",
                &leaf.display().to_string(),
                "-noout",
                "-text",
            ],
        ));
        assert!(
            full.contains(eku) && !full.contains("Authentication, TLS"),
            "{profile}: {full}"
        );
        if have_pkilint {
            assert_eq!(
                pkilint_errors(&leaf),
                Vec::<String>::new(),
                "{profile} leaf"
            );
        }
    }
    if have_pkilint {
        assert_eq!(pkilint_errors(&roots_path), Vec::<String>::new(), "root");
        assert_eq!(
            pkilint_errors(&work.join("data/intermediate.crt")),
            Vec::<String>::new(),
            "intermediate"
        );
    }

    // Denied names get the policy's reason; the audit chain covers it all.
    let csr = openssl_csr(work, "evil", "ec:P-256", "/CN=www.example.com", &[]);
    let err = fails(cert_issue(&config, &csr, &[]));
    assert!(
        err.contains("www.example.com") && err.contains("no allow rule"),
        "{err}"
    );
    let audit = ok(sigil(&["audit", "verify", "--config", &config]));
    assert!(audit.contains("audit chain OK"), "{audit}");
    // The head, to keep outside the database: SEQ:HASH.
    let head = audit
        .split("head ")
        .nth(1)
        .and_then(|h| h.split_whitespace().next())
        .unwrap()
        .to_string();
    let anchor_seq: i64 = head.split(':').next().unwrap().parse().unwrap();
    let list = ok(sigil(&[
        "audit", "list", "--config", &config, "--limit", "100",
    ]));
    assert!(
        list.contains("cert.denied")
            && list.contains("cert.issued")
            && list.contains("issuer.installed"),
        "{list}"
    );
    let certs = ok(sigil(&[
        "cert",
        "list",
        "--config",
        &config,
        "--name",
        "p256.internal",
    ]));
    assert_eq!(certs.lines().count(), 2, "header + one row: {certs}");

    let log = server.stop();
    let pass = std::fs::read_to_string(work.join("data/intermediate.pass")).unwrap();
    let root_pass = std::fs::read_to_string(work.join("data/DEV-ONLY-root/passphrase")).unwrap();
    assert!(
        !log.contains(pass.trim()) && !log.contains(root_pass.trim()),
        "passphrases must never be logged"
    );
    assert!(!log.contains("PRIVATE KEY"));

    // Rows appended since (the server's stop) keep the recorded head.
    let anchored = || {
        sigil(&[
            "audit",
            "verify",
            "--config",
            &config,
            "--expect-head",
            &head,
        ])
    };
    let out = ok(anchored());
    assert!(out.contains("is in the chain"), "{out}");
    let bad = sigil(&[
        "audit",
        "verify",
        "--config",
        &config,
        "--expect-head",
        "7:zz",
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("SEQ:HASH"),
        "{bad:?}"
    );
    // Someone with write access cuts rows from the end: what is left still
    // links up, and only the recorded head shows the loss.
    if have("sqlite3") {
        ok(run(
            "sqlite3",
            &[
                &work.join("data/sigil.db").display().to_string(),
                &format!(
                    "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq >= {anchor_seq};"
                ),
            ],
        ));
        let plain = ok(sigil(&["audit", "verify", "--config", &config]));
        assert!(plain.contains("audit chain OK"), "{plain}");
        let cut = anchored();
        let text = String::from_utf8_lossy(&cut.stdout);
        assert!(!cut.status.success(), "{text}");
        assert!(
            text.contains("BROKEN") && text.contains("cut from its end"),
            "{text}"
        );
    }
}

#[test]
fn dev_ca_restart_reuses_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&["--dev", "--data-dir", "d"], tmp.path(), &[]);
    let (_, first) = http_get(s.port, "/roots.pem").unwrap();
    s.stop();
    let s = Server::start(&["--dev", "--data-dir", "d"], tmp.path(), &[]);
    let (_, second) = http_get(s.port, "/roots.pem").unwrap();
    assert_eq!(first, second, "the same CA is served after a restart");
    // Certificates name the new address (AIA/CRL DP follow the dev server).
    let config = std::fs::read_to_string(tmp.path().join("d/sigil.toml")).unwrap();
    assert!(
        config.contains(&format!("http://127.0.0.1:{}", s.port)),
        "{config}"
    );
    // The OCSP responder made at first start (its key sealed in the
    // database) is opened again rather than replaced.
    let cfg = tmp.path().join("d/sigil.toml").display().to_string();
    let audit = ok(sigil(&[
        "audit", "list", "--config", &cfg, "--limit", "1000",
    ]));
    let issued: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("ocsp_signer.issued"))
        .collect();
    assert_eq!(issued.len(), 1, "{audit}");
    assert!(issued[0].contains("database"), "{audit}");
    assert!(
        s.log_text().contains("using the shared OCSP responder"),
        "{}",
        s.log_text()
    );
    s.stop();
}

/// Certificate and revocation rows changed behind the CA's back (by someone
/// with write access to the database file) while the audit chain itself is
/// left intact: `audit verify` names each change and fails.
#[test]
fn audit_verify_finds_rows_changed_outside_the_ca() {
    if !have("sqlite3") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let config = work.join("data/sigil.toml").display().to_string();
    let db = work.join("data/sigil.db").display().to_string();
    let sql = |q: &str| ok(run("sqlite3", &[&db, q]));
    let mut serials = Vec::new();
    for i in 0..4 {
        let name = format!("rec{i}.internal");
        let csr = openssl_csr(
            work,
            &format!("rec{i}"),
            "ec:P-256",
            &format!("/CN={name}"),
            &[&format!("DNS:{name}")],
        );
        issue(&config, &csr, &[]);
        let serial = sql(&format!(
            "SELECT serial FROM certificates WHERE names LIKE '%\"{name}\"%';"
        ));
        serials.push(serial.trim().to_string());
    }
    // Revoking needs the records only: with the issuer key's passphrase
    // gone and a broken policy file (an incident), it still works.
    let data = work.join("data");
    std::fs::rename(data.join("intermediate.pass"), work.join("pass.aside")).unwrap();
    std::fs::write(data.join("policies/broken.toml"), "[[rule]\n").unwrap();
    ok(sigil_env(
        &[
            "revoke",
            "--config",
            &config,
            "--serial",
            &serials[2],
            "--reason",
            "superseded",
        ],
        &[("SIGIL_KEY_PASSPHRASE", "")],
    ));
    std::fs::rename(work.join("pass.aside"), data.join("intermediate.pass")).unwrap();
    std::fs::remove_file(data.join("policies/broken.toml")).unwrap();
    server.stop();
    let clean = ok(sigil(&["audit", "verify", "--config", &config]));
    assert!(
        clean.contains("records OK") && clean.contains("audit chain OK"),
        "{clean}"
    );

    let forged = "7f".repeat(16);
    sql(&format!(
        "UPDATE certificates SET der = der || x'00' WHERE serial = '{edited}'; \
         DELETE FROM certificates WHERE serial = '{deleted}'; \
         DROP TRIGGER revocations_final_delete; \
         DELETE FROM revocations WHERE serial = '{unrevoked}'; \
         INSERT INTO certificates (serial, issuer_id, profile, requester, names, key_fingerprint, \
           not_before, not_after, issued_at, der, crl_shard) \
           SELECT '{forged}', issuer_id, profile, requester, names, key_fingerprint, \
           not_before, not_after, issued_at, der, crl_shard FROM certificates WHERE serial = '{copied}';",
        edited = serials[0],
        deleted = serials[1],
        unrevoked = serials[2],
        copied = serials[3],
    ));
    let out = sigil(&["audit", "verify", "--config", &config]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    // The chain was not touched, so only the cross-check can see this.
    assert!(text.contains("audit chain OK"), "{text}");
    let broken: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("records BROKEN"))
        .collect();
    assert_eq!(broken.len(), 4, "{text}");
    let says = |serial: &str, what: &str| {
        assert!(
            broken
                .iter()
                .any(|l| l.contains(serial) && l.contains(what)),
            "{serial} {what}: {text}"
        )
    };
    says(&serials[0], "edited");
    says(&serials[1], "deleted");
    says(&serials[2], "looks valid again");
    says(&forged, "inserted outside the CA");
}
