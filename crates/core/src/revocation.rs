//! RFC 5280 CRLReason codes (section 5.3.1).

/// Reason codes and their RFC 5280 names. 7 is unassigned; certificateHold (6)
/// is listed for completeness of parsing and display.
const REASONS: [(i32, &str); 10] = [
    (0, "unspecified"),
    (1, "keyCompromise"),
    (2, "cACompromise"),
    (3, "affiliationChanged"),
    (4, "superseded"),
    (5, "cessationOfOperation"),
    (6, "certificateHold"),
    (8, "removeFromCRL"),
    (9, "privilegeWithdrawn"),
    (10, "aACompromise"),
];

/// Whether `code` is a CRLReason a revocation may carry. removeFromCRL (8) only
/// appears in delta CRLs and certificateHold (6) would make a revocation
/// reversible, so neither is accepted for a new revocation.
pub fn is_valid_reason(code: i32) -> bool {
    matches!(code, 0..=5 | 9 | 10)
}

/// The RFC 5280 name of a reason code (`unknown(N)` otherwise).
pub fn reason_name(code: i32) -> String {
    REASONS
        .iter()
        .find(|(c, _)| *c == code)
        .map_or_else(|| format!("unknown({code})"), |(_, n)| (*n).to_string())
}

/// Parses a reason by RFC 5280 name (case-insensitive, `-`/`_` ignored) or number.
pub fn parse_reason(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return REASONS.iter().any(|(c, _)| *c == n).then_some(n);
    }
    let norm = |x: &str| {
        x.chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase()
    };
    let want = norm(s);
    REASONS
        .iter()
        .find(|(_, n)| norm(n) == want)
        .map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        assert_eq!(parse_reason("key-compromise"), Some(1));
        assert_eq!(parse_reason("keyCompromise"), Some(1));
        assert_eq!(parse_reason("4"), Some(4));
        assert_eq!(parse_reason("7"), None);
        assert_eq!(parse_reason("bogus"), None);
        assert_eq!(reason_name(5), "cessationOfOperation");
        assert!(is_valid_reason(0) && is_valid_reason(10));
        assert!(!is_valid_reason(6) && !is_valid_reason(7) && !is_valid_reason(8));
    }
}
