//! Keys held in a PKCS#11 token (a hardware security module, or SoftHSM),
//! named by an RFC 7512 URI such as
//! `pkcs11:token=sigil;object=intermediate?module-path=/usr/lib/softhsm/libsofthsm2.so`.
//!
//! The private key never leaves the token: it is generated there
//! (sensitive, not extractable) and every signature is made there. Digests
//! are computed here (CKM_ECDSA signs a digest), so any token that offers
//! plain ECDSA or RSA PKCS#1 v1.5 works.

use crate::Error;
use crate::software::SpkiOnly;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use sigil_core::{KeySpec, PublicKey};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// DER of the P-256 curve OID (CKA_EC_PARAMS).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the P-384 curve OID.
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// id-Ed25519 (1.3.101.112), the CKA_EC_PARAMS of an Edwards key (PKCS#11 3.0).
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// A parsed `pkcs11:` URI (RFC 7512): the token and object, the module to
/// load, and optionally where the PIN is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// Token label.
    pub token: String,
    /// Key label (CKA_LABEL), shared by the private and public key objects.
    pub object: String,
    /// The PKCS#11 module (shared library).
    pub module: PathBuf,
    /// A file holding the PIN (`pin-source=file:...`).
    pub pin_source: Option<PathBuf>,
}

fn pct_decode(s: &str) -> Result<String, Error> {
    // The value is not shown: it may be a secret (a pin-value, refused).
    let bad = || Error::Pkcs11("bad percent-encoding in a pkcs11: URI value".into());
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

impl Pkcs11Uri {
    /// Whether `s` names a PKCS#11 key rather than a file.
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("pkcs11:")
    }

    /// Parses `pkcs11:token=T;object=O[?module-path=M][&pin-source=file:P]`.
    /// The module defaults to `$SIGIL_PKCS11_MODULE`.
    pub fn parse(s: &str) -> Result<Pkcs11Uri, Error> {
        // Messages show the URI without its query: a pin-value there is a
        // secret (and refused).
        let shown = match s.split_once('?') {
            Some((path, _)) => format!("{path}?…"),
            None => s.to_string(),
        };
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| Error::Pkcs11(format!("'{shown}' is not a pkcs11: URI (RFC 7512)")))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut token, mut object, mut module, mut pin_source) = (None, None, None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| Error::Pkcs11(format!("'{attr}' in '{shown}' is not name=value")))?;
            let v = pct_decode(v)?;
            match k {
                "token" => token = Some(v),
                "object" => object = Some(v),
                // Accepted and checked by the search itself.
                "type" if v == "private" || v == "public" => {}
                "manufacturer"
                | "model"
                | "serial"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id"
                | "id" => {
                    return Err(Error::Pkcs11(format!(
                        "'{k}' in '{shown}' is not supported: name the key by token and object"
                    )));
                }
                other => {
                    return Err(Error::Pkcs11(format!(
                        "unknown attribute '{other}' in '{shown}'"
                    )));
                }
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr.split_once('=').ok_or_else(|| {
                Error::Pkcs11(format!("a query attribute of '{shown}' is not name=value"))
            })?;
            let v = pct_decode(v)?;
            match k {
                "module-path" => module = Some(PathBuf::from(v)),
                "pin-source" => {
                    let p = v
                        .strip_prefix("file:")
                        .unwrap_or(&v)
                        .trim_start_matches("//");
                    pin_source = Some(PathBuf::from(p));
                }
                "pin-value" => {
                    return Err(Error::Pkcs11(
                        "pin-value in a URI would put the PIN in config files and process lists; use pin-source=file:PATH or SIGIL_PKCS11_PIN(_FILE)".into(),
                    ));
                }
                other => {
                    return Err(Error::Pkcs11(format!(
                        "unknown query attribute '{other}' in '{shown}'"
                    )));
                }
            }
        }
        let module = module
            .or_else(|| std::env::var_os("SIGIL_PKCS11_MODULE").map(PathBuf::from))
            .ok_or_else(|| {
                Error::Pkcs11(format!(
                    "'{shown}' names no module: add ?module-path=/path/to/module.so or set SIGIL_PKCS11_MODULE"
                ))
            })?;
        Ok(Pkcs11Uri {
            token: token.ok_or_else(|| Error::Pkcs11(format!("'{shown}' has no token=")))?,
            object: object.ok_or_else(|| Error::Pkcs11(format!("'{shown}' has no object=")))?,
            module,
            pin_source,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    P256,
    P384,
    Rsa,
    Ed25519,
}

/// A private key in a PKCS#11 token. Signing takes a session lock: one
/// token session signs at a time.
pub struct Pkcs11Key {
    live: Mutex<Live>,
    /// How to get the session back when the token loses it (None: a session
    /// object, which is lost with its session).
    relogin: Option<Arc<Relogin>>,
    kind: Kind,
    public: PublicKey,
    raw_public: Vec<u8>,
    label: String,
    // Keeps the module loaded for the session's lifetime.
    context: Pkcs11,
}

/// A key's session and its handle in it.
struct Live {
    session: Session,
    key: ObjectHandle,
    slot: cryptoki::slot::Slot,
}

/// What reopens a token key's session after the token lost it (an HSM
/// restart or failover, a logout elsewhere in the process): the token's
/// label and the PIN, kept like the key store keeps it.
struct Relogin {
    token: String,
    pin: zeroize::Zeroizing<String>,
}

/// Token errors after which the session, or the login, is gone while the
/// token may be back: worth reopening the session and logging in again.
fn session_lost(e: &cryptoki::error::Error) -> bool {
    use cryptoki::error::RvError as Rv;
    matches!(
        e,
        cryptoki::error::Error::Pkcs11(
            Rv::SessionHandleInvalid
                | Rv::SessionClosed
                | Rv::UserNotLoggedIn
                | Rv::DeviceRemoved
                | Rv::DeviceError
                | Rv::TokenNotPresent
                | Rv::KeyHandleInvalid
                | Rv::ObjectHandleInvalid,
            _
        )
    )
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pkcs11Key({})", self.label)
    }
}

fn ck(what: &str) -> impl Fn(cryptoki::error::Error) -> Error + '_ {
    move |e| Error::Pkcs11(format!("{what}: {e}"))
}

/// Generates a key pair in `session`'s token: persistent (`token`) or a
/// session object that disappears with the session.
fn generate_pair(
    session: &Session,
    spec: KeySpec,
    label: &str,
    token: bool,
) -> Result<(ObjectHandle, ObjectHandle), Error> {
    let label = Attribute::Label(label.as_bytes().to_vec());
    let private = vec![
        Attribute::Token(token),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        label.clone(),
    ];
    let (mechanism, public_template) =
        match spec {
            KeySpec::EcdsaP256 | KeySpec::EcdsaP384 => (
                Mechanism::EccKeyPairGen,
                vec![
                    Attribute::Token(token),
                    Attribute::Verify(true),
                    Attribute::EcParams(
                        if spec == KeySpec::EcdsaP256 {
                            P256_PARAMS
                        } else {
                            P384_PARAMS
                        }
                        .to_vec(),
                    ),
                    label,
                ],
            ),
            KeySpec::Rsa3072 | KeySpec::Rsa4096 => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![
                    Attribute::Token(token),
                    Attribute::Verify(true),
                    Attribute::ModulusBits(cryptoki::types::Ulong::from(
                        if spec == KeySpec::Rsa3072 { 3072 } else { 4096 },
                    )),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                    label,
                ],
            ),
            KeySpec::Ed25519 => (
                Mechanism::EccEdwardsKeyPairGen,
                vec![
                    Attribute::Token(token),
                    Attribute::Verify(true),
                    Attribute::EcParams(ED25519_PARAMS.to_vec()),
                    label,
                ],
            ),
        };
    let (public, key) = session
        .generate_key_pair(&mechanism, &public_template, &private)
        .map_err(ck("generating a key pair in the token"))?;
    Ok((key, public))
}

/// A token some key of this process is logged in to.
#[derive(Clone)]
pub struct TokenHandle {
    context: Pkcs11,
    slot: cryptoki::slot::Slot,
    relogin: Option<Arc<Relogin>>,
}

impl std::fmt::Debug for TokenHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHandle({})", self.slot)
    }
}

impl TokenHandle {
    /// Whether the token is still there (not removed, module answering).
    pub fn present(&self) -> bool {
        self.context.get_token_info(self.slot).is_ok()
    }

    /// Generates a key stored in the token under `label` (sensitive, never
    /// extractable), which other processes logged in to the token can open
    /// with [`TokenHandle::open_key`]. Refuses a label already taken.
    pub fn token_key(&self, spec: KeySpec, label: &str) -> Result<Pkcs11Key, Error> {
        let session = self
            .context
            .open_rw_session(self.slot)
            .map_err(ck("opening a PKCS#11 session"))?;
        if label_taken(&session, label)? {
            return Err(Error::Exists(format!(
                "a key labelled '{label}' in the token"
            )));
        }
        let (key, public) = generate_pair(&session, spec, label, true)?;
        self.stored_key(session, key, public, label)
    }

    /// A key stored in this token, found or made in `session`.
    fn stored_key(
        &self,
        session: Session,
        key: ObjectHandle,
        public: ObjectHandle,
        label: &str,
    ) -> Result<Pkcs11Key, Error> {
        let live = Live {
            session,
            key,
            slot: self.slot,
        };
        Pkcs11Key::assemble(
            self.context.clone(),
            live,
            public,
            label,
            self.relogin.clone(),
        )
    }

    /// Opens a key stored in the token under `label`.
    pub fn open_key(&self, label: &str) -> Result<Pkcs11Key, Error> {
        let session = self
            .context
            .open_rw_session(self.slot)
            .map_err(ck("opening a PKCS#11 session"))?;
        let missing = || Error::Pkcs11(format!("the token has no key pair labelled '{label}'"));
        let key = find(&session, ObjectClass::PRIVATE_KEY, label)?.ok_or_else(missing)?;
        let public = find(&session, ObjectClass::PUBLIC_KEY, label)?.ok_or_else(missing)?;
        self.stored_key(session, key, public, label)
    }

    /// Destroys the key pair stored under `label`, if there is one.
    pub fn destroy_key(&self, label: &str) -> Result<(), Error> {
        let session = self
            .context
            .open_rw_session(self.slot)
            .map_err(ck("opening a PKCS#11 session"))?;
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            if let Some(object) = find(&session, class, label)? {
                session
                    .destroy_object(object)
                    .map_err(ck("destroying a token object"))?;
            }
        }
        Ok(())
    }

    /// Destroys every key pair whose label starts with `prefix`, except
    /// those labelled as in `keep`; returns how many were destroyed.
    pub fn destroy_keys_except(&self, prefix: &str, keep: &[&str]) -> Result<usize, Error> {
        let session = self
            .context
            .open_rw_session(self.slot)
            .map_err(ck("opening a PKCS#11 session"))?;
        let mut destroyed = 0;
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            let objects = session
                .find_objects(&[Attribute::Class(class), Attribute::Token(true)])
                .map_err(ck("searching the token"))?;
            for object in objects {
                let attrs = session
                    .get_attributes(object, &[AttributeType::Label])
                    .map_err(ck("reading a token object label"))?;
                let label = attrs.iter().find_map(|a| match a {
                    Attribute::Label(l) => String::from_utf8(l.clone()).ok(),
                    _ => None,
                });
                if let Some(label) = label
                    && label.starts_with(prefix)
                    && !keep.contains(&label.as_str())
                {
                    session
                        .destroy_object(object)
                        .map_err(ck("destroying a token object"))?;
                    if class == ObjectClass::PRIVATE_KEY {
                        destroyed += 1;
                    }
                }
            }
        }
        Ok(destroyed)
    }

    /// A short-lived key that lives only as long as the returned handle (a
    /// session object: never stored in the token, gone when the process
    /// ends). For delegated OCSP responders of an issuer held in the token.
    pub fn session_key(&self, spec: KeySpec) -> Result<Pkcs11Key, Error> {
        // Login state is per token and process: a new session shares it.
        let session = self
            .context
            .open_rw_session(self.slot)
            .map_err(ck("opening a PKCS#11 session"))?;
        let mut tag = [0u8; 8];
        crate::random_bytes(&mut tag)?;
        let label = format!(
            "sigil-session-{}",
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let (key, public) = generate_pair(&session, spec, &label, false)?;
        let live = Live {
            session,
            key,
            slot: self.slot,
        };
        // A session object is gone with its session: nothing to reopen.
        Pkcs11Key::assemble(self.context.clone(), live, public, &label, None)
    }
}

/// Loads the module, finds the token by label and logs in; returns what
/// logs in again too.
fn login(
    uri: &Pkcs11Uri,
    pin: &str,
) -> Result<(Pkcs11, Session, cryptoki::slot::Slot, Arc<Relogin>), Error> {
    let context = Pkcs11::new(&uri.module).map_err(ck(&format!(
        "cannot load PKCS#11 module {}",
        uri.module.display()
    )))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        // Another key in this process already initialized the module.
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => return Err(ck("initializing the PKCS#11 module")(e)),
    }
    let relogin = Arc::new(Relogin {
        token: uri.token.clone(),
        pin: zeroize::Zeroizing::new(pin.to_string()),
    });
    let (session, slot) = relogin.session(&context)?;
    Ok((context, session, slot, relogin))
}

impl Relogin {
    /// Finds the token by label and opens a session logged in to it.
    fn session(&self, context: &Pkcs11) -> Result<(Session, cryptoki::slot::Slot), Error> {
        let slot = context
            .get_slots_with_token()
            .map_err(ck("listing PKCS#11 slots"))?
            .into_iter()
            .find(|s| {
                context
                    .get_token_info(*s)
                    .is_ok_and(|t| t.label().trim_end() == self.token)
            })
            .ok_or_else(|| Error::Pkcs11(format!("no PKCS#11 token labelled '{}'", self.token)))?;
        let session = context
            .open_rw_session(slot)
            .map_err(ck("opening a PKCS#11 session"))?;
        match session.login(UserType::User, Some(&AuthPin::from(self.pin.to_string()))) {
            Ok(()) => {}
            // Login is per token and process: another key's session did it.
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::PinIncorrect, _)) => {
                return Err(Error::WrongPin(self.token.clone()));
            }
            Err(e) => return Err(ck("logging in to the token")(e)),
        }
        Ok((session, slot))
    }
}

/// Whether a private or a public key in the token has `label`: a new pair
/// under it could not be opened by label afterwards.
fn label_taken(session: &Session, label: &str) -> Result<bool, Error> {
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let found = session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(ck("searching the token"))?;
        if !found.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn find(session: &Session, class: ObjectClass, label: &str) -> Result<Option<ObjectHandle>, Error> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(ck("searching the token"))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::Pkcs11(format!(
            "several objects in the token are labelled '{label}': name the key uniquely"
        ))),
    }
}

/// Strips the DER OCTET STRING that wraps CKA_EC_POINT.
fn ec_point(der: &[u8]) -> Vec<u8> {
    match der {
        [0x04, len, rest @ ..]
            if usize::from(*len) == rest.len() && rest.first() == Some(&0x04) =>
        {
            rest.to_vec()
        }
        other => other.to_vec(),
    }
}

/// The 32-byte public key of an Edwards key from its CKA_EC_POINT: a DER
/// OCTET STRING (PKCS#11 3.0), or the bare key as some tokens return it.
fn edwards_point(der: &[u8]) -> Result<Vec<u8>, Error> {
    match der {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => Ok(rest.to_vec()),
        bare if bare.len() == 32 => Ok(bare.to_vec()),
        _ => Err(Error::Pkcs11(
            "the token's Ed25519 public key has an unexpected encoding".into(),
        )),
    }
}

/// DER INTEGER of an unsigned big-endian value.
fn der_uint(v: &[u8]) -> Vec<u8> {
    let start = v
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(v.len().saturating_sub(1));
    let mut body = v[start..].to_vec();
    if body.first().is_some_and(|b| b & 0x80 != 0) {
        body.insert(0, 0);
    }
    let mut out = vec![0x02];
    out.extend(der_len(body.len()));
    out.extend(body);
    out
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        return vec![n as u8];
    }
    let bytes: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

/// ECDSA signature r||s (as PKCS#11 returns it) to the DER X.509 uses.
fn ecdsa_der(raw: &[u8]) -> Result<Vec<u8>, Error> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return Err(Error::Pkcs11(format!(
            "token returned a {}-byte ECDSA signature",
            raw.len()
        )));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let body: Vec<u8> = [der_uint(r), der_uint(s)].concat();
    let mut out = vec![0x30];
    out.extend(der_len(body.len()));
    out.extend(body);
    Ok(out)
}

impl Pkcs11Key {
    /// Opens an existing key.
    pub fn open(uri: &Pkcs11Uri, pin: &str) -> Result<Pkcs11Key, Error> {
        let (context, session, slot, relogin) = login(uri, pin)?;
        let key = find(&session, ObjectClass::PRIVATE_KEY, &uri.object)?.ok_or_else(|| {
            Error::Pkcs11(format!(
                "token '{}' has no private key labelled '{}'",
                uri.token, uri.object
            ))
        })?;
        let public = find(&session, ObjectClass::PUBLIC_KEY, &uri.object)?.ok_or_else(|| {
            Error::Pkcs11(format!(
                "token '{}' has no public key labelled '{}' beside the private key",
                uri.token, uri.object
            ))
        })?;
        let live = Live { session, key, slot };
        Pkcs11Key::assemble(context, live, public, &uri.object, Some(relogin))
    }

    /// Generates a key in the token (sensitive, never extractable); refuses
    /// if the label is taken.
    pub fn generate(uri: &Pkcs11Uri, spec: KeySpec, pin: &str) -> Result<Pkcs11Key, Error> {
        let (context, session, slot, relogin) = login(uri, pin)?;
        if label_taken(&session, &uri.object)? {
            return Err(Error::Exists(format!(
                "a key labelled '{}' in token '{}'",
                uri.object, uri.token
            )));
        }
        let (key, public) = generate_pair(&session, spec, &uri.object, true)?;
        let live = Live { session, key, slot };
        Pkcs11Key::assemble(context, live, public, &uri.object, Some(relogin))
    }

    /// A handle on this key's token, to make more keys there.
    pub fn token(&self) -> TokenHandle {
        TokenHandle {
            context: self.context.clone(),
            slot: self.live().slot,
            relogin: self.relogin.clone(),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn assemble(
        context: Pkcs11,
        live: Live,
        public_handle: ObjectHandle,
        label: &str,
        relogin: Option<Arc<Relogin>>,
    ) -> Result<Pkcs11Key, Error> {
        let attrs = live
            .session
            .get_attributes(
                public_handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                ],
            )
            .map_err(ck("reading the public key"))?;
        let (mut key_type, mut params, mut point, mut modulus, mut exponent) =
            (None, None, None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(m) => modulus = Some(m),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        let (kind, alg, raw_public) = match (key_type, params.as_deref(), point, modulus, exponent)
        {
            (Some(KeyType::EC), Some(P256_PARAMS), Some(p), _, _) => {
                (Kind::P256, &rcgen::PKCS_ECDSA_P256_SHA256, ec_point(&p))
            }
            (Some(KeyType::EC), Some(P384_PARAMS), Some(p), _, _) => {
                (Kind::P384, &rcgen::PKCS_ECDSA_P384_SHA384, ec_point(&p))
            }
            (Some(KeyType::EC_EDWARDS), Some(ED25519_PARAMS), Some(p), _, _) => {
                (Kind::Ed25519, &rcgen::PKCS_ED25519, edwards_point(&p)?)
            }
            (Some(KeyType::RSA), _, _, Some(n), Some(e)) => {
                let body = [der_uint(&n), der_uint(&e)].concat();
                let mut der = vec![0x30];
                der.extend(der_len(body.len()));
                der.extend(body);
                (Kind::Rsa, &rcgen::PKCS_RSA_SHA256, der)
            }
            _ => {
                return Err(Error::UnsupportedKey(format!(
                    "PKCS#11 object '{label}' (only EC P-256/P-384, Ed25519 and RSA keys are supported)"
                )));
            }
        };
        let spki = SpkiOnly {
            alg,
            raw: &raw_public,
        };
        let spki_der = rcgen::PublicKeyData::subject_public_key_info(&spki);
        let public = PublicKey::from_spki_der(&spki_der)
            .map_err(|e| Error::Pkcs11(format!("the token's public key is unusable: {e}")))?;
        Ok(Pkcs11Key {
            live: Mutex::new(live),
            relogin,
            kind,
            public,
            raw_public,
            label: label.to_string(),
            context,
        })
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `msg` in the token (ECDSA: DER signature over SHA-256/384;
    /// RSA: PKCS#1 v1.5 SHA-256).
    ///
    /// When the token has lost the session or the login (an HSM restart or
    /// failover), the session is opened again, logged in, the key found
    /// again by its label and checked with a test signature, and the
    /// signature made once more.
    pub fn sign_bytes(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let mut live = self.live();
        let first = match self.sign_in(&live, msg) {
            Err(e) if session_lost(&e) => e,
            other => return self.finish(other.map_err(ck("signing in the token"))?),
        };
        let Some(relogin) = &self.relogin else {
            return Err(ck("signing in the token")(first));
        };
        let fresh = self.reopen(relogin).map_err(|e| {
            Error::Pkcs11(format!(
                "signing in the token: {first}; opening a new session failed: {e}"
            ))
        })?;
        *live = fresh;
        let raw = self
            .sign_in(&live, msg)
            .map_err(ck("signing in the token (in a new session)"))?;
        self.finish(raw)
    }

    /// A signature as X.509 carries it: ECDSA's r||s from the token as DER.
    fn finish(&self, raw: Vec<u8>) -> Result<Vec<u8>, Error> {
        match self.kind {
            Kind::P256 | Kind::P384 => ecdsa_der(&raw),
            Kind::Rsa | Kind::Ed25519 => Ok(raw),
        }
    }

    /// One signature in `live`'s session, as the token returns it.
    fn sign_in(&self, live: &Live, msg: &[u8]) -> Result<Vec<u8>, cryptoki::error::Error> {
        use aws_lc_rs::digest;
        match self.kind {
            Kind::P256 | Kind::P384 => {
                let alg = if matches!(self.kind, Kind::P256) {
                    &digest::SHA256
                } else {
                    &digest::SHA384
                };
                let hash = digest::digest(alg, msg);
                live.session
                    .sign(&Mechanism::Ecdsa, live.key, hash.as_ref())
            }
            Kind::Rsa => live.session.sign(&Mechanism::Sha256RsaPkcs, live.key, msg),
            Kind::Ed25519 => {
                let params = cryptoki::mechanism::eddsa::EddsaParams::new(
                    cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
                );
                live.session.sign(&Mechanism::Eddsa(params), live.key, msg)
            }
        }
    }

    /// A new logged-in session with this key found again by its label,
    /// proven to be the same key by a test signature.
    fn reopen(&self, relogin: &Relogin) -> Result<Live, Error> {
        let (session, slot) = relogin.session(&self.context)?;
        let key = find(&session, ObjectClass::PRIVATE_KEY, &self.label)?.ok_or_else(|| {
            Error::Pkcs11(format!(
                "token '{}' no longer has a private key labelled '{}'",
                relogin.token, self.label
            ))
        })?;
        let live = Live { session, key, slot };
        let probe = b"sigil key reopened";
        let raw = self
            .sign_in(&live, probe)
            .map_err(ck("signing a test message in the new session"))?;
        let signature = self.finish(raw)?;
        crate::verify(&self.public, probe, &signature).map_err(|_| {
            Error::Pkcs11(format!(
                "the key labelled '{}' in token '{}' is no longer the key this issuer was opened with",
                self.label, relogin.token
            ))
        })?;
        Ok(live)
    }
}

impl rcgen::PublicKeyData for Pkcs11Key {
    fn der_bytes(&self) -> &[u8] {
        &self.raw_public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.kind {
            Kind::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Kind::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Kind::Rsa => &rcgen::PKCS_RSA_SHA256,
            Kind::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

impl rcgen::SigningKey for Pkcs11Key {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        // rcgen has no room for the cause; the token is checked at startup
        // (a test signature), so a failure here is the token going away.
        self.sign_bytes(msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_refuse_what_they_should() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=sigil%20ca;object=intermediate;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/sigil/pin",
        )
        .unwrap();
        assert_eq!(u.token, "sigil ca");
        assert_eq!(u.object, "intermediate");
        assert_eq!(u.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(u.pin_source, Some(PathBuf::from("/etc/sigil/pin")));
        for (bad, why) in [
            ("file.key", "not a pkcs11"),
            ("pkcs11:object=x?module-path=/m.so", "no token"),
            ("pkcs11:token=t?module-path=/m.so", "no object"),
            (
                "pkcs11:token=t;object=o?module-path=/m.so&pin-value=1234",
                "pin-value",
            ),
            (
                "pkcs11:token=t;object=o;colour=red?module-path=/m.so",
                "unknown attribute",
            ),
            ("pkcs11:token=t%zz;object=o?module-path=/m.so", "percent"),
            // A PIN in the query never shows in a message.
            (
                "pkcs11:token=t;object=o;colour=x?pin-value=1234",
                "unknown attribute",
            ),
            ("pkcs11:token=t;object=o?pin-value=12%z4", "percent"),
            ("pkcs11:token=t;object=o?x&pin-value=1234", "not name=value"),
        ] {
            let e = Pkcs11Uri::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("1234") && !e.contains("12%z4"), "{bad}: {e}");
        }
    }

    /// The same conformance suite as software keys, against keys made in a
    /// SoftHSM token; a reopened key signs too, a wrong PIN is refused, and
    /// a label is never overwritten.
    #[test]
    fn softhsm_keys_pass_conformance() {
        let Some((uri_template, pin)) = crate::testing::softhsm_token("conformance", "4711-2342")
        else {
            return;
        };
        for (spec, object) in [
            (KeySpec::EcdsaP256, "p256"),
            (KeySpec::EcdsaP384, "p384"),
            (KeySpec::Rsa3072, "rsa3072"),
            (KeySpec::Ed25519, "ed25519"),
        ] {
            let uri = Pkcs11Uri::parse(&uri_template.replace("OBJ", object)).unwrap();
            let key = Pkcs11Key::generate(&uri, spec, &pin).unwrap();
            crate::software::tests::conformance(&key, key.public_key());
            let again = Pkcs11Key::open(&uri, &pin).unwrap();
            assert_eq!(again.public_key(), key.public_key());
            crate::software::tests::conformance(&again, again.public_key());
            let dup = Pkcs11Key::generate(&uri, spec, &pin)
                .unwrap_err()
                .to_string();
            assert!(dup.contains("already exists"), "{dup}");
            assert!(!format!("{key:?}").contains(&pin));
        }
        let uri = Pkcs11Uri::parse(&uri_template.replace("OBJ", "p256")).unwrap();
        let e = Pkcs11Key::open(&uri, "wrong-pin").unwrap_err().to_string();
        assert!(e.contains("wrong PIN"), "{e}");
        let missing = Pkcs11Uri::parse(&uri_template.replace("OBJ", "nothing")).unwrap();
        let e = Pkcs11Key::open(&missing, &pin).unwrap_err().to_string();
        assert!(e.contains("no private key labelled 'nothing'"), "{e}");
    }

    /// A key whose token lost the login (here: a logout through another
    /// session of the process, as after an HSM restart) logs in again and
    /// signs; its token handle makes keys that do so too.
    #[test]
    fn a_lost_login_is_recovered() {
        let Some((uri_template, pin)) = crate::testing::softhsm_token("relogin", "1234-5678")
        else {
            return;
        };
        let uri = Pkcs11Uri::parse(&uri_template.replace("OBJ", "issuer")).unwrap();
        let key = Pkcs11Key::generate(&uri, KeySpec::EcdsaP256, &pin).unwrap();
        let other = key.token().token_key(KeySpec::EcdsaP256, "other").unwrap();
        for (n, k) in [&key, &other, &key].into_iter().enumerate() {
            let msg = format!("after logout {n}");
            let probe = Pkcs11Key::open(&uri, &pin).unwrap();
            probe.live().session.logout().unwrap();
            let e = probe.sign_in(&probe.live(), b"x").unwrap_err();
            assert!(session_lost(&e), "{e}");
            let signature = k.sign_bytes(msg.as_bytes()).unwrap();
            crate::verify(k.public_key(), msg.as_bytes(), &signature).unwrap();
        }
        // A session key has nothing to log in again with.
        let brief = key.token().session_key(KeySpec::EcdsaP256).unwrap();
        key.live().session.logout().unwrap();
        assert!(brief.sign_bytes(b"y").is_err());
    }

    #[test]
    fn ecdsa_signatures_become_der() {
        let raw = [[0x80u8; 32], [0x01u8; 32]].concat();
        let der = ecdsa_der(&raw).unwrap();
        // SEQUENCE { INTEGER 00 80.. (33 bytes), INTEGER 01.. (32 bytes) }
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 33, 0x00]);
        assert!(ecdsa_der(&[1, 2, 3]).is_err());
    }
}
