//! Intermediate rotation with overlap, end to end on a running server:
//! rotate → sign offline → install --stage → activate (now, then at a set
//! time), with the out-of-order steps refused, both issuers trusted from
//! staging on, and the replaced issuer still answering OCSP and publishing
//! CRLs that `openssl` accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_e2e::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Issues a leaf for `name`; writes `<tag>.pem` (leaf) and `<tag>-int.pem`
/// (its issuer) in `work`. Returns the issuer certificate PEM.
fn issue(work: &Path, config: &str, name: &str, tag: &str) -> String {
    let csr = openssl_csr(
        work,
        tag,
        "ec:P-256",
        &format!("/CN={name}"),
        &[&format!("DNS:{name}")],
    );
    let blocks = pem_blocks(&ok(cert_issue(config, &csr, &[])));
    std::fs::write(work.join(format!("{tag}.pem")), &blocks[0]).unwrap();
    std::fs::write(work.join(format!("{tag}-int.pem")), &blocks[1]).unwrap();
    blocks[1].clone()
}

fn serial_of(cert: &Path) -> String {
    String::from_utf8_lossy(
        &run(
            "openssl",
            &[
                "x509",
                "-in",
                &cert.display().to_string(),
                "-noout",
                "-serial",
            ],
        )
        .stdout,
    )
    .trim()
    .trim_start_matches("serial=")
    .to_string()
}

/// The issuer id (32 hex) of an intermediate: its SKI-based id as served in
/// /ca/<id>.crt is what `sigil intermediate install --stage` prints.
fn printed_id(out: &str, prefix: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no '{prefix}' in: {out}"))
        .to_string()
}

fn ocsp(work: &Path, port: u16, issuer_pem: &str, leaf: &str) -> String {
    let p = |n: &str| work.join(n).display().to_string();
    text(&run(
        "openssl",
        &[
            "ocsp",
            "-issuer",
            &p(issuer_pem),
            "-cert",
            &p(leaf),
            "-url",
            &format!("http://127.0.0.1:{port}/ocsp"),
            "-CAfile",
            &p("root.pem"),
            "-no_nonce",
        ],
    ))
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn intermediate_rotation_with_overlap() {
    if !have("openssl") {
        assert!(
            std::env::var_os("SIGIL_REQUIRE_EXTERNAL").is_none(),
            "openssl is required"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let config = work.join("data/sigil.toml").display().to_string();
    let root_dir = work.join("data/DEV-ONLY-root").display().to_string();
    let root_pass = work
        .join("data/DEV-ONLY-root/passphrase")
        .display()
        .to_string();
    let p = |n: &str| work.join(n).display().to_string();
    std::fs::write(work.join("root.pem"), served_root(server.port)).unwrap();
    let first_int = issue(work, &config, "old.internal", "old");

    // Out of order: nothing to activate, nothing to stage.
    let install_staged = |name: &str| {
        sigil(&[
            "intermediate",
            "install",
            "--config",
            &config,
            "--stage",
            "--cert",
            &p(name),
        ])
    };
    let err = fails(sigil(&["intermediate", "activate", "--config", &config]));
    assert!(err.contains("no intermediate is staged"), "{err}");
    let err = fails(install_staged("old-int.pem"));
    assert!(err.contains("sigil intermediate rotate"), "{err}");

    // A key the audit log cannot record is not kept (a database refusing
    // the write, here by a trigger): nothing is left for a re-run to trip on.
    if have("sqlite3") {
        let db = work.join("data/sigil.db").display().to_string();
        ok(run(
            "sqlite3",
            &[
                "-cmd",
                ".timeout 10000",
                &db,
                "CREATE TRIGGER refuse_key BEFORE INSERT ON audit \
                 WHEN NEW.kind = 'issuer.key_generated' BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            ],
        ));
        let err = fails(sigil(&["intermediate", "rotate", "--config", &config]));
        assert!(err.contains("could not be recorded"), "{err}");
        assert!(!work.join("data/intermediate-next.key").exists());
        assert!(!work.join("data/intermediate-next.csr").exists());
        ok(run(
            "sqlite3",
            &["-cmd", ".timeout 10000", &db, "DROP TRIGGER refuse_key;"],
        ));
    }
    // 1. rotate: the next key and CSR; nothing changes for clients.
    let out = ok(sigil(&["intermediate", "rotate", "--config", &config]));
    assert!(out.contains("not active"), "{out}");
    let csr = work.join("data/intermediate-next.csr");
    assert!(csr.exists(), "{out}");
    let key = work.join("data/intermediate-next.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .contains("ENCRYPTED PRIVATE KEY"),
        "the next key is encrypted at rest"
    );
    let err = fails(sigil(&["intermediate", "rotate", "--config", &config]));
    assert!(err.contains("already under way"), "{err}");
    let err = fails(sigil(&["intermediate", "activate", "--config", &config]));
    assert!(err.contains("has no certificate yet"), "{err}");

    // A certificate for another key is refused by --stage.
    let err = fails(install_staged("old-int.pem"));
    assert!(err.contains("does not match the key"), "{err}");
    // So is one that chains to an unknown root.
    let other_root = work.join("other-root");
    ok(sigil_env(
        &[
            "root",
            "init",
            "--dir",
            &other_root.display().to_string(),
            "--key-type",
            "ecdsa-p256",
        ],
        &[("SIGIL_ROOT_PASSPHRASE", "another root passphrase")],
    ));
    ok(sigil_env(
        &[
            "root",
            "sign",
            "--dir",
            &other_root.display().to_string(),
            "--csr",
            &csr.display().to_string(),
            "--out",
            &p("stray.crt"),
        ],
        &[("SIGIL_ROOT_PASSPHRASE", "another root passphrase")],
    ));
    let err = fails(install_staged("stray.crt"));
    assert!(
        err.contains("does not chain to any configured root"),
        "{err}"
    );

    // 2. the offline root signs it; 3. it is staged.
    let csr_path = csr.display().to_string();
    let root_sign = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "root",
            "sign",
            "--dir",
            &root_dir,
            "--csr",
            &csr_path,
            "--out",
            out,
            "--passphrase-file",
            &root_pass,
        ];
        args.extend_from_slice(extra);
        sigil(&args)
    };
    let sign_and_stage = |name: &str| {
        ok(root_sign(&p(name), &[]));
        ok(install_staged(name))
    };
    ok(root_sign(&p("next.crt"), &[]));
    // Installed without --stage, as if it were the first intermediate: the
    // error says to add --stage.
    let err = fails(sigil(&[
        "intermediate",
        "install",
        "--config",
        &config,
        "--cert",
        &p("next.crt"),
    ]));
    assert!(err.contains("--stage") && err.contains("next key"), "{err}");
    let out = ok(install_staged("next.crt"));
    let second_id = printed_id(&out, "staged issuer ");
    assert!(!key.exists(), "the next key took its final name");
    let next_pem = std::fs::read_to_string(work.join("next.crt")).unwrap();
    // Trusted from staging on, while the old issuer still issues.
    let bundle = String::from_utf8(http_get(server.port, "/bundle.pem").unwrap().1).unwrap();
    assert!(
        bundle.contains(next_pem.trim()) && bundle.contains(first_int.trim()),
        "{bundle}"
    );
    let still_old = issue(work, &config, "still-old.internal", "still-old");
    assert_eq!(still_old.trim(), first_int.trim(), "staged is not active");
    // The staged issuer's CRL is published before it issues anything, so the
    // CRL URL in its first certificates answers from the moment it is
    // activated. openssl checks its signature against the staged certificate.
    let staged_crl = wait_for("the staged issuer's CRL", 15, || {
        let (status, body) = http_get(server.port, &format!("/crl/{second_id}.crl")).ok()?;
        (status == 200).then_some(body)
    });
    std::fs::write(work.join("staged.crl"), &staged_crl).unwrap();
    let out = run(
        "openssl",
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            &p("staged.crl"),
            "-CAfile",
            &p("next.crt"),
            "-noout",
        ],
    );
    assert!(text(&out).contains("verify OK"), "{}", text(&out));
    // `sigil status` shows it under the staged issuer.
    let status = text(&sigil(&["status", "--config", &config]));
    let staged_block: Vec<&str> = status
        .lines()
        .skip_while(|l| !(l.contains(&second_id) && l.contains("staged")))
        .take(3)
        .collect();
    assert!(staged_block.iter().any(|l| l.contains("CRL #")), "{status}");

    // A renewal deadline in the past (a mistyped year) would send every
    // client to renew at once: refused, and nothing is activated.
    let err = fails(sigil(&[
        "intermediate",
        "activate",
        "--config",
        &config,
        "--renew-all-by",
        "2020-01-01T00:00:00Z",
    ]));
    assert!(err.contains("is in the past"), "{err}");
    // 4. activate now: new issuance moves to the new issuer.
    let out = ok(sigil(&["intermediate", "activate", "--config", &config]));
    assert!(out.contains(&second_id), "{out}");
    let err = fails(sigil(&["intermediate", "activate", "--config", &config]));
    assert!(err.contains("no intermediate is staged"), "{err}");
    let new_int = issue(work, &config, "new.internal", "new");
    assert_eq!(new_int.trim(), next_pem.trim(), "issued by the new issuer");
    for leaf in ["old", "new"] {
        let out = run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                &p("root.pem"),
                "-untrusted",
                &p(&format!("{leaf}-int.pem")),
                &p(&format!("{leaf}.pem")),
            ],
        );
        assert!(out.status.success(), "{leaf}: {}", text(&out));
    }

    // The running server follows within seconds: OCSP answers for both
    // issuers' certificates, each signed by that issuer's responder.
    let out = wait_for("OCSP for the new issuer", 15, || {
        let out = ocsp(work, server.port, "new-int.pem", "new.pem");
        out.contains("new.pem: good").then_some(out)
    });
    assert!(out.contains("Response verify OK"), "{out}");
    let out = ocsp(work, server.port, "old-int.pem", "old.pem");
    assert!(
        out.contains("Response verify OK") && out.contains("old.pem: good"),
        "{out}"
    );

    // The replaced issuer keeps publishing: a revocation of its certificate
    // reaches its OCSP answers and its CRL, which openssl checks.
    ok(sigil(&[
        "revoke",
        "--config",
        &config,
        "--serial",
        &serial_of(&work.join("old.pem")),
        "--reason",
        "superseded",
    ]));
    let out = wait_for("old certificate revoked in OCSP", 10, || {
        let out = ocsp(work, server.port, "old-int.pem", "old.pem");
        out.contains("old.pem: revoked").then_some(out)
    });
    assert!(out.contains("Response verify OK"), "{out}");
    let old_id = {
        let der = run(
            "openssl",
            &["x509", "-in", &p("old-int.pem"), "-outform", "DER"],
        )
        .stdout;
        // The CRL URL in the old leaf names its issuer.
        let leaf = text(&run(
            "openssl",
            &[
                "x509",
                "-in",
                &p("old.pem"),
                "-noout",
                "-ext",
                "crlDistributionPoints",
            ],
        ));
        assert!(!der.is_empty());
        leaf.split("/crl/")
            .nth(1)
            .and_then(|s| s.split(".crl").next())
            .unwrap_or_else(|| panic!("no CRL URL in {leaf}"))
            .to_string()
    };
    assert_ne!(old_id, second_id);
    let crl_ok = wait_for("the old issuer's CRL lists the revocation", 20, || {
        let (status, der) = http_get(server.port, &format!("/crl/{old_id}.crl")).unwrap();
        assert_eq!(status, 200);
        std::fs::write(work.join("old.crl.der"), &der).unwrap();
        let conv = run(
            "openssl",
            &[
                "crl",
                "-inform",
                "DER",
                "-in",
                &p("old.crl.der"),
                "-out",
                &p("old.crl.pem"),
            ],
        );
        assert!(conv.status.success(), "{}", text(&conv));
        let out = run(
            "openssl",
            &[
                "verify",
                "-crl_check",
                "-CAfile",
                &p("root.pem"),
                "-untrusted",
                &p("old-int.pem"),
                "-CRLfile",
                &p("old.crl.pem"),
                &p("old.pem"),
            ],
        );
        let t = text(&out);
        (!out.status.success() && t.contains("certificate revoked")).then_some(t)
    });
    assert!(crl_ok.contains("certificate revoked"), "{crl_ok}");
    // The new issuer publishes its own CRL, under which its leaf is fine.
    let (status, der) = http_get(server.port, &format!("/crl/{second_id}.crl")).unwrap();
    assert_eq!(status, 200);
    std::fs::write(work.join("new.crl.der"), &der).unwrap();
    ok(run(
        "openssl",
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            &p("new.crl.der"),
            "-out",
            &p("new.crl.pem"),
        ],
    ));
    ok(run(
        "openssl",
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            &p("root.pem"),
            "-untrusted",
            &p("new-int.pem"),
            "-CRLfile",
            &p("new.crl.pem"),
            &p("new.pem"),
        ],
    ));

    // A second rotation, activated at a set time: until then the second
    // issuer issues; after it, the third, without touching the server.
    ok(sigil(&["intermediate", "rotate", "--config", &config]));
    let out = sign_and_stage("third.crt");
    let third_id = printed_id(&out, "staged issuer ");
    let err = fails(sigil(&[
        "intermediate",
        "activate",
        "--config",
        &config,
        "--at",
        "1h",
        "--renew-all-by",
        "30m",
    ]));
    assert!(err.contains("is before --at"), "{err}");
    let out = ok(sigil(&[
        "intermediate",
        "activate",
        "--config",
        &config,
        "--at",
        "4s",
        "--renew-all-by",
        "1h",
    ]));
    assert!(out.contains("takes over issuance at"), "{out}");
    let before = issue(work, &config, "before.internal", "before");
    assert_eq!(before.trim(), next_pem.trim(), "not active before --at");
    let third_pem = std::fs::read_to_string(work.join("third.crt")).unwrap();
    wait_for("the scheduled activation", 20, || {
        let log = server.log_text();
        log.contains("scheduled activation").then_some(())
    });
    let after = issue(work, &config, "after.internal", "after");
    assert_eq!(after.trim(), third_pem.trim(), "active after --at");
    let out = wait_for("OCSP for the third issuer", 15, || {
        let out = ocsp(work, server.port, "after-int.pem", "after.pem");
        out.contains("after.pem: good").then_some(out)
    });
    assert!(out.contains("Response verify OK"), "{out}");
    // All three still serve: the first and second have unexpired certificates.
    let bundle = String::from_utf8(http_get(server.port, "/bundle.pem").unwrap().1).unwrap();
    for pem in [&first_int, &next_pem, &third_pem] {
        assert!(bundle.contains(pem.trim()), "{bundle}");
    }
    let out = ocsp(work, server.port, "before-int.pem", "before.pem");
    assert!(out.contains("before.pem: good"), "{out}");
    assert!(third_id != second_id);

    // A fourth key. Its certificate cannot be signed for 3m (minutes, not
    // months) nor written over the root's own certificate; one signed for
    // 30 hours is staged, but would expire within a day of taking over in
    // 10 hours, so it is not activated. While it is staged no other
    // rotation starts; withdrawn, it leaves the trust bundle. (First, a
    // CSR that cannot be written leaves no key behind to block the rotation.)
    let err = fails(sigil(&[
        "intermediate",
        "rotate",
        "--config",
        &config,
        "--out",
        &p("no-such-dir/next.csr"),
    ]));
    assert!(err.contains("was removed"), "{err}");
    assert!(!key.exists(), "{err}");
    ok(sigil(&["intermediate", "rotate", "--config", &config]));
    let err = fails(root_sign(&p("short.crt"), &["--validity", "3m"]));
    assert!(err.contains("at least a day"), "{err}");
    let root_crt = format!("{root_dir}/root.crt");
    let root_before = std::fs::read(&root_crt).unwrap();
    let err = fails(root_sign(&root_crt, &["--validity", "30h"]));
    assert!(err.contains("the root's root.crt"), "{err}");
    assert_eq!(std::fs::read(&root_crt).unwrap(), root_before);
    ok(root_sign(&p("short.crt"), &["--validity", "30h"]));
    let out = ok(install_staged("short.crt"));
    let short_id = printed_id(&out, "staged issuer ");
    let err = fails(sigil(&["intermediate", "rotate", "--config", &config]));
    assert!(
        err.contains(&short_id) && err.contains("sigil intermediate unstage"),
        "{err}"
    );
    let err = fails(sigil(&[
        "intermediate",
        "activate",
        "--config",
        &config,
        "--at",
        "10h",
    ]));
    assert!(err.contains("expires at"), "{err}");
    let out = ok(sigil(&["intermediate", "unstage", "--config", &config]));
    assert!(
        out.contains(&short_id) && out.contains("withdrawn"),
        "{out}"
    );
    let short_pem = std::fs::read_to_string(work.join("short.crt")).unwrap();
    wait_for("the withdrawn issuer leaves the bundle", 15, || {
        let b = String::from_utf8(http_get(server.port, "/bundle.pem").unwrap().1).unwrap();
        (!b.contains(short_pem.trim()) && b.contains(third_pem.trim())).then_some(())
    });
    let err = fails(sigil(&["intermediate", "unstage", "--config", &config]));
    assert!(err.contains("nothing to withdraw"), "{err}");
    let after_unstage = issue(work, &config, "still-third.internal", "still-third");
    assert_eq!(after_unstage.trim(), third_pem.trim());

    // Every step is in the audit chain, which still verifies.
    let out = ok(sigil(&["audit", "verify", "--config", &config]));
    assert!(
        out.to_lowercase().contains("ok") || out.contains("intact"),
        "{out}"
    );
    let db = work.join("data/sigil.db");
    if have("sqlite3") {
        let kinds = String::from_utf8_lossy(
            &run(
                "sqlite3",
                &[
                    &db.display().to_string(),
                    "SELECT kind || ' ' || actor FROM audit WHERE kind LIKE 'issuer.%' ORDER BY seq",
                ],
            )
            .stdout,
        )
        .to_string();
        for k in [
            "issuer.key_generated operator:",
            "issuer.staged operator:",
            "issuer.activated operator:",
            "issuer.activation_scheduled operator:",
            "issuer.activated system:scheduler",
            "issuer.unstaged operator:",
        ] {
            assert!(kinds.contains(k), "{k} missing from:\n{kinds}");
        }
    }
    server.stop();

    // The first issuer (previous, with unexpired certificates) loses its key
    // on the node that runs the jobs. Its CRL can no longer be re-signed:
    // the server says so, keeps serving the last one, and reports its age,
    // so the staleness alert fires before relying parties refuse.
    let data = work.join("data");
    let first_key = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| {
            let n = f.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("intermediate")
                && n.ends_with(".key")
                && !n.contains(&second_id)
                && !n.contains(&third_id)
                && !n.contains(&short_id)
                && !n.contains("next")
        })
        .expect("the first issuer's key file");
    std::fs::rename(&first_key, work.join("first.key.away")).unwrap();
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let (status, _) = http_get(server.port, &format!("/crl/{old_id}.crl")).unwrap();
    assert_eq!(status, 200, "the last stored CRL is still served");
    let metrics = wait_for("the old issuer's CRL age in the metrics", 15, || {
        let m = String::from_utf8(http_get(server.port, "/metrics").unwrap().1).unwrap();
        m.contains(&format!("sigil_crl_age_seconds{{issuer=\"{old_id}\"}}"))
            .then_some(m)
    });
    assert!(
        metrics.contains(&format!(
            "sigil_crl_next_update_seconds{{issuer=\"{old_id}\"}}"
        )),
        "{metrics}"
    );
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&old_id) && l.contains("CRL is not re-signed")),
        "{log}"
    );
    server.stop();
}
