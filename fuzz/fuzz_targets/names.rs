//! Fuzz name normalization: never panic, and normalizing is idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil_core::{DnsName, Identifier};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(n) = DnsName::parse(s) {
        assert_eq!(DnsName::parse(n.as_str()).ok(), Some(n.clone()));
        assert!(n.as_str().len() <= 253);
    }
    if let Ok(id) = Identifier::parse_any(s) {
        assert_eq!(Identifier::parse_any(&id.to_string()).ok(), Some(id));
    }
});
