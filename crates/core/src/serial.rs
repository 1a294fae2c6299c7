//! Certificate serial numbers.

use std::fmt;

/// A positive certificate serial number (big-endian magnitude, no leading zero byte).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// Builds a serial from 16 random bytes: 128 bits of entropy, positive.
    ///
    /// Returns `None` when the first byte is zero (the caller draws again) so the
    /// encoding is always exactly the 128 drawn bits, never shortened.
    pub fn from_random(bytes: [u8; 16]) -> Option<Serial> {
        (bytes[0] != 0).then(|| Serial(bytes.to_vec()))
    }

    /// Parses a hex serial as printed by Sigil or OpenSSL (colons allowed).
    pub fn parse_hex(s: &str) -> Option<Serial> {
        let clean: String = s.chars().filter(|c| *c != ':').collect();
        let mut bytes = hex::decode(clean.trim()).ok()?;
        while bytes.len() > 1 && bytes[0] == 0 {
            bytes.remove(0);
        }
        (!bytes.is_empty() && bytes.len() <= 20).then_some(Serial(bytes))
    }

    /// The big-endian magnitude bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lowercase hex, the canonical storage and display form.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serial_rules() {
        assert!(Serial::from_random([0; 16]).is_none());
        let s = Serial::from_random([0x80; 16]).unwrap();
        assert_eq!(s.as_bytes().len(), 16);
        assert_eq!(Serial::parse_hex(&s.to_hex()), Some(s.clone()));
        assert_eq!(
            Serial::parse_hex("00:80:80"),
            Some(Serial(vec![0x80, 0x80]))
        );
        assert!(Serial::parse_hex("zz").is_none());
    }
}
