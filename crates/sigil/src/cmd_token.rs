//! Bootstrap tokens: the server's token-signing key and `sigil token create`.

use crate::cli::TokenCmd;
use crate::cmd_ca::key_passphrase;
use crate::config::{Config, GrpcConfig};
use anyhow::{Context, Result, bail};
use rcgen::SigningKey as _;
use sigil_core::lifetime::parse_duration;
use sigil_core::{Clock as _, KeySpec};
use sigil_grpc::tokens::{Claims, TokenVerifier, assemble};
use sigil_signer::{Passphrase, SoftwareKey, read_encrypted_key, write_encrypted_key};
use std::process::ExitCode;

/// The gRPC section, or a clear error.
pub fn grpc_section(cfg: &Config) -> Result<&GrpcConfig> {
    cfg.grpc.as_ref().with_context(|| {
        format!(
            "{} has no [grpc] section: add one (see deploy/sigil.example.toml) to use the gRPC CSR API",
            cfg.path.display()
        )
    })
}

/// Loads the token-signing key, creating it (Ed25519, encrypted, 0600) on first
/// use, with its public half beside it (`<token_key>.pub`) for the server.
pub fn token_key(cfg: &Config, grpc: &GrpcConfig, pass: &Passphrase) -> Result<SoftwareKey> {
    let path = cfg.resolve(&grpc.token_key);
    if !path.exists() {
        let (_, pkcs8) = SoftwareKey::generate(KeySpec::Ed25519)?;
        match write_encrypted_key(&path, &pkcs8, pass) {
            Ok(()) => tracing::warn!(
                path = %path.display(),
                "created a new bootstrap-token signing key (tokens made with any earlier key no longer verify)"
            ),
            // Another process created it first: use theirs.
            Err(_) if path.exists() => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
        }
    }
    let key = read_encrypted_key(&path, pass)
        .with_context(|| format!("token-signing key {}", path.display()))?;
    if key.public_key().key_type() != sigil_core::KeyType::Ed25519 {
        bail!("token-signing key {} is not an Ed25519 key", path.display());
    }
    // The server verifies with the public half: it must be this key's, also
    // after the key file was replaced (a leaked token's key must stop working).
    let public = public_path(cfg, grpc);
    if read_public(&public).ok().as_ref() != Some(key.public_key()) {
        crate::cmd_ca::write_public(
            &public,
            &sigil_authority::pem("PUBLIC KEY", key.public_key().spki_der()),
        )?;
    }
    Ok(key)
}

/// The Ed25519 public key in a `.pub` file.
fn read_public(path: &std::path::Path) -> Result<sigil_core::PublicKey> {
    let text = crate::cmd_ca::read_trusted(path)?;
    let der = sigil_core::csr::decode_pem_or_der(&text)
        .with_context(|| format!("{} is not a PEM public key", path.display()))?;
    let key = sigil_core::PublicKey::from_spki_der(&der)
        .with_context(|| format!("{} is not a public key", path.display()))?;
    if key.key_type() != sigil_core::KeyType::Ed25519 {
        bail!("{} is not an Ed25519 public key", path.display());
    }
    Ok(key)
}

fn public_path(cfg: &Config, grpc: &GrpcConfig) -> std::path::PathBuf {
    let mut p = cfg.resolve(&grpc.token_key).into_os_string();
    p.push(".pub");
    p.into()
}

/// The server's token verifier, from the public key file; only if that is
/// missing, or older than the private key (which was replaced), is the
/// private key opened (and created if need be) to write it.
pub fn server_verifier(
    cfg: &Config,
    grpc: &GrpcConfig,
    pass: impl FnOnce() -> Result<Passphrase>,
) -> Result<TokenVerifier> {
    let public = public_path(cfg, grpc);
    // Status-change times: unlike modification times, copying a file with
    // its times kept (cp -p, rsync -a, tar) cannot set them back.
    let changed = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.ctime(), m.ctime_nsec()))
    };
    if let (Some(public_at), Some(key_at)) =
        (changed(&public), changed(&cfg.resolve(&grpc.token_key)))
        && public_at >= key_at
    {
        return Ok(TokenVerifier::new(read_public(&public)?.raw()));
    }
    Ok(verifier(&token_key(cfg, grpc, &pass()?)?))
}

/// Key id: the first 16 hex digits of the public key's SHA-256.
pub fn key_id(key: &SoftwareKey) -> String {
    key.public_key().fingerprint().chars().take(16).collect()
}

/// The verifier for tokens signed by `key`.
pub fn verifier(key: &SoftwareKey) -> TokenVerifier {
    TokenVerifier::new(key.public_key().raw())
}

/// Signs a token for `claims`.
pub fn sign_token(key: &SoftwareKey, claims: &Claims) -> Result<String> {
    let input = claims.signing_input(&key_id(key))?;
    let sig = key
        .sign(input.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing the token failed: {e}"))?;
    Ok(assemble(&input, &sig))
}

/// Runs a `sigil token` command.
pub fn token(cmd: TokenCmd) -> Result<ExitCode> {
    match cmd {
        TokenCmd::Create {
            config,
            subject,
            san,
            ttl,
        } => {
            let cfg = Config::load(&config)?;
            let grpc = grpc_section(&cfg)?;
            let ttl = parse_duration(&ttl).context("--ttl")?;
            let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
            let pass = key_passphrase(&cfg)?;
            let key = token_key(&cfg, grpc, &pass)?;
            let mut id = [0u8; 16];
            sigil_signer::random_bytes(&mut id)?;
            let jti = hex::encode(id);
            let now = sigil_core::SystemClock.now().unix_timestamp();
            let claims = match Claims::new(&subject, &san, jti, now, ttl) {
                Ok(c) => c,
                Err(e) => bail!("{e}"),
            };
            println!("{}", sign_token(&key, &claims)?);
            eprintln!(
                "token for '{}' ({}), valid until {}, usable once (jti {})",
                claims.sub,
                claims.sans.join(", "),
                time::OffsetDateTime::from_unix_timestamp(claims.exp)
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                claims.jti
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
