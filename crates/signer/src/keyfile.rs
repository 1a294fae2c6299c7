//! Encrypted key files: PKCS#8 PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) in PEM,
//! readable by OpenSSL, created 0600 and never overwritten.

use crate::{Error, SoftwareKey};
use pkcs8::der::pem::LineEnding;
use pkcs8::pkcs5::pbes2;
use pkcs8::{EncryptedPrivateKeyInfoRef, PrivateKeyInfoRef};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use zeroize::Zeroizing;

/// PBKDF2 rounds for key files (OWASP 2023 guidance for PBKDF2-HMAC-SHA256).
const PBKDF2_ROUNDS: u32 = 600_000;
/// Shortest passphrase accepted when a key file is created.
pub const MIN_PASSPHRASE_LEN: usize = 12;

/// A key-file passphrase; zeroized on drop and never printed.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase (trailing newline from a file is removed).
    pub fn new(s: String) -> Passphrase {
        let mut s = Zeroizing::new(s);
        while s.ends_with('\n') || s.ends_with('\r') {
            s.pop();
        }
        Passphrase(s)
    }

    /// Generates a random passphrase (for dev mode).
    pub fn generate() -> Result<Passphrase, Error> {
        let mut b = Zeroizing::new([0u8; 24]);
        crate::random_bytes(&mut b[..])?;
        Ok(Passphrase(Zeroizing::new(hex_lower(&b[..]))))
    }

    /// The secret text, for writing a dev-mode passphrase file.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Encrypts a PKCS#8 key (PBES2, as in key files) into a DER
/// `EncryptedPrivateKeyInfo`: how a key is sealed for the database.
pub fn seal_key(pkcs8_der: &[u8], pass: &Passphrase) -> Result<Vec<u8>, Error> {
    Ok(encrypt(pkcs8_der, pass)?.as_bytes().to_vec())
}

/// Opens a key sealed by [`seal_key`]; `what` names it in errors.
pub fn unseal_key(sealed: &[u8], pass: &Passphrase, what: &str) -> Result<SoftwareKey, Error> {
    let enc =
        EncryptedPrivateKeyInfoRef::try_from(sealed).map_err(|_| Error::Decrypt(what.into()))?;
    let plain = enc
        .decrypt(pass.0.as_bytes())
        .map_err(|_| Error::Decrypt(what.into()))?;
    SoftwareKey::from_pkcs8(plain.as_bytes(), what)
}

fn encrypt(pkcs8_der: &[u8], pass: &Passphrase) -> Result<pkcs8::der::SecretDocument, Error> {
    if pass.0.chars().count() < MIN_PASSPHRASE_LEN {
        return Err(Error::Passphrase(format!(
            "use at least {MIN_PASSPHRASE_LEN} characters"
        )));
    }
    let info =
        PrivateKeyInfoRef::try_from(pkcs8_der).map_err(|_| Error::Crypto("key is not PKCS#8"))?;
    let mut salt = [0u8; 16];
    let mut iv = [0u8; 16];
    crate::random_bytes(&mut salt)?;
    crate::random_bytes(&mut iv)?;
    let params = pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(PBKDF2_ROUNDS, &salt, iv)
        .map_err(|_| Error::Crypto("PBES2 parameters"))?;
    info.encrypt_with_params(params, pass.0.as_bytes())
        .map_err(|_| Error::Crypto("key encryption failed"))
}

/// Encrypts a PKCS#8 key and writes it as PEM to a new file with mode 0600.
pub fn write_encrypted_key(path: &Path, pkcs8_der: &[u8], pass: &Passphrase) -> Result<(), Error> {
    let enc = encrypt(pkcs8_der, pass)?;
    let pem = enc
        .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .map_err(|_| Error::Crypto("PEM encoding failed"))?;
    let shown = path.display().to_string();
    if path.exists() {
        return Err(Error::Exists(shown));
    }
    // Written whole under a name of its own, then linked into place: a crash
    // never leaves a partial key file at `path`, and an existing file is
    // never replaced (the link fails instead).
    let mut rnd = [0u8; 8];
    crate::random_bytes(&mut rnd)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{:016x}.tmp", u64::from_le_bytes(rnd)));
    let tmp = path.with_file_name(name);
    let write_new = |at: &Path| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(at)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()
    };
    let written = write_new(&tmp).and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    // A filesystem without hard links: written in place, as a new file.
    let written = match written {
        Err(e)
            if e.kind() == std::io::ErrorKind::Unsupported
                || e.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            write_new(path)
        }
        r => r,
    };
    match written {
        Ok(()) => {
            if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
                let _ = dir.sync_all();
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Exists(shown)),
        Err(e) => Err(Error::Io(shown, e)),
    }
}

/// Reads and decrypts a key file written by [`write_encrypted_key`] (or OpenSSL's
/// `pkcs8 -topk8 -v2 aes-256-cbc`). Refuses files readable by group or others.
pub fn read_encrypted_key(path: &Path, pass: &Passphrase) -> Result<SoftwareKey, Error> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| Error::Io(shown.clone(), e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Permissions(shown, mode));
    }
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::Io(shown.clone(), e))?);
    let (label, doc) =
        pkcs8::der::Document::from_pem(&text).map_err(|_| Error::Decrypt(shown.clone()))?;
    if label != "ENCRYPTED PRIVATE KEY" {
        return Err(Error::Decrypt(shown));
    }
    let enc = EncryptedPrivateKeyInfoRef::try_from(doc.as_bytes())
        .map_err(|_| Error::Decrypt(shown.clone()))?;
    let plain = enc
        .decrypt(pass.0.as_bytes())
        .map_err(|_| Error::Decrypt(shown.clone()))?;
    SoftwareKey::from_pkcs8(plain.as_bytes(), &shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_core::KeySpec;

    #[test]
    fn round_trip_mode_and_wrong_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let (key, pkcs8) = SoftwareKey::generate(KeySpec::EcdsaP256).unwrap();
        let pass = Passphrase::new("correct horse battery\n".into());
        write_encrypted_key(&path, &pkcs8, &pass).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
        let back = read_encrypted_key(&path, &pass).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        let wrong = Passphrase::new("not the passphrase".into());
        assert!(matches!(
            read_encrypted_key(&path, &wrong),
            Err(Error::Decrypt(_))
        ));
        assert!(matches!(
            write_encrypted_key(&path, &pkcs8, &pass),
            Err(Error::Exists(_))
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_encrypted_key(&path, &pass),
            Err(Error::Permissions(..))
        ));
        let short = Passphrase::new("short".into());
        assert!(write_encrypted_key(&dir.path().join("s.key"), &pkcs8, &short).is_err());
    }
}
