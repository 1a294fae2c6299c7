//! Fuzz the CSR parser: any bytes, as PEM or DER, must yield Ok or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = sigil_core::Csr::parse(data) {
        // Whatever parses has verified, normalized identifiers.
        assert!(!csr.identifiers().is_empty());
    }
    let _ = sigil_core::CaRequest::parse(data);
});
