//! The ACME server driven by real clients: certbot (http-01, renewal,
//! revocation by account and by certificate key, a name outside policy) and
//! lego (http-01, tls-alpn-01, dns-01 with a wildcard through a test DNS
//! server, external account binding); openssl checks every certificate and
//! revocation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_e2e::*;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A client run that takes longer than this is killed and fails the test.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(240);

/// How long a revocation may take to reach OCSP.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(10);

/// What a client printed (stdout and stderr interleaved) and how it ended.
struct Ran {
    what: String,
    ok: bool,
    out: String,
}

/// Runs `program ARGS` in `work` with extra environment, killing it after
/// [`CLIENT_TIMEOUT`]. The output goes to a log file in `work`, so a chatty
/// client cannot block on a full pipe.
fn client(work: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> Ran {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let log = work.join(format!(
        "client-{}.log",
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let file = fs::File::create(&log).unwrap();
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        out.push_str(&format!("\n(killed after {CLIENT_TIMEOUT:?})"));
    }
    Ran {
        what: format!("{program} {}", args.join(" ")),
        ok: status.is_some_and(|s| s.success()),
        out,
    }
}

/// stdout of a command that must succeed.
fn stdout_of(program: &str, args: &[&str]) -> String {
    ok(run(program, args))
}

/// A serial as lower-case hex without leading zeros, whatever the source
/// (`openssl x509 -serial`, the audit table).
fn norm_serial(s: &str) -> String {
    let s = s.trim().trim_start_matches("serial=").to_ascii_lowercase();
    let s = s.replace(':', "");
    let t = s.trim_start_matches('0');
    if t.is_empty() { "0".into() } else { t.into() }
}

fn serial(cert: &Path) -> String {
    norm_serial(&stdout_of(
        "openssl",
        &["x509", "-in", &p(cert), "-noout", "-serial"],
    ))
}

/// The subjectAltName entries of a certificate, sorted (`DNS:app.localhost`).
fn sans(cert: &Path) -> Vec<String> {
    let out = stdout_of(
        "openssl",
        &["x509", "-in", &p(cert), "-noout", "-ext", "subjectAltName"],
    );
    let mut names: Vec<String> = out
        .lines()
        .skip(1)
        .flat_map(|l| l.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    names.sort();
    names
}

/// The message of a caught panic.
fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Whether two PEM texts hold the same bytes, whatever their line breaks.
fn same_pem(a: &str, b: &str) -> bool {
    let squash = |t: &str| t.split_whitespace().collect::<String>();
    squash(a) == squash(b)
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A dev CA serving ACME from its own temp dir.
struct Ca {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    data: PathBuf,
    server: Server,
    directory: String,
    /// The dev root, the only trust anchor of the HTTPS listener.
    root: PathBuf,
    config: String,
}

impl Ca {
    /// `sigil serve --dev` with extra flags, once its ACME listener accepts connections.
    fn start(extra: &[&str]) -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().to_path_buf();
        let data = work.join("data");
        let data_dir = p(&data);
        let mut args = vec!["--dev", "--data-dir", &data_dir];
        args.extend_from_slice(extra);
        // Tests run in parallel and each picks free ports: one may be taken
        // between picking and binding, so try again with fresh ones.
        let mut attempt = 0;
        let server = loop {
            attempt += 1;
            match std::panic::catch_unwind(|| Server::start(&args, &work, &[])) {
                Ok(server) => break server,
                Err(e) if attempt < 3 && panic_text(&*e).contains("Address already in use") => {}
                Err(e) => std::panic::resume_unwind(e),
            }
        };
        let https = server.https_port.expect("a dev server has an HTTPS port");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", https)).is_err() {
            assert!(
                Instant::now() < deadline,
                "HTTPS listener on {https} never came up:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ca {
            _tmp: tmp,
            root: data.join("DEV-ONLY-root/root.crt"),
            config: p(&data.join("sigil.toml")),
            directory: format!("https://127.0.0.1:{https}/acme/directory"),
            work,
            data,
            server,
        }
    }

    /// Asserts that a client run succeeded; returns its output.
    fn ok(&self, r: Ran) -> String {
        assert!(
            r.ok,
            "{} failed:\n{}\n--- server log ---\n{}",
            r.what,
            r.out,
            self.server.log_text()
        );
        r.out
    }

    /// Asserts that a client run failed; returns its output.
    fn refused(&self, r: Ran) -> String {
        assert!(
            !r.ok,
            "{} unexpectedly succeeded:\n{}\n--- server log ---\n{}",
            r.what,
            r.out,
            self.server.log_text()
        );
        r.out
    }

    /// certbot SUBCOMMAND ARGS with its state in `work/certbot`, trusting the dev root.
    fn certbot(&self, subcommand: &str, args: &[&str]) -> Ran {
        let dir = self.work.join("certbot");
        let (config, work, logs) = (dir.join("config"), dir.join("work"), dir.join("logs"));
        let (config, work, logs) = (p(&config), p(&work), p(&logs));
        let mut all = vec![
            subcommand,
            "--non-interactive",
            "--server",
            &self.directory,
            "--config-dir",
            &config,
            "--work-dir",
            &work,
            "--logs-dir",
            &logs,
        ];
        all.extend_from_slice(args);
        let root = p(&self.root);
        client(
            &self.work,
            "certbot",
            &all,
            &[("REQUESTS_CA_BUNDLE", &root)],
        )
    }

    /// certbot's debug log, which holds the server's responses verbatim.
    fn certbot_log(&self) -> String {
        fs::read_to_string(self.work.join("certbot/logs/letsencrypt.log")).unwrap_or_default()
    }

    /// lego GLOBAL-ARGS COMMAND... with its state in `work/lego`, trusting the dev root.
    fn lego(&self, global: &[&str], command: &[&str], env: &[(&str, &str)]) -> Ran {
        let path = p(&self.work.join("lego"));
        let mut all = vec![
            "--server",
            &self.directory,
            "--path",
            &path,
            "--email",
            "ops@corp.internal",
            "--accept-tos",
        ];
        all.extend_from_slice(global);
        all.extend_from_slice(command);
        let root = p(&self.root);
        let mut env = env.to_vec();
        env.push(("LEGO_CA_CERTIFICATES", &root));
        client(&self.work, "lego", &all, &env)
    }

    /// Where lego keeps the certificate (leaf + issuer) and the issuer for a first domain.
    fn lego_files(&self, domain: &str) -> (PathBuf, PathBuf) {
        let dir = self.work.join("lego/certificates");
        let base = domain.replace('*', "_");
        (
            dir.join(format!("{base}.crt")),
            dir.join(format!("{base}.issuer.crt")),
        )
    }

    /// The audit table, oldest first, as JSON objects (kind, actor, subject, detail).
    fn audit(&self) -> Vec<serde_json::Value> {
        let db = p(&self.data.join("sigil.db"));
        let out = stdout_of(
            "sqlite3",
            &[
                "-json",
                "-cmd",
                ".timeout 5000",
                &db,
                "select kind, actor, subject, detail from audit order by seq",
            ],
        );
        if out.trim().is_empty() {
            return Vec::new();
        }
        serde_json::from_str(&out).unwrap()
    }

    /// `sigil cert list --name NAME`: one row per certificate, header dropped.
    fn cert_list(&self, name: &str) -> Vec<String> {
        ok(sigil(&[
            "cert",
            "list",
            "--config",
            &self.config,
            "--name",
            name,
        ]))
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
    }

    /// Checks a certificate with openssl: it chains to the dev root through
    /// `chain` for TLS servers, and names exactly `names`. Returns its serial.
    fn check_cert(&self, cert: &Path, chain: &Path, names: &[&str]) -> String {
        let out = run(
            "openssl",
            &[
                "verify",
                "-purpose",
                "sslserver",
                "-CAfile",
                &p(&self.root),
                "-untrusted",
                &p(chain),
                &p(cert),
            ],
        );
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK"),
            "openssl verify {}:\n{}{}",
            cert.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut want: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        want.sort();
        assert_eq!(sans(cert), want, "SAN of {}", cert.display());
        serial(cert)
    }

    /// Asserts that `cert` was issued through an audited `cert.issued` event.
    fn assert_issued_audited(&self, cert: &Path) {
        let serial = serial(cert);
        let audit = self.audit();
        assert!(
            audit.iter().any(|r| r["kind"] == "cert.issued"
                && norm_serial(r["subject"].as_str().unwrap_or("")) == serial),
            "no cert.issued audit row for {serial}: {audit:#?}"
        );
    }

    /// Waits until OCSP (at the URL in the certificate, verified against the
    /// dev root) says `cert` is revoked with `reason`, and checks the
    /// `cert.revoked` audit row.
    fn assert_revoked(&self, cert: &Path, issuer: &Path, reason: &str) {
        let url = stdout_of("openssl", &["x509", "-in", &p(cert), "-noout", "-ocsp_uri"]);
        let url = url.trim();
        assert!(
            url.starts_with(&format!("http://127.0.0.1:{}/", self.server.port)),
            "OCSP URL {url:?} is not this server's"
        );
        let args = [
            "ocsp",
            "-no_nonce",
            "-issuer",
            &p(issuer),
            "-cert",
            &p(cert),
            "-url",
            url,
            "-CAfile",
            &p(&self.root),
        ];
        let deadline = Instant::now() + REVOCATION_DEADLINE;
        loop {
            let out = run("openssl", &args);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if text.contains(": revoked") {
                assert!(text.contains("Response verify OK"), "{text}");
                assert!(
                    text.contains(&format!("Reason: {reason}")),
                    "wanted reason {reason}: {text}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "OCSP does not say revoked after {REVOCATION_DEADLINE:?}:\n{text}\n--- server log ---\n{}",
                self.server.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        let serial = serial(cert);
        let audit = self.audit();
        assert!(
            audit.iter().any(|r| r["kind"] == "cert.revoked"
                && norm_serial(r["subject"].as_str().unwrap_or("")) == serial
                && r["detail"].as_str().unwrap_or("").contains(reason)),
            "no cert.revoked audit row for {serial} ({reason}): {audit:#?}"
        );
    }
}

/// Whether the external tools a test needs are there (see [`have`]).
fn tools(names: &[&str]) -> bool {
    names.iter().all(|t| have(t))
}

// ------------------------------------------------------------------ certbot

/// certbot's standalone http-01 solver on 127.0.0.1:PORT.
fn certbot_http01(port: &str) -> [&str; 7] {
    [
        "--standalone",
        "--preferred-challenges",
        "http",
        "--http-01-address",
        "127.0.0.1",
        "--http-01-port",
        port,
    ]
}

#[test]
fn certbot_http01_obtains_renews_and_revokes_by_account_and_by_key() {
    if !tools(&["certbot", "openssl", "sqlite3"]) {
        return;
    }
    let port = free_port().to_string();
    let ca = Ca::start(&["--validation-http-port", &port]);
    let live = ca.work.join("certbot/config/live/app");

    ca.ok(ca.certbot(
        "certonly",
        &[
            &certbot_http01(&port)[..],
            &[
                "-d",
                "app.localhost",
                "--cert-name",
                "app",
                "--agree-tos",
                "--email",
                "ops@corp.internal",
            ],
        ]
        .concat(),
    ));
    let first_serial = ca.check_cert(
        &live.join("cert.pem"),
        &live.join("chain.pem"),
        &["app.localhost"],
    );
    let fullchain = pem_blocks(&fs::read_to_string(live.join("fullchain.pem")).unwrap());
    assert!(
        fullchain.len() >= 2
            && same_pem(
                &fullchain[0],
                &fs::read_to_string(live.join("cert.pem")).unwrap()
            ),
        "fullchain.pem should be the leaf then the chain: {fullchain:#?}"
    );
    ca.assert_issued_audited(&live.join("cert.pem"));
    // live/ links to the newest version: keep this one for revocation.
    let first = ca.work.join("first.pem");
    let first_chain = ca.work.join("first-chain.pem");
    fs::copy(live.join("cert.pem"), &first).unwrap();
    fs::copy(live.join("chain.pem"), &first_chain).unwrap();

    // Renewal from certbot's stored renewal configuration (server, solver, port).
    ca.ok(ca.certbot(
        "renew",
        &[
            "--cert-name",
            "app",
            "--force-renewal",
            "--no-random-sleep-on-renew",
        ],
    ));
    let second_serial = ca.check_cert(
        &live.join("cert.pem"),
        &live.join("chain.pem"),
        &["app.localhost"],
    );
    assert_ne!(
        first_serial, second_serial,
        "renewal gave the same certificate"
    );
    ca.assert_issued_audited(&live.join("cert.pem"));
    let listed = ca.cert_list("app.localhost");
    for s in [&first_serial, &second_serial] {
        assert!(
            listed
                .iter()
                .any(|row| norm_serial(row.split_whitespace().next().unwrap_or("")) == *s),
            "{s} not in `sigil cert list`: {listed:#?}"
        );
    }

    // The first certificate, revoked with the account key.
    ca.ok(ca.certbot(
        "revoke",
        &[
            "--cert-path",
            &p(&first),
            "--reason",
            "superseded",
            "--no-delete-after-revoke",
        ],
    ));
    ca.assert_revoked(&first, &first_chain, "superseded");

    // The current one, revoked with its own key (no account involved).
    ca.ok(ca.certbot(
        "revoke",
        &[
            "--cert-path",
            &p(&live.join("cert.pem")),
            "--key-path",
            &p(&live.join("privkey.pem")),
            "--reason",
            "keycompromise",
            "--no-delete-after-revoke",
        ],
    ));
    ca.assert_revoked(
        &live.join("cert.pem"),
        &live.join("chain.pem"),
        "keyCompromise",
    );

    // keyCompromise blocks the key: a new order with the same key is refused.
    let issued_before = ca
        .audit()
        .iter()
        .filter(|r| r["kind"] == "cert.issued")
        .count();
    let out = ca.refused(
        ca.certbot(
            "certonly",
            &[
                &certbot_http01(&port)[..],
                &[
                    "-d",
                    "app.localhost",
                    "--cert-name",
                    "app",
                    "--reuse-key",
                    "--force-renewal",
                ],
            ]
            .concat(),
        ),
    );
    let issued_after = ca
        .audit()
        .iter()
        .filter(|r| r["kind"] == "cert.issued")
        .count();
    assert_eq!(
        issued_before, issued_after,
        "a compromised key was certified again:\n{out}"
    );
    ca.server.stop();
}

#[test]
fn certbot_name_outside_policy_is_refused_and_audited() {
    if !tools(&["certbot", "sqlite3"]) {
        return;
    }
    let port = free_port().to_string();
    let ca = Ca::start(&["--validation-http-port", &port]);

    let out = ca.refused(
        ca.certbot(
            "certonly",
            &[
                &certbot_http01(&port)[..],
                &[
                    "-d",
                    "example.com",
                    "--agree-tos",
                    "--register-unsafely-without-email",
                ],
            ]
            .concat(),
        ),
    );
    assert!(out.contains("example.com"), "{out}");
    let log = ca.certbot_log();
    assert!(
        log.contains("urn:ietf:params:acme:error:rejectedIdentifier")
            || log.contains("urn:ietf:params:acme:error:unauthorized"),
        "expected a rejectedIdentifier or unauthorized problem; certbot saw:\n{out}\n--- certbot log ---\n{log}"
    );

    let audit = ca.audit();
    let mentions = |r: &serde_json::Value| {
        r["subject"].as_str().unwrap_or("").contains("example.com")
            || r["detail"].as_str().unwrap_or("").contains("example.com")
    };
    assert!(
        audit.iter().any(|r| {
            let kind = r["kind"].as_str().unwrap_or("");
            (kind.contains("denied") || kind.contains("reject")) && mentions(r)
        }),
        "no audited refusal for example.com: {audit:#?}"
    );
    assert!(
        !audit
            .iter()
            .any(|r| r["kind"] == "cert.issued" && mentions(r)),
        "{audit:#?}"
    );
    assert_eq!(ca.cert_list("example.com"), Vec::<String>::new());
    ca.server.stop();
}

// --------------------------------------------------------------------- lego

/// Obtains a certificate for `domains` with lego, checks it with openssl,
/// revokes it (reason superseded) and checks the revocation.
fn lego_obtain_and_revoke(ca: &Ca, solver: &[&str], domains: &[&str], env: &[(&str, &str)]) {
    let mut global = solver.to_vec();
    for d in domains {
        global.extend(["-d", *d]);
    }
    ca.ok(ca.lego(&global, &["run"], env));
    let (cert, issuer) = ca.lego_files(domains[0]);
    ca.check_cert(&cert, &issuer, domains);
    ca.assert_issued_audited(&cert);
    let bundle = pem_blocks(&fs::read_to_string(&cert).unwrap());
    let issuer_pem = fs::read_to_string(&issuer).unwrap();
    assert!(
        bundle.len() == 2 && same_pem(&bundle[1], &issuer_pem),
        "lego's bundle should be leaf + issuer: {bundle:#?}\nissuer: {issuer_pem}"
    );
    ca.ok(ca.lego(
        &["-d", domains[0]],
        &["revoke", "--keep", "--reason", "4"],
        &[],
    ));
    ca.assert_revoked(&cert, &issuer, "superseded");
}

#[test]
fn lego_http01_obtains_and_revokes() {
    if !tools(&["lego", "openssl", "sqlite3"]) {
        return;
    }
    let port = free_port();
    let ca = Ca::start(&["--validation-http-port", &port.to_string()]);

    // Nothing answers on the validation port: the challenge must fail.
    let elsewhere = format!("127.0.0.1:{}", free_port());
    let out = ca.refused(ca.lego(
        &["--http", "--http.port", &elsewhere, "-d", "miss.localhost"],
        &["run"],
        &[],
    ));
    assert!(out.contains("urn:ietf:params:acme:error:"), "{out}");
    assert!(ca.cert_list("miss.localhost").is_empty());

    let addr = format!("127.0.0.1:{port}");
    lego_obtain_and_revoke(
        &ca,
        &["--http", "--http.port", &addr],
        &["app.localhost", "www.app.localhost"],
        &[],
    );
    ca.server.stop();
}

#[test]
fn lego_tls_alpn01_obtains_and_revokes() {
    if !tools(&["lego", "openssl", "sqlite3"]) {
        return;
    }
    let port = free_port();
    let ca = Ca::start(&["--validation-tls-port", &port.to_string()]);
    let addr = format!("127.0.0.1:{port}");
    lego_obtain_and_revoke(
        &ca,
        &["--tls", "--tls.port", &addr],
        &["tls.localhost"],
        &[],
    );
    ca.server.stop();
}

/// `tests/python/dns_server.py` on 127.0.0.1, serving the TXT records that a
/// lego `exec` hook writes into its records directory.
struct Dns {
    _tmp: tempfile::TempDir,
    child: Child,
    port: u16,
    records: PathBuf,
    log: PathBuf,
    /// The lego `exec` hook: `present|cleanup FQDN VALUE` (publishes
    /// `$DNS_HOOK_TXT` instead of VALUE when that is set).
    hook: PathBuf,
}

impl Dns {
    /// Starts the DNS server, or returns None when python3 with dnslib is
    /// missing (a failure under `SIGIL_REQUIRE_EXTERNAL=1`).
    fn start() -> Option<Dns> {
        if !have("python3") {
            return None;
        }
        if !run("python3", &["-c", "import dnslib"]).status.success() {
            assert!(
                std::env::var("SIGIL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
                "python dnslib missing; run ./scripts/test"
            );
            eprintln!("note: python dnslib not installed; skipping");
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let records = tmp.path().join("records");
        fs::create_dir(&records).unwrap();
        let hook = tmp.path().join("dns-hook.sh");
        fs::write(
            &hook,
            format!(
                r#"#!/bin/sh
# lego exec DNS provider: present|cleanup FQDN VALUE. One file per record,
# renamed into place so the DNS server never reads half a file.
# DNS_HOOK_TXT, when set, is published instead of VALUE.
set -eu
echo "$@" >>'{dir}/hook.log'
file='{records}'/$(printf '%s %s' "$2" "$3" | sha256sum | cut -c1-32).json
case "$1" in
present) printf '{{"name": "%s", "txt": "%s"}}\n' "$2" "${{DNS_HOOK_TXT:-$3}}" >"$file.tmp"
         mv "$file.tmp" "$file" ;;
cleanup) rm -f "$file" ;;
*) exit 2 ;;
esac
"#,
                dir = tmp.path().display(),
                records = records.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();

        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/dns_server.py");
        // The port is free for TCP when picked; retry if UDP or a race says otherwise.
        for attempt in 0..5 {
            let port = free_port();
            let log = tmp.path().join(format!("dns-{port}.log"));
            let file = fs::File::create(&log).unwrap();
            let mut child = Command::new("python3")
                .args([
                    &p(&script),
                    "--port",
                    &port.to_string(),
                    "--records-dir",
                    &p(&records),
                ])
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let text = fs::read_to_string(&log).unwrap_or_default();
                if text.lines().any(|l| l == "ready") {
                    return Some(Dns {
                        _tmp: tmp,
                        child,
                        port,
                        records,
                        log,
                        hook,
                    });
                }
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("dns_server.py exited ({status}), attempt {attempt}:\n{text}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "dns_server.py not ready:\n{text}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("dns_server.py did not start");
    }

    fn record_files(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.records)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dns-01 through lego's `exec` hook and the test DNS server, for names under
/// `zone`. First the hook publishes a wrong value: the server must refuse, and
/// its problem must name that value, which shows it asked our DNS server. Then
/// a wildcard and its base name (two challenges on one TXT name) are issued.
fn lego_dns01_wildcard(zone: &str) {
    if !tools(&["lego", "openssl", "sqlite3"]) {
        return;
    }
    let Some(dns) = Dns::start() else { return };
    let resolver = format!("127.0.0.1:{}", dns.port);
    let ca = Ca::start(&["--dns-resolver", &resolver]);
    let solver = [
        "--dns",
        "exec",
        "--dns.resolvers",
        &resolver,
        "--dns.disable-cp",
    ];
    let hook = p(&dns.hook);
    let env = [
        ("EXEC_PATH", hook.as_str()),
        ("EXEC_POLLING_INTERVAL", "1"),
        ("EXEC_PROPAGATION_TIMEOUT", "30"),
        // lego solves one dns-01 challenge at a time, by default a minute apart.
        ("EXEC_SEQUENCE_INTERVAL", "1"),
    ];
    let with_dns_log = |what: &str| format!("{what}\n--- dns log ---\n{}", dns.log_text());

    let wrong = "not-the-key-authorization-digest";
    let name = format!("wrong.{zone}");
    let r = ca.lego(
        &[&solver[..], &["-d", &name]].concat(),
        &["run"],
        &[&env[..], &[("DNS_HOOK_TXT", wrong)]].concat(),
    );
    assert!(
        !r.ok,
        "{}",
        with_dns_log(&format!("{} succeeded:\n{}", r.what, r.out))
    );
    assert!(
        r.out.contains("urn:ietf:params:acme:error:") && r.out.contains(wrong),
        "the refusal should name the TXT value the server found:\n{}",
        with_dns_log(&r.out)
    );
    assert!(ca.cert_list(&name).is_empty());

    let wildcard = format!("*.wild.{zone}");
    let base = format!("wild.{zone}");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lego_obtain_and_revoke(&ca, &solver, &[wildcard.as_str(), base.as_str()], &env);
    }));
    if let Err(e) = r {
        eprintln!("{}", with_dns_log(""));
        std::panic::resume_unwind(e);
    }
    assert_eq!(
        dns.record_files(),
        Vec::<PathBuf>::new(),
        "lego's cleanup left records behind"
    );
    ca.server.stop();
}

#[test]
fn lego_dns01_wildcard_under_internal() {
    lego_dns01_wildcard("internal");
}

/// Names under `.localhost` never reach DNS (RFC 6761), so dns-01 cannot
/// validate them; the refusal must say so rather than report a missing record.
#[test]
fn lego_dns01_under_localhost_is_refused_with_the_reason() {
    if !tools(&["lego"]) {
        return;
    }
    let Some(dns) = Dns::start() else { return };
    let resolver = format!("127.0.0.1:{}", dns.port);
    let ca = Ca::start(&["--dns-resolver", &resolver]);
    let hook = p(&dns.hook);
    let r = ca.lego(
        &[
            "--dns",
            "exec",
            "--dns.resolvers",
            &resolver,
            "--dns.disable-cp",
            "-d",
            "*.wild.localhost",
        ],
        &["run"],
        &[("EXEC_PATH", hook.as_str()), ("EXEC_POLLING_INTERVAL", "1")],
    );
    assert!(!r.ok, "{} succeeded:\n{}", r.what, r.out);
    assert!(
        r.out.contains("urn:ietf:params:acme:error:dns") && r.out.contains("RFC 6761"),
        "the refusal should explain that .localhost names are not in DNS:\n{}",
        r.out
    );
    assert!(ca.cert_list("*.wild.localhost").is_empty());
    ca.server.stop();
}

#[test]
fn lego_external_account_binding_is_required_and_names_the_requester() {
    if !tools(&["lego", "openssl", "sqlite3"]) {
        return;
    }
    let port = free_port();
    let ca = Ca::start(&[
        "--validation-http-port",
        &port.to_string(),
        "--eab-required",
    ]);
    let addr = format!("127.0.0.1:{port}");
    let solver = ["--http", "--http.port", &addr, "-d", "eab.localhost"];

    // lego reads meta.externalAccountRequired from the directory and stops
    // before asking for an account.
    let out = ca.refused(ca.lego(&solver, &["run"], &[]));
    assert!(
        out.contains("requires External Account Binding")
            || out.contains("urn:ietf:params:acme:error:externalAccountRequired"),
        "{out}"
    );

    let eab = ok(sigil(&[
        "acme",
        "eab",
        "create",
        "--config",
        &ca.config,
        "--requester",
        "team-a",
    ]));
    let field = |label: &str| {
        eab.lines()
            .find_map(|l| l.strip_prefix(label))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {label:?} in:\n{eab}"))
    };
    let (kid, hmac) = (field("EAB key id:"), field("EAB HMAC key:"));

    // A wrong MAC key for a real key id is refused too.
    let out = ca.refused(
        ca.lego(
            &[
                &solver[..],
                &[
                    "--eab",
                    "--kid",
                    &kid,
                    "--hmac",
                    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                ],
            ]
            .concat(),
            &["run"],
            &[],
        ),
    );
    assert!(out.contains("urn:ietf:params:acme:error:"), "{out}");

    ca.ok(ca.lego(
        &[&solver[..], &["--eab", "--kid", &kid, "--hmac", &hmac]].concat(),
        &["run"],
        &[],
    ));
    let (cert, issuer) = ca.lego_files("eab.localhost");
    ca.check_cert(&cert, &issuer, &["eab.localhost"]);
    ca.assert_issued_audited(&cert);
    let listed = ca.cert_list("eab.localhost");
    assert!(
        listed.len() == 1 && listed[0].contains("team-a"),
        "the certificate should be issued to requester team-a: {listed:#?}"
    );
    ca.server.stop();
}
