//! Where key passphrases come from: a file, an environment variable, or the
//! terminal, in that order. Never from a command-line argument (visible in ps).

use anyhow::{Context, Result, bail};
use sigil_signer::Passphrase;
use std::io::IsTerminal;
use std::path::Path;

/// Env var for the online intermediate key.
pub const KEY_ENV: &str = "SIGIL_KEY_PASSPHRASE";
/// Env var for the offline root key.
pub const ROOT_ENV: &str = "SIGIL_ROOT_PASSPHRASE";

/// Obtains a passphrase to unlock an existing key.
pub fn obtain(file: Option<&Path>, env: &str, what: &str) -> Result<Passphrase> {
    get(file, env, what, false)
}

/// Obtains a passphrase for a new key (asked twice on a terminal).
pub fn obtain_new(file: Option<&Path>, env: &str, what: &str) -> Result<Passphrase> {
    get(file, env, what, true)
}

/// The permission bits of secret file `f` when group or others may read it.
/// Under systemd's credentials directory, which is private to the service
/// and grants access by ACL (shown as group bits), only others count.
pub fn readable_by_others(f: &Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(f)?.permissions().mode() & 0o777;
    let in_credentials = std::env::var_os("CREDENTIALS_DIRECTORY")
        .is_some_and(|d| !d.is_empty() && f.starts_with(Path::new(&d)));
    let loose = if in_credentials { 0o007 } else { 0o077 };
    Ok((mode & loose != 0).then_some(mode))
}

fn get(file: Option<&Path>, env: &str, what: &str, confirm: bool) -> Result<Passphrase> {
    // `<ENV>_FILE` names a file, e.g. a systemd credential
    // (`Environment=SIGIL_KEY_PASSPHRASE_FILE=%d/intermediate-passphrase`).
    let from_env = std::env::var_os(format!("{env}_FILE"))
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from);
    if let Some(f) = file.map(Path::to_path_buf).or(from_env) {
        let f = f.as_path();
        let loose = readable_by_others(f)
            .with_context(|| format!("cannot read passphrase file {}", f.display()))?;
        if let Some(mode) = loose {
            bail!(
                "passphrase file {} is readable by group or others (mode {mode:o}); run: chmod 600 {}",
                f.display(),
                f.display()
            );
        }
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read passphrase file {}", f.display()))?;
        return Ok(Passphrase::new(text));
    }
    if let Ok(v) = std::env::var(env)
        && !v.is_empty()
    {
        return Ok(Passphrase::new(v));
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "no passphrase for the {what}: configure a passphrase file (--passphrase-file, ca.passphrase_file, or pin-source in a pkcs11: URI), or set {env}_FILE (a file) or {env}, or run on a terminal"
        );
    }
    let first = rpassword::prompt_password(format!("Passphrase for the {what}: "))?;
    if confirm {
        let second = rpassword::prompt_password("Repeat passphrase: ")?;
        if first != second {
            bail!("passphrases do not match");
        }
    }
    Ok(Passphrase::new(first))
}
