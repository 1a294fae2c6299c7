//! Table-driven policy decisions, including attempts to slip past a rule.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_core::{Identifier, KeyType, Profile, Requester};
use sigil_policy::{Outcome, Policy, Request};
use std::time::Duration;

const POLICY: &str = r#"
[[rule]]
name = "payments"
effect = "allow"
requesters = ["token:payments-*", "mtls:spiffe://corp/ns/payments/*"]
dns = ["*.payments.internal", "api.corp.internal"]
ip = ["10.20.0.0/16"]
uri = ["spiffe://corp/ns/payments/sa/*"]
max_lifetime = "72h"
profiles = ["mtls", "server"]
key_types = ["ecdsa-p256", "ed25519", "rsa-3072"]

[[rule]]
name = "platform"
effect = "allow"
requesters = ["operator"]
dns = [".internal"]
ip = ["10.0.0.0/8", "::/0"]
email = ["@corp.example"]

[[rule]]
name = "no-vault"
effect = "deny"
requesters = ["*"]
dns = ["vault.payments.internal", ".secrets.internal"]
ip = ["::ffff:10.20.99.0/120"]

[[rule]]
name = "no-rsa-for-tokens"
effect = "deny"
requesters = ["token"]
key_types = ["rsa-4096"]
"#;

fn policy() -> Policy {
    Policy::from_sources([("test.toml", POLICY)]).unwrap()
}

struct Case {
    requester: Requester,
    names: &'static [&'static str],
    profile: Profile,
    key: KeyType,
    lifetime: Option<u64>,
    allowed: bool,
    reason_has: &'static str,
}

fn case(
    r: Requester,
    names: &'static [&'static str],
    allowed: bool,
    reason_has: &'static str,
) -> Case {
    Case {
        requester: r,
        names,
        profile: Profile::Mtls,
        key: KeyType::EcdsaP256,
        lifetime: None,
        allowed,
        reason_has,
    }
}

#[test]
fn decisions() {
    let tok = || Requester::Token("payments-web".into());
    let op = || Requester::Operator("alice".into());
    let mut cases = vec![
        case(tok(), &["a.payments.internal"], true, "payments"),
        // Case and trailing dot normalize before matching.
        case(tok(), &["A.Payments.Internal."], true, "payments"),
        case(tok(), &["api.corp.internal"], true, "payments"),
        // One label only under a '*.' pattern.
        case(tok(), &["a.b.payments.internal"], false, "no allow rule"),
        // A different requester kind with the same name is not selected.
        case(
            Requester::Mtls("payments-web".into()),
            &["a.payments.internal"],
            false,
            "no allow rule",
        ),
        case(
            Requester::Mtls("spiffe://corp/ns/payments/sa/web".into()),
            &["spiffe://corp/ns/payments/sa/web"],
            true,
            "payments",
        ),
        case(
            tok(),
            &["spiffe://corp/ns/billing/sa/web"],
            false,
            "no allow rule",
        ),
        // Deny wins over allow, exactly and for wildcards overlapping a denied name.
        case(tok(), &["vault.payments.internal"], false, "no-vault"),
        case(tok(), &["*.payments.internal"], false, "no-vault"),
        case(op(), &["x.secrets.internal"], false, "no-vault"),
        case(op(), &["*.secrets.internal"], false, "no-vault"),
        // One label below .internal never reaches names under secrets.internal.
        case(op(), &["*.internal"], true, "platform"),
        case(op(), &["*.payments.internal"], false, "no-vault"),
        case(op(), &["deep.team.internal"], true, "platform"),
        // Lookalike suffix is not under the domain.
        case(op(), &["evilinternal"], false, "no allow rule"),
        // IPs: containment and deny ranges; IPv4-mapped IPv6 is judged as IPv4.
        case(tok(), &["10.20.1.1"], true, "payments"),
        case(tok(), &["10.20.99.7"], false, "no-vault"),
        case(op(), &["::ffff:10.20.99.7"], false, "no-vault"),
        case(op(), &["2001:db8::1"], true, "platform"),
        // Mixed: one bad name refuses the whole request.
        case(
            tok(),
            &["a.payments.internal", "other.internal"],
            false,
            "no allow rule",
        ),
        case(op(), &["ops@corp.example"], true, "platform"),
        case(op(), &["ops@corp.example.evil"], false, "no allow rule"),
    ];
    // Profile, key type and lifetime limits, with reasons naming the rule.
    cases.push(Case {
        profile: Profile::Client,
        ..case(tok(), &["a.payments.internal"], false, "not profile client")
    });
    cases.push(Case {
        key: KeyType::EcdsaP384,
        ..case(
            tok(),
            &["a.payments.internal"],
            false,
            "not key type ecdsa-p384",
        )
    });
    cases.push(Case {
        key: KeyType::Rsa(2048),
        ..case(
            tok(),
            &["a.payments.internal"],
            false,
            "not key type rsa-2048",
        )
    });
    cases.push(Case {
        key: KeyType::Rsa(3072),
        ..case(tok(), &["a.payments.internal"], true, "payments")
    });
    cases.push(Case {
        key: KeyType::Rsa(4096),
        ..case(tok(), &["a.payments.internal"], false, "no-rsa-for-tokens")
    });
    cases.push(Case {
        lifetime: Some(72 * 3600),
        ..case(tok(), &["a.payments.internal"], true, "payments")
    });
    cases.push(Case {
        lifetime: Some(73 * 3600),
        ..case(tok(), &["a.payments.internal"], false, "at most 3days")
    });

    let p = policy();
    for c in cases {
        let ids: Vec<Identifier> = c
            .names
            .iter()
            .map(|n| Identifier::parse_any(n).unwrap())
            .collect();
        let d = p.evaluate(&Request {
            requester: &c.requester,
            identifiers: &ids,
            profile: c.profile,
            key_type: Some(c.key),
            lifetime: c.lifetime.map(Duration::from_secs),
        });
        let text = d.to_string();
        assert_eq!(
            d.allowed, c.allowed,
            "{:?} for {}: {text}",
            c.names, c.requester
        );
        assert!(
            text.contains(c.reason_has),
            "{:?}: expected '{}' in:\n{text}",
            c.names,
            c.reason_has
        );
    }
}

#[test]
fn lifetime_bound_is_reported() {
    let p = policy();
    let ids = vec![Identifier::parse_any("a.payments.internal").unwrap()];
    let r = Requester::Token("payments-x".into());
    let d = p.evaluate(&Request {
        requester: &r,
        identifiers: &ids,
        profile: Profile::Mtls,
        key_type: Some(KeyType::Ed25519),
        lifetime: None,
    });
    assert!(d.allowed);
    assert_eq!(d.max_lifetime, Some(Duration::from_secs(72 * 3600)));
    assert_eq!(d.findings[0].outcome, Outcome::Allowed);
}

#[test]
fn unicode_homograph_does_not_match_ascii_rule() {
    let p = policy();
    // Cyrillic 'а' in "аpi" becomes an xn-- label that no rule names.
    let ids = vec![Identifier::parse_any("\u{0430}pi.corp.internal").unwrap()];
    let r = Requester::Token("payments-x".into());
    let d = p.evaluate(&Request {
        requester: &r,
        identifiers: &ids,
        profile: Profile::Mtls,
        key_type: Some(KeyType::Ed25519),
        lifetime: None,
    });
    assert!(!d.allowed, "{d}");
}

#[test]
fn bad_policies_name_the_problem() {
    let bad = [
        (
            "[[rule]]\nname='x'\neffect='allow'\nrequesters=['*']\n",
            "must list names",
        ),
        (
            "[[rule]]\nname='x'\neffect='allow'\nrequesters=['*']\ndns=['*.*.x']\n",
            "wildcard",
        ),
        (
            "[[rule]]\nname='x'\neffect='allow'\nrequesters=['boss']\ndns=['x']\n",
            "kind must be one of",
        ),
        (
            "[[rule]]\nname='x'\neffect='allow'\nrequesters=['*']\ndns=['x']\nkey_types=['dsa']\n",
            "unknown key type",
        ),
        (
            "[[rule]]\nname='x'\neffect='allow'\nrequesters=['*']\ndns=['x']\nfoo=1\n",
            "unknown field",
        ),
        (
            "[[rule]]\nname='x'\neffect='allow'\nrequesters=['*']\nip=['300.1.1.1']\n",
            "not an IP",
        ),
        (
            "[[rule]]\nname='x'\neffect='allow'\nrequesters=['*']\ndns=['a']\n[[rule]]\nname='x'\neffect='deny'\nrequesters=['*']\n",
            "already used",
        ),
        // Lists that would select nothing, which makes a deny rule inert.
        (
            "[[rule]]\nname='x'\neffect='deny'\nrequesters=['*']\ndns=['vault.internal']\nprofiles=[]\n",
            "profiles is empty",
        ),
        (
            "[[rule]]\nname='x'\neffect='deny'\nrequesters=['*']\ndns=['vault.internal']\nkey_types=[]\n",
            "key_types is empty",
        ),
        // Globs where none are matched.
        (
            "[[rule]]\nname='x'\neffect='deny'\nrequesters=['*']\nemail=['*@corp.example']\n",
            "not a wildcard here",
        ),
        (
            "[[rule]]\nname='x'\neffect='deny'\nrequesters=['*']\nemail=['@*.corp.example']\n",
            "not a wildcard here",
        ),
        (
            "[[rule]]\nname='x'\neffect='deny'\nrequesters=['mtls:*/ns/admin/*']\ndns=['x']\n",
            "mtls:spiffe://",
        ),
    ];
    for (text, want) in bad {
        let e = Policy::from_sources([("bad.toml", text)])
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
        assert!(e.contains("bad.toml"), "{e}");
    }
}

#[test]
fn shipped_policies_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let p = Policy::load_dir(&root).unwrap();
    assert!(!p.rules().is_empty());
}

#[test]
fn the_digest_names_the_files_that_decided() {
    let a = Policy::from_sources([("a.toml", POLICY)]).unwrap();
    let same = Policy::from_sources([("a.toml", POLICY)]).unwrap();
    let renamed = Policy::from_sources([("b.toml", POLICY)]).unwrap();
    let text = format!(
        "{POLICY}
# reviewed
"
    );
    let edited = Policy::from_sources([("a.toml", text.as_str())]).unwrap();
    assert_eq!(a.digest(), same.digest());
    assert_ne!(a.digest(), renamed.digest());
    assert_ne!(a.digest(), edited.digest());
    assert_eq!(
        a.digest(),
        sigil_policy::sources_digest([("a.toml", POLICY.as_bytes())])
    );
    let requester = Requester::Operator("alice".into());
    let ids = [Identifier::parse_any("x.internal").unwrap()];
    let d = edited.evaluate(&Request {
        requester: &requester,
        identifiers: &ids,
        profile: Profile::Server,
        key_type: Some(KeyType::EcdsaP256),
        lifetime: None,
    });
    assert_eq!(&*d.policy, edited.digest());
}

/// A deny rule naming a profile also denies the profiles whose
/// certificates can do the same: `mtls` certificates are server and client
/// certificates too.
#[test]
fn a_denied_profile_is_denied_inside_a_wider_one() {
    let policy = Policy::from_sources([(
        "p.toml",
        r#"
[[rule]]
name = "web"
effect = "allow"
requesters = ["token"]
dns = [".corp.internal"]

[[rule]]
name = "no-server-certs"
effect = "deny"
requesters = ["token"]
dns = [".corp.internal"]
profiles = ["server"]
"#,
    )])
    .unwrap();
    let requester = Requester::Token("web".into());
    let identifiers = [Identifier::parse_any("a.corp.internal").unwrap()];
    for (profile, allowed) in [
        (Profile::Server, false),
        (Profile::Mtls, false),
        (Profile::Client, true),
    ] {
        let d = policy.evaluate(&Request {
            requester: &requester,
            identifiers: &identifiers,
            profile,
            key_type: Some(KeyType::EcdsaP256),
            lifetime: None,
        });
        assert_eq!(d.allowed, allowed, "{profile:?}: {:?}", d.findings);
        if !allowed {
            assert!(
                d.denial_reason().unwrap().contains("no-server-certs"),
                "{profile:?}"
            );
        }
    }
}

/// The one-line reason names the deny rule that decided, even when another
/// name (sorted first) was merely not allowed.
#[test]
fn the_reason_names_the_deny_rule_first() {
    let p = Policy::from_sources([(
        "p.toml",
        "[[rule]]\nname='a'\neffect='allow'\nrequesters=['token']\ndns=['.corp.internal']\n\
         [[rule]]\nname='no-vault'\neffect='deny'\nrequesters=['*']\ndns=['vault.corp.internal']\n",
    )])
    .unwrap();
    let names = [
        Identifier::parse_any("a.elsewhere.internal").unwrap(),
        Identifier::parse_any("vault.corp.internal").unwrap(),
    ];
    let d = p.evaluate(&Request {
        requester: &Requester::Token("t".into()),
        identifiers: &names,
        profile: Profile::Mtls,
        key_type: Some(KeyType::EcdsaP256),
        lifetime: None,
    });
    let reason = d.denial_reason().unwrap();
    assert!(reason.contains("no-vault"), "{reason}");
}
