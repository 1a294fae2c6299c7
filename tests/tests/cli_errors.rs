//! Bad input gets a clear error that says what to do, and changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_e2e::*;

#[test]
fn bad_csrs_and_policy_explanations() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // A dev CA without serving: start once to create it, then stop.
    let s = Server::start(&["--dev", "--data-dir", "d"], work, &[]);
    s.stop();
    let config = work.join("d/sigil.toml").display().to_string();
    let before = ok(sigil(&["audit", "verify", "--config", &config]));

    let garbage = work.join("garbage.csr");
    std::fs::write(&garbage, "this is not a CSR").unwrap();
    let e = fails(cert_issue(&config, &garbage, &[]));
    assert!(e.contains("not PKCS#10"), "{e}");

    if have("openssl") {
        let weak = openssl_csr(work, "weak", "rsa:1024", "/CN=weak.internal", &[]);
        let e = fails(cert_issue(&config, &weak, &[]));
        assert!(e.contains("1024 bits") && e.contains("2048"), "{e}");

        // Flip a byte inside the signature of a PEM CSR.
        let good = openssl_csr(work, "good", "ec:P-256", "/CN=good.internal", &[]);
        let der = run(
            "openssl",
            &["req", "-in", &good.display().to_string(), "-outform", "DER"],
        )
        .stdout;
        let mut bad = der.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x40;
        let tampered = work.join("tampered.der");
        std::fs::write(&tampered, bad).unwrap();
        let e = fails(cert_issue(&config, &tampered, &[]));
        assert!(e.contains("does not verify"), "{e}");

        let p521 = openssl_csr(work, "p521", "ec:P-521", "/CN=x.internal", &[]);
        let e = fails(cert_issue(&config, &p521, &[]));
        assert!(e.contains("EC curve"), "{e}");

        let e = fails(cert_issue(&config, &good, &["--profile", "codesign"]));
        assert!(e.contains("unknown profile"), "{e}");
    }
    // Malformed input is refused before policy, so nothing reached the database:
    // the audit chain is exactly as before.
    let after = ok(sigil(&["audit", "verify", "--config", &config]));
    assert_eq!(before, after);

    let allow = ok(sigil(&[
        "policy",
        "check",
        "--config",
        &config,
        "--requester",
        "token:web",
        "--name",
        "App.Localhost.",
        "--name",
        "127.0.0.1",
    ]));
    assert!(
        allow.contains("ALLOW") && allow.contains("dev-local") && allow.contains("app.localhost"),
        "{allow}"
    );
    let out = sigil(&[
        "policy",
        "check",
        "--config",
        &config,
        "--requester",
        "token:web",
        "--name",
        "db.example.com",
    ]);
    assert!(!out.status.success());
    let deny = String::from_utf8_lossy(&out.stdout);
    assert!(
        deny.contains("DENY") && deny.contains("no allow rule lets token:web"),
        "{deny}"
    );
    let e = fails(sigil(&[
        "policy",
        "check",
        "--config",
        &config,
        "--requester",
        "root:x",
        "--name",
        "a.internal",
    ]));
    assert!(e.contains("KIND:NAME"), "{e}");

    // A mistyped database path is refused, not created empty and reported
    // on (an audit chain of nothing "verifies").
    let typo = work.join("d/sigil.sqlite3-typo");
    let url = format!("sqlite://{}", typo.display());
    for args in [
        &["audit", "verify", "--config", &config][..],
        &["status", "--config", &config],
        &["cert", "list", "--config", &config],
        &["revoke", "--config", &config, "--serial", "01"],
    ] {
        let out = sigil_env(args, &[("SIGIL_DATABASE_URL", &url)]);
        if args[0] == "status" {
            // Distinct from "something is due" (1).
            assert_eq!(out.status.code(), Some(3), "{out:?}");
        }
        let e = fails(out);
        assert!(
            e.contains("does not exist") && e.contains("sigil.sqlite3-typo"),
            "{args:?}: {e}"
        );
        assert!(!typo.exists(), "{args:?} created the database");
    }
    let into = format!("sqlite://{}", work.join("copy.sqlite3").display());
    let e = fails(sigil(&["db", "migrate", "--from", &url, "--to", &into]));
    assert!(e.contains("does not exist"), "{e}");
    assert!(!typo.exists());
    let e = fails(sigil(&[
        "policy",
        "check",
        "--config",
        &config,
        "--requester",
        "token:x",
        "--name",
        "*.*.internal",
    ]));
    assert!(e.contains("wildcard"), "{e}");
}

#[test]
fn config_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.toml").display().to_string();
    let e = fails(sigil(&["serve", "--config", &missing]));
    assert!(e.contains("nope.toml") && e.contains("--dev"), "{e}");
    // --dev with --config would serve a dev CA in place of the configured
    // one; --data-dir belongs to --dev.
    for args in [
        &["serve", "--config", &missing, "--dev"][..],
        &["serve", "--config", &missing, "--data-dir", "x"],
    ] {
        let out = sigil(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("cannot be used with"), "{args:?}: {e}");
    }
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nhttp_addr = \"127.0.0.1:1\"\npublic_url = \"http://x\"\nbogus = 1\n",
    )
    .unwrap();
    let e = fails(sigil(&[
        "cert",
        "list",
        "--config",
        &bad.display().to_string(),
    ]));
    assert!(e.contains("bogus"), "{e}");
}
