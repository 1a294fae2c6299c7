//! Normalized names. A value of these types has already passed every syntax rule,
//! so matching code never has to think about case, trailing dots or unicode.

use crate::NameError;
use std::fmt;
use std::net::IpAddr;

/// A DNS name in canonical form: lowercase A-labels, no trailing dot, optionally
/// a wildcard as the whole leftmost label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(String);

impl DnsName {
    /// Normalizes and validates a DNS name from any source (CSR, policy, CLI).
    pub fn parse(input: &str) -> Result<DnsName, NameError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(NameError::Empty);
        }
        if trimmed.len() > 1024 {
            return Err(NameError::TooLong(truncate(input)));
        }
        let (wildcard, rest) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        // Any other '*' (or a lone "*") is a wildcard in the wrong place. Also catch
        // the fullwidth and small asterisks that IDNA would otherwise map to '*'.
        if rest.contains(['*', '\u{FF0A}', '\u{FE61}', '\u{2217}']) || rest.is_empty() {
            return Err(NameError::BadWildcard(input.to_string()));
        }
        if rest.parse::<IpAddr>().is_ok() || looks_like_ipv4(rest) {
            return Err(NameError::IpInDns(input.to_string()));
        }
        let ascii = idna::domain_to_ascii_strict(rest)
            .map_err(|_| NameError::InvalidDns(input.to_string()))?;
        let ascii = ascii.strip_suffix('.').unwrap_or(&ascii).to_string();
        if ascii.is_empty() {
            return Err(NameError::InvalidDns(input.to_string()));
        }
        if ascii.parse::<IpAddr>().is_ok() || looks_like_ipv4(&ascii) {
            return Err(NameError::IpInDns(input.to_string()));
        }
        for label in ascii.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(NameError::InvalidDns(input.to_string()));
            }
        }
        let full = if wildcard {
            format!("*.{ascii}")
        } else {
            ascii
        };
        if full.len() > 253 {
            return Err(NameError::TooLong(truncate(input)));
        }
        Ok(DnsName(full))
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the leftmost label is a wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// The name without its wildcard label (`*.a.b` → `a.b`); itself if not a wildcard.
    pub fn base(&self) -> &str {
        self.0.strip_prefix("*.").unwrap_or(&self.0)
    }

    /// Whether `self` is strictly below `parent` (`a.b.c` is below `b.c`).
    pub fn is_strictly_under(name: &str, parent: &str) -> bool {
        name.len() > parent.len() + 1
            && name.ends_with(parent)
            && name.as_bytes()[name.len() - parent.len() - 1] == b'.'
    }
}

fn looks_like_ipv4(s: &str) -> bool {
    // A purely numeric last label is never a hostname (RFC 1123 §2.1); this also
    // catches shortened or octal/hex IPv4 forms such as "127.1" or "0x7f.1".
    let last = s.rsplit('.').next().unwrap_or(s);
    !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || (last.starts_with("0x") && last[2..].bytes().all(|b| b.is_ascii_hexdigit())))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect::<String>() + "..."
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE ID (`spiffe://trust-domain/path`), validated per the SPIFFE ID spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// Validates a SPIFFE ID; the trust domain is lowercased.
    pub fn parse(input: &str) -> Result<SpiffeId, NameError> {
        let bad = |why| NameError::InvalidUri(input.chars().take(256).collect(), why);
        if input.len() > 2048 {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = input
            .get(..9)
            .filter(|p| p.eq_ignore_ascii_case("spiffe://"))
            .map(|_| &input[9..])
            .ok_or_else(|| bad("scheme must be spiffe"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() || td.len() > 255 {
            return Err(bad("trust domain must be 1-255 characters"));
        }
        let td = td.to_ascii_lowercase();
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(bad(
                "trust domain may contain only letters, digits, '-', '.' and '_' (no port, user or query)",
            ));
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(bad("path has an empty segment or a trailing '/'"));
                }
                if seg == "." || seg == ".." {
                    return Err(bad("path may not contain '.' or '..' segments"));
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(bad(
                        "path segments may contain only letters, digits, '-', '.' and '_'",
                    ));
                }
            }
        }
        Ok(SpiffeId(format!("spiffe://{td}{path}")))
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One name a certificate can be issued for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Identifier {
    /// A DNS name (possibly a wildcard).
    Dns(DnsName),
    /// An IP address (IPv4-mapped IPv6 addresses are stored as IPv4).
    Ip(IpAddr),
    /// A SPIFFE URI.
    Uri(SpiffeId),
    /// An email address (domain part normalized like a DNS name).
    Email(String),
}

impl Identifier {
    /// Parses a name typed by a person: an IP if it is one, `spiffe://` as URI,
    /// `x@y` as email, otherwise a DNS name.
    pub fn parse_any(s: &str) -> Result<Identifier, NameError> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Identifier::Ip(ip.to_canonical()));
        }
        if s.contains("://") {
            return SpiffeId::parse(s).map(Identifier::Uri);
        }
        if s.contains('@') {
            return parse_email(s).map(Identifier::Email);
        }
        DnsName::parse(s).map(Identifier::Dns)
    }

    /// Builds an IP identifier from the raw bytes of an iPAddress SAN.
    pub fn from_ip_bytes(bytes: &[u8]) -> Result<Identifier, NameError> {
        let ip = match bytes.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(bytes).map_err(|_| NameError::BadIpLength(4))?),
            16 => {
                IpAddr::from(<[u8; 16]>::try_from(bytes).map_err(|_| NameError::BadIpLength(16))?)
            }
            n => return Err(NameError::BadIpLength(n)),
        };
        Ok(Identifier::Ip(ip.to_canonical()))
    }

    /// The kind as used in messages and policies (`dns`, `ip`, `uri`, `email`).
    pub fn kind(&self) -> &'static str {
        match self {
            Identifier::Dns(_) => "dns",
            Identifier::Ip(_) => "ip",
            Identifier::Uri(_) => "uri",
            Identifier::Email(_) => "email",
        }
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identifier::Dns(d) => write!(f, "{d}"),
            Identifier::Ip(ip) => write!(f, "{ip}"),
            Identifier::Uri(u) => write!(f, "{u}"),
            Identifier::Email(e) => write!(f, "{e}"),
        }
    }
}

/// Validates `local@domain` and lowercases it: the domain is normalized as a
/// (non-wildcard) DNS name, and the local part is folded too so that case can
/// never separate a requested address from a policy rule.
pub fn parse_email(s: &str) -> Result<String, NameError> {
    let bad = || NameError::InvalidEmail(s.chars().take(256).collect());
    let (local, domain) = s.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || local.len() > 64
        || !local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"@()<>[]:;,\\\"".contains(&b))
    {
        return Err(bad());
    }
    let domain = DnsName::parse(domain).map_err(|_| bad())?;
    if domain.is_wildcard() {
        return Err(bad());
    }
    Ok(format!("{}@{domain}", local.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_normalization_table() {
        let ok = [
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("*.Example.com", "*.example.com"),
            ("bücher.internal", "xn--bcher-kva.internal"),
            ("ｅxample.internal", "example.internal"), // fullwidth e maps to ASCII
            ("localhost", "localhost"),
            ("a-b.c1.internal", "a-b.c1.internal"),
        ];
        for (input, want) in ok {
            assert_eq!(DnsName::parse(input).unwrap().as_str(), want, "{input}");
        }
        let bad = [
            "",
            ".",
            "*",
            "*.*.example.com",
            "a.*.example.com",
            "f*o.example.com",
            "*example.com",
            "127.0.0.1",
            "10.1",
            "foo.0x7f",
            "::1",
            "-a.example.com",
            "a-.example.com",
            "a..example.com",
            "under_score.example.com",
            "sp ace.example.com",
            "*.＊.example.com",
        ];
        for input in bad {
            assert!(
                DnsName::parse(input).is_err(),
                "{input:?} should be rejected"
            );
        }
        let long = format!("{}.internal", vec!["a".repeat(63); 4].join("."));
        assert!(DnsName::parse(&long).is_err());
    }

    #[test]
    fn homograph_is_not_ascii() {
        // Cyrillic 'е' (U+0435) must not collapse to Latin 'e'.
        let n = DnsName::parse("\u{0435}xample.com").unwrap();
        assert_ne!(n.as_str(), "example.com");
        assert!(n.as_str().starts_with("xn--"));
    }

    #[test]
    fn under() {
        assert!(DnsName::is_strictly_under("a.b.c", "b.c"));
        assert!(!DnsName::is_strictly_under("b.c", "b.c"));
        assert!(!DnsName::is_strictly_under("ab.c", "b.c"));
    }

    #[test]
    fn spiffe_and_email() {
        assert_eq!(
            SpiffeId::parse("SPIFFE://Prod.Example/ns/web/sa/api")
                .unwrap()
                .as_str(),
            "spiffe://prod.example/ns/web/sa/api"
        );
        for bad in [
            "https://x/y",
            "spiffe://",
            "spiffe://td:443/a",
            "spiffe://u@td/a",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a?x=1",
            "spiffe://td/a/",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_email("Ops@Example.COM").unwrap(), "ops@example.com");
        assert!(parse_email("no-at-sign").is_err());
        assert!(parse_email("a@*.example.com").is_err());
        assert_eq!(
            Identifier::parse_any("::ffff:10.0.0.1").unwrap(),
            Identifier::Ip("10.0.0.1".parse().unwrap())
        );
    }

    proptest::proptest! {
        #[test]
        fn dns_parse_never_panics_and_is_idempotent(s in "\\PC{0,80}") {
            if let Ok(n) = DnsName::parse(&s) {
                let again = DnsName::parse(n.as_str()).unwrap();
                proptest::prop_assert_eq!(again, n.clone());
                proptest::prop_assert!(n.as_str().len() <= 253);
                proptest::prop_assert!(!n.base().contains('*'));
            }
        }

        #[test]
        fn dns_ascii_like_inputs(s in "[a-zA-Z0-9.*\\-]{0,40}") {
            let _ = DnsName::parse(&s);
            let _ = Identifier::parse_any(&s);
        }

        #[test]
        fn spiffe_parse_never_panics(s in "(spiffe://)?\\PC{0,60}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                proptest::prop_assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
            }
        }
    }
}
