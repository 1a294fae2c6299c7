//! OCSP (RFC 6960) requests and responses. The ASN.1 types come from
//! `x509-ocsp`, which exists only for the previous RustCrypto generation
//! (`der` 0.7); they stay inside this module and meet the rest at DER bytes.
//! Nothing here signs: callers get the to-be-signed bytes and hand back a
//! signature made by the responder key.

use crate::template::IssuerInfo;
use crate::{Error, Serial};
use der_07::asn1::{GeneralizedTime, Null, ObjectIdentifier, OctetString};
use der_07::{Decode, Encode};
use time::OffsetDateTime;
use x509_cert_02::ext::Extension;
use x509_cert_02::spki::AlgorithmIdentifierOwned;
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspGeneralizedTime, OcspRequest, OcspResponse,
    OcspResponseStatus, ResponderId, ResponseData, RevokedInfo, SingleResponse,
};

const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const NONCE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.2");
const ECDSA_SHA256: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OCSP_BASIC: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.1");
/// Largest OCSP request accepted (bytes).
pub const MAX_REQUEST_LEN: usize = 16 * 1024;
/// Most certificates answered in one request.
pub const MAX_CERTS_PER_REQUEST: usize = 8;

/// Why a request cannot be answered with status `successful`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a well-formed OCSP request (or too large / too many certificates).
    Malformed,
    /// For an issuer this responder does not serve.
    Unauthorized,
    /// Something failed on our side.
    Internal,
    /// Overloaded: try again.
    TryLater,
}

/// The hash algorithm of a CertID. A response names its certificate with
/// the algorithm the request used, so answers are kept per algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertIdHash {
    /// SHA-1, what most clients send.
    Sha1,
    /// SHA-256.
    Sha256,
}

/// One certificate asked about.
#[derive(Debug, Clone)]
pub struct Query {
    /// The CertID exactly as sent (echoed in the response).
    cert_id: CertId,
    /// Its serial.
    pub serial: Serial,
}

impl Query {
    /// Whether the CertID's hash algorithm carries NULL parameters, the form
    /// this responder pre-signs (and OpenSSL, Go and Java send). RFC 5754
    /// lets SHA-2 CertIDs omit them; a client compares the CertID echoed in
    /// the answer with its own, parameters included, so an answer made for
    /// one form does not serve the other.
    pub fn canonical(&self) -> bool {
        self.cert_id.hash_algorithm.parameters == Some(Null.into())
    }

    /// The CertID's hash algorithm, if one this responder knows.
    pub fn hash(&self) -> Option<CertIdHash> {
        match self.cert_id.hash_algorithm.oid {
            SHA1 => Some(CertIdHash::Sha1),
            SHA256 => Some(CertIdHash::Sha256),
            _ => None,
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The certificates asked about (at least one).
    pub queries: Vec<Query>,
    /// The nonce extension value, if any (RFC 8954), or why it cannot be
    /// echoed: refused only by a responder that honours nonces.
    pub nonce: Option<Result<Vec<u8>, Refusal>>,
}

/// How an issuer is named in CertIDs, with SHA-1 and SHA-256.
#[derive(Debug, Clone)]
pub struct IssuerHashes {
    sha1: (Vec<u8>, Vec<u8>),
    sha256: (Vec<u8>, Vec<u8>),
}

fn digest(alg: &'static aws_lc_rs::digest::Algorithm, data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(alg, data).as_ref().to_vec()
}

impl IssuerHashes {
    /// Hashes of the issuer's subject DER and public key bits.
    pub fn of(issuer: &IssuerInfo) -> IssuerHashes {
        let (name, key) = (&issuer.subject_der, issuer.public_key.raw());
        let sha1 = &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY;
        let sha256 = &aws_lc_rs::digest::SHA256;
        IssuerHashes {
            sha1: (digest(sha1, name), digest(sha1, key)),
            sha256: (digest(sha256, name), digest(sha256, key)),
        }
    }

    /// Whether a CertID names this issuer.
    pub fn matches(&self, q: &Query) -> bool {
        let id = &q.cert_id;
        let (name, key) = match q.hash() {
            Some(CertIdHash::Sha1) => &self.sha1,
            Some(CertIdHash::Sha256) => &self.sha256,
            None => return false,
        };
        id.issuer_name_hash.as_bytes() == name.as_slice()
            && id.issuer_key_hash.as_bytes() == key.as_slice()
    }

    /// The CertID for one of this issuer's serials, with `hash`.
    pub fn cert_id(&self, serial: &Serial, hash: CertIdHash) -> Result<Query, Error> {
        let bad = |e: der_07::Error| Error::Template(format!("CertID: {e}"));
        let (oid, (name, key)) = match hash {
            CertIdHash::Sha1 => (SHA1, &self.sha1),
            CertIdHash::Sha256 => (SHA256, &self.sha256),
        };
        Ok(Query {
            cert_id: CertId {
                hash_algorithm: AlgorithmIdentifierOwned {
                    oid,
                    parameters: Some(Null.into()),
                },
                issuer_name_hash: OctetString::new(name.clone()).map_err(bad)?,
                issuer_key_hash: OctetString::new(key.clone()).map_err(bad)?,
                serial_number: x509_cert_02::serial_number::SerialNumber::new(serial.as_bytes())
                    .map_err(bad)?,
            },
            serial: serial.clone(),
        })
    }

    /// The CertID for one of this issuer's serials as a client that leaves
    /// out the hash algorithm's (NULL) parameters sends it, which RFC 5754
    /// allows for SHA-2.
    pub fn cert_id_without_parameters(
        &self,
        serial: &Serial,
        hash: CertIdHash,
    ) -> Result<Query, Error> {
        let mut q = self.cert_id(serial, hash)?;
        q.cert_id.hash_algorithm.parameters = None;
        Ok(q)
    }
}

/// Parses a DER OCSP request; unsigned requests only need be honoured.
pub fn parse_request(der: &[u8]) -> Result<Request, Refusal> {
    if der.len() > MAX_REQUEST_LEN {
        return Err(Refusal::Malformed);
    }
    let req = OcspRequest::from_der(der).map_err(|_| Refusal::Malformed)?;
    let tbs = req.tbs_request;
    if tbs.request_list.is_empty() || tbs.request_list.len() > MAX_CERTS_PER_REQUEST {
        return Err(Refusal::Malformed);
    }
    let mut queries = Vec::with_capacity(tbs.request_list.len());
    for r in tbs.request_list {
        let serial = Serial::parse_hex(&hex::encode(r.req_cert.serial_number.as_bytes()))
            .ok_or(Refusal::Malformed)?;
        queries.push(Query {
            cert_id: r.req_cert,
            serial,
        });
    }
    let nonce = match tbs
        .request_extensions
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.extn_id == NONCE)
    {
        Some(e) => Some(nonce_value(e.extn_value.as_bytes())),
        None => None,
    };
    Ok(Request { queries, nonce })
}

/// Longest nonce accepted (RFC 8954 section 2.1: longer ones are refused).
const MAX_NONCE_LEN: usize = 128;

/// Checks a request's nonce extension value and returns it as it is echoed.
/// RFC 8954 makes the value an OCTET STRING of 1 to 128 bytes (1 to 32 are
/// the norm) and has a zero-length or longer one refused as malformed; some
/// clients put the raw bytes there instead, and those get the same limits.
fn nonce_value(value: &[u8]) -> Result<Vec<u8>, Refusal> {
    let content_len = match OctetString::from_der(value) {
        Ok(inner) => inner.as_bytes().len(),
        Err(_) => value.len(),
    };
    if content_len == 0 || content_len > MAX_NONCE_LEN {
        return Err(Refusal::Malformed);
    }
    Ok(value.to_vec())
}

/// What a signed response says about its first certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The hash algorithm of the CertID naming it.
    pub hash: Option<CertIdHash>,
    /// Whether that CertID's hash algorithm has NULL parameters (see
    /// [`Query::canonical`]).
    pub canonical: bool,
    /// Whether it says revoked.
    pub revoked: bool,
    /// thisUpdate (unix s).
    pub this_update: i64,
    /// nextUpdate (unix s), if given.
    pub next_update: Option<i64>,
    /// The nonce extension value echoed, if any.
    pub nonce: Option<Vec<u8>>,
}

/// Reads a successful response (from [`successful`]); `None` when it is
/// not one or cannot be read. Signatures are not checked.
pub fn summarize(der: &[u8]) -> Option<Summary> {
    let resp = OcspResponse::from_der(der).ok()?;
    let bytes = resp.response_bytes?;
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes()).ok()?;
    let data = basic.tbs_response_data;
    let first = data.responses.first()?;
    let unix = |t: &OcspGeneralizedTime| i64::try_from(t.0.to_unix_duration().as_secs()).ok();
    let query = Query {
        cert_id: first.cert_id.clone(),
        serial: Serial::parse_hex(&hex::encode(first.cert_id.serial_number.as_bytes()))?,
    };
    Some(Summary {
        hash: query.hash(),
        canonical: query.canonical(),
        revoked: matches!(first.cert_status, CertStatus::Revoked(_)),
        this_update: unix(&first.this_update)?,
        next_update: match &first.next_update {
            Some(t) => Some(unix(t)?),
            None => None,
        },
        nonce: data
            .response_extensions
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.extn_id == NONCE)
            .map(|e| e.extn_value.as_bytes().to_vec()),
    })
}

/// A DER request for `queries` (what a relying party sends), with the
/// nonce extension value given.
pub fn request(queries: &[&Query], nonce: Option<&[u8]>) -> Result<Vec<u8>, Error> {
    let bad = |e: der_07::Error| Error::Template(format!("OCSP request: {e}"));
    let request_extensions = match nonce {
        Some(n) => Some(vec![Extension {
            extn_id: NONCE,
            critical: false,
            extn_value: OctetString::new(n.to_vec()).map_err(bad)?,
        }]),
        None => None,
    };
    OcspRequest {
        tbs_request: x509_ocsp::TbsRequest {
            version: Default::default(),
            requestor_name: None,
            request_list: queries
                .iter()
                .map(|q| x509_ocsp::Request {
                    req_cert: q.cert_id.clone(),
                    single_request_extensions: None,
                })
                .collect(),
            request_extensions,
        },
        optional_signature: None,
    }
    .to_der()
    .map_err(bad)
}

/// What is known of one certificate.
#[derive(Debug, Clone, Copy)]
pub enum Status {
    /// Issued and not revoked.
    Good,
    /// Revoked at a time, with a CRLReason code.
    Revoked {
        /// When.
        at: OffsetDateTime,
        /// CRLReason code (0 = unspecified, omitted).
        reason: i32,
    },
    /// Not a certificate this CA issued.
    Unknown,
}

fn gtime(t: OffsetDateTime) -> Result<OcspGeneralizedTime, Error> {
    let secs = u64::try_from(t.unix_timestamp())
        .map_err(|_| Error::Template("time before 1970".into()))?;
    GeneralizedTime::from_unix_duration(std::time::Duration::from_secs(secs))
        .map(OcspGeneralizedTime)
        .map_err(|e| Error::Template(format!("time: {e}")))
}

/// The to-be-signed part of a response (ResponseData, DER).
pub fn response_data(
    responder_key_hash: &[u8],
    produced_at: OffsetDateTime,
    answers: &[(&Query, Status)],
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
    nonce: Option<&[u8]>,
) -> Result<Vec<u8>, Error> {
    let bad = |e: der_07::Error| Error::Template(format!("OCSP response: {e}"));
    let mut responses = Vec::with_capacity(answers.len());
    for (q, status) in answers {
        let cert_status = match status {
            Status::Good => CertStatus::good(),
            Status::Unknown => CertStatus::unknown(),
            Status::Revoked { at, reason } => CertStatus::revoked(RevokedInfo {
                revocation_time: gtime(*at)?,
                revocation_reason: if *reason == 0 {
                    None
                } else {
                    Some(crl_reason(*reason)?)
                },
            }),
        };
        responses.push(SingleResponse {
            cert_id: q.cert_id.clone(),
            cert_status,
            this_update: gtime(this_update)?,
            next_update: Some(gtime(next_update)?),
            single_extensions: None,
        });
    }
    let response_extensions = match nonce {
        Some(n) => Some(vec![Extension {
            extn_id: NONCE,
            critical: false,
            extn_value: OctetString::new(n.to_vec()).map_err(bad)?,
        }]),
        None => None,
    };
    let data = ResponseData {
        version: Default::default(),
        responder_id: ResponderId::ByKey(
            OctetString::new(responder_key_hash.to_vec()).map_err(bad)?,
        ),
        produced_at: gtime(produced_at)?,
        responses,
        response_extensions,
    };
    data.to_der().map_err(bad)
}

fn crl_reason(code: i32) -> Result<x509_cert_02::ext::pkix::CrlReason, Error> {
    use x509_cert_02::ext::pkix::CrlReason as R;
    Ok(match code {
        0 => R::Unspecified,
        1 => R::KeyCompromise,
        2 => R::CaCompromise,
        3 => R::AffiliationChanged,
        4 => R::Superseded,
        5 => R::CessationOfOperation,
        9 => R::PrivilegeWithdrawn,
        10 => R::AaCompromise,
        other => return Err(Error::Template(format!("reason {other} in OCSP"))),
    })
}

/// A successful response: ResponseData, its ECDSA P-256/SHA-256 signature
/// (DER) by the responder key, and `certs`, the encoded certificates that
/// let a client chain the responder to the root (from [`certs_field`]).
/// The parts are already DER, so they are framed as they are: nothing is
/// parsed again for each response.
pub fn successful(tbs: &[u8], signature: &[u8], certs: &[u8]) -> Result<Vec<u8>, Error> {
    use der::Encode as _;
    use der::asn1::{AnyRef, BitStringRef, OctetStringRef};
    let bad = |e: der::Error| Error::Template(format!("OCSP response: {e}"));
    let basic = BasicRaw {
        tbs_response_data: AnyRef::try_from(tbs).map_err(bad)?,
        signature_algorithm: AlgorithmRaw { oid: ECDSA_SHA256 },
        signature: BitStringRef::from_bytes(signature).map_err(bad)?,
        certs: AnyRef::try_from(certs).map_err(bad)?,
    }
    .to_der()
    .map_err(bad)?;
    ResponseRaw {
        status: AnyRef::new(der::Tag::Enumerated, &[0]).map_err(bad)?,
        bytes: ResponseBytesRaw {
            response_type: OCSP_BASIC,
            response: OctetStringRef::new(&basic).map_err(bad)?,
        },
    }
    .to_der()
    .map_err(bad)
}

/// OCSPResponse (RFC 6960 4.2.1) with status `successful`.
#[derive(der::Sequence)]
struct ResponseRaw<'a> {
    status: der::asn1::AnyRef<'a>,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    bytes: ResponseBytesRaw<'a>,
}

/// ResponseBytes: `id-pkix-ocsp-basic` and the BasicOCSPResponse.
#[derive(der::Sequence)]
struct ResponseBytesRaw<'a> {
    response_type: const_oid::ObjectIdentifier,
    response: &'a der::asn1::OctetStringRef,
}

/// BasicOCSPResponse with its ResponseData and `certs` field pre-encoded.
#[derive(der::Sequence)]
struct BasicRaw<'a> {
    tbs_response_data: der::asn1::AnyRef<'a>,
    signature_algorithm: AlgorithmRaw,
    signature: der::asn1::BitStringRef<'a>,
    certs: der::asn1::AnyRef<'a>,
}

/// An AlgorithmIdentifier without parameters (ECDSA, RFC 5758).
#[derive(der::Sequence)]
struct AlgorithmRaw {
    oid: const_oid::ObjectIdentifier,
}

/// The `certs` field of a basic response carrying `certs` (`[0] EXPLICIT
/// SEQUENCE OF Certificate`): the bytes that end every [`successful`]
/// response made with the same certificates.
pub fn certs_field(certs: &[&[u8]]) -> Result<Vec<u8>, Error> {
    let bad = |e: der_07::Error| Error::Template(format!("OCSP response certificates: {e}"));
    let certs = certs
        .iter()
        .map(|c| x509_cert_02::Certificate::from_der(c).map_err(bad))
        .collect::<Result<Vec<_>, _>>()?;
    der_07::asn1::ContextSpecific {
        tag_number: der_07::TagNumber::N0,
        tag_mode: der_07::TagMode::Explicit,
        value: certs,
    }
    .to_der()
    .map_err(bad)
}

/// Whether `head` followed by `tail_len` more bytes is exactly one DER
/// value: what the header `head` starts with says, so a stored head joined
/// to the wrong certificates (or none) is caught before it is served.
pub fn joins(head: &[u8], tail_len: usize) -> bool {
    use der::{Decode, Encode};
    let Ok(header) = der::Header::from_der_partial(head).map(|(h, _)| h) else {
        return false;
    };
    let (Ok(header_len), Ok(body_len)) = (
        header.encoded_len().and_then(usize::try_from),
        usize::try_from(header.length()),
    ) else {
        return false;
    };
    header_len.checked_add(body_len) == head.len().checked_add(tail_len)
}

/// An unsuccessful response (no signature, per RFC 6960 section 2.3).
pub fn refusal(r: Refusal) -> Vec<u8> {
    let status = match r {
        Refusal::Malformed => OcspResponseStatus::MalformedRequest,
        Refusal::Unauthorized => OcspResponseStatus::Unauthorized,
        Refusal::Internal => OcspResponseStatus::InternalError,
        Refusal::TryLater => OcspResponseStatus::TryLater,
    };
    OcspResponse {
        response_status: status,
        response_bytes: None,
    }
    .to_der()
    // SEQUENCE { ENUMERATED n }: cannot fail to encode; keep a literal fallback.
    .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, status as u8])
}

/// SHA-1 of a public key's bits: the responder's `byKey` id.
pub fn key_hash(public_key: &crate::PublicKey) -> Vec<u8> {
    digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        public_key.raw(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Framing the pre-encoded parts gives, byte for byte, the response the
    /// `x509-ocsp` types encode from the parsed parts, and it reads back.
    #[test]
    fn successful_frames_the_parts_as_x509_ocsp_encodes_them() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "OCSP test CA");
        let ca_der = ca.self_signed(&key).unwrap().der().to_vec();
        let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der.clone().into(), &key).unwrap();
        let responder_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let responder = rcgen::CertificateParams::new(vec!["ocsp.test".to_string()])
            .unwrap()
            .signed_by(&responder_key, &issuer)
            .unwrap()
            .der()
            .to_vec();
        let info = IssuerInfo::from_der(&ca_der).unwrap();
        let serial = Serial::parse_hex(&"8f".repeat(16)).unwrap();
        let q = IssuerHashes::of(&info)
            .cert_id(&serial, CertIdHash::Sha1)
            .unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap();
        let later = now + std::time::Duration::from_secs(3600);
        let tbs = response_data(&[7; 20], now, &[(&q, Status::Good)], now, later, None).unwrap();
        let signature = [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02];
        let certs = [&responder[..], &ca_der[..]];
        let ours = successful(&tbs, &signature, &certs_field(&certs).unwrap()).unwrap();

        let basic = BasicOcspResponse {
            tbs_response_data: ResponseData::from_der(&tbs).unwrap(),
            signature_algorithm: AlgorithmIdentifierOwned {
                oid: ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2"),
                parameters: None,
            },
            signature: der_07::asn1::BitString::from_bytes(&signature).unwrap(),
            certs: Some(
                certs
                    .iter()
                    .map(|c| x509_cert_02::Certificate::from_der(c).unwrap())
                    .collect(),
            ),
        };
        let theirs = OcspResponse::successful(basic).unwrap().to_der().unwrap();
        assert_eq!(ours, theirs);
        let read = summarize(&ours).unwrap();
        assert_eq!((read.revoked, read.this_update), (false, 1_790_000_000));
        let field = certs_field(&certs).unwrap();
        let head = &ours[..ours.len() - field.len()];
        assert!(joins(head, field.len()));
        assert!(joins(&ours, 0));
        assert!(!joins(head, field.len() - 1));
        assert!(!joins(head, 0));
        assert!(!joins(&[], 0));
    }

    #[test]
    fn refusals_encode() {
        assert_eq!(
            refusal(Refusal::Malformed),
            vec![0x30, 0x03, 0x0a, 0x01, 0x01]
        );
        assert_eq!(
            refusal(Refusal::Unauthorized),
            vec![0x30, 0x03, 0x0a, 0x01, 0x06]
        );
    }

    #[test]
    fn nonce_lengths_follow_rfc_8954() {
        let q = Query {
            cert_id: CertId {
                hash_algorithm: AlgorithmIdentifierOwned {
                    oid: SHA256,
                    parameters: None,
                },
                issuer_name_hash: OctetString::new(vec![1; 32]).unwrap(),
                issuer_key_hash: OctetString::new(vec![2; 32]).unwrap(),
                serial_number: x509_cert_02::serial_number::SerialNumber::new(&[0x42]).unwrap(),
            },
            serial: Serial::parse_hex("42").unwrap(),
        };
        let with = |content: usize| {
            let value = OctetString::new(vec![7; content])
                .unwrap()
                .to_der()
                .unwrap();
            parse_request(&request(&[&q], Some(&value)).unwrap())
                .unwrap()
                .nonce
                .unwrap()
        };
        let parsed = parse_request(&request(&[&q], None).unwrap()).unwrap();
        assert_eq!(parsed.queries[0].hash(), Some(CertIdHash::Sha256));
        assert_eq!(parsed.queries[0].serial, q.serial);
        assert!(parsed.nonce.is_none());
        // Zero-length and over 128 bytes: malformed. 1 to 128: echoed as sent.
        assert_eq!(with(0).unwrap_err(), Refusal::Malformed);
        assert_eq!(with(129).unwrap_err(), Refusal::Malformed);
        for n in [1, 16, 32, 33, 128] {
            let value = OctetString::new(vec![7; n]).unwrap().to_der().unwrap();
            assert_eq!(with(n), Ok(value), "{n} bytes");
        }
        // Raw bytes (no inner OCTET STRING) get the same limits.
        let raw = |n: usize| {
            parse_request(&request(&[&q], Some(&vec![0xff; n])).unwrap())
                .unwrap()
                .nonce
                .unwrap()
        };
        assert_eq!(raw(0).unwrap_err(), Refusal::Malformed);
        assert_eq!(raw(20), Ok(vec![0xff; 20]));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
        }
    }
}
