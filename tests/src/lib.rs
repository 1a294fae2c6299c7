//! Helpers for end-to-end tests: start the real `sigil` binary on 127.0.0.1,
//! stop it by PID, and drive it with tools we did not write (openssl, pkilint).

// Test support: a failed expectation here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the `sigil` binary built alongside the tests.
pub fn sigil_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/sigil
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("sigil");
    assert!(
        bin.exists(),
        "{} missing: build the workspace first (cargo build)",
        bin.display()
    );
    bin
}

/// Whether an external tool is available. With `SIGIL_REQUIRE_EXTERNAL=1`
/// (set by ./scripts/test) a missing tool fails the test instead of skipping.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("SIGIL_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("{tool} is required but not on PATH; run ./scripts/test");
        }
        eprintln!("note: {tool} not found; skipping the checks that need it");
    }
    ok
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Runs `sigil` with arguments; returns the output.
pub fn sigil(args: &[&str]) -> Output {
    sigil_env(args, &[])
}

/// Runs `sigil` with arguments and extra environment.
pub fn sigil_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(sigil_bin());
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run sigil")
}

/// Asserts success and returns stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts failure and returns stderr.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "command unexpectedly succeeded:\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs any program; returns output.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// A running `sigil serve`, stopped by PID on drop.
pub struct Server {
    child: Option<Child>,
    /// The HTTP port.
    pub port: u16,
    /// The gRPC port chosen for a `--dev` server (none with `--config`).
    pub grpc_port: Option<u16>,
    /// The HTTPS (ACME) port chosen for a `--dev` server (none with `--config`).
    pub https_port: Option<u16>,
    /// stdout+stderr log file.
    pub log: PathBuf,
}

impl Server {
    /// Starts `sigil serve ARGS --http-addr 127.0.0.1:PORT` (and, for `--dev`,
    /// `--grpc-addr` and `--https-addr` on free ports) and waits for /healthz.
    /// A port taken by another test between choosing and binding it is
    /// retried with new ports.
    pub fn start(args: &[&str], workdir: &Path, env: &[(&str, &str)]) -> Server {
        for _ in 0..4 {
            match Server::try_start(args, workdir, env) {
                Ok(s) => return s,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
        panic!("sigil serve found no free ports in 4 attempts");
    }

    fn try_start(args: &[&str], workdir: &Path, env: &[(&str, &str)]) -> Result<Server, String> {
        let port = free_port();
        let log = workdir.join(format!("serve-{port}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let addr = format!("127.0.0.1:{port}");
        // A dev server would take the fixed default gRPC port: give it a free one.
        let grpc_port = (args.contains(&"--dev") && !args.contains(&"--grpc-addr")).then(free_port);
        let mut c = Command::new(sigil_bin());
        c.arg("serve").args(args).args(["--http-addr", &addr]);
        if let Some(g) = grpc_port {
            c.args(["--grpc-addr", &format!("127.0.0.1:{g}")]);
        }
        // Likewise for the HTTPS (ACME) listener.
        let https_port =
            (args.contains(&"--dev") && !args.contains(&"--https-addr")).then(free_port);
        if let Some(h) = https_port {
            c.args(["--https-addr", &format!("127.0.0.1:{h}")]);
        }
        c.current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().expect("spawn sigil serve");
        let mut s = Server {
            child: Some(child),
            port,
            grpc_port,
            https_port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "sigil serve exited with {status}:\n{}",
                    s.log_text()
                ));
            }
            if let Ok((200, _)) = http_get(port, "/healthz") {
                return Ok(s);
            }
            assert!(
                Instant::now() < deadline,
                "server did not come up:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The issuing intermediate's id, from the banner the server printed.
    pub fn issuer_id(&self) -> String {
        self.log_text()
            .lines()
            .find_map(|l| l.strip_prefix("issuer:"))
            .and_then(|l| {
                l.rsplit_once('(')
                    .map(|(_, id)| id.trim_end_matches(')').to_string())
            })
            .expect("issuer id in the server banner")
    }

    /// Sends SIGTERM by PID and waits for a clean exit.
    pub fn stop(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        assert!(status.success(), "server exited with {status}");
                        break;
                    }
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        panic!("server ignored SIGTERM");
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.log_text()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A minimal HTTP/1.0 GET on loopback; returns status and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    http_request(port, "GET", path, None)
}

/// A minimal HTTP/1.0 POST on loopback; returns status and body.
pub fn http_post(port: u16, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    http_request(port, "POST", path, Some(body))
}

fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n")?;
    if let Some(b) = body {
        write!(
            s,
            "Content-Type: application/ocsp-request\r\nContent-Length: {}\r\n",
            b.len()
        )?;
    }
    write!(s, "\r\n")?;
    if let Some(b) = body {
        // The server may answer (413) before reading everything.
        let _ = s.write_all(b);
    }
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    Ok((status, buf[split + 4..].to_vec()))
}

/// Generates a CSR with openssl for `key_alg` (`ec:P-256`, `ec:P-384`, `ed25519`,
/// `rsa:2048`, ...) with the given subject and SANs; returns the CSR path.
pub fn openssl_csr(dir: &Path, name: &str, key_alg: &str, subject: &str, sans: &[&str]) -> PathBuf {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let mut args: Vec<String> = vec!["req".into(), "-new".into(), "-nodes".into()];
    match key_alg.split_once(':') {
        Some(("ec", curve)) => args.extend([
            "-newkey".into(),
            "ec".into(),
            "-pkeyopt".into(),
            format!("ec_paramgen_curve:{curve}"),
        ]),
        Some(("rsa", bits)) => args.extend(["-newkey".into(), format!("rsa:{bits}")]),
        _ => args.extend(["-newkey".into(), key_alg.into()]),
    }
    args.extend([
        "-keyout".into(),
        key.display().to_string(),
        "-out".into(),
        csr.display().to_string(),
        "-subj".into(),
        subject.into(),
    ]);
    if !sans.is_empty() {
        args.extend([
            "-addext".into(),
            format!("subjectAltName={}", sans.join(",")),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("openssl", &refs);
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    csr
}

/// ERROR and FATAL findings of pkilint's RFC 5280 certificate linter.
pub fn pkilint_errors(cert_pem: &Path) -> Vec<String> {
    let out = run(
        "lint_pkix_cert",
        &[
            "lint",
            "-s",
            "ERROR",
            "-f",
            "JSON",
            &cert_pem.display().to_string(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().is_empty(),
        "pkilint could not load {}: {stderr}",
        cert_pem.display()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pkilint JSON");
    let mut findings = Vec::new();
    for r in v["results"].as_array().into_iter().flatten() {
        for f in r["finding_descriptions"].as_array().into_iter().flatten() {
            let sev = f["severity"].as_str().unwrap_or("");
            if sev == "ERROR" || sev == "FATAL" {
                findings.push(format!("{} {} {}", sev, f["code"], r["node_path"]));
            }
        }
    }
    findings
}

/// The first certificate of the served trust bundle (`/roots.pem`): the
/// root alone, for checks that must trust nothing else.
pub fn served_root(port: u16) -> String {
    let bundle = String::from_utf8(http_get(port, "/roots.pem").expect("GET /roots.pem").1)
        .expect("PEM text");
    pem_blocks(&bundle)
        .into_iter()
        .next()
        .expect("a root first in /roots.pem")
}

/// Splits a PEM bundle into individual PEM blocks.
pub fn pem_blocks(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| b[b.find("-----BEGIN").unwrap_or(0)..].to_string())
        .collect()
}

/// Writes a secret file (passphrase) with mode 0600, as Sigil requires.
pub fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Runs `sigil cert issue --config CONFIG --csr CSR EXTRA...`.
pub fn cert_issue(config: &str, csr: &Path, extra: &[&str]) -> Output {
    let csr = csr.display().to_string();
    let mut args = vec!["cert", "issue", "--config", config, "--csr", &csr];
    args.extend_from_slice(extra);
    sigil(&args)
}
