//! Where the online CA's keys are, and opening them: encrypted key files in
//! the key directory (beside `ca.intermediate_key`), or keys in a PKCS#11
//! token named by an RFC 7512 URI (`ca.intermediate_key = "pkcs11:..."`,
//! or a rotation's `--key pkcs11:...`).
//!
//! Secrets (the key-file passphrase, the token PIN) are obtained when first
//! needed and kept by a running server, so keys staged while it runs can be
//! opened without a restart.

use crate::config::Config;
use crate::passphrase;
use anyhow::{Context, Result};
use sigil_authority::{Error as AuthorityError, IssuerKeys, IssuerRow};
use sigil_core::KeySpec;
use sigil_signer::{CaKey, Passphrase, Pkcs11Key, Pkcs11Uri, SoftwareKey, read_encrypted_key};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Env var (or `<it>_FILE`) for a PKCS#11 token PIN.
pub const PIN_ENV: &str = "SIGIL_PKCS11_PIN";

/// Where a CA key is.
#[derive(Debug, Clone)]
pub enum KeyLocation {
    /// An encrypted PKCS#8 file.
    File(PathBuf),
    /// A key in a PKCS#11 token.
    Token(Pkcs11Uri),
}

impl std::fmt::Display for KeyLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyLocation::File(p) => write!(f, "{}", p.display()),
            KeyLocation::Token(u) => write!(f, "token '{}' object '{}'", u.token, u.object),
        }
    }
}

/// Parses a key reference: a `pkcs11:` URI, or a path (relative to `base`).
pub fn parse_location(text: &str, base: impl FnOnce(&Path) -> PathBuf) -> Result<KeyLocation> {
    if Pkcs11Uri::is_uri(text) {
        return Ok(KeyLocation::Token(Pkcs11Uri::parse(text)?));
    }
    Ok(KeyLocation::File(base(Path::new(text))))
}

/// The configured intermediate key (`ca.intermediate_key`).
pub fn configured(cfg: &Config) -> Result<KeyLocation> {
    let text = cfg.ca.intermediate_key.to_string_lossy();
    parse_location(&text, |p| cfg.resolve(p)).context("ca.intermediate_key")
}

/// The directory rotated key files live in.
pub fn key_dir(cfg: &Config) -> PathBuf {
    match configured(cfg) {
        Ok(KeyLocation::File(p)) => p
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        _ => cfg.resolve(Path::new(".")),
    }
}

fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Opens CA keys: file keys with the intermediate passphrase, token keys
/// with the PIN.
pub struct KeyStore {
    configured: KeyLocation,
    dir: PathBuf,
    passphrase_file: Option<PathBuf>,
    pass: Mutex<Option<Passphrase>>,
    pin: Mutex<Option<Passphrase>>,
}

impl KeyStore {
    /// The key store a config describes.
    pub fn new(cfg: &Config) -> Result<KeyStore> {
        Ok(KeyStore {
            configured: configured(cfg)?,
            dir: key_dir(cfg),
            passphrase_file: cfg.ca.passphrase_file.as_ref().map(|p| cfg.resolve(p)),
            pass: Mutex::new(None),
            pin: Mutex::new(None),
        })
    }

    /// Where the key of a stored issuer is: its recorded reference (a file
    /// name in the key directory, or a URI), else the configured key.
    pub fn location(&self, issuer: &IssuerRow) -> Result<KeyLocation, AuthorityError> {
        match &issuer.key_ref {
            None => Ok(self.configured.clone()),
            Some(r) if Pkcs11Uri::is_uri(r) => Pkcs11Uri::parse(r)
                .map(KeyLocation::Token)
                .map_err(|e| AuthorityError::Config(format!("key of issuer {}: {e}", issuer.id))),
            Some(name) if valid_key_name(name) => Ok(KeyLocation::File(self.dir.join(name))),
            Some(name) => Err(AuthorityError::Config(format!(
                "issuer {} names key '{name}', which is neither a file name in the key directory {} nor a pkcs11: URI",
                issuer.id,
                self.dir.display()
            ))),
        }
    }

    fn with_secret<T>(
        &self,
        slot: &Mutex<Option<Passphrase>>,
        obtain: impl FnOnce() -> Result<Passphrase>,
        use_it: impl FnOnce(&Passphrase) -> Result<T>,
    ) -> Result<T> {
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(obtain()?);
        }
        match guard.as_ref() {
            Some(s) => use_it(s),
            None => anyhow::bail!("no secret available"),
        }
    }

    /// Runs `use_it` with the key-file passphrase (obtained on first use).
    fn with_passphrase<T>(&self, use_it: impl FnOnce(&Passphrase) -> Result<T>) -> Result<T> {
        self.with_secret(
            &self.pass,
            || {
                passphrase::obtain(
                    self.passphrase_file.as_deref(),
                    passphrase::KEY_ENV,
                    "intermediate key",
                )
            },
            use_it,
        )
    }

    /// Opens a key and proves it signs (a test signature, verified).
    pub fn open(&self, location: &KeyLocation) -> Result<CaKey> {
        match location {
            KeyLocation::File(path) => self.with_passphrase(|pass| {
                let key: CaKey = read_encrypted_key(path, pass)?.into();
                key.self_test().with_context(|| {
                    format!("the key in {} failed a test signature", path.display())
                })?;
                Ok(key)
            }),
            KeyLocation::Token(uri) => {
                let key: CaKey = self.with_secret(
                    &self.pin,
                    || token_pin(uri),
                    |pin| Ok(Pkcs11Key::open(uri, pin.expose())?.into()),
                )?;
                key.self_test()
                    .with_context(|| format!("the key in {location} failed a test signature"))?;
                Ok(key)
            }
        }
    }

    /// Makes a new CA key at `location` (a file: encrypted, 0600; a token:
    /// generated inside it, never extractable). Returns it.
    pub fn generate(&self, location: &KeyLocation, spec: KeySpec) -> Result<CaKey> {
        match location {
            KeyLocation::File(path) => {
                if path.exists() {
                    anyhow::bail!(
                        "{} already exists: a CA key is generated once; move it away to start over",
                        path.display()
                    );
                }
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let (key, pkcs8) = SoftwareKey::generate(spec)?;
                self.with_secret(
                    &self.pass,
                    || {
                        passphrase::obtain_new(
                            self.passphrase_file.as_deref(),
                            passphrase::KEY_ENV,
                            "intermediate key",
                        )
                    },
                    |pass| Ok(sigil_signer::write_encrypted_key(path, &pkcs8, pass)?),
                )?;
                Ok(key.into())
            }
            KeyLocation::Token(uri) => self.with_secret(
                &self.pin,
                || token_pin(uri),
                |pin| Ok(Pkcs11Key::generate(uri, spec, pin.expose())?.into()),
            ),
        }
    }
}

fn token_pin(uri: &Pkcs11Uri) -> Result<Passphrase> {
    passphrase::obtain(
        uri.pin_source.as_deref(),
        PIN_ENV,
        &format!("PKCS#11 token '{}' (PIN)", uri.token),
    )
}

impl IssuerKeys for KeyStore {
    fn load(&self, issuer: &IssuerRow) -> Result<CaKey, AuthorityError> {
        let location = self.location(issuer)?;
        self.open(&location).map_err(|e| {
            AuthorityError::Config(format!("key of issuer {} ({location}): {e:#}", issuer.id))
        })
    }

    /// Seals with the intermediate key's passphrase: whoever can open the
    /// key files can open the shared OCSP responder key.
    fn seal(&self, pkcs8: &[u8]) -> Option<Result<Vec<u8>, AuthorityError>> {
        Some(
            self.with_passphrase(|pass| Ok(sigil_signer::seal_key(pkcs8, pass)?))
                .map_err(|e| AuthorityError::Unavailable(format!("sealing a key: {e:#}"))),
        )
    }

    fn unseal(&self, sealed: &[u8]) -> Result<CaKey, AuthorityError> {
        self.with_passphrase(|pass| {
            let key: CaKey =
                sigil_signer::unseal_key(sealed, pass, "the stored OCSP responder key")?.into();
            key.self_test()?;
            Ok(key)
        })
        .map_err(|e| AuthorityError::Unavailable(format!("{e:#}")))
    }
}
