//! CA certificates: the offline root, intermediate requests and signing, and the
//! online issuer that signs leaves.

use crate::{Error, SoftwareKey};
use rcgen::{CertificateParams, DistinguishedName, Issuer, SigningKey};
use sigil_core::template::{IntermediateOptions, intermediate_params, root_params};
use sigil_core::{CaRequest, IssuerInfo, LeafTemplate, Serial};
use std::time::Duration;
use time::OffsetDateTime;

/// A CA certificate together with its private key, ready to sign.
pub struct CaSigner<K: SigningKey = SoftwareKey> {
    info: IssuerInfo,
    issuer: Issuer<'static, K>,
}

impl<K: SigningKey> std::fmt::Debug for CaSigner<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaSigner({})", self.info.subject)
    }
}

impl<K: SigningKey> CaSigner<K> {
    /// Pairs a CA certificate with its key; fails if they do not match.
    pub fn new(cert_der: &[u8], key: K) -> Result<CaSigner<K>, Error> {
        let info = IssuerInfo::from_der(cert_der)?;
        if info.public_key.raw() != key.der_bytes() {
            return Err(Error::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der.to_vec().into(), key)?;
        Ok(CaSigner { info, issuer })
    }

    /// Facts about the CA certificate.
    pub fn info(&self) -> &IssuerInfo {
        &self.info
    }

    /// Signs a delegated OCSP responder certificate for `subject`.
    pub fn sign_ocsp_signer(
        &self,
        params: &CertificateParams,
        subject: &impl rcgen::PublicKeyData,
    ) -> Result<Vec<u8>, Error> {
        self.sign_params(params, subject)
    }

    /// Signs a CRL template (consuming it).
    pub fn sign_crl(&self, template: sigil_core::crl::CrlTemplate) -> Result<Vec<u8>, Error> {
        Ok(template.sign(&self.issuer)?)
    }

    /// Signs a checked leaf template (consuming it).
    pub fn sign_leaf(&self, template: LeafTemplate) -> Result<Vec<u8>, Error> {
        Ok(template.sign(&self.issuer)?)
    }

    /// Signs arbitrary CA-made parameters for `subject` (intermediates).
    fn sign_params(
        &self,
        params: &CertificateParams,
        subject: &impl rcgen::PublicKeyData,
    ) -> Result<Vec<u8>, Error> {
        Ok(params.signed_by(subject, &self.issuer)?.der().to_vec())
    }
}

/// Creates a self-signed root certificate for `key`.
pub fn self_signed_root(
    key: &SoftwareKey,
    subject: DistinguishedName,
    serial: &Serial,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<Vec<u8>, Error> {
    let params = root_params(subject, key.public_key(), serial, now, validity);
    Ok(params.self_signed(key)?.der().to_vec())
}

/// Creates the PKCS#10 request for an intermediate key (subject only; the
/// extensions are decided by the root ceremony).
pub fn intermediate_csr(
    key: &impl SigningKey,
    subject: DistinguishedName,
) -> Result<Vec<u8>, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// The root signs an intermediate from its verified request.
pub fn sign_intermediate<K: SigningKey>(
    root: &CaSigner<K>,
    request: &CaRequest,
    serial: &Serial,
    now: OffsetDateTime,
    validity: Duration,
    opts: &IntermediateOptions,
) -> Result<Vec<u8>, Error> {
    let not_after = now + validity;
    if not_after > root.info.not_after {
        return Err(Error::Core(sigil_core::Error::Template(format!(
            "intermediate would outlive the root (root expires {}); shorten --validity",
            root.info.not_after
        ))));
    }
    let params = intermediate_params(
        request.subject.clone(),
        &request.public_key,
        serial,
        now,
        validity,
        opts,
    )?;
    root.sign_params(&params, &request.public_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_core::KeySpec;
    use sigil_core::dn::parse_subject;

    #[test]
    fn root_intermediate_chain_and_mismatch() {
        let now = sigil_core::Clock::now(&sigil_core::SystemClock);
        let (root_key, _) = SoftwareKey::generate(KeySpec::EcdsaP384).unwrap();
        let serial = crate::random_serial().unwrap();
        let root_der = self_signed_root(
            &root_key,
            parse_subject("CN=Test Root,O=Sigil").unwrap(),
            &serial,
            now,
            Duration::from_secs(86400 * 3650),
        )
        .unwrap();
        let root = CaSigner::new(&root_der, root_key).unwrap();
        assert!(root.info().is_ca && root.info().is_self_issued());

        let (int_key, _) = SoftwareKey::generate(KeySpec::EcdsaP256).unwrap();
        let csr = intermediate_csr(&int_key, parse_subject("CN=Test Issuing CA").unwrap()).unwrap();
        let req = CaRequest::parse(&csr).unwrap();
        let int_der = sign_intermediate(
            &root,
            &req,
            &crate::random_serial().unwrap(),
            now,
            Duration::from_secs(86400 * 365),
            &IntermediateOptions::default(),
        )
        .unwrap();
        let int = CaSigner::new(&int_der, int_key).unwrap();
        assert_eq!(int.info().path_len, Some(0));
        assert_eq!(int.info().issuer, root.info().subject);

        let (other, _) = SoftwareKey::generate(KeySpec::EcdsaP256).unwrap();
        assert!(matches!(
            CaSigner::new(&int_der, other),
            Err(Error::KeyMismatch)
        ));
        let too_long = sign_intermediate(
            &root,
            &req,
            &crate::random_serial().unwrap(),
            now,
            Duration::from_secs(86400 * 3651 * 2),
            &IntermediateOptions::default(),
        );
        assert!(too_long.is_err());
    }

    #[test]
    fn dns_name_constraints_are_subtrees_and_refuse_what_they_cannot_say() {
        let now = sigil_core::Clock::now(&sigil_core::SystemClock);
        let (root_key, _) = SoftwareKey::generate(KeySpec::EcdsaP256).unwrap();
        let root_der = self_signed_root(
            &root_key,
            parse_subject("CN=Test Root").unwrap(),
            &crate::random_serial().unwrap(),
            now,
            Duration::from_secs(86400 * 3650),
        )
        .unwrap();
        let root = CaSigner::new(&root_der, root_key).unwrap();
        let (int_key, _) = SoftwareKey::generate(KeySpec::EcdsaP256).unwrap();
        let csr = intermediate_csr(&int_key, parse_subject("CN=Constrained").unwrap()).unwrap();
        let sign = |dns: &str| {
            let opts = IntermediateOptions {
                permitted_dns: vec![dns.into()],
                ..Default::default()
            };
            sign_intermediate(
                &root,
                &CaRequest::parse(&csr).unwrap(),
                &crate::random_serial().unwrap(),
                now,
                Duration::from_secs(86400 * 365),
                &opts,
            )
        };
        let int_der = sign("Svc.Internal").unwrap();
        let info = sigil_core::IssuerInfo::from_der(&int_der).unwrap();
        assert_eq!(info.key_id, info.public_key.key_identifier());
        // A cross-certificate repeats the certified CA's own key identifier
        // (say a SHA-1 one another CA wrote) rather than deriving one.
        let foreign_ski = vec![0xab; 20];
        let cross = sign_intermediate(
            &root,
            &CaRequest::parse(&csr).unwrap(),
            &crate::random_serial().unwrap(),
            now,
            Duration::from_secs(86400 * 365),
            &IntermediateOptions {
                path_len: 1,
                subject_key_id: Some(foreign_ski.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let cross = sigil_core::IssuerInfo::from_der(&cross).unwrap();
        assert_eq!(cross.key_id, foreign_ski);
        let id = |s: &str| sigil_core::Identifier::parse_any(s).unwrap();
        let nc = &info.name_constraints;
        // "svc.internal": the name itself and the names below it.
        assert!(nc.permits(&id("svc.internal")));
        assert!(nc.permits(&id("a.svc.internal")));
        assert!(!nc.permits(&id("other.internal")));

        // Forms the constraint cannot express are refused, saying what to write.
        for (bad, says) in [
            (".corp.internal", "use corp.internal"),
            ("*.corp.internal", "wildcard"),
        ] {
            let e = sign(bad).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }
}
