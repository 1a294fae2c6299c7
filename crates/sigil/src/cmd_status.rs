//! `sigil status`: the CA at a glance, from the database and config alone
//! (no running server needed), with a warning for anything due soon.

use crate::cmd_ca::load_roots;
use crate::config::Config;
use anyhow::Result;
use sigil_core::lifetime::parse_duration;
use sigil_core::{Clock, IssuerInfo, SystemClock};
use sigil_store::{IssuerState, Store};
use std::path::Path;
use std::process::ExitCode;
use time::OffsetDateTime;

fn when(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// "in 3d 4h" / "5h ago".
fn relative(seconds: i64) -> String {
    let a = seconds.unsigned_abs();
    let text = if a >= 86400 {
        format!("{}d {}h", a / 86400, (a % 86400) / 3600)
    } else if a >= 3600 {
        format!("{}h {}m", a / 3600, (a % 3600) / 60)
    } else {
        format!("{}m {}s", a / 60, a % 60)
    };
    if seconds >= 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Runs `sigil status`.
pub async fn status(config: &Path, warn_within: &str) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let horizon = i64::try_from(parse_duration(warn_within)?.as_secs()).unwrap_or(i64::MAX);
    let now = SystemClock.now().unix_timestamp();
    let mut warnings: Vec<String> = Vec::new();
    let mut due = |what: String, at: i64, warnings: &mut Vec<String>| {
        if at <= now {
            warnings.push(format!("OVERDUE: {what} ({})", relative(at - now)));
        } else if at - now <= horizon {
            warnings.push(format!("due soon: {what} ({})", relative(at - now)));
        }
    };

    println!("roots");
    let roots = load_roots(&cfg)?;
    for r in &roots {
        let t = r.not_after.unix_timestamp();
        println!(
            "  {}  {}  expires {} ({})",
            r.id,
            r.subject,
            when(t),
            relative(t - now)
        );
        due(format!("root {} expires", r.subject), t, &mut warnings);
    }

    let store = Store::open_existing(&cfg.database_url()).await?;
    let result = match root_crls(&store, &roots, now, &mut warnings, &mut due).await {
        Ok(()) => report(&store, now, &mut warnings, &mut due).await,
        Err(e) => Err(e),
    };
    store.close().await;
    result?;

    if warnings.is_empty() {
        println!("\nnothing due within {warn_within}");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\nwarnings");
        for w in &warnings {
            println!("  {w}");
        }
        Ok(ExitCode::from(1))
    }
}

/// The roots' ARLs and the cross-certificates: both are renewed only by an
/// offline signing, so they are due well before they lapse.
async fn root_crls(
    store: &Store,
    roots: &[IssuerInfo],
    now: i64,
    warnings: &mut Vec<String>,
    due: &mut impl FnMut(String, i64, &mut Vec<String>),
) -> Result<()> {
    for r in roots {
        // A root whose intermediates name no CRL needs no ARL.
        let Some(c) = store.latest_crl(r.id.as_str()).await? else {
            continue;
        };
        println!(
            "  {}  ARL #{} thisUpdate {} nextUpdate {} ({})",
            r.id,
            c.number,
            when(c.this_update),
            when(c.next_update),
            relative(c.next_update - now)
        );
        due(
            format!(
                "the ARL of root {} reaches its nextUpdate: sign a new one offline (`sigil root crl`) and install it (`sigil crl install`)",
                r.subject
            ),
            c.next_update,
            warnings,
        );
    }
    let cross = store.cross_certs(now).await?;
    if !cross.is_empty() {
        println!("\ncross-certificates");
    }
    for der in cross {
        let Ok(x) = IssuerInfo::from_der(&der) else {
            warnings.push("a stored cross-certificate cannot be read".into());
            continue;
        };
        let t = x.not_after.unix_timestamp();
        println!(
            "  {}  expires {} ({})",
            x.subject,
            when(t),
            relative(t - now)
        );
        due(
            format!("the cross-certificate for {} expires", x.subject),
            t,
            warnings,
        );
    }
    Ok(())
}

async fn report(
    store: &Store,
    now: i64,
    warnings: &mut Vec<String>,
    due: &mut impl FnMut(String, i64, &mut Vec<String>),
) -> Result<()> {
    println!("\nissuers");
    let issuers = store.issuers().await?;
    if !issuers.iter().any(|i| i.state == IssuerState::Active) {
        warnings.push("no issuer is active: nothing can be issued".into());
    }
    for i in &issuers {
        let outstanding = store.count_unexpired(&i.id, now).await?;
        let info = IssuerInfo::from_der(&i.cert_der).ok();
        println!(
            "  {}  {:<8}  {}  expires {} ({})  certificates outstanding: {}",
            i.id,
            i.state,
            info.as_ref()
                .map_or(i.subject.as_str(), |x| x.subject.as_str()),
            when(i.not_after),
            relative(i.not_after - now),
            outstanding
        );
        if let Some(at) = i.activate_at {
            println!("      scheduled to take over issuance at {}", when(at));
        }
        match i.state {
            IssuerState::Active => {
                due(
                    format!("active issuer {} expires", i.id),
                    i.not_after,
                    warnings,
                );
                // A rotation takes an offline signing: start it well before.
                if !issuers.iter().any(|s| s.state == IssuerState::Staged) {
                    let life = (i.not_after - i.not_before).max(1);
                    let start = i.not_after - life / 5;
                    if start <= now {
                        warnings.push(format!(
                            "active issuer {} is in the last fifth of its life: start a rotation (`sigil intermediate rotate`)",
                            i.id
                        ));
                    }
                }
            }
            IssuerState::Staged => due(
                format!("staged issuer {} expires", i.id),
                i.not_after,
                warnings,
            ),
            IssuerState::Previous | IssuerState::Retired => {}
        }
        // A staged issuer's CRL and responder are made by a server once it
        // sees the issuer: shown when there, not yet expected otherwise.
        let staged = i.state == IssuerState::Staged;
        if !i.state.serves_revocation() && !staged {
            continue;
        }
        match store.latest_crl(&i.id).await? {
            Some(c) => {
                println!(
                    "      CRL #{} thisUpdate {} nextUpdate {} ({})",
                    c.number,
                    when(c.this_update),
                    when(c.next_update),
                    relative(c.next_update - now)
                );
                if c.next_update <= now {
                    warnings.push(format!(
                        "OVERDUE: the CRL of issuer {} passed its nextUpdate ({}): is a server running?",
                        i.id,
                        relative(c.next_update - now)
                    ));
                }
            }
            None if staged => println!("      no CRL yet (a running server publishes one)"),
            None => warnings.push(format!("issuer {} has no CRL yet", i.id)),
        }
        let signer = store
            .audit_latest_of_kind("ocsp_signer.issued", 64)
            .await?
            .into_iter()
            .find_map(|r| {
                let d: serde_json::Value = serde_json::from_str(&r.detail).ok()?;
                (d["issuer"].as_str() == Some(i.id.as_str())).then(|| d["not_after"].as_i64())?
            });
        match signer {
            Some(until) => {
                println!(
                    "      OCSP responder certificate expires {} ({})",
                    when(until),
                    relative(until - now)
                );
                if until <= now {
                    warnings.push(format!(
                        "OVERDUE: the OCSP responder of issuer {} expired: is a server running?",
                        i.id
                    ));
                }
            }
            None if staged => {
                println!("      no OCSP responder yet (a running server makes one)")
            }
            None => warnings.push(format!("issuer {} has no OCSP responder yet", i.id)),
        }
    }
    Ok(())
}

/// `sigil backup`.
pub async fn backup(config: &Path, out: &Path) -> Result<ExitCode> {
    use anyhow::bail;
    use std::os::unix::fs::OpenOptionsExt;
    let cfg = Config::load(config)?;
    let store = Store::open_existing(&cfg.database_url()).await?;
    // ACME secrets (EAB HMAC keys, the nonce key) are in the database: the
    // file is made 0600 before anything is written to it.
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out);
    if let Err(e) = created {
        store.close().await;
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            bail!("{} exists: choose a new file name", out.display());
        }
        return Err(anyhow::Error::new(e).context(format!("cannot create {}", out.display())));
    }
    let made = store.backup_sqlite(out).await;
    store.close().await;
    if let Err(e) = made {
        let _ = std::fs::remove_file(out);
        return Err(anyhow::Error::new(e).context(format!("backup to {} failed", out.display())));
    }
    let copy = Store::open(&format!("sqlite://{}", out.display())).await?;
    let report = copy.verify_audit().await;
    copy.close().await;
    let report = report?;
    if let Some((seq, why)) = report.first_bad {
        bail!("the backup's audit chain breaks at row {seq}: {why}");
    }
    println!("backup: {} (0600)", out.display());
    println!("audit chain OK: {} rows, head {}", report.rows, report.head);
    println!(
        "keys and config are not in it: back up {} and the key directory separately",
        cfg.path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `sigil db migrate`.
pub async fn migrate(from: &str, to: &str) -> Result<ExitCode> {
    use anyhow::Context;
    // A SQLite source must exist (not be created by a mistyped path).
    let source = Store::open_existing(from)
        .await
        .with_context(|| "cannot open --from (is the path right?)".to_string())?;
    // A SQLite source must not change while it is copied: no server on it.
    let _no_server = match sigil_store::ServerLock::take(from) {
        Ok(l) => l,
        Err(e) => {
            source.close().await;
            return Err(e.into());
        }
    };
    if source
        .issuers()
        .await
        .map(|i| i.is_empty())
        .unwrap_or(false)
    {
        source.close().await;
        anyhow::bail!(
            "--from {} holds no CA (no intermediate was ever installed): check the path",
            sigil_store::redact(from)
        );
    }
    let target = match Store::open(to).await {
        Ok(t) => t,
        Err(e) => {
            source.close().await;
            return Err(anyhow::Error::new(e).context("cannot open --to"));
        }
    };
    let copied = source.copy_into(&target).await;
    source.close().await;
    target.close().await;
    let report = copied.context("nothing was copied (the target is unchanged)")?;
    for (table, rows) in &report.tables {
        println!("{table:<20} {rows} rows");
    }
    println!(
        "audit chain verified on arrival: {} rows, head {}",
        report.audit_rows, report.audit_head
    );
    println!(
        "next: set [database] url (or SIGIL_DATABASE_URL) to the new database on every node, then start them"
    );
    Ok(ExitCode::SUCCESS)
}
