//! Rules, loading, and evaluation.

use crate::Error;
use crate::pattern::{DnsPattern, EmailPattern, RequesterSelector, UriPattern};
use ipnet::IpNet;
use serde::Deserialize;
use sigil_core::lifetime::format_duration;
use sigil_core::{Identifier, KeyType, Profile, Requester};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Permit the names it covers.
    Allow,
    /// Refuse the names it touches; wins over any allow.
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    description: String,
    effect: Effect,
    requesters: Vec<String>,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    ip: Vec<String>,
    #[serde(default)]
    uri: Vec<String>,
    #[serde(default)]
    email: Vec<String>,
    #[serde(default, with = "sigil_core::lifetime::serde_opt")]
    max_lifetime: Option<Duration>,
    profiles: Option<Vec<String>>,
    key_types: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySel {
    Family(&'static str),
    RsaMin(usize),
}

impl KeySel {
    fn parse(s: &str) -> Result<KeySel, String> {
        Ok(match s {
            "ecdsa-p256" => KeySel::Family("ecdsa-p256"),
            "ecdsa-p384" => KeySel::Family("ecdsa-p384"),
            "ed25519" => KeySel::Family("ed25519"),
            "rsa" | "rsa-2048" => KeySel::RsaMin(2048),
            "rsa-3072" => KeySel::RsaMin(3072),
            "rsa-4096" => KeySel::RsaMin(4096),
            _ => {
                return Err(format!(
                    "unknown key type '{s}' (use ecdsa-p256, ecdsa-p384, ed25519, rsa, rsa-3072, rsa-4096; rsa-N means at least N bits)"
                ));
            }
        })
    }

    fn matches(&self, k: KeyType) -> bool {
        match (self, k) {
            (KeySel::RsaMin(min), KeyType::Rsa(bits)) => bits >= *min,
            (KeySel::Family(f), k) => *f == k.family(),
            _ => false,
        }
    }
}

impl fmt::Display for KeySel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySel::Family(s) => f.write_str(s),
            KeySel::RsaMin(b) => write!(f, "rsa>={b}"),
        }
    }
}

/// One loaded rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique name, used in explanations and audit records.
    pub name: String,
    /// Free text for people.
    pub description: String,
    /// Allow or deny.
    pub effect: Effect,
    /// The file it came from.
    pub file: String,
    requesters: Vec<RequesterSelector>,
    dns: Vec<DnsPattern>,
    ip: Vec<IpNet>,
    uri: Vec<UriPattern>,
    email: Vec<EmailPattern>,
    max_lifetime: Option<Duration>,
    profiles: Option<Vec<Profile>>,
    key_types: Option<Vec<KeySel>>,
}

impl Rule {
    fn from_raw(raw: RawRule, file: &str) -> Result<Rule, Error> {
        let err = |why: String| Error::Rule {
            file: file.to_string(),
            rule: raw.name.clone(),
            why,
        };
        if raw.name.trim().is_empty() {
            return Err(err("rule needs a non-empty name".into()));
        }
        if raw.requesters.is_empty() {
            return Err(err("requesters is empty: use [\"*\"] for anyone".into()));
        }
        let requesters = raw
            .requesters
            .iter()
            .map(|s| RequesterSelector::parse(s))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let dns = raw
            .dns
            .iter()
            .map(|s| DnsPattern::parse(s))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let ip = raw
            .ip
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map(|n| canonical_net(n.trunc()))
                    .map_err(|_| format!("'{s}' is not an IP address or CIDR"))
            })
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let uri = raw
            .uri
            .iter()
            .map(|s| UriPattern::parse(s))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let email = raw
            .email
            .iter()
            .map(|s| EmailPattern::parse(s))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let profiles = raw
            .profiles
            .map(|ps| {
                ps.iter()
                    .map(|p| p.parse::<Profile>().map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(err)?;
        let key_types = raw
            .key_types
            .map(|ks| {
                ks.iter()
                    .map(|k| KeySel::parse(k))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(err)?;
        // An empty list would select nothing: a deny rule with it never
        // denies, an allow rule never allows. Omitting the key means any.
        if profiles.as_ref().is_some_and(Vec::is_empty) {
            return Err(err(
                "profiles is empty: omit it for any profile, or list some".into(),
            ));
        }
        if key_types.as_ref().is_some_and(Vec::is_empty) {
            return Err(err(
                "key_types is empty: omit it for any key type, or list some".into(),
            ));
        }
        let rule = Rule {
            name: raw.name.clone(),
            description: raw.description,
            effect: raw.effect,
            file: file.to_string(),
            requesters,
            dns,
            ip,
            uri,
            email,
            max_lifetime: raw.max_lifetime,
            profiles,
            key_types,
        };
        if rule.effect == Effect::Allow && !rule.has_names() {
            return Err(err(
                "an allow rule must list names (dns, ip, uri or email)".into()
            ));
        }
        if rule.effect == Effect::Deny && rule.max_lifetime.is_some() {
            return Err(err("max_lifetime only applies to allow rules".into()));
        }
        Ok(rule)
    }

    fn has_names(&self) -> bool {
        !(self.dns.is_empty() && self.ip.is_empty() && self.uri.is_empty() && self.email.is_empty())
    }

    fn selects(&self, r: &Requester) -> bool {
        self.requesters.iter().any(|s| s.matches(r))
    }

    /// Allow semantics: the whole identifier is inside the rule's names.
    fn covers(&self, id: &Identifier) -> bool {
        match id {
            Identifier::Dns(d) => self.dns.iter().any(|p| p.covers(d)),
            Identifier::Ip(ip) => self.ip.iter().any(|n| n.contains(ip)),
            Identifier::Uri(u) => self.uri.iter().any(|p| p.matches(u)),
            Identifier::Email(e) => self.email.iter().any(|p| p.matches(e)),
            _ => false,
        }
    }

    /// Deny semantics: any part of the identifier touches the rule's names; a
    /// deny rule without names touches everything.
    fn touches(&self, id: &Identifier) -> bool {
        if !self.has_names() {
            return true;
        }
        match id {
            Identifier::Dns(d) => self.dns.iter().any(|p| p.intersects(d)),
            Identifier::Ip(ip) => self.ip.iter().any(|n| n.contains(ip)),
            Identifier::Uri(u) => self.uri.iter().any(|p| p.matches(u)),
            Identifier::Email(e) => self.email.iter().any(|p| p.matches(e)),
            _ => false,
        }
    }

    fn profile_ok(&self, p: Profile) -> bool {
        self.profiles.as_ref().is_none_or(|ps| ps.contains(&p))
    }

    /// For deny rules: whether a certificate of profile `p` could do what a
    /// listed profile's could (a rule denying `server` denies `mtls`, whose
    /// certificates are server certificates too).
    fn profile_denied(&self, p: Profile) -> bool {
        self.profiles
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|d| p.covers(*d)))
    }

    fn key_ok(&self, k: KeyType) -> bool {
        self.key_types
            .as_ref()
            .is_none_or(|ks| ks.iter().any(|s| s.matches(k)))
    }
}

/// A loaded policy: all rules from a directory, in file then declaration order.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    /// SHA-256 (hex) over the sources' names and texts, in load order.
    digest: std::sync::Arc<str>,
}

/// SHA-256 (hex) over `(file name, contents)` pairs in load order: a
/// policy's [`Policy::digest`], and how a watcher tells the files changed.
pub fn sources_digest<'a>(sources: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut all = Vec::new();
    for (file, text) in sources {
        all.extend_from_slice(file.as_bytes());
        all.push(0);
        all.extend_from_slice(text);
        all.push(0);
    }
    sigil_core::sha256_hex(&all)
}

/// What the policy is asked.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Who asks.
    pub requester: &'a Requester,
    /// Normalized identifiers.
    pub identifiers: &'a [Identifier],
    /// The profile.
    pub profile: Profile,
    /// The subject key type; `None` before the key is known (an ACME order):
    /// then only rules that hold for every key type decide.
    pub key_type: Option<KeyType>,
    /// The lifetime explicitly asked for, if any.
    pub lifetime: Option<Duration>,
}

/// The outcome for one identifier (or the request as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed by the named rule.
    Allowed,
    /// Denied by a deny rule.
    Denied,
    /// No allow rule permits it.
    NotAllowed,
}

/// One line of an explanation.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The identifier concerned.
    pub identifier: Identifier,
    /// The outcome.
    pub outcome: Outcome,
    /// The deciding rule, if one decided.
    pub rule: Option<String>,
    /// Why, in words.
    pub reason: String,
}

/// The policy's answer, with the reasoning for every identifier.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Whether every identifier is allowed and none denied.
    pub allowed: bool,
    /// The longest lifetime the allowing rules permit for all names together.
    pub max_lifetime: Option<Duration>,
    /// Per-identifier findings.
    pub findings: Vec<Finding>,
    /// The [`Policy::digest`] of the policy that decided.
    pub policy: std::sync::Arc<str>,
}

impl Decision {
    /// The first refusal, as one sentence for an error message.
    pub fn denial_reason(&self) -> Option<String> {
        // A deny rule that decided is named before a name no rule allowed.
        self.findings
            .iter()
            .find(|f| f.outcome == Outcome::Denied)
            .or_else(|| self.findings.iter().find(|f| f.outcome != Outcome::Allowed))
            .map(|f| format!("{}: {}", f.identifier, f.reason))
    }

    /// The rules that allowed the request.
    pub fn allowing_rules(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .findings
            .iter()
            .filter_map(|f| f.rule.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "decision: {}",
            if self.allowed { "ALLOW" } else { "DENY" }
        )?;
        for x in &self.findings {
            let tag = match x.outcome {
                Outcome::Allowed => "allow",
                Outcome::Denied => "deny ",
                Outcome::NotAllowed => "none ",
            };
            writeln!(f, "  {tag} {:<40} {}", x.identifier.to_string(), x.reason)?;
        }
        if let Some(m) = self.max_lifetime {
            writeln!(f, "  max lifetime: {}", format_duration(m))?;
        }
        Ok(())
    }
}

impl Policy {
    /// Loads every `*.toml` file in `dir` (sorted by name).
    pub fn load_dir(dir: &Path) -> Result<Policy, Error> {
        let shown = dir.display().to_string();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::Io(shown.clone(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut sources = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::Io(path.display().to_string(), e))?;
            sources.push((path.display().to_string(), text));
        }
        let policy = Policy::from_sources(sources.iter().map(|(f, t)| (f.as_str(), t.as_str())))?;
        if policy.rules.is_empty() {
            return Err(Error::Empty(shown));
        }
        Ok(policy)
    }

    /// Parses policy text from `(file name, contents)` pairs.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Policy, Error> {
        let sources: Vec<(&str, &str)> = sources.into_iter().collect();
        let digest = sources_digest(sources.iter().map(|(f, t)| (*f, t.as_bytes())));
        let mut rules: Vec<Rule> = Vec::new();
        for (file, text) in sources {
            let parsed: RuleFile =
                toml::from_str(text).map_err(|e| Error::Syntax(file.to_string(), e.to_string()))?;
            for raw in parsed.rule {
                let rule = Rule::from_raw(raw, file)?;
                if let Some(prev) = rules.iter().find(|r| r.name == rule.name) {
                    return Err(Error::Rule {
                        file: file.to_string(),
                        rule: rule.name.clone(),
                        why: format!("name already used in {}", prev.file),
                    });
                }
                rules.push(rule);
            }
        }
        Ok(Policy {
            rules,
            digest: digest.into(),
        })
    }

    /// The loaded rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// SHA-256 (hex) over the policy files' names and contents in load
    /// order: recorded with every decision, so the audit log tells which
    /// policy files decided (the same value `policy.reloaded` records).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Decides a request. Every identifier needs an allow rule that covers it and
    /// fits the profile, key type and lifetime; any matching deny rule refuses it.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        let mut findings = Vec::with_capacity(req.identifiers.len());
        let mut max_lifetime: Option<Duration> = None;
        let mut bounded = false;
        for id in req.identifiers {
            let finding = self.evaluate_one(req, id);
            if let (Outcome::Allowed, Some(Some(m))) = (&finding.0.outcome, &finding.1) {
                max_lifetime = Some(max_lifetime.map_or(*m, |cur| cur.min(*m)));
                bounded = true;
            }
            findings.push(finding.0);
        }
        let allowed =
            !findings.is_empty() && findings.iter().all(|f| f.outcome == Outcome::Allowed);
        Decision {
            allowed,
            max_lifetime: if bounded { max_lifetime } else { None },
            findings,
            policy: self.digest.clone(),
        }
    }

    /// Returns the finding and, when allowed, the lifetime bound for this name
    /// (`Some(None)` = allowed without a bound).
    fn evaluate_one(
        &self,
        req: &Request<'_>,
        id: &Identifier,
    ) -> (Finding, Option<Option<Duration>>) {
        let finding = |outcome, rule: Option<&Rule>, reason: String| Finding {
            identifier: id.clone(),
            outcome,
            rule: rule.map(|r| r.name.clone()),
            reason,
        };
        for rule in self.rules.iter().filter(|r| r.effect == Effect::Deny) {
            if rule.selects(req.requester)
                && rule.touches(id)
                && rule.profile_denied(req.profile)
                && req
                    .key_type
                    .map_or(rule.key_types.is_none(), |k| rule.key_ok(k))
            {
                let why = format!("denied by rule '{}' ({})", rule.name, rule.file);
                return (finding(Outcome::Denied, Some(rule), why), None);
            }
        }
        // Among allow rules that cover the name, pick the one allowing the longest
        // lifetime; remember the most specific reason a covering rule did not fit.
        let mut best: Option<(&Rule, Option<Duration>)> = None;
        let mut near_miss: Option<String> = None;
        let mut selected_any = false;
        for rule in self.rules.iter().filter(|r| r.effect == Effect::Allow) {
            if !rule.covers(id) {
                continue;
            }
            if !rule.selects(req.requester) {
                continue;
            }
            selected_any = true;
            let miss = if !rule.profile_ok(req.profile) {
                Some(format!(
                    "rule '{}' covers it but not profile {} (allowed: {})",
                    rule.name,
                    req.profile,
                    list(rule.profiles.iter().flatten())
                ))
            } else if let Some(k) = req.key_type.filter(|k| !rule.key_ok(*k)) {
                Some(format!(
                    "rule '{}' covers it but not key type {} (allowed: {})",
                    rule.name,
                    k,
                    list(rule.key_types.iter().flatten())
                ))
            } else if let (Some(want), Some(max)) = (req.lifetime, rule.max_lifetime) {
                (want > max).then(|| {
                    format!(
                        "rule '{}' covers it but allows at most {} (asked {})",
                        rule.name,
                        format_duration(max),
                        format_duration(want)
                    )
                })
            } else {
                None
            };
            match miss {
                Some(m) => {
                    near_miss.get_or_insert(m);
                }
                None => {
                    let better = match (best, rule.max_lifetime) {
                        (None, _) => true,
                        (Some((_, None)), _) => false,
                        (Some(_), None) => true,
                        (Some((_, Some(a))), Some(b)) => b > a,
                    };
                    if better {
                        best = Some((rule, rule.max_lifetime));
                    }
                }
            }
        }
        if let Some((rule, max)) = best {
            let why = format!("allowed by rule '{}' ({})", rule.name, rule.file);
            return (finding(Outcome::Allowed, Some(rule), why), Some(max));
        }
        let why = near_miss.unwrap_or_else(|| {
            if selected_any {
                "no allow rule fits".to_string()
            } else {
                format!(
                    "no allow rule lets {} have this {} name",
                    req.requester,
                    id.kind()
                )
            }
        });
        (finding(Outcome::NotAllowed, None, why), None)
    }
}

/// IPv4-mapped IPv6 ranges become IPv4 ranges, as requested IPs do.
fn canonical_net(n: IpNet) -> IpNet {
    match n {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(n, IpNet::V4),
            None => n,
        },
        _ => n,
    }
}

fn list<T: fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}
