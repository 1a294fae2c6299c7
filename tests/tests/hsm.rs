//! The online intermediate's key in a PKCS#11 token (SoftHSM): the key
//! ceremony, issuance and OCSP/CRL signing all with a key that never leaves
//! the token, checked by openssl against the root only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_e2e::*;
use std::path::Path;

/// `openssl ocsp` against the server: the leaf is `good` and the response
/// verifies with the root alone.
fn ocsp_good(work: &Path, port: u16) {
    let ocsp = run(
        "openssl",
        &[
            "ocsp",
            "-issuer",
            &work.join("int.pem").display().to_string(),
            "-cert",
            &work.join("leaf.pem").display().to_string(),
            "-url",
            &format!("http://127.0.0.1:{port}/ocsp"),
            "-CAfile",
            &work.join("root/root.crt").display().to_string(),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&ocsp.stdout),
        String::from_utf8_lossy(&ocsp.stderr)
    );
    assert!(
        text.contains("Response verify OK") && text.contains("leaf.pem: good"),
        "{text}"
    );
}

#[test]
fn ceremony_issuance_and_ocsp_with_the_intermediate_key_in_softhsm() {
    let pin = "hsm-pin-4711";
    let Some((template, _)) = sigil_signer::testing::softhsm_token("sigil-e2e", pin) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let p = |n: &str| work.join(n).display().to_string();
    let root_env = [("SIGIL_ROOT_PASSPHRASE", "offline root passphrase")];

    // Offline root (software, as on an offline host).
    ok(sigil_env(
        &[
            "root",
            "init",
            "--dir",
            &p("root"),
            "--key-type",
            "ecdsa-p384",
        ],
        &root_env,
    ));
    // The online CA: its key is a token object; the PIN is in a 0600 file.
    write_secret(&work.join("pin"), pin);
    std::fs::create_dir_all(work.join("policies")).unwrap();
    std::fs::write(
        work.join("policies/hsm.toml"),
        "[[rule]]\nname = \"internal\"\neffect = \"allow\"\nrequesters = [\"*\"]\ndns = [\".internal\"]\n",
    )
    .unwrap();
    let port = free_port();
    let key_uri = format!(
        "{}&pin-source=file:{}",
        template.replace("OBJ", "intermediate"),
        p("pin")
    );
    let config = work.join("sigil.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttp_addr = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\n\
             [database]\nurl = \"sqlite://sigil.db\"\n\
             [ca]\nroots = [\"root/root.crt\"]\nintermediate_cert = \"intermediate.crt\"\nintermediate_key = \"{key_uri}\"\n\
             [policy]\ndir = \"policies\"\n"
        ),
    )
    .unwrap();
    let cfg = config.display().to_string();

    // Ceremony: key generated in the token, CSR signed offline, installed.
    let out = ok(sigil(&["intermediate", "csr", "--config", &cfg]));
    assert!(out.contains("in the token, not extractable"), "{out}");
    let err = fails(sigil(&["intermediate", "csr", "--config", &cfg]));
    assert!(err.contains("already exists"), "{err}");
    ok(sigil_env(
        &[
            "root",
            "sign",
            "--dir",
            &p("root"),
            "--csr",
            &p("intermediate.csr"),
            "--out",
            &p("intermediate.crt"),
        ],
        &root_env,
    ));
    ok(sigil(&[
        "intermediate",
        "install",
        "--config",
        &cfg,
        "--cert",
        &p("intermediate.crt"),
    ]));
    // No key material on disk: only certificates, the PIN file and the DB.
    for entry in std::fs::read_dir(work).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".key"), "a key file appeared: {name}");
    }
    // A wrong PIN is refused with a clear error.
    let bad_cfg = work.join("bad.toml");
    std::fs::write(&bad_cfg, std::fs::read_to_string(&config).unwrap()).unwrap();
    write_secret(&work.join("wrong-pin"), "not-the-pin");
    std::fs::write(
        &bad_cfg,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&p("pin"), &p("wrong-pin")),
    )
    .unwrap();
    let err = fails(cert_issue(
        &bad_cfg.display().to_string(),
        &openssl_csr(work, "x", "ec:P-256", "/CN=x.internal", &["DNS:x.internal"]),
        &[],
    ));
    assert!(err.contains("wrong PIN"), "{err}");

    // Serve, issue, and check with openssl against the root only.
    let server = Server::start(&["--config", &cfg], work, &[]);
    assert_eq!(
        http_get(server.port, "/readyz").unwrap().0,
        200,
        "{}",
        server.log_text()
    );
    let csr = openssl_csr(
        work,
        "leaf",
        "ec:P-256",
        "/CN=hsm.internal",
        &["DNS:hsm.internal"],
    );
    let blocks = pem_blocks(&ok(cert_issue(&cfg, &csr, &[])));
    std::fs::write(work.join("leaf.pem"), &blocks[0]).unwrap();
    std::fs::write(work.join("int.pem"), &blocks[1]).unwrap();
    let verify = run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            &p("root/root.crt"),
            "-untrusted",
            &p("int.pem"),
            &p("leaf.pem"),
        ],
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // OCSP: the responder certificate was signed in the token by the server.
    ocsp_good(work, server.port);
    // The responder key itself was made in the token.
    let audit = ok(sigil(&[
        "audit", "list", "--config", &cfg, "--limit", "100",
    ]));
    let row = audit
        .lines()
        .find(|l| l.contains("ocsp_signer.issued"))
        .unwrap_or_else(|| panic!("no responder issued:\n{audit}"));
    assert!(row.contains("pkcs11"), "{row}");
    // The CRL, signed in the token too, passes openssl's CRL check.
    let id = server.issuer_id();
    let (status, der) = http_get(server.port, &format!("/crl/{id}.crl")).unwrap();
    assert_eq!(status, 200);
    std::fs::write(work.join("crl.der"), der).unwrap();
    ok(run(
        "openssl",
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            &p("crl.der"),
            "-out",
            &p("crl.pem"),
        ],
    ));
    let verify = run(
        "openssl",
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            &p("root/root.crt"),
            "-untrusted",
            &p("int.pem"),
            "-CRLfile",
            &p("crl.pem"),
            &p("leaf.pem"),
        ],
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    server.stop();

    // After a restart the responder key is opened in the token (a
    // persistent object), not made again, and still signs verifiable answers.
    let server = Server::start(&["--config", &cfg], work, &[]);
    let audit = ok(sigil(&[
        "audit", "list", "--config", &cfg, "--limit", "100",
    ]));
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("ocsp_signer.issued"))
            .count(),
        1,
        "{audit}"
    );
    ocsp_good(work, server.port);
    server.stop();
}
