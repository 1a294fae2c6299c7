//! RFC 5280 §4.2.1.10 name constraints of an issuing CA, so the CA never signs a
//! certificate that relying parties would reject for violating them.

use crate::names::Identifier;
use ipnet::IpNet;
use std::net::IpAddr;
use x509_cert::ext::pkix::name::GeneralName;

/// One constraint subtree, in the forms Sigil can evaluate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Subtree {
    /// dNSName: the name and everything below it (a leading dot: below only).
    Dns(String),
    /// iPAddress range.
    Ip(IpNet),
    /// uniformResourceIdentifier host constraint (same rules as dNSName).
    UriHost(String),
    /// rfc822Name: a mailbox, a host, or (leading dot) hosts below a domain.
    Email(String),
    /// A form Sigil does not evaluate (directoryName, ...): never matches.
    Other,
}

/// Permitted and excluded subtrees of one CA certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameConstraints {
    permitted: Vec<Subtree>,
    excluded: Vec<Subtree>,
}

impl NameConstraints {
    /// Reads the extension's subtrees.
    pub(crate) fn from_x509(nc: &x509_cert::ext::pkix::NameConstraints) -> NameConstraints {
        let conv = |t: &Option<Vec<x509_cert::ext::pkix::constraints::name::GeneralSubtree>>| {
            t.iter()
                .flatten()
                .map(|s| match &s.base {
                    GeneralName::DnsName(d) => Subtree::Dns(d.as_str().to_ascii_lowercase()),
                    GeneralName::UniformResourceIdentifier(u) => {
                        Subtree::UriHost(u.as_str().to_ascii_lowercase())
                    }
                    GeneralName::Rfc822Name(e) => Subtree::Email(e.as_str().to_ascii_lowercase()),
                    GeneralName::IpAddress(o) => ip_subtree(o.as_bytes()).unwrap_or(Subtree::Other),
                    _ => Subtree::Other,
                })
                .collect::<Vec<_>>()
        };
        NameConstraints {
            permitted: conv(&nc.permitted_subtrees),
            excluded: conv(&nc.excluded_subtrees),
        }
    }

    /// Whether `id` is inside the permitted subtrees of its type (if any are
    /// listed) and outside every excluded subtree.
    pub fn permits(&self, id: &Identifier) -> bool {
        if self
            .excluded
            .iter()
            .any(|s| matches(s, id, Side::Excluded) == Some(true))
        {
            return false;
        }
        let relevant: Vec<bool> = self
            .permitted
            .iter()
            .filter_map(|s| matches(s, id, Side::Permitted))
            .collect();
        relevant.is_empty() || relevant.contains(&true)
    }
}

fn ip_subtree(b: &[u8]) -> Option<Subtree> {
    let net = match b.len() {
        8 => {
            let addr = IpAddr::from(<[u8; 4]>::try_from(&b[..4]).ok()?);
            let mask = u32::from_be_bytes(<[u8; 4]>::try_from(&b[4..]).ok()?);
            IpNet::new(addr, mask.count_ones() as u8).ok()?
        }
        32 => {
            let addr = IpAddr::from(<[u8; 16]>::try_from(&b[..16]).ok()?);
            let mask = u128::from_be_bytes(<[u8; 16]>::try_from(&b[16..]).ok()?);
            IpNet::new(addr, mask.count_ones() as u8).ok()?
        }
        _ => return None,
    };
    Some(Subtree::Ip(net))
}

/// Which list a subtree is in: a wildcard is permitted when every name it
/// stands for is inside, and excluded when any one is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Permitted,
    Excluded,
}

/// `Some(matched)` when the subtree is of the identifier's type, else `None`.
fn matches(s: &Subtree, id: &Identifier, side: Side) -> Option<bool> {
    match (s, id) {
        (Subtree::Dns(c), Identifier::Dns(d)) if d.is_wildcard() => {
            Some(wildcard_in(d.base(), c, side))
        }
        (Subtree::Dns(c), Identifier::Dns(d)) => Some(host_in(d.as_str(), c)),
        (Subtree::Ip(net), Identifier::Ip(ip)) => Some(net.contains(ip)),
        (Subtree::UriHost(c), Identifier::Uri(u)) => {
            let rest = &u.as_str()["spiffe://".len()..];
            let host = rest.split('/').next().unwrap_or(rest);
            // RFC 5280 4.2.1.10: for URIs, "host" names that host only and
            // ".domain" the hosts below it.
            Some(match c.strip_prefix('.') {
                Some(parent) => crate::DnsName::is_strictly_under(host, parent),
                None => host == c,
            })
        }
        (Subtree::Email(c), Identifier::Email(e)) => {
            let e = e.to_ascii_lowercase();
            let host = e.rsplit_once('@').map_or("", |(_, h)| h);
            Some(if c.contains('@') {
                e == *c
            } else if c.starts_with('.') {
                host.ends_with(c.as_str())
            } else {
                host == c
            })
        }
        (Subtree::Other, _) => None,
        _ => None,
    }
}

/// For `*.base`: every name it covers (`x.base`, one label) is in subtree
/// `c` when `base` is the subtree's domain or below it; one of them is when,
/// besides, `c` (without a leading dot) is itself one label below `base`.
fn wildcard_in(base: &str, c: &str, side: Side) -> bool {
    if c.is_empty() {
        return true;
    }
    let dotted = c.starts_with('.');
    let domain = c.trim_start_matches('.');
    let all = base == domain || crate::DnsName::is_strictly_under(base, domain);
    let one_label_below = crate::DnsName::is_strictly_under(domain, base)
        && !domain[..domain.len() - base.len() - 1].contains('.');
    all || (side == Side::Excluded && !dotted && one_label_below)
}

/// dNSName semantics: `c` matches itself and names below; `.c` only names below.
fn host_in(name: &str, c: &str) -> bool {
    if c.is_empty() {
        return true;
    }
    match c.strip_prefix('.') {
        Some(parent) => crate::DnsName::is_strictly_under(name, parent),
        None => name == c || crate::DnsName::is_strictly_under(name, c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_ip_and_exclusions() {
        let nc = NameConstraints {
            permitted: vec![
                Subtree::Dns("corp.internal".into()),
                Subtree::Ip("10.0.0.0/8".parse().unwrap()),
            ],
            excluded: vec![Subtree::Dns("secret.corp.internal".into())],
        };
        let id = |s: &str| Identifier::parse_any(s).unwrap();
        assert!(nc.permits(&id("corp.internal")));
        assert!(nc.permits(&id("a.b.corp.internal")));
        // It stands for secret.corp.internal too, which is excluded.
        assert!(!nc.permits(&id("*.corp.internal")));
        assert!(nc.permits(&id("*.a.corp.internal")));
        assert!(!nc.permits(&id("*.secret.corp.internal")));
        assert!(!nc.permits(&id("evilcorp.internal")));
        assert!(!nc.permits(&id("x.secret.corp.internal")));
        assert!(nc.permits(&id("10.1.2.3")));
        assert!(!nc.permits(&id("192.168.1.1")));
        // No URI subtrees listed: URIs are unconstrained.
        assert!(nc.permits(&id("spiffe://corp/x")));
        assert_eq!(
            ip_subtree(&[10, 0, 0, 0, 255, 0, 0, 0]),
            Some(Subtree::Ip("10.0.0.0/8".parse().unwrap()))
        );
    }

    #[test]
    fn a_wildcard_directly_under_a_dotted_subtree_is_inside_it() {
        let id = |s: &str| Identifier::parse_any(s).unwrap();
        let nc = NameConstraints {
            permitted: vec![Subtree::Dns(".corp.internal".into())],
            excluded: vec![Subtree::Dns(".x.corp.internal".into())],
        };
        assert!(nc.permits(&id("*.corp.internal")));
        assert!(!nc.permits(&id("corp.internal")));
        assert!(!nc.permits(&id("*.internal")));
        // `.x.corp.internal` holds the names below x, none of which
        // *.corp.internal stands for; *.x.corp.internal is all inside it.
        assert!(nc.permits(&id("x.corp.internal")));
        assert!(!nc.permits(&id("*.x.corp.internal")));
    }

    #[test]
    fn uri_hosts_name_one_host_and_dotted_ones_the_hosts_below() {
        let id = |s: &str| Identifier::parse_any(s).unwrap();
        let host = NameConstraints {
            permitted: vec![Subtree::UriHost("td.example".into())],
            excluded: vec![],
        };
        assert!(host.permits(&id("spiffe://td.example/ns/a")));
        assert!(!host.permits(&id("spiffe://a.td.example/ns/a")));
        let below = NameConstraints {
            permitted: vec![Subtree::UriHost(".td.example".into())],
            excluded: vec![],
        };
        assert!(below.permits(&id("spiffe://a.td.example/ns/a")));
        assert!(!below.permits(&id("spiffe://td.example/ns/a")));
        assert!(!below.permits(&id("spiffe://eviltd.example/ns/a")));
    }
}
