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

    /// Builds a serial that sorts by issuance time: 48 bits of Unix
    /// milliseconds, then 80 random bits.
    ///
    /// Serials issued close together share a prefix, so the database's serial
    /// index grows at its end instead of touching a random page per
    /// certificate. The 80 random bits keep serials unpredictable (the CA/B
    /// Forum asks for at least 64). Times outside 2004..10889 are clamped so
    /// the first byte is never zero and the length is always 16 bytes.
    pub fn from_time_and_random(unix_ms: u64, random: [u8; 10]) -> Serial {
        let ms = unix_ms.clamp(1 << 40, (1 << 48) - 1);
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(&ms.to_be_bytes()[2..]);
        bytes.extend_from_slice(&random);
        Serial(bytes)
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

    #[test]
    fn timed_serials_sort_by_time_and_keep_their_randomness() {
        let t = 1_795_000_000_123u64;
        let a = Serial::from_time_and_random(t, [0xff; 10]);
        let b = Serial::from_time_and_random(t + 1, [0; 10]);
        assert_eq!(a.as_bytes().len(), 16);
        assert!(a.to_hex() < b.to_hex(), "{a} should sort before {b}");
        assert_eq!(&a.as_bytes()[..6], &t.to_be_bytes()[2..]);
        assert_eq!(&a.as_bytes()[6..], &[0xff; 10]);
        // A clock before 2004 still gives a 16-byte serial with no leading zero.
        let early = Serial::from_time_and_random(0, [7; 10]);
        assert_eq!(early.as_bytes().len(), 16);
        assert_ne!(early.as_bytes()[0], 0);
        assert_eq!(Serial::parse_hex(&early.to_hex()), Some(early));
    }
}
