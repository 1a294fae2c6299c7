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
use std::collections::{HashMap, HashSet};
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
    /// Whether the passphrase held has opened a key: then one file it does
    /// not open (corrupt, or sealed with another passphrase) says nothing
    /// against it, and it is kept for the keys it does open.
    pass_opened: std::sync::atomic::AtomicBool,
    /// Token PINs, by module and token label: each token has its own.
    pins: Mutex<HashMap<(PathBuf, String), Passphrase>>,
    /// Digests of PINs a token refused: never tried on it again, since a
    /// token locks its PIN after a few failures (and this store is asked
    /// again every minute while a key is missing).
    refused_pins: Mutex<HashSet<(PathBuf, String, String)>>,
}

impl KeyStore {
    /// The key store a config describes.
    pub fn new(cfg: &Config) -> Result<KeyStore> {
        Ok(KeyStore {
            configured: configured(cfg)?,
            dir: key_dir(cfg),
            passphrase_file: cfg.ca.passphrase_file.as_ref().map(|p| cfg.resolve(p)),
            pass: Mutex::new(None),
            pass_opened: std::sync::atomic::AtomicBool::new(false),
            pins: Mutex::new(HashMap::new()),
            refused_pins: Mutex::new(HashSet::new()),
        })
    }

    /// Whether `module` is a PKCS#11 module this host was configured with:
    /// the configured key's, or `$SIGIL_PKCS11_MODULE`.
    fn allowed_module(&self, module: &Path) -> bool {
        let same = |a: &Path, b: &Path| {
            a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
        };
        let configured = match &self.configured {
            KeyLocation::Token(u) => same(&u.module, module),
            KeyLocation::File(_) => false,
        };
        configured
            || std::env::var_os("SIGIL_PKCS11_MODULE").is_some_and(|m| same(Path::new(&m), module))
    }

    /// Where the key of a stored issuer is: its recorded reference (a file
    /// name in the key directory, or a URI), else the configured key.
    pub fn location(&self, issuer: &IssuerRow) -> Result<KeyLocation, AuthorityError> {
        match &issuer.key_ref {
            None => Ok(self.configured.clone()),
            Some(r) if Pkcs11Uri::is_uri(r) => {
                let uri = Pkcs11Uri::parse(r).map_err(|e| {
                    AuthorityError::Config(format!("key of issuer {}: {e}", issuer.id))
                })?;
                // The database names the key, not the code loaded to reach
                // it (and given the PIN): only modules this host configured.
                if !self.allowed_module(&uri.module) {
                    return Err(AuthorityError::Config(format!(
                        "key of issuer {} is in PKCS#11 module {}, which is neither the configured key's module nor SIGIL_PKCS11_MODULE; set SIGIL_PKCS11_MODULE to it if this host should load it",
                        issuer.id,
                        uri.module.display()
                    )));
                }
                Ok(KeyLocation::Token(uri))
            }
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
        let out = match guard.as_ref() {
            Some(s) => use_it(s),
            None => anyhow::bail!("no secret available"),
        };
        // A secret that never decrypted anything is forgotten and read
        // afresh next time, so a corrected passphrase file is picked up.
        // One that did is kept: forgetting it would prompt again, from a
        // blocking task, for every key it still opens.
        use std::sync::atomic::Ordering;
        match &out {
            Ok(_) => self.pass_opened.store(true, Ordering::Release),
            Err(e)
                if !self.pass_opened.load(Ordering::Acquire)
                    && e.chain().any(|c| {
                        matches!(
                            c.downcast_ref::<sigil_signer::Error>(),
                            Some(sigil_signer::Error::Decrypt(_))
                        )
                    }) =>
            {
                *guard = None;
            }
            Err(_) => {}
        }
        out
    }

    /// Runs `use_it` with the PIN of `uri`'s token: read from its PIN source
    /// on first use, kept while the token accepts it. A PIN the token refused
    /// is forgotten and never presented to that token again.
    fn with_pin<T>(
        &self,
        uri: &Pkcs11Uri,
        use_it: impl FnOnce(&str) -> Result<T, sigil_signer::Error>,
    ) -> Result<T> {
        let token = (uri.module.clone(), uri.token.clone());
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        let pin = match pins.remove(&token) {
            Some(pin) => pin,
            None => token_pin(uri)?,
        };
        let digest = sigil_core::sha256_hex(pin.expose().as_bytes());
        let refused = (token.0.clone(), token.1.clone(), digest);
        let mut refused_pins = self.refused_pins.lock().unwrap_or_else(|p| p.into_inner());
        if refused_pins.contains(&refused) {
            anyhow::bail!(
                "PKCS#11 token '{}' refused this PIN before; it is not tried again, as tokens lock after a few wrong PINs: correct the PIN source ({})",
                uri.token,
                uri.pin_source
                    .as_ref()
                    .map_or_else(|| format!("${PIN_ENV}"), |p| p.display().to_string())
            );
        }
        match use_it(pin.expose()) {
            Err(e @ sigil_signer::Error::WrongPin(_)) => {
                refused_pins.insert(refused);
                Err(e.into())
            }
            result => {
                pins.insert(token, pin);
                Ok(result?)
            }
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
                let key: CaKey = self.with_pin(uri, |pin| Pkcs11Key::open(uri, pin))?.into();
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
            KeyLocation::Token(uri) => Ok(self
                .with_pin(uri, |pin| Pkcs11Key::generate(uri, spec, pin))?
                .into()),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed expectation is a failure
    use super::*;

    fn store() -> KeyStore {
        store_with(None)
    }

    fn store_with(passphrase_file: Option<PathBuf>) -> KeyStore {
        KeyStore {
            configured: KeyLocation::File(PathBuf::from("unused.key")),
            dir: PathBuf::from("."),
            passphrase_file,
            pass: Mutex::new(None),
            pass_opened: std::sync::atomic::AtomicBool::new(false),
            pins: Mutex::new(HashMap::new()),
            refused_pins: Mutex::new(HashSet::new()),
        }
    }

    /// A key reference from the database may not load a PKCS#11 module
    /// this host was not configured with.
    #[test]
    fn stored_key_uris_load_only_configured_modules() {
        let row = |key_ref: &str| IssuerRow {
            id: "i1".into(),
            cert_der: Vec::new(),
            subject: String::new(),
            not_before: 0,
            not_after: 0,
            installed_at: 0,
            state: sigil_store::IssuerState::Staged,
            key_ref: Some(key_ref.into()),
            activate_at: None,
            changed_at: None,
        };
        let mut keys = store();
        keys.configured = KeyLocation::Token(
            Pkcs11Uri::parse("pkcs11:token=t;object=a?module-path=/opt/hsm/ok.so").unwrap(),
        );
        let ok = row("pkcs11:token=t;object=b?module-path=/opt/hsm/ok.so");
        assert!(matches!(keys.location(&ok), Ok(KeyLocation::Token(_))));
        let evil = row("pkcs11:token=t;object=b?module-path=/var/tmp/x.so");
        let e = keys.location(&evil).err().unwrap().to_string();
        assert!(
            e.contains("/var/tmp/x.so") && e.contains("SIGIL_PKCS11_MODULE"),
            "{e}"
        );
        // A host whose own key is a file loads none named by the database.
        assert!(store().location(&ok).is_err());
    }

    /// A passphrase that does not open the key file is not kept: once the
    /// passphrase file is corrected, the key opens without a restart.
    #[test]
    fn a_wrong_passphrase_is_read_again() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let pass_file = tmp.path().join("passphrase");
        let write_pass = |text: &str| {
            std::fs::write(&pass_file, text).unwrap();
            std::fs::set_permissions(&pass_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let key = KeyLocation::File(tmp.path().join("int.key"));
        write_pass("the right passphrase");
        store_with(Some(pass_file.clone()))
            .generate(&key, KeySpec::EcdsaP256)
            .unwrap();
        let keys = store_with(Some(pass_file.clone()));
        write_pass("a wrong passphrase!!");
        assert!(keys.open(&key).is_err());
        write_pass("the right passphrase");
        keys.open(&key).unwrap();
        // Once it has opened a key, a file it cannot open (corrupt, or
        // sealed with another passphrase) does not make it forgotten: it is
        // not read again (here it would now be wrong) for the keys it opens.
        let corrupt = KeyLocation::File(tmp.path().join("corrupt.key"));
        if let KeyLocation::File(p) = &corrupt {
            std::fs::write(p, "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(keys.open(&corrupt).is_err());
        write_pass("a wrong passphrase!!");
        keys.open(&key).unwrap();
    }

    /// Two tokens with their own PINs serve one key store; a PIN a token
    /// refused is not presented to it again, and a corrected PIN source is
    /// read afresh.
    #[test]
    fn each_token_gets_its_own_pin_and_a_refused_pin_is_not_retried() {
        let tmp = tempfile::tempdir().unwrap();
        let Some((a, pin_a)) = sigil_signer::testing::softhsm_token("pins-a", "pin-of-token-a")
        else {
            return;
        };
        let (b, pin_b) = sigil_signer::testing::softhsm_token("pins-b", "pin-of-token-b").unwrap();
        let uri = |template: &str, object: &str, pin: &str| {
            let file = tmp.path().join(format!("{object}.pin"));
            std::fs::write(&file, pin).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            let text = format!(
                "{}&pin-source=file:{}",
                template.replace("OBJ", object),
                file.display()
            );
            KeyLocation::Token(Pkcs11Uri::parse(&text).unwrap())
        };
        let keys = store();
        let key_a = uri(&a, "ka", &pin_a);
        let key_b = uri(&b, "kb", &pin_b);
        keys.generate(&key_a, KeySpec::EcdsaP256).unwrap();
        keys.generate(&key_b, KeySpec::EcdsaP256).unwrap();
        keys.open(&key_a).unwrap();
        keys.open(&key_b).unwrap();

        // A wrong PIN: refused by the token once, then not tried again.
        let keys = store();
        let wrong = uri(&a, "ka", "not-the-pin");
        let e = format!("{:#}", keys.open(&wrong).err().unwrap());
        assert!(e.contains("wrong PIN"), "{e}");
        let e = format!("{:#}", keys.open(&wrong).err().unwrap());
        assert!(e.contains("refused this PIN before"), "{e}");
        // The operator corrects the PIN source: read again, accepted.
        keys.open(&uri(&a, "ka", &pin_a)).unwrap();
    }
}
