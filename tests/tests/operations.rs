//! Running it in production: /metrics and /readyz, `sigil status`, online
//! backup with a restore, and moving a CA from SQLite to PostgreSQL with
//! `sigil db migrate`.

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

fn issue(work: &Path, config: &str, name: &str) -> String {
    let csr = openssl_csr(
        work,
        name,
        "ec:P-256",
        &format!("/CN={name}"),
        &[&format!("DNS:{name}")],
    );
    let blocks = pem_blocks(&ok(cert_issue(config, &csr, &[])));
    std::fs::write(work.join(format!("{name}.pem")), &blocks[0]).unwrap();
    std::fs::write(work.join("int.pem"), &blocks[1]).unwrap();
    let serial = run(
        "openssl",
        &[
            "x509",
            "-in",
            &work.join(format!("{name}.pem")).display().to_string(),
            "-noout",
            "-serial",
        ],
    );
    String::from_utf8_lossy(&serial.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase()
}

fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn ocsp_status(work: &Path, port: u16, leaf: &str) -> String {
    let p = |n: &str| work.join(n).display().to_string();
    text(&run(
        "openssl",
        &[
            "ocsp",
            "-issuer",
            &p("int.pem"),
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

#[test]
fn metrics_readiness_and_status_describe_the_ca() {
    if !have("openssl") {
        assert!(std::env::var_os("SIGIL_REQUIRE_EXTERNAL").is_none());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let config = work.join("data/sigil.toml").display().to_string();
    std::fs::write(work.join("root.pem"), served_root(server.port)).unwrap();
    let (status, body) = http_get(server.port, "/readyz").unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    issue(work, &config, "metrics.internal");
    let out = ocsp_status(work, server.port, "metrics.internal.pem");
    assert!(out.contains(": good"), "{out}");
    let garbage = http_post(server.port, "/ocsp", b"not an OCSP request").unwrap();
    assert_eq!(garbage.0, 200);

    let (status, body) = http_get(server.port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let body = String::from_utf8(body).unwrap();
    assert_eq!(metric(&body, "sigil_ready"), Some(1.0), "{body}");
    assert!(
        metric(&body, "sigil_ocsp_requests_total{status=\"good\"}").is_some_and(|v| v >= 1.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "sigil_ocsp_requests_total{status=\"malformed\"}"),
        Some(1.0),
        "{body}"
    );
    assert!(
        body.contains("sigil_ocsp_response_seconds_bucket"),
        "{body}"
    );
    assert!(
        body.contains("sigil_db_query_seconds_bucket{op=\"commit\""),
        "{body}"
    );
    for kind in ["root", "issuer", "ocsp_signer", "listener"] {
        let v = metric(
            &body,
            &format!("sigil_certificate_expiry_seconds{{kind=\"{kind}\""),
        )
        .unwrap_or_else(|| panic!("no expiry for {kind}: {body}"));
        assert!(v > 3600.0, "{kind}: {v}");
    }
    assert!(
        metric(&body, "sigil_crl_number{").is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(metric(&body, "sigil_crl_next_update_seconds{").is_some_and(|s| s > 0.0));
    assert!(
        body.contains("sigil_db_pool_connections{state=\"idle\"}"),
        "{body}"
    );

    // A policy denial is counted by rule; an issuance by entry point.
    let csr = openssl_csr(
        work,
        "denied",
        "ec:P-256",
        "/CN=x.example",
        &["DNS:x.example"],
    );
    fails(cert_issue(&config, &csr, &[]));

    // `sigil status` reads the database: the active issuer, its CRL and
    // OCSP responder, and nothing due.
    let out = sigil(&["status", "--config", &config]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("active") && t.contains("certificates outstanding: "),
        "{t}"
    );
    assert!(
        t.contains("CRL #") && t.contains("OCSP responder certificate expires"),
        "{t}"
    );
    assert!(t.contains("nothing due within 30d"), "{t}");
    // Within a longer horizon the issuer's expiry is due: exit 1 and say so.
    let out = sigil(&["status", "--config", &config, "--warn-within", "4000d"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("due soon: active issuer"), "{t}");
    // The root's ARL (365 days in the dev CA) is renewed only offline: shown,
    // and due within a year.
    assert!(t.contains("ARL #1"), "{t}");
    let out = sigil(&["status", "--config", &config, "--warn-within", "400d"]);
    let t = text(&out);
    assert!(t.contains("due soon: the ARL of root"), "{t}");
    server.stop();
}

#[test]
fn online_backup_restores_and_db_migrate_moves_the_ca_to_postgres() {
    if !have("openssl") || !have("sqlite3") {
        assert!(std::env::var_os("SIGIL_REQUIRE_EXTERNAL").is_none());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let config = work.join("data/sigil.toml").display().to_string();
    std::fs::write(work.join("root.pem"), served_root(server.port)).unwrap();
    let kept = issue(work, &config, "kept.internal");
    let revoked = issue(work, &config, "revoked.internal");
    ok(sigil(&[
        "revoke",
        "--config",
        &config,
        "--serial",
        &revoked,
        "--reason",
        "keyCompromise",
    ]));

    // Backup while serving.
    let backup = work.join("backup.db");
    let out = ok(sigil(&[
        "backup",
        "--config",
        &config,
        "--out",
        &backup.display().to_string(),
    ]));
    assert!(out.contains("audit chain OK"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let err = fails(sigil(&[
        "backup",
        "--config",
        &config,
        "--out",
        &backup.display().to_string(),
    ]));
    assert!(err.contains("exists"), "{err}");
    // Issued after the backup: gone after the restore.
    let lost = issue(work, &config, "after-backup.internal");

    // Restore (the documented procedure): stop, copy over, verify, start.
    server.stop();
    let db = work.join("data/sigil.db");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(work.join(format!("data/sigil.db{suffix}")));
    }
    std::fs::copy(&backup, &db).unwrap();
    let out = ok(sigil(&["audit", "verify", "--config", &config]));
    assert!(out.contains("audit chain OK"), "{out}");
    let list = ok(sigil(&["cert", "list", "--config", &config]));
    assert!(list.contains(&kept) && list.contains(&revoked), "{list}");
    assert!(!list.contains(&lost), "{list}");
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let out = ocsp_status(work, server.port, "revoked.internal.pem");
    assert!(out.contains(": revoked"), "{out}");
    server.stop();

    // To PostgreSQL.
    let Ok(admin) = std::env::var("TEST_DATABASE_URL") else {
        assert!(
            std::env::var("SIGIL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
            "SIGIL_REQUIRE_EXTERNAL=1 but TEST_DATABASE_URL is not set"
        );
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = rt
        .block_on(sigil_store::testing::fresh_postgres(&admin))
        .unwrap();
    let from = format!("sqlite://{}", db.display());
    // A mistyped source path is refused, and no empty database is made there.
    let typo = work.join("data/sigil-typo.db");
    let err = fails(sigil(&[
        "db",
        "migrate",
        "--from",
        &format!("sqlite://{}", typo.display()),
        "--to",
        &pg,
    ]));
    assert!(err.contains("cannot open --from"), "{err}");
    assert!(
        !typo.exists(),
        "no database was created at the mistyped path"
    );
    // Not while a server still writes to the source.
    let running = Server::start(&["--dev", "--data-dir", "data"], work, &[]);
    let err = fails(sigil(&["db", "migrate", "--from", &from, "--to", &pg]));
    assert!(err.contains("stop that server first"), "{err}");
    running.stop();
    let out = ok(sigil(&["db", "migrate", "--from", &from, "--to", &pg]));
    assert!(out.contains("audit chain verified on arrival"), "{out}");
    assert!(
        out.contains("certificates") && out.contains("revocations"),
        "{out}"
    );
    // Into a database that is no longer empty: refused, nothing changes.
    let err = fails(sigil(&["db", "migrate", "--from", &from, "--to", &pg]));
    assert!(err.contains("not empty"), "{err}");

    // The same CA served from PostgreSQL (SIGIL_DATABASE_URL overrides the
    // file): same certificates, same revocations, chain intact.
    let env = [("SIGIL_DATABASE_URL", pg.as_str())];
    let server = Server::start(&["--dev", "--data-dir", "data"], work, &env);
    let out = ocsp_status(work, server.port, "revoked.internal.pem");
    assert!(out.contains(": revoked"), "{out}");
    let out = ocsp_status(work, server.port, "kept.internal.pem");
    assert!(out.contains(": good"), "{out}");
    let out = ok(sigil_env(&["audit", "verify", "--config", &config], &env));
    assert!(out.contains("audit chain OK"), "{out}");
    // `backup` is for SQLite: refused, and no file is left behind.
    let pg_backup = work.join("pg-backup.db");
    let err = fails(sigil_env(
        &[
            "backup",
            "--config",
            &config,
            "--out",
            &pg_backup.display().to_string(),
        ],
        &env,
    ));
    assert!(err.contains("pg_dump"), "{err}");
    assert!(!pg_backup.exists());
    let list = ok(sigil_env(&["cert", "list", "--config", &config], &env));
    assert!(list.contains(&kept), "{list}");
    // keyCompromise still blocks the key on the new database.
    let err = fails(sigil_env(
        &[
            "cert",
            "issue",
            "--config",
            &config,
            "--csr",
            &work.join("revoked.internal.csr").display().to_string(),
        ],
        &env,
    ));
    assert!(err.to_lowercase().contains("compromise"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while http_get(server.port, "/readyz").unwrap().0 != 200 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(200));
    }
    server.stop();
}

/// `server.max_connections` (here from SIGIL_SERVER_MAX_CONNECTIONS) caps
/// open connections: a request waits while two idle connections hold the
/// slots, and is answered as soon as one closes.
#[test]
fn connection_limit_holds_new_connections_until_a_slot_frees() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &["--dev", "--data-dir", "data"],
        tmp.path(),
        &[("SIGIL_SERVER_MAX_CONNECTIONS", "2")],
    );
    let addr = format!("127.0.0.1:{}", server.port);
    let idle1 = std::net::TcpStream::connect(&addr).unwrap();
    let idle2 = std::net::TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let early = third.read(&mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "answered over the limit: {early:?}"
    );
    drop(idle1);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    third.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    drop(idle2);
    server.stop();
}

/// `server.idle_timeout` (here 2s): connections that send nothing, or stop
/// sending halfway through a request's headers, are closed, so they cannot
/// hold the connection slots (here 2) that other clients need. On the HTTPS
/// (ACME) listener too, after the TLS handshake.
#[test]
fn silent_and_trickling_connections_are_closed_after_the_idle_timeout() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &["--dev", "--data-dir", "data"],
        tmp.path(),
        &[
            ("SIGIL_SERVER_MAX_CONNECTIONS", "2"),
            ("SIGIL_SERVER_IDLE_TIMEOUT", "2s"),
        ],
    );
    let addr = format!("127.0.0.1:{}", server.port);
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    let mut trickling = std::net::TcpStream::connect(&addr).unwrap();
    trickling.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    third.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(6),
        "answered after {waited:?}"
    );
    for (what, conn) in [("silent", &mut silent), ("trickling", &mut trickling)] {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        let closed = conn.read_to_end(&mut rest);
        assert!(closed.is_ok(), "{what} connection not closed: {closed:?}");
    }

    // HTTPS: a handshaken connection that never sends a request is closed
    // (openssl s_client returns when the server closes it).
    if have("openssl") {
        let https = server.https_port.expect("dev server HTTPS port");
        // stdin stays open and silent until the server closes the connection.
        let mut client = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{https}"),
                "-quiet",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while client.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(10) {
                let _ = client.kill();
                panic!("HTTPS connection kept open over 10 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(http_get(server.port, "/healthz").unwrap().0, 200);
    server.stop();
}

/// One client address cannot take every TLS handshake slot: past 64
/// handshakes in progress from one address, its new connections are closed
/// at once while other addresses are served, and a connection that sends
/// nothing is dropped after 3 s, giving its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_handshake_slot() {
    use tokio::io::AsyncReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&["--dev", "--data-dir", "data"], tmp.path(), &[]);
    let https: std::net::SocketAddr = format!("127.0.0.1:{}", server.https_port.unwrap())
        .parse()
        .unwrap();
    let connect_from = |src: &'static str| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        sock.connect(https).await.unwrap()
    };
    // Closed by the server within `wait` (read returns end of file), or
    // still open then.
    let closed_within = |mut c: tokio::net::TcpStream, wait: Duration| async move {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(wait, c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(n)) => panic!("{n} bytes from a connection that sent nothing"),
            Err(_) => false,
        }
    };
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(connect_from("127.0.0.1").await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra = connect_from("127.0.0.1").await;
    assert!(
        closed_within(extra, Duration::from_secs(2)).await,
        "a 65th silent connection from one address is closed at once"
    );
    let other = connect_from("127.0.0.2").await;
    assert!(
        !closed_within(other, Duration::from_millis(1500)).await,
        "another address still gets a handshake slot"
    );
    // Sending nothing, each is dropped after 3 s, not the 10 s a
    // handshake may take.
    for c in silent {
        assert!(closed_within(c, Duration::from_secs(8)).await);
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(8),
        "silent connections closed after {waited:?}"
    );
    let again = connect_from("127.0.0.1").await;
    assert!(
        !closed_within(again, Duration::from_millis(1500)).await,
        "the address's slots came back"
    );
    server.stop();
}

/// A client that sends requests and never reads the answers loses its
/// connection once the server's writes have waited `server.idle_timeout`
/// (here 2s), so it cannot hold the only connection slot; a waiting client
/// is then answered.
#[test]
fn a_peer_that_stops_reading_loses_its_connection_slot() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &["--dev", "--data-dir", "data"],
        tmp.path(),
        &[
            ("SIGIL_SERVER_MAX_CONNECTIONS", "1"),
            ("SIGIL_SERVER_IDLE_TIMEOUT", "2s"),
        ],
    );
    let addr = format!("127.0.0.1:{}", server.port);
    // Megabytes of answers the client never reads fill both sockets'
    // buffers; the writer thread may block too, which is fine.
    let hog = std::net::TcpStream::connect(&addr).unwrap();
    let mut writer = hog.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    std::thread::spawn(move || {
        let requests = b"GET /roots.pem HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20_000);
        let _ = writer.write_all(&requests);
    });
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut waiting = std::net::TcpStream::connect(&addr).unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut text = String::new();
    let read = waiting.read_to_string(&mut text);
    assert!(
        read.is_ok() && text.starts_with("HTTP/1.1 200"),
        "not answered while the slot was held: {read:?} {text}"
    );
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    drop(hog);
    server.stop();
}

/// `server.request_timeout` (here 1s, from SIGIL_SERVER_REQUEST_TIMEOUT):
/// an ACME request whose body never finishes arriving is answered 503 with
/// `Retry-After` after the timeout instead of holding its handler, as an
/// ACME problem document with a fresh nonce, and the server keeps serving.
#[test]
fn a_request_that_takes_too_long_is_answered_503() {
    if !have("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &["--dev", "--data-dir", "data"],
        tmp.path(),
        &[("SIGIL_SERVER_REQUEST_TIMEOUT", "1s")],
    );
    let https = server.https_port.expect("dev server HTTPS port");
    // Headers announce 100 bytes of body; one arrives, then the client waits.
    let script = format!(
        "(printf 'POST /acme/new-account HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\
         Content-Type: application/jose+json\\r\\nContent-Length: 100\\r\\n\\r\\n{{'; sleep 6) \
         | openssl s_client -connect 127.0.0.1:{https} -quiet 2>/dev/null"
    );
    let started = Instant::now();
    let out = run("sh", &["-c", &script]);
    let answer = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 5"),
        "{answer}"
    );
    assert!(answer.contains("request timed out"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/problem+json"),
        "{answer}"
    );
    assert!(lower.contains("replay-nonce: "), "{answer}");
    assert!(
        answer.contains("urn:ietf:params:acme:error:serverInternal"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        server.log_text().contains("request timed out"),
        "{}",
        server.log_text()
    );
    assert_eq!(http_get(server.port, "/healthz").unwrap().0, 200);
    server.stop();
}
