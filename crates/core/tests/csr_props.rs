//! The CSR parser never panics, whatever it is fed, and accepts only what verifies.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use proptest::prelude::*;
use rcgen::{CertificateParams, KeyPair, SanType};
use sigil_core::{Csr, CsrError};

fn valid_csr() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::DnsName("svc.internal".try_into().unwrap())];
    p.serialize_request(&key).unwrap().der().to_vec()
}

#[test]
fn valid_csr_parses_in_der_and_any_pem_width() {
    let der = valid_csr();
    let csr = Csr::parse(&der).unwrap();
    // The default CN is not a host name, so it is ignored (subjects are never copied).
    assert_eq!(csr.identifiers().len(), 1);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    for width in [64, 76, 1000] {
        let body: Vec<String> = b64
            .as_bytes()
            .chunks(width)
            .map(|c| String::from_utf8_lossy(c).into())
            .collect();
        let pem = format!(
            "junk before\r\n-----BEGIN NEW CERTIFICATE REQUEST-----\r\n{}\r\n-----END NEW CERTIFICATE REQUEST-----\n",
            body.join("\r\n")
        );
        assert!(Csr::parse(pem.as_bytes()).is_ok(), "width {width}");
    }
    assert!(matches!(
        Csr::parse(&vec![0x30; 70_000]),
        Err(CsrError::TooLarge(..))
    ));
    assert!(matches!(Csr::parse(b"hello"), Err(CsrError::Malformed(_))));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Csr::parse(&bytes);
        let _ = sigil_core::CaRequest::parse(&bytes);
    }

    #[test]
    fn mutated_csrs_never_panic_and_never_verify_wrongly(pos in any::<prop::sample::Index>(), bit in 0u8..8, cut in any::<prop::sample::Index>()) {
        let der = valid_csr();
        let mut flipped = der.clone();
        let i = pos.index(flipped.len());
        flipped[i] ^= 1 << bit;
        if let Ok(csr) = Csr::parse(&flipped) {
            // Only flips outside the signed content and signature (e.g. a length
            // byte re-read the same way) may still parse; the key must be unchanged.
            let orig = Csr::parse(&der).unwrap();
            prop_assert_eq!(csr.public_key(), orig.public_key());
        }
        let truncated = &der[..cut.index(der.len())];
        prop_assert!(Csr::parse(truncated).is_err());
    }
}
