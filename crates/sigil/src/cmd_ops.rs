//! Operator commands: issue and inspect certificates, audit, policy.

use crate::cli::{AuditCmd, CertCmd, PolicyCmd};
use crate::cmd_ca::{operator_name, write_public};
use crate::config::Config;
use anyhow::{Context, Result};
use sigil_authority::{Authority, IssueRequest, Settings, pem};
use sigil_core::lifetime::parse_duration;
use sigil_core::{CaUrls, Identifier, KeyType, Profile, Requester, SystemClock};
use sigil_policy::Policy;
use sigil_store::Store;
use std::process::ExitCode;
use std::sync::Arc;

/// Builds the authority from a config and its store: policy, issuer key and certificate.
pub async fn build_authority(cfg: &Config, store: Store) -> Result<Authority> {
    let prepared = (|| -> Result<_> {
        let policy = Policy::load_dir(&cfg.resolve(&cfg.policy.dir))?;
        let urls = CaUrls::new(&cfg.server.public_url).with_crl_sharding(cfg.crl_sharding()?);
        let settings = Settings {
            default_lifetime: cfg.default_lifetime()?,
            max_lifetime: cfg.max_lifetime()?,
            urls,
            rate_per_minute: cfg.issuance.rate_per_minute,
        };
        Ok((policy, settings, Arc::new(crate::keys::KeyStore::new(cfg)?)))
    })();
    let (policy, settings, keys) = match prepared {
        Ok(p) => p,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    let opened =
        Authority::open(Arc::new(SystemClock), policy, store.clone(), settings, keys).await;
    match opened {
        Ok(a) => Ok(a),
        Err(e) => {
            store.close().await;
            Err(anyhow::Error::new(e).context(format!(
                "cannot start the CA from {} and its database",
                cfg.path.display()
            )))
        }
    }
}

/// Runs a `sigil cert` command.
pub async fn cert(cmd: CertCmd) -> Result<ExitCode> {
    match cmd {
        CertCmd::Issue {
            config,
            csr,
            profile,
            lifetime,
            operator,
            out,
        } => {
            let cfg = Config::load(&config)?;
            let csr_bytes =
                std::fs::read(&csr).with_context(|| format!("cannot read {}", csr.display()))?;
            let profile = profile.map(|p| p.parse::<Profile>()).transpose()?;
            let lifetime = lifetime.map(|l| parse_duration(&l)).transpose()?;
            let authority =
                build_authority(&cfg, Store::open_existing(&cfg.database_url()).await?).await?;
            let issued = authority
                .issue(IssueRequest {
                    csr: csr_bytes.into(),
                    requester: Requester::Operator(operator_name(operator.as_deref())),
                    profile,
                    lifetime,
                    token: None,
                    not_before: None,
                    completes: None,
                })
                .await;
            authority.store().close().await;
            let issued = issued?;
            match out {
                Some(path) => write_public(&path, &issued.chain_pem).with_context(|| {
                    format!(
                        "certificate {} was issued, but not saved: get it with `sigil cert show --serial {} --pem`",
                        issued.serial, issued.serial
                    )
                })?,
                None => print!("{}", issued.chain_pem),
            }
            eprintln!(
                "issued serial {} for {} (valid until {}, audit #{})",
                issued.serial,
                issued
                    .identifiers
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                issued.not_after,
                issued.receipt.seq
            );
            Ok(ExitCode::SUCCESS)
        }
        CertCmd::List {
            config,
            name,
            limit,
        } => {
            let cfg = Config::load(&config)?;
            let store = Store::open_existing(&cfg.database_url()).await?;
            let name = name
                .map(|n| Identifier::parse_any(&n).with_context(|| format!("--name '{n}'")))
                .transpose()?
                .map(|id| id.to_string());
            let rows = store.certificates(name.as_deref(), limit, 0).await?;
            println!(
                "{:<34} {:<20} {:<7} {:<24} names",
                "serial", "not_after", "profile", "requester"
            );
            for r in rows {
                println!(
                    "{:<34} {:<20} {:<7} {:<24} {}",
                    r.serial,
                    fmt_time(r.not_after),
                    r.profile,
                    r.requester,
                    r.names.join(",")
                );
            }
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        CertCmd::Show {
            config,
            serial,
            pem: with_pem,
        } => {
            let cfg = Config::load(&config)?;
            let s = sigil_core::Serial::parse_hex(&serial)
                .with_context(|| format!("'{serial}' is not a hex serial"))?;
            let store = Store::open_existing(&cfg.database_url()).await?;
            let row = store.certificate(&s.to_hex()).await?;
            store.close().await;
            let Some(r) = row else {
                anyhow::bail!("no certificate with serial {s}: see `sigil cert list`");
            };
            println!("serial:     {}", r.serial);
            println!("issuer:     {}", r.issuer_id);
            println!("names:      {}", r.names.join(", "));
            println!("profile:    {}", r.profile);
            println!("requester:  {}", r.requester);
            println!("not before: {}", fmt_time(r.not_before));
            println!("not after:  {}", fmt_time(r.not_after));
            println!("key sha256: {}", r.key_fingerprint);
            if with_pem {
                print!("{}", pem("CERTIFICATE", &r.der));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `sigil revoke`.
pub async fn revoke(
    config: &std::path::Path,
    serial: &str,
    reason: &str,
    operator: Option<&str>,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let serial = sigil_core::Serial::parse_hex(serial).with_context(|| {
        format!("--serial '{serial}' is not a hex serial (see `sigil cert list`)")
    })?;
    let code = sigil_core::revocation::parse_reason(reason).with_context(|| {
        format!("--reason '{reason}' is not an RFC 5280 reason (e.g. keyCompromise, superseded, cessationOfOperation)")
    })?;
    // The records alone: no issuer key, HSM or policy is needed to revoke.
    let store = Store::open_existing(&cfg.database_url()).await?;
    let by = Requester::Operator(operator_name(operator));
    let result = sigil_authority::revoke::revoke(
        &store,
        sigil_core::Clock::now(&SystemClock),
        &serial,
        code,
        &by,
    )
    .await;
    store.close().await;
    let revoked = result?;
    println!(
        "revoked {} ({}) at {}",
        revoked.serial,
        sigil_core::revocation::reason_name(code),
        revoked.revoked_at
    );
    if code == 1 {
        println!("its public key is blocked: no certificate will be issued for it again");
        for other in &revoked.same_key {
            println!("revoked {other} too (keyCompromise): it has the same key");
        }
    }
    println!("a running server publishes the change in its CRL within seconds");
    Ok(ExitCode::SUCCESS)
}

fn fmt_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// A recorded chain head, `SEQ:HASH` as `audit verify` prints it.
fn parse_anchor(text: &str) -> Result<(i64, String)> {
    let parsed = text.split_once(':').and_then(|(seq, hash)| {
        let seq = seq.parse::<i64>().ok().filter(|s| *s > 0)?;
        let hash = hash.to_ascii_lowercase();
        (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some((seq, hash))
    });
    parsed.ok_or_else(|| {
        anyhow::anyhow!(
            "--expect-head '{text}' is not SEQ:HASH (a row number, a colon and 64 hex digits, as `sigil audit verify` prints the head)"
        )
    })
}

/// Runs a `sigil audit` command.
pub async fn audit(cmd: AuditCmd) -> Result<ExitCode> {
    match cmd {
        AuditCmd::Verify {
            config,
            expect_head,
        } => {
            let anchors = expect_head
                .iter()
                .map(|a| parse_anchor(a))
                .collect::<Result<Vec<_>>>()?;
            let cfg = Config::load(&config)?;
            let store = Store::open_existing(&cfg.database_url()).await?;
            let report = store.verify_audit().await?;
            let mut missing = Vec::new();
            if report.first_bad.is_none() {
                for (seq, hash) in &anchors {
                    let row = store.audit_rows(seq - 1, 1).await?;
                    match row.first() {
                        Some(r) if r.seq == *seq && r.hash == *hash => {}
                        Some(r) if r.seq == *seq => missing.push(format!(
                            "row {seq} now has hash {} instead of {hash}: the chain was rewritten from there on",
                            r.hash
                        )),
                        _ => missing.push(format!(
                            "row {seq} is gone (the chain ends at row {}): rows were cut from its end",
                            report.rows
                        )),
                    }
                }
            }
            let records = store.cross_check_records().await?;
            store.close().await;
            for p in &records.problems {
                println!("records BROKEN: {p}");
            }
            let unlisted = records.problem_count - records.problems.len() as u64;
            if unlisted > 0 {
                println!("records BROKEN: {unlisted} more problems like these");
            }
            let records_ok = records.problem_count == 0;
            if records_ok {
                println!(
                    "records OK: {} certificates and {} revocations match their audit rows",
                    records.certificates, records.revocations
                );
            }
            match report.first_bad {
                None if missing.is_empty() => {
                    println!(
                        "audit chain OK: {} rows, head {}:{}",
                        report.rows, report.rows, report.head
                    );
                    for (seq, _) in &anchors {
                        println!("expected head {seq} is in the chain");
                    }
                    Ok(if records_ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                None => {
                    for m in &missing {
                        println!("audit chain BROKEN: {m}");
                    }
                    println!(
                        "the rows present link up ({} rows, head {}:{}), but they are not the chain recorded earlier",
                        report.rows, report.rows, report.head
                    );
                    Ok(ExitCode::FAILURE)
                }
                Some((seq, why)) => {
                    println!("audit chain BROKEN at row {seq}: {why}");
                    println!("rows before it verify; last good head {}", report.head);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCmd::List { config, limit } => {
            let cfg = Config::load(&config)?;
            let store = Store::open_existing(&cfg.database_url()).await?;
            for r in store.audit_tail(limit).await? {
                println!(
                    "{:>6} {} {:<18} {:<28} {} {}",
                    r.seq,
                    fmt_time(r.ts_ms / 1000),
                    r.kind,
                    r.actor,
                    r.subject,
                    r.detail
                );
            }
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs a `sigil policy` command.
pub fn policy(cmd: PolicyCmd) -> Result<ExitCode> {
    match cmd {
        PolicyCmd::Check {
            config,
            requester,
            names,
            profile,
            key_type,
            lifetime,
        } => {
            let cfg = Config::load(&config)?;
            let policy = Policy::load_dir(&cfg.resolve(&cfg.policy.dir))?;
            let requester = Requester::parse(&requester).with_context(|| {
                format!("requester '{requester}' must be KIND:NAME with KIND one of operator, token, mtls, acme, eab")
            })?;
            let ids = names
                .iter()
                .map(|n| Identifier::parse_any(n).with_context(|| format!("name '{n}'")))
                .collect::<Result<Vec<_>>>()?;
            let key_type: KeyType = key_type.parse()?;
            let decision = policy.evaluate(&sigil_policy::Request {
                requester: &requester,
                identifiers: &ids,
                profile: profile.parse()?,
                key_type: Some(key_type),
                lifetime: lifetime.map(|l| parse_duration(&l)).transpose()?,
            });
            print!("{decision}");
            Ok(if decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
