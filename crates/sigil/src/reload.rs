//! Policy reloads without a restart: on SIGHUP, and when a file in the
//! policy directory changes. A policy that fails to load is refused (the old
//! one stays in force) and the refusal is audited like a reload.

use sigil_authority::Authority;
use sigil_policy::Policy;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often the policy directory is checked for changes.
const POLL: Duration = Duration::from_secs(2);

/// The policy files' digest ([`sigil_policy::sources_digest`], the value a
/// policy loaded from them reports); `None` when the directory cannot be read.
fn digest(dir: &Path) -> Option<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut read = Vec::with_capacity(files.len());
    for f in files {
        let text = std::fs::read(&f).ok()?;
        read.push((f.display().to_string(), text));
    }
    Some(sigil_policy::sources_digest(
        read.iter().map(|(f, t)| (f.as_str(), t.as_slice())),
    ))
}

/// Loads the policy in `dir` and puts it in force, audited either way.
/// Returns whether the new policy is in force.
pub async fn reload(authority: &Authority, dir: &Path, trigger: &str) -> bool {
    let sha = digest(dir);
    let loaded = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || Policy::load_dir(&dir)).await
    };
    let detail = serde_json::json!({
        "trigger": trigger,
        "dir": dir.display().to_string(),
        "sha256": sha,
    });
    match loaded {
        Ok(Ok(policy)) => {
            // What was loaded, should a file have changed since `sha` was taken.
            let mut detail = detail;
            detail["sha256"] = serde_json::json!(policy.digest());
            match authority.replace_policy(policy, "system", detail).await {
                Ok(_) => {
                    tracing::info!(
                        trigger,
                        rules = authority.policy().rules().len(),
                        "policy reloaded"
                    );
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy reload not recorded; the old policy stays in force");
                    false
                }
            }
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, trigger, "policy reload refused; the old policy stays in force");
            let mut detail = detail;
            detail["error"] = serde_json::json!(e.to_string());
            if let Err(e) = authority
                .record("policy.reload_failed", "system", "policy", detail)
                .await
            {
                tracing::error!(error = %e, "recording the refused policy reload failed");
            }
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "policy reload task failed");
            false
        }
    }
}

/// Reloads on SIGHUP and on changes to the policy files, until the process ends.
pub async fn watch(authority: Arc<Authority>, dir: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; policy reloads follow file changes only");
            None
        }
    };
    let mut seen = digest(&dir);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = tick.tick() => {
                let now = digest(&dir);
                if now == seen || now.is_none() {
                    continue;
                }
                "file change"
            }
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
        };
        // Remember what was tried, so a broken file is reported once, not
        // every poll; fixing it is a new change.
        seen = digest(&dir);
        reload(&authority, &dir, trigger).await;
    }
}
