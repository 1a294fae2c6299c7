//! Name patterns and requester selectors.

use sigil_core::names::parse_email;
use sigil_core::{DnsName, Requester, SpiffeId};
use std::fmt;

/// A DNS name pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsPattern {
    /// Exactly this name (may itself be a literal wildcard such as `*.a.b`,
    /// which also covers every name one label below `a.b`).
    Exact(DnsName),
    /// Every name strictly below this domain, any depth (written `.a.b`).
    Suffix(String),
}

impl DnsPattern {
    /// Parses `name`, `*.name` or `.name`; normalized like requested names.
    pub fn parse(s: &str) -> Result<DnsPattern, String> {
        if let Some(rest) = s.strip_prefix('.') {
            let d = DnsName::parse(rest).map_err(|e| e.to_string())?;
            if d.is_wildcard() {
                return Err(format!("'{s}': a suffix pattern cannot contain a wildcard"));
            }
            return Ok(DnsPattern::Suffix(d.as_str().to_string()));
        }
        DnsName::parse(s)
            .map(DnsPattern::Exact)
            .map_err(|e| e.to_string())
    }

    /// Whether a certificate for `name` is fully inside this pattern (allow rules).
    pub fn covers(&self, name: &DnsName) -> bool {
        match self {
            DnsPattern::Exact(p) if p == name => true,
            DnsPattern::Exact(p) if p.is_wildcard() && !name.is_wildcard() => {
                one_label_below(name.as_str(), p.base())
            }
            DnsPattern::Exact(_) => false,
            DnsPattern::Suffix(s) => {
                if name.is_wildcard() {
                    name.base() == s || DnsName::is_strictly_under(name.base(), s)
                } else {
                    DnsName::is_strictly_under(name.as_str(), s)
                }
            }
        }
    }

    /// Whether any name a certificate for `name` would be valid for is inside
    /// this pattern (deny rules: a wildcard overlapping a denied name is denied).
    pub fn intersects(&self, name: &DnsName) -> bool {
        if self.covers(name) {
            return true;
        }
        if !name.is_wildcard() {
            return false;
        }
        let base = name.base();
        match self {
            DnsPattern::Exact(p) if p.is_wildcard() => p.base() == base,
            DnsPattern::Exact(p) => one_label_below(p.as_str(), base),
            DnsPattern::Suffix(s) => base == s || DnsName::is_strictly_under(base, s),
        }
    }
}

fn one_label_below(name: &str, parent: &str) -> bool {
    DnsName::is_strictly_under(name, parent) && !name[..name.len() - parent.len() - 1].contains('.')
}

impl fmt::Display for DnsPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsPattern::Exact(d) => write!(f, "{d}"),
            DnsPattern::Suffix(s) => write!(f, ".{s}"),
        }
    }
}

/// A SPIFFE ID pattern: `*` matches one path segment, a final `**` one or more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriPattern {
    text: String,
    trust_domain: String,
    segments: Vec<String>,
}

impl UriPattern {
    /// Parses `spiffe://td/seg/*/seg/**`.
    pub fn parse(s: &str) -> Result<UriPattern, String> {
        // Validate the shape by substituting the wildcards with a legal segment.
        let probe = s.replace("**", "x").replace('*', "x");
        let id = SpiffeId::parse(&probe).map_err(|e| e.to_string())?;
        let rest = &id.as_str()["spiffe://".len()..];
        let (td, _) = rest.split_once('/').unwrap_or((rest, ""));
        let orig_rest = s.get("spiffe://".len()..).unwrap_or("");
        let segments: Vec<String> = orig_rest
            .split_once('/')
            .map(|(_, p)| p.split('/').map(str::to_string).collect())
            .unwrap_or_default();
        for (i, seg) in segments.iter().enumerate() {
            if seg.contains('*') && seg != "*" && seg != "**" {
                return Err(format!("'{s}': '*' must be a whole path segment"));
            }
            if seg == "**" && i + 1 != segments.len() {
                return Err(format!("'{s}': '**' is only allowed as the last segment"));
            }
        }
        let orig_td = orig_rest.split('/').next().unwrap_or(orig_rest);
        if orig_td.contains('*') {
            return Err(format!("'{s}': the trust domain cannot be a wildcard"));
        }
        Ok(UriPattern {
            text: s.to_string(),
            trust_domain: td.to_string(),
            segments,
        })
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        let rest = &id.as_str()["spiffe://".len()..];
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if td != self.trust_domain {
            return false;
        }
        let segs: Vec<&str> = if path.is_empty() {
            vec![]
        } else {
            path.split('/').collect()
        };
        let mut i = 0;
        for (pi, p) in self.segments.iter().enumerate() {
            if p == "**" {
                return pi == self.segments.len() - 1 && segs.len() > i;
            }
            match segs.get(i) {
                Some(s) if p == "*" || p == s => i += 1,
                _ => return false,
            }
        }
        i == segs.len()
    }
}

impl fmt::Display for UriPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// An email pattern: `user@domain` exactly, or `@domain` for any user there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailPattern(String);

impl EmailPattern {
    /// Parses and normalizes.
    pub fn parse(s: &str) -> Result<EmailPattern, String> {
        // Patterns are an exact address or `@domain`; a glob would be taken
        // literally and match nothing (a deny rule that never denies).
        if s.contains('*') {
            return Err(format!(
                "email pattern '{s}': '*' is not a wildcard here; write '@domain' for every address at a domain, or an exact address"
            ));
        }
        if let Some(domain) = s.strip_prefix('@') {
            let d = DnsName::parse(domain).map_err(|e| e.to_string())?;
            return Ok(EmailPattern(format!("@{d}")));
        }
        parse_email(s).map(EmailPattern).map_err(|e| e.to_string())
    }

    /// Whether `addr` (already normalized) matches.
    pub fn matches(&self, addr: &str) -> bool {
        if self.0.starts_with('@') {
            addr.rsplit_once('@').map(|(_, d)| d) == Some(&self.0[1..])
        } else {
            addr == self.0
        }
    }
}

impl fmt::Display for EmailPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Selects requesters: `*`, a kind (`operator`, `token`, `mtls`, `acme`, `eab`),
/// or `kind:glob` where `*` in the glob matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequesterSelector {
    kind: Option<String>,
    glob: Option<String>,
}

const KINDS: [&str; 5] = ["operator", "token", "mtls", "acme", "eab"];

impl RequesterSelector {
    /// Parses a selector.
    pub fn parse(s: &str) -> Result<RequesterSelector, String> {
        if s == "*" {
            return Ok(RequesterSelector {
                kind: None,
                glob: None,
            });
        }
        let (kind, glob) = match s.split_once(':') {
            Some((k, g)) => (k, Some(g.to_string())),
            None => (s, None),
        };
        if !KINDS.contains(&kind) {
            return Err(format!(
                "requester selector '{s}': kind must be one of {} (or '*' for anyone)",
                KINDS.join(", ")
            ));
        }
        if glob.as_deref() == Some("") {
            return Err(format!("requester selector '{s}': empty name after ':'"));
        }
        let glob = match glob {
            Some(g) if kind == "mtls" => Some(canonical_mtls_glob(&g)),
            g => g,
        };
        // A DNS-name glob with a path or a scheme selects nobody: mTLS
        // identities are DNS names or SPIFFE IDs (`spiffe://*/...`).
        if let Some(g) = glob.as_deref()
            && kind == "mtls"
            && !g.starts_with("spiffe://")
            && g.contains(['/', ':'])
        {
            return Err(format!(
                "requester selector '{s}': an mTLS identity is a DNS name or a SPIFFE ID; for SPIFFE IDs write mtls:spiffe://TRUST-DOMAIN/... (a '*' may stand for the trust domain)"
            ));
        }
        Ok(RequesterSelector {
            kind: Some(kind.to_string()),
            glob,
        })
    }

    /// Whether `r` is selected.
    pub fn matches(&self, r: &Requester) -> bool {
        match (&self.kind, &self.glob) {
            (None, _) => true,
            (Some(k), None) => k == r.kind(),
            (Some(k), Some(g)) => {
                k == r.kind() && same_identity_kind(k, g, r.name()) && glob_match(g, r.name())
            }
        }
    }
}

impl fmt::Display for RequesterSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.glob) {
            (None, _) => f.write_str("*"),
            (Some(k), None) => f.write_str(k),
            (Some(k), Some(g)) => write!(f, "{k}:{g}"),
        }
    }
}

/// An `mtls:` glob in the form client identities take: a SPIFFE URI's
/// scheme and trust domain, and a DNS name, in lower case (the path of a
/// SPIFFE URI keeps its case). Otherwise a selector written `mtls:API.corp`
/// would silently never match, which for a deny rule means no deny.
fn canonical_mtls_glob(glob: &str) -> String {
    const SPIFFE: &str = "spiffe://";
    match glob.get(..SPIFFE.len()) {
        Some(scheme) if scheme.eq_ignore_ascii_case(SPIFFE) => {
            let rest = &glob[SPIFFE.len()..];
            let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            format!("{SPIFFE}{}{path}", domain.to_ascii_lowercase())
        }
        _ => glob.to_ascii_lowercase(),
    }
}

/// An `mtls:` glob written for a SPIFFE ID selects only SPIFFE IDs, and one
/// written for a DNS name only DNS names (`*` alone selects both): otherwise
/// `mtls:*.corp.internal` would select `spiffe://corp/ns/x/y.corp.internal`,
/// an ID whose path its holder chose.
fn same_identity_kind(kind: &str, glob: &str, name: &str) -> bool {
    const SPIFFE: &str = "spiffe://";
    kind != "mtls" || glob == "*" || glob.starts_with(SPIFFE) == name.starts_with(SPIFFE)
}

/// Glob with `*` matching any run of characters (iterative, no backtracking blowup).
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> DnsName {
        DnsName::parse(s).unwrap()
    }

    #[test]
    fn mtls_selectors_match_identities_whatever_their_case() {
        let who = |name: &str| Requester::Mtls(name.into());
        for (selector, identity, selected) in [
            (
                "mtls:spiffe://Corp.Example/ns/a/*",
                "spiffe://corp.example/ns/a/sa/x",
                true,
            ),
            (
                "mtls:SPIFFE://corp.example/ns/a/*",
                "spiffe://corp.example/ns/a/sa/x",
                true,
            ),
            (
                "mtls:spiffe://corp.example/ns/A/*",
                "spiffe://corp.example/ns/a/sa/x",
                false,
            ),
            ("mtls:GW.Internal", "gw.internal", true),
            ("mtls:*.Internal", "api.internal", true),
            // A DNS glob does not select a SPIFFE ID ending like a DNS name,
            // nor a SPIFFE glob a DNS name; `*` selects any identity.
            (
                "mtls:*.corp.internal",
                "spiffe://corp/ns/team/x.corp.internal",
                false,
            ),
            ("mtls:*internal", "spiffe://corp/ns/internal", false),
            ("mtls:spiffe://*", "spiffe://corp/ns/a", true),
            ("mtls:*", "spiffe://corp/ns/a", true),
            ("mtls:*", "gw.internal", true),
            ("token:Team-A", "team-a", false),
        ] {
            let s = RequesterSelector::parse(selector).unwrap();
            let r = if selector.starts_with("token:") {
                Requester::Token(identity.into())
            } else {
                who(identity)
            };
            assert_eq!(s.matches(&r), selected, "{selector} vs {identity}");
        }
    }

    #[test]
    fn dns_cover_and_intersect_table() {
        // (pattern, name, covers, intersects)
        let table = [
            ("api.corp.internal", "api.corp.internal", true, true),
            ("api.corp.internal", "API.corp.internal.", true, true),
            ("api.corp.internal", "x.api.corp.internal", false, false),
            ("*.corp.internal", "a.corp.internal", true, true),
            ("*.corp.internal", "a.b.corp.internal", false, false),
            ("*.corp.internal", "corp.internal", false, false),
            ("*.corp.internal", "*.corp.internal", true, true),
            ("*.corp.internal", "*.b.corp.internal", false, false),
            (".corp.internal", "a.b.corp.internal", true, true),
            (".corp.internal", "corp.internal", false, false),
            (".corp.internal", "*.corp.internal", true, true),
            (".corp.internal", "*.b.corp.internal", true, true),
            (".corp.internal", "evilcorp.internal", false, false),
            ("secret.corp.internal", "*.corp.internal", false, true),
            ("*.corp.internal", "*.corp.internal", true, true),
            (".a.corp.internal", "*.corp.internal", false, false),
            (".corp.internal", "*.internal", false, false),
        ];
        for (p, n, cov, int) in table {
            let pat = DnsPattern::parse(p).unwrap();
            assert_eq!(pat.covers(&d(n)), cov, "{p} covers {n}");
            assert_eq!(pat.intersects(&d(n)), int, "{p} intersects {n}");
        }
        assert!(DnsPattern::parse(".*.x").is_err());
        assert!(DnsPattern::parse("a.*.x").is_err());
    }

    #[test]
    fn uri_patterns() {
        let p = UriPattern::parse("spiffe://corp/ns/*/sa/*").unwrap();
        let id = |s| SpiffeId::parse(s).unwrap();
        assert!(p.matches(&id("spiffe://corp/ns/web/sa/api")));
        assert!(p.matches(&id("spiffe://CORP/ns/web/sa/api")));
        assert!(!p.matches(&id("spiffe://corp/ns/web/sa/api/extra")));
        assert!(!p.matches(&id("spiffe://corp/ns/web")));
        assert!(!p.matches(&id("spiffe://corp.evil/ns/web/sa/api")));
        let deep = UriPattern::parse("spiffe://corp/ns/pay/**").unwrap();
        assert!(deep.matches(&id("spiffe://corp/ns/pay/sa/x")));
        assert!(!deep.matches(&id("spiffe://corp/ns/pay")));
        assert!(UriPattern::parse("spiffe://corp/ns/a*b").is_err());
        assert!(UriPattern::parse("spiffe://corp/**/x").is_err());
        assert!(UriPattern::parse("https://corp/x").is_err());
        assert!(UriPattern::parse("spiffe://*/admin/**").is_err());
        assert!(UriPattern::parse("spiffe://c*/admin").is_err());
    }

    #[test]
    fn selectors_and_globs() {
        let s = RequesterSelector::parse("mtls:spiffe://corp/ns/pay/*").unwrap();
        assert!(s.matches(&Requester::Mtls("spiffe://corp/ns/pay/sa/x".into())));
        assert!(!s.matches(&Requester::Token("spiffe://corp/ns/pay/sa/x".into())));
        assert!(
            RequesterSelector::parse("*")
                .unwrap()
                .matches(&Requester::Eab("k".into()))
        );
        assert!(
            RequesterSelector::parse("operator")
                .unwrap()
                .matches(&Requester::Operator("bob".into()))
        );
        assert!(RequesterSelector::parse("root:x").is_err());
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b", "axxbc"));
        assert!(glob_match("*", ""));
        let e = EmailPattern::parse("@Corp.Example").unwrap();
        assert!(e.matches("ops@corp.example"));
        assert!(!e.matches("ops@evil.corp.example"));
        let admin = EmailPattern::parse("Admin@corp.example").unwrap();
        let asked = sigil_core::names::parse_email("ADMIN@Corp.Example").unwrap();
        assert!(
            admin.matches(&asked),
            "case never separates a requested address from a rule"
        );
    }

    proptest::proptest! {
        #[test]
        fn glob_never_panics(p in "[a-c*]{0,12}", t in "[a-c]{0,20}") {
            let _ = glob_match(&p, &t);
        }
    }
}
