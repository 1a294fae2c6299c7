//! The production ceremony through the CLI: offline root, online intermediate,
//! install checks, serving, issuance and audit, on SQLite and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_e2e::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const POLICY: &str = r#"
[[rule]]
name = "ops-internal"
effect = "allow"
requesters = ["operator"]
dns = [".corp.internal", ".other.internal"]
max_lifetime = "7d"
"#;

fn write_config(ca: &Path, db_url: &str, port: u16) -> String {
    std::fs::create_dir_all(ca.join("policies")).unwrap();
    std::fs::write(ca.join("policies/ops.toml"), POLICY).unwrap();
    write_secret(&ca.join("int.pass"), "intermediate passphrase 42\n");
    let cfg = format!(
        r#"[server]
http_addr = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"

[database]
url = "{db_url}"

[ca]
roots = ["root.crt"]
intermediate_cert = "intermediate.crt"
intermediate_key = "intermediate.key"
passphrase_file = "int.pass"

[issuance]
default_lifetime = "24h"
max_lifetime = "30d"

[policy]
dir = "policies"
"#
    );
    let path = ca.join("sigil.toml");
    std::fs::write(&path, cfg).unwrap();
    path.display().to_string()
}

fn ceremony(backend: &str, db_url: &str, root_type: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let root = work.join("root");
    let ca = work.join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    let root_pass = work.join("root.pass");
    // A passphrase file others can read is refused, like a readable key file.
    std::fs::write(&root_pass, "root passphrase 1234\n").unwrap();
    let loose = fails(sigil(&[
        "root",
        "init",
        "--dir",
        &root.display().to_string(),
        "--passphrase-file",
        &root_pass.display().to_string(),
    ]));
    assert!(loose.contains("chmod 600"), "{loose}");
    write_secret(&root_pass, "root passphrase 1234\n");
    let rp = root_pass.display().to_string();
    let rdir = root.display().to_string();

    // Offline host: the root.
    let out = ok(sigil(&[
        "root",
        "init",
        "--dir",
        &rdir,
        "--key-type",
        root_type,
        "--subject",
        "CN=Corp Root CA,O=Corp,C=US",
        "--validity",
        "10y",
        "--passphrase-file",
        &rp,
    ]));
    assert!(out.contains("SHA-256 fingerprint"), "{out}");
    let key_meta = std::fs::metadata(root.join("root.key")).unwrap();
    assert_eq!(
        key_meta.permissions().mode() & 0o777,
        0o600,
        "root key is 0600"
    );
    let key_text = std::fs::read_to_string(root.join("root.key")).unwrap();
    assert!(key_text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    let again = fails(sigil(&[
        "root",
        "init",
        "--dir",
        &rdir,
        "--passphrase-file",
        &rp,
    ]));
    assert!(again.contains("already exists"), "{again}");
    std::fs::copy(root.join("root.crt"), ca.join("root.crt")).unwrap();

    // Online host: key and CSR; the key never leaves.
    let port = free_port();
    let config = write_config(&ca, db_url, port);
    ok(sigil(&[
        "intermediate",
        "csr",
        "--config",
        &config,
        "--subject",
        "CN=Corp Issuing CA 1,O=Corp",
    ]));
    assert_eq!(
        std::fs::metadata(ca.join("intermediate.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Offline host signs; a wrong passphrase is refused first.
    write_secret(&work.join("wrong.pass"), "not the passphrase");
    let csr = ca.join("intermediate.csr").display().to_string();
    let int = ca.join("intermediate.crt").display().to_string();
    let e = fails(sigil(&[
        "root",
        "sign",
        "--dir",
        &rdir,
        "--csr",
        &csr,
        "--out",
        &int,
        "--passphrase-file",
        &work.join("wrong.pass").display().to_string(),
    ]));
    assert!(e.contains("wrong passphrase"), "{e}");
    // A leading dot cannot be expressed in an RFC 5280 DNS constraint.
    let e = fails(sigil(&[
        "root",
        "sign",
        "--dir",
        &rdir,
        "--csr",
        &csr,
        "--out",
        &int,
        "--permitted-dns",
        ".corp.internal",
        "--passphrase-file",
        &rp,
    ]));
    assert!(e.contains("use corp.internal"), "{e}");
    assert!(!Path::new(&int).exists(), "nothing written on refusal");
    ok(sigil(&[
        "root",
        "sign",
        "--dir",
        &rdir,
        "--csr",
        &csr,
        "--out",
        &int,
        "--validity",
        "3y",
        "--path-len",
        "0",
        "--permitted-dns",
        "corp.internal",
        "--passphrase-file",
        &rp,
    ]));

    // Before install the server refuses to start, saying what to do.
    let e = fails(sigil_env(&["serve", "--config", &config], &[]));
    assert!(e.contains("sigil intermediate install"), "{e}");

    // Install checks the chain: a certificate from another root is refused.
    let other = work.join("other");
    ok(sigil(&[
        "root",
        "init",
        "--dir",
        &other.display().to_string(),
        "--key-type",
        "ecdsa-p256",
        "--passphrase-file",
        &rp,
    ]));
    let stray = work.join("stray.crt").display().to_string();
    ok(sigil(&[
        "root",
        "sign",
        "--dir",
        &other.display().to_string(),
        "--csr",
        &csr,
        "--out",
        &stray,
        "--passphrase-file",
        &rp,
    ]));
    let e = fails(sigil(&[
        "intermediate",
        "install",
        "--config",
        &config,
        "--cert",
        &stray,
    ]));
    assert!(e.contains("does not chain to any configured root"), "{e}");
    let out = ok(sigil(&[
        "intermediate",
        "install",
        "--config",
        &config,
        "--cert",
        &int,
    ]));
    assert!(out.contains("installed issuer"), "{out}");

    if have("openssl") {
        let v = run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                &ca.join("root.crt").display().to_string(),
                &int,
            ],
        );
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
        let text = ok(run("openssl", &["x509", "-in", &int, "-noout", "-text"]));
        assert!(
            text.contains("pathlen:0")
                && text.contains("Permitted")
                && text.contains("DNS:corp.internal"),
            "{text}"
        );
        assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
        let pk = run(
            "openssl",
            &[
                "pkey",
                "-in",
                &root.join("root.key").display().to_string(),
                "-passin",
                &format!("file:{rp}"),
                "-noout",
            ],
        );
        assert!(
            pk.status.success(),
            "OpenSSL reads the encrypted root key: {}",
            String::from_utf8_lossy(&pk.stderr)
        );
    }
    if have("lint_pkix_cert") {
        assert_eq!(
            pkilint_errors(&ca.join("root.crt")),
            Vec::<String>::new(),
            "{backend} root {root_type}"
        );
        assert_eq!(
            pkilint_errors(&ca.join("intermediate.crt")),
            Vec::<String>::new(),
            "{backend} intermediate"
        );
    }

    // Serve, issue through the CLI while the server runs, verify the chain.
    let server = Server::start(&["--config", &config], work, &[]);
    assert_eq!(http_get(server.port, "/readyz").unwrap().0, 200);
    if have("openssl") {
        let leaf_csr = openssl_csr(
            work,
            "api",
            "ec:P-256",
            "/CN=api.corp.internal",
            &["DNS:api.corp.internal"],
        );
        let chain = ok(cert_issue(
            &config,
            &leaf_csr,
            &["--lifetime", "48h", "--operator", "alice"],
        ));
        let chain_path = work.join("api-chain.pem");
        std::fs::write(&chain_path, &chain).unwrap();
        let leaf = work.join("api.crt");
        std::fs::write(&leaf, &pem_blocks(&chain)[0]).unwrap();
        let v = run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                &ca.join("root.crt").display().to_string(),
                "-untrusted",
                &chain_path.display().to_string(),
                &leaf.display().to_string(),
            ],
        );
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
        let e = fails(cert_issue(&config, &leaf_csr, &["--lifetime", "8d"]));
        assert!(e.contains("at most"), "policy max lifetime: {e}");
        // Policy allows .other.internal, but the intermediate's name constraints do not.
        let outside = openssl_csr(work, "other", "ec:P-256", "/CN=api.other.internal", &[]);
        let e = fails(cert_issue(&config, &outside, &[]));
        assert!(e.contains("outside the name constraints"), "{e}");
        let listed = ok(sigil(&["cert", "list", "--config", &config]));
        assert!(
            listed.contains("operator:alice") && listed.contains("api.corp.internal"),
            "{listed}"
        );
        let serial = listed
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let shown = ok(sigil(&[
            "cert", "show", "--config", &config, "--serial", &serial, "--pem",
        ]));
        assert!(
            shown.contains("BEGIN CERTIFICATE") && shown.contains("api.corp.internal"),
            "{shown}"
        );
        // The CLI's issuance names the policy files that allowed it.
        let policy_file = ca.join("policies").join("ops.toml").display().to_string();
        let digest = sigil_core::sha256_hex(format!("{policy_file}\0{POLICY}\0").as_bytes());
        let audit = ok(sigil(&[
            "audit", "list", "--config", &config, "--limit", "50",
        ]));
        assert!(
            audit.lines().any(|l| l.contains("cert.issued")
                && l.contains("operator:alice")
                && l.contains(&format!("\"policy\":\"{digest}\""))),
            "{digest} in {audit}"
        );

        // A second node on the same database: on PostgreSQL it serves too,
        // and a revocation (made by the CLI, a third process) reaches OCSP on
        // both nodes within seconds. SQLite serves one node.
        let second = if backend == "postgres" {
            Some(Server::start(&["--config", &config], work, &[]))
        } else {
            let addr = format!("127.0.0.1:{}", free_port());
            let e = fails(sigil(&["serve", "--config", &config, "--http-addr", &addr]));
            assert!(e.contains("another `sigil serve` is running"), "{e}");
            None
        };
        let ports: Vec<u16> = std::iter::once(server.port)
            .chain(second.as_ref().map(|s| s.port))
            .collect();
        let ocsp_status = |port: u16| {
            let out = run(
                "openssl",
                &[
                    "ocsp",
                    "-issuer",
                    &ca.join("intermediate.crt").display().to_string(),
                    "-cert",
                    &leaf.display().to_string(),
                    "-url",
                    &format!("http://127.0.0.1:{port}/ocsp"),
                    "-CAfile",
                    &ca.join("root.crt").display().to_string(),
                    "-no_nonce",
                ],
            );
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("Response verify OK"),
                "{text}"
            );
            text
        };
        for &port in &ports {
            assert!(
                ocsp_status(port).contains(": good"),
                "{backend} node {port}"
            );
        }
        ok(sigil(&[
            "revoke",
            "--config",
            &config,
            "--serial",
            &serial,
            "--reason",
            "superseded",
        ]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for &port in &ports {
            while !ocsp_status(port).contains(": revoked") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{backend}: node {port} still says good"
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        if let Some(second) = second {
            second.stop();
        }
    }
    let audit = ok(sigil(&["audit", "verify", "--config", &config]));
    assert!(audit.contains("audit chain OK"), "{backend}: {audit}");
    let log = server.stop();
    assert!(
        !log.contains("intermediate passphrase 42"),
        "passphrase never logged"
    );
}

#[test]
fn ceremony_on_sqlite_with_rsa4096_root() {
    ceremony("sqlite", "sqlite://sigil.db", "rsa-4096");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremony_on_postgres_with_p384_root() {
    let tmp = tempfile::tempdir().unwrap();
    let backends = sigil_store::testing::backends(tmp.path()).await;
    let Some((_, url)) = backends.into_iter().find(|(b, _)| *b == "postgres") else {
        return;
    };
    tokio::task::spawn_blocking(move || ceremony("postgres", &url, "ecdsa-p384"))
        .await
        .unwrap();
}

#[test]
fn every_root_key_type_passes_openssl_and_pkilint() {
    let tmp = tempfile::tempdir().unwrap();
    let pass = tmp.path().join("p");
    write_secret(&pass, "root passphrase 1234");
    for kt in [
        "ecdsa-p256",
        "ecdsa-p384",
        "ed25519",
        "rsa-3072",
        "rsa-4096",
    ] {
        let dir = tmp.path().join(kt);
        ok(sigil(&[
            "root",
            "init",
            "--dir",
            &dir.display().to_string(),
            "--key-type",
            kt,
            "--passphrase-file",
            &pass.display().to_string(),
        ]));
        let crt = dir.join("root.crt");
        if have("openssl") {
            let v = run(
                "openssl",
                &[
                    "verify",
                    "-CAfile",
                    &crt.display().to_string(),
                    &crt.display().to_string(),
                ],
            );
            assert!(
                v.status.success(),
                "{kt}: {}",
                String::from_utf8_lossy(&v.stdout)
            );
            let text = ok(run(
                "openssl",
                &["x509", "-in", &crt.display().to_string(), "-noout", "-text"],
            ));
            assert!(
                text.contains("CA:TRUE") && text.contains("Certificate Sign, CRL Sign"),
                "{kt}: {text}"
            );
        }
        if have("lint_pkix_cert") {
            assert_eq!(pkilint_errors(&crt), Vec::<String>::new(), "{kt}");
        }
    }
}
