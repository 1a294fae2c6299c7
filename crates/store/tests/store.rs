//! Storage tests, run on SQLite and (when available) PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed expectation is a failure

use sigil_store::{
    AuditEvent, Change, IssuerChange, IssuerState, NewCertificate, NewIssuer, Store, testing,
};

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        ts_ms: 1_700_000_000_000 + i as i64,
        kind: "cert.issued".into(),
        actor: "operator:test".into(),
        subject: format!("serial-{i}"),
        detail: serde_json::json!({ "n": i, "text": "line\nbreak" }),
    }
}

fn issuer() -> NewIssuer {
    NewIssuer {
        id: "00112233445566778899aabbccddeeff".into(),
        cert_der: vec![0x30, 0x00],
        subject: "CN=Test".into(),
        not_before: 0,
        not_after: 4_000_000_000,
        installed_at: 1,
        key_ref: None,
    }
}

fn cert(i: usize) -> NewCertificate {
    NewCertificate {
        serial: format!("{i:032x}"),
        issuer_id: issuer().id,
        profile: "mtls".into(),
        requester: "operator:test".into(),
        names: vec![format!("host{i}.internal")],
        key_fingerprint: format!("fp{i}"),
        not_before: 10,
        not_after: 20,
        issued_at: i as i64,
        der: vec![1, 2, 3],
        crl_shard: None,
    }
}

/// The revocation (keyCompromise, by an operator) of `cert(i)`.
fn revocation(i: usize) -> sigil_store::NewRevocation {
    sigil_store::NewRevocation {
        serial: cert(i).serial,
        issuer_id: issuer().id,
        reason: 1,
        revoked_at: 99,
        revoked_by: "operator:test".into(),
        block_key: Some(cert(i).key_fingerprint),
    }
}

async fn seeded(url: &str, n: usize) -> Store {
    let store = Store::open(url).await.unwrap();
    store
        .commit(Change::Issuer {
            change: IssuerChange::Install(issuer()),
            event: event(0),
        })
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 1..=n {
        let s = store.clone();
        handles.push(tokio::spawn(async move {
            s.commit(Change::Issue {
                cert: cert(i),
                token: None,
                renews: None,
                event: event(i),
                completes: None,
            })
            .await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_keep_chain_and_rows() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 200).await;
        assert_eq!(store.certificate_count().await.unwrap(), 200, "{name}");
        let report = store.verify_audit().await.unwrap();
        assert_eq!(report.rows, 201, "{name}");
        assert!(report.first_bad.is_none(), "{name}: {:?}", report.first_bad);
        // Durable read-back with the names decoded.
        let c = store
            .certificate(&format!("{:032x}", 7))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.names, vec!["host7.internal".to_string()]);
        let found = store
            .certificates(Some("host7.internal"), 10, 0)
            .await
            .unwrap();
        assert_eq!(found.len(), 1, "{name}");
        // A duplicate serial fails alone and leaves the chain intact.
        let dup = store
            .commit(Change::Issue {
                cert: cert(7),
                token: None,
                renews: None,
                event: event(999),
                completes: None,
            })
            .await;
        assert!(
            matches!(dup, Err(sigil_store::Error::Conflict(_))),
            "{name}: {dup:?}"
        );
        assert!(store.verify_audit().await.unwrap().first_bad.is_none());
        assert_eq!(store.issuers().await.unwrap()[0].state, IssuerState::Active);
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_refuses_audit_update_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 3).await;
        let pool = store.dangerous_raw_pool();
        let upd = sqlx::query("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
            .execute(pool)
            .await;
        assert!(
            upd.unwrap_err().to_string().contains("append-only"),
            "{name}"
        );
        let del = sqlx::query("DELETE FROM audit WHERE seq = 2")
            .execute(pool)
            .await;
        assert!(
            del.unwrap_err().to_string().contains("append-only"),
            "{name}"
        );
        // Rewriting a row by re-inserting it, or appending out of sequence, is refused.
        let cols = "INSERT INTO audit (seq, ts_ms, kind, actor, subject, detail, prev_hash, hash)";
        let replace = if name == "sqlite" {
            format!(
                "INSERT OR REPLACE {} VALUES (2, 0, 'k', 'mallory', 's', '{{}}', 'p', 'h')",
                &cols[7..]
            )
        } else {
            format!(
                "{cols} VALUES (2, 0, 'k', 'mallory', 's', '{{}}', 'p', 'h') ON CONFLICT (seq) DO UPDATE SET actor = 'mallory'"
            )
        };
        let r = sqlx::query(sqlx::AssertSqlSafe(replace))
            .execute(pool)
            .await;
        assert!(r.unwrap_err().to_string().contains("append-only"), "{name}");
        let gap = format!("{cols} VALUES (99, 0, 'k', 'a', 's', '{{}}', 'p', 'h')");
        let r = sqlx::query(sqlx::AssertSqlSafe(gap)).execute(pool).await;
        assert!(r.unwrap_err().to_string().contains("append-only"), "{name}");
        if name == "postgres" {
            let tr = sqlx::query("TRUNCATE audit").execute(pool).await;
            assert!(tr.is_err(), "{name}: truncate must be refused");
        }
        assert!(store.verify_audit().await.unwrap().first_bad.is_none());
        store.close().await;
    }
}

async fn drop_protection(store: &Store, backend: &str) {
    let pool = store.dangerous_raw_pool();
    if backend == "sqlite" {
        sqlx::query("DROP TRIGGER audit_no_update")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("DROP TRIGGER audit_no_delete")
            .execute(pool)
            .await
            .unwrap();
    } else {
        sqlx::query("DROP TRIGGER audit_no_update ON audit")
            .execute(pool)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_edited_deleted_and_reordered_rows() {
    let dir = tempfile::tempdir().unwrap();
    for (name, base_url) in testing::backends(dir.path()).await {
        // Each tampering gets its own database.
        for (i, tamper) in ["edit", "delete", "reorder"].into_iter().enumerate() {
            let url = if name == "sqlite" {
                format!("sqlite://{}", dir.path().join(format!("t{i}.db")).display())
            } else {
                let admin = std::env::var("TEST_DATABASE_URL").unwrap();
                let _ = &base_url;
                testing::fresh_postgres(&admin).await.unwrap()
            };
            let store = seeded(&url, 5).await;
            drop_protection(&store, name).await;
            let pool = store.dangerous_raw_pool();
            let (sql, bad_seq, why): (&str, i64, &str) = match tamper {
                "edit" => (
                    "UPDATE audit SET actor = 'mallory' WHERE seq = 3",
                    3,
                    "edited",
                ),
                "delete" => ("DELETE FROM audit WHERE seq = 3", 4, "sequence jumps"),
                // Swap rows 3 and 4 (below).
                _ => ("", 3, "prev_hash"),
            };
            if tamper == "reorder" {
                // The primary key is checked per row; swap through a free number.
                for s in [
                    "UPDATE audit SET seq = -1 WHERE seq = 3",
                    "UPDATE audit SET seq = 3 WHERE seq = 4",
                    "UPDATE audit SET seq = 4 WHERE seq = -1",
                ] {
                    sqlx::query(s).execute(pool).await.unwrap();
                }
            } else {
                sqlx::query(sql).execute(pool).await.unwrap();
            }
            let report = store.verify_audit().await.unwrap();
            let (seq, reason) = report
                .first_bad
                .clone()
                .unwrap_or_else(|| panic!("{name}/{tamper}: not detected"));
            assert_eq!(seq, bad_seq, "{name}/{tamper}: {reason}");
            assert!(reason.contains(why), "{name}/{tamper}: {reason}");
            store.close().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sqlite_database_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A space, percent-encoded in the URL, as SQLite's own URL parsing expects.
    let db = dir.path().join("new ca.db");
    let url = format!("sqlite://{}", dir.path().join("new%20ca.db").display());
    let store = seeded(&url, 3).await;
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{path} has mode {mode:o}");
    }
    assert_eq!(store.certificate_count().await.unwrap(), 3);
}

#[tokio::test]
async fn bad_urls_are_explained() {
    let e = Store::open("mysql://x").await.unwrap_err().to_string();
    assert!(e.contains("sqlite://") && e.contains("postgres://"), "{e}");
    let e = Store::open("sqlite::memory:")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("file path"), "{e}");
    assert_eq!(
        sigil_store::redact("postgres://u:secret@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(
        sigil_store::redact("postgres://h/db?user=u&password=secret"),
        "postgres://h/db?user=u&password=***"
    );
}

/// On PostgreSQL, makes REPEATABLE READ the database's default for new
/// sessions: the writer must not depend on the server's default isolation.
async fn strict_default_isolation(store: &Store, name: &str) {
    if name != "postgres" {
        return;
    }
    let pool = store.dangerous_raw_pool();
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {db} SET default_transaction_isolation = 'repeatable read'"
    )))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_database_keep_one_chain() {
    // Like the CLI beside a running server, or two nodes on one PostgreSQL:
    // each writer's cached chain head goes stale and must be refreshed.
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        strict_default_isolation(&Store::open(&url).await.unwrap(), name).await;
        let a = seeded(&url, 1).await;
        let b = Store::open(&url).await.unwrap();
        for i in 10..30 {
            let (s, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            s.commit(Change::Issue {
                cert: cert(i),
                token: None,
                renews: None,
                event: event(i),
                completes: None,
            })
            .await
            .unwrap();
            let _ = other;
        }
        // Concurrent bursts from both.
        let mut tasks = Vec::new();
        for i in 100..160 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                s.commit(Change::Issue {
                    cert: cert(i),
                    token: None,
                    renews: None,
                    event: event(i),
                    completes: None,
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let report = a.verify_audit().await.unwrap();
        assert!(report.first_bad.is_none(), "{name}: {:?}", report.first_bad);
        assert_eq!(report.rows, 2 + 20 + 60, "{name}");
        a.close().await;
        b.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_written_change_by_change_follows_another_writer() {
    // A batch holding one bad change is written again one change at a time;
    // another writer appending meanwhile must not fail the good ones.
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        strict_default_isolation(&Store::open(&url).await.unwrap(), name).await;
        let a = seeded(&url, 1).await;
        let b = Store::open(&url).await.unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let appender = {
            let (b, stop) = (b.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    b.commit(Change::Record(event(50_000 + n))).await.unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut good = 0;
        for round in 0..20 {
            let mut tasks = Vec::new();
            for i in 0..6 {
                // cert(1) is stored already: that one must fail, alone.
                let serial = if i == 3 { 1 } else { 1000 + round * 10 + i };
                let s = a.clone();
                tasks.push(tokio::spawn(async move {
                    let r = s
                        .commit(Change::Issue {
                            cert: cert(serial),
                            token: None,
                            renews: None,
                            event: event(serial),
                            completes: None,
                        })
                        .await;
                    (serial, r)
                }));
            }
            for t in tasks {
                match t.await.unwrap() {
                    (1, r) => assert!(
                        matches!(r, Err(sigil_store::Error::Conflict(_))),
                        "{name}: {r:?}"
                    ),
                    (serial, r) => {
                        assert!(r.is_ok(), "{name}: {serial}: {r:?}");
                        good += 1;
                    }
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let appended = appender.await.unwrap();
        assert!(appended > 0, "{name}");
        let report = a.verify_audit().await.unwrap();
        assert!(report.first_bad.is_none(), "{name}: {:?}", report.first_bad);
        assert_eq!(report.rows, (2 + good + appended) as u64, "{name}");
        a.close().await;
        b.close().await;
    }
}

fn spent(jti: &str) -> sigil_store::SpentToken {
    sigil_store::SpentToken {
        jti: jti.into(),
        subject: "web".into(),
        used_at: 5,
        expires_at: 600,
        serial: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_spent_once_even_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 0).await;
        // Two concurrent issuances with the same token: exactly one wins, and
        // the loser leaves neither a certificate nor an audit row behind.
        let mut tasks = Vec::new();
        for i in 1..=2 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.commit(Change::Issue {
                    cert: cert(i),
                    token: Some(spent("jti-1")),
                    renews: None,
                    event: event(i),
                    completes: None,
                })
                .await
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "{name}: {results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(sigil_store::Error::Conflict(_)))),
            "{name}: {results:?}"
        );
        assert!(store.token_spent("jti-1").await.unwrap(), "{name}");
        assert!(!store.token_spent("jti-2").await.unwrap(), "{name}");
        assert_eq!(store.certificate_count().await.unwrap(), 1, "{name}");
        assert_eq!(store.verify_audit().await.unwrap().rows, 2, "{name}");
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_are_recorded_once_and_final() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 2).await;
        let rev = revocation(1);
        store
            .commit(Change::Revoke {
                revocation: rev.clone(),
                event: event(50),
            })
            .await
            .unwrap();
        let again = store
            .commit(Change::Revoke {
                revocation: rev.clone(),
                event: event(51),
            })
            .await;
        assert!(
            matches!(again, Err(sigil_store::Error::Conflict(_))),
            "{name}: {again:?}"
        );
        let got = store.revocation(&rev.serial).await.unwrap().unwrap();
        assert_eq!((got.reason, got.revoked_at), (1, 99), "{name}");
        assert!(store.revocation(&cert(2).serial).await.unwrap().is_none());
        // A serial that was never issued cannot be revoked.
        let unknown = store
            .commit(Change::Revoke {
                revocation: sigil_store::NewRevocation {
                    serial: "ff".into(),
                    ..rev.clone()
                },
                event: event(52),
            })
            .await;
        assert!(unknown.is_err(), "{name}");
        // The database itself refuses to undo a revocation.
        let undo = sqlx::query("DELETE FROM revocations")
            .execute(store.dangerous_raw_pool())
            .await;
        assert!(undo.is_err(), "{name}");
        assert_eq!(
            store.verify_audit().await.unwrap().rows,
            1 + 2 + 1,
            "{name}"
        );
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_numbers_only_grow_across_writers_and_the_newest_crl_wins() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let a = seeded(&url, 0).await;
        let b = Store::open(&url).await.unwrap();
        let id = issuer().id;
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = id.clone();
            tasks.push(tokio::spawn(async move { s.next_crl_number(&id).await }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap().unwrap());
        }
        got.sort();
        assert_eq!(
            got,
            (1..=20).collect::<Vec<i64>>(),
            "{name}: unique and gapless"
        );
        // A batch for the full CRL and its shards continues the sequence.
        assert_eq!(a.next_crl_numbers(&id, 5).await.unwrap(), 21, "{name}");
        assert_eq!(b.next_crl_number(&id).await.unwrap(), 26, "{name}");
        let shard = |k: i64, n: i64| sigil_store::CrlRow {
            issuer_id: id.clone(),
            shard: Some(k),
            number: n,
            this_update: n,
            next_update: n + 10,
            der: vec![k as u8, n as u8],
        };
        a.save_crls(&[shard(0, 30), shard(1, 31)]).await.unwrap();
        b.save_crls(&[shard(1, 29)]).await.unwrap(); // older: ignored
        let shards = b.shard_crls(&id).await.unwrap();
        assert_eq!(
            shards
                .iter()
                .map(|c| (c.shard, c.number))
                .collect::<Vec<_>>(),
            [(Some(0), 30), (Some(1), 31)],
            "{name}"
        );
        assert_eq!(b.shard_crl(&id, 1).await.unwrap().unwrap().der, [1, 31]);
        assert!(b.shard_crl(&id, 2).await.unwrap().is_none());
        assert!(
            a.latest_crl(&id).await.unwrap().is_none(),
            "shards are not the full CRL"
        );
        let crl = |n: i64| sigil_store::CrlRow {
            issuer_id: id.clone(),
            shard: None,
            number: n,
            this_update: n,
            next_update: n + 10,
            der: vec![n as u8],
        };
        a.save_crl(&crl(5)).await.unwrap();
        b.save_crl(&crl(3)).await.unwrap(); // older: ignored
        assert_eq!(
            a.latest_crl(&id).await.unwrap().unwrap().number,
            5,
            "{name}"
        );
        b.save_crl(&crl(7)).await.unwrap();
        assert_eq!(
            a.latest_crl(&id).await.unwrap().unwrap().der,
            vec![7],
            "{name}"
        );
        // The numbers alone, for followers deciding what to fetch.
        assert_eq!(
            b.crl_versions(&id).await.unwrap(),
            [(None, 7), (Some(0), 30), (Some(1), 31)],
            "{name}"
        );
        assert!(b.crl_versions("other").await.unwrap().is_empty());
        a.close().await;
        b.close().await;
    }
}

fn acme_object(id: &str, status: &str, body: &str) -> sigil_store::AcmeObject {
    sigil_store::AcmeObject {
        id: id.into(),
        account_id: "acct1".into(),
        status: status.into(),
        expires_at: 1_000,
        body: body.into(),
        created_at: 1,
    }
}

fn acme_event(kind: &str) -> AuditEvent {
    AuditEvent {
        ts_ms: 1_700_000_000_000,
        kind: kind.into(),
        actor: "acme:acct1".into(),
        subject: "acct1".into(),
        detail: serde_json::json!({}),
    }
}

/// Adds account `acct1` (no EAB), which the ACME objects of these tests name.
async fn with_account(store: &Store) {
    store
        .commit(Change::Acme {
            write: sigil_store::AcmeWrite::NewAccount(sigil_store::AcmeAccount {
                id: "acct1".into(),
                thumbprint: "tp1".into(),
                jwk: "{}".into(),
                status: "valid".into(),
                contact: "[]".into(),
                requester: "acme:acct1".into(),
                eab_kid: None,
                created_at: 1,
            }),
            event: acme_event("acme.account.created"),
        })
        .await
        .unwrap();
}

/// ACME protocol state on every backend: nonces spent once (also when the
/// same nonce arrives twice in one batch), compare-and-set updates, EAB keys
/// binding one account, authorization reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_state_on_every_backend() {
    use sigil_store::{AcmeAccount, AcmeTable, AcmeWrite, EabKey};
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = Store::open(&url).await.unwrap();
        // The shared secret is created once and then returned as stored.
        let s1 = store.acme_secret("k", b"first").await.unwrap();
        let s2 = store.acme_secret("k", b"second").await.unwrap();
        assert_eq!(
            (s1.as_slice(), s2.as_slice()),
            (&b"first"[..], &b"first"[..])
        );

        // Nonces: concurrent spends of the same nonce succeed exactly once.
        let spends: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let nonce = format!("nonce-{}", i % 4);
                    store.acme_spend_nonce(&nonce, 100).await.unwrap()
                })
            })
            .collect();
        let mut accepted = 0;
        for s in spends {
            accepted += usize::from(s.await.unwrap());
        }
        assert_eq!(accepted, 4, "{name}: each of 4 nonces accepted once");
        assert!(!store.acme_spend_nonce("nonce-0", 100).await.unwrap());
        assert_eq!(store.acme_prune_nonces(1_000).await.unwrap(), 4);
        assert!(store.acme_spend_nonce("nonce-0", 100).await.unwrap());

        // Accounts and EAB: a key binds one account.
        store
            .commit(Change::Acme {
                write: AcmeWrite::NewEabKey(EabKey {
                    kid: "kid1".into(),
                    hmac_key: vec![7; 32],
                    requester: "team-a".into(),
                    created_at: 1,
                    account_id: None,
                }),
                event: acme_event("acme.eab.created"),
            })
            .await
            .unwrap();
        let account = |id: &str, tp: &str| AcmeAccount {
            id: id.into(),
            thumbprint: tp.into(),
            jwk: "{}".into(),
            status: "valid".into(),
            contact: "[]".into(),
            requester: "eab:team-a".into(),
            eab_kid: Some("kid1".into()),
            created_at: 1,
        };
        store
            .commit(Change::Acme {
                write: AcmeWrite::NewAccount(account("acct1", "tp1")),
                event: acme_event("acme.account.created"),
            })
            .await
            .unwrap();
        let again = store
            .commit(Change::Acme {
                write: AcmeWrite::NewAccount(account("acct2", "tp2")),
                event: acme_event("acme.account.created"),
            })
            .await;
        assert!(
            matches!(again, Err(sigil_store::Error::Conflict(_))),
            "{name}: {again:?}"
        );
        assert_eq!(
            store
                .acme_eab_key("kid1")
                .await
                .unwrap()
                .unwrap()
                .account_id
                .as_deref(),
            Some("acct1")
        );
        assert_eq!(
            store.acme_account_by_key("tp1").await.unwrap().unwrap().id,
            "acct1"
        );
        assert!(store.acme_account("acct2").await.unwrap().is_none());

        // Account changes are compare-and-set: a change read before a
        // deactivation does not bring the account back.
        let was = account("acct1", "tp1");
        let deactivated = AcmeAccount {
            status: "deactivated".into(),
            ..was.clone()
        };
        store
            .commit(Change::Acme {
                write: AcmeWrite::UpdateAccount {
                    next: deactivated.clone(),
                    was: was.clone(),
                },
                event: acme_event("acme.account.deactivated"),
            })
            .await
            .unwrap();
        let late = store
            .commit(Change::Acme {
                write: AcmeWrite::UpdateAccount {
                    next: AcmeAccount {
                        contact: "[\"mailto:a@example.com\"]".into(),
                        ..was.clone()
                    },
                    was,
                },
                event: acme_event("acme.account.updated"),
            })
            .await;
        assert!(
            matches!(late, Err(sigil_store::Error::Stale(_))),
            "{name}: {late:?}"
        );
        assert_eq!(
            store.acme_account("acct1").await.unwrap().unwrap(),
            deactivated,
            "{name}"
        );

        // Orders and authorizations: insert, compare-and-set, reuse lookup.
        let authz = acme_object("az1", "pending", r#"{"a":1}"#);
        let order = acme_object("or1", "pending", r#"{"o":1}"#);
        store
            .acme_insert_order(
                Some(&order),
                &[(authz.clone(), "dns:a.internal".into())],
                None,
            )
            .await
            .unwrap();
        let valid = acme_object("az1", "valid", r#"{"a":2}"#);
        assert!(
            store
                .acme_update(AcmeTable::Authzs, "pending", &valid)
                .await
                .unwrap()
        );
        assert!(
            !store
                .acme_update(AcmeTable::Authzs, "pending", &valid)
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .acme_object(AcmeTable::Authzs, "az1")
                .await
                .unwrap()
                .unwrap()
                .body,
            r#"{"a":2}"#
        );
        let reuse = store
            .acme_valid_authz("acct1", "dns:a.internal", 500)
            .await
            .unwrap();
        assert_eq!(reuse.map(|a| a.id).as_deref(), Some("az1"));
        assert!(
            store
                .acme_valid_authz("acct1", "dns:a.internal", 1_000)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store
                .acme_authorized_identifiers("acct1", 500)
                .await
                .unwrap(),
            vec!["dns:a.internal".to_string()]
        );
        assert_eq!(
            store.acme_order_ids("acct1", None, 10).await.unwrap(),
            vec!["or1"]
        );
        // Paged newest (greatest id) first, continuing before a cursor.
        for id in ["or2", "or3"] {
            let o = acme_object(id, "pending", "{}");
            store.acme_insert_order(Some(&o), &[], None).await.unwrap();
        }
        assert_eq!(
            store.acme_order_ids("acct1", None, 2).await.unwrap(),
            vec!["or3", "or2"]
        );
        assert_eq!(
            store.acme_order_ids("acct1", Some("or2"), 2).await.unwrap(),
            vec!["or1"]
        );

        // Many at once (a batch or a few): inserts, and two racing
        // compare-and-sets per authorization, of which exactly one wins.
        let inserts: Vec<_> = (0..40)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let a = acme_object(&format!("b-az{i}"), "pending", "{}");
                    let o = acme_object(&format!("b-or{i}"), "pending", "{}");
                    store
                        .acme_insert_order(Some(&o), &[(a, format!("dns:b{i}.internal"))], None)
                        .await
                        .unwrap();
                })
            })
            .collect();
        for t in inserts {
            t.await.unwrap();
        }
        let races: Vec<_> = (0..80)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let to = if i % 2 == 0 { "valid" } else { "invalid" };
                    let next =
                        acme_object(&format!("b-az{}", i / 2), to, &format!("{{\"by\":{i}}}"));
                    let won = store
                        .acme_update(AcmeTable::Authzs, "pending", &next)
                        .await
                        .unwrap();
                    (i, won)
                })
            })
            .collect();
        let mut winners = std::collections::BTreeMap::new();
        for t in races {
            let (i, won) = t.await.unwrap();
            if won {
                assert!(
                    winners.insert(i / 2, i).is_none(),
                    "{name}: two winners for b-az{}",
                    i / 2
                );
            }
        }
        assert_eq!(winners.len(), 40, "{name}: one winner per authorization");
        // What this store serves, and what a second handle reads from the
        // database, is the winner's row.
        let fresh = Store::open(&url).await.unwrap();
        for (n, i) in &winners {
            let id = format!("b-az{n}");
            let want = format!("{{\"by\":{i}}}");
            for (who, s) in [("served", &store), ("stored", &fresh)] {
                let got = s
                    .acme_object(AcmeTable::Authzs, &id)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(got.body, want, "{name} {who}: {id}");
            }
            assert!(
                fresh
                    .acme_object(AcmeTable::Orders, &format!("b-or{n}"))
                    .await
                    .unwrap()
                    .is_some(),
                "{name}: order b-or{n}"
            );
        }

        // Of orders racing to replace one certificate (ARI), on this handle
        // and a second one as another node, exactly one is stored.
        let claim = |failed: Vec<String>| sigil_store::Replacing {
            requester: "eab:team-a".into(),
            cert_id: "AAA.Ab_1".into(),
            now: 500,
            since: 0,
            failed,
        };
        let body = r#"{"replaces":"AAA.Ab_1"}"#;
        let racing: Vec<_> = (0..8)
            .map(|i| {
                let s = if i % 2 == 0 {
                    store.clone()
                } else {
                    fresh.clone()
                };
                tokio::spawn(async move {
                    let a = acme_object(&format!("r-az{i}"), "pending", "{}");
                    let o = acme_object(&format!("r-or{i}"), "pending", body);
                    let stored = s
                        .acme_insert_order(
                            Some(&o),
                            &[(a, format!("dns:r{i}.internal"))],
                            Some(claim(Vec::new())),
                        )
                        .await
                        .unwrap();
                    (i, stored)
                })
            })
            .collect();
        let mut stored = Vec::new();
        for t in racing {
            let (i, ok) = t.await.unwrap();
            if ok {
                stored.push(i);
            }
        }
        assert_eq!(stored.len(), 1, "{name}: stored {stored:?}");
        let winner = format!("r-or{}", stored[0]);
        for i in 0..8 {
            let id = format!("r-or{i}");
            let found = fresh.acme_object(AcmeTable::Orders, &id).await.unwrap();
            assert_eq!(found.is_some(), id == winner, "{name}: {id}");
            // A refused order's authorizations are not stored either.
            let authz = fresh
                .acme_object(AcmeTable::Authzs, &format!("r-az{i}"))
                .await
                .unwrap();
            assert_eq!(authz.is_some(), id == winner, "{name}: r-az{i}");
        }
        // Other ids and other requesters' orders do not count; an order the
        // caller found failed does not either.
        let other = |id: &str, cert_id: &str, requester: &str| {
            (
                acme_object(id, "pending", &format!(r#"{{"replaces":"{cert_id}"}}"#)),
                sigil_store::Replacing {
                    requester: requester.into(),
                    cert_id: cert_id.into(),
                    now: 500,
                    since: 0,
                    failed: Vec::new(),
                },
            )
        };
        for (id, cert_id, requester, want) in [
            ("r-x1", "AAA.Ab_1", "eab:team-a", false),
            ("r-x2", "AAA.ab_1", "eab:team-a", true),
            ("r-x3", "AAA.Ab%1", "eab:team-a", true),
            ("r-x4", "AAA.Ab_1", "eab:team-b", true),
        ] {
            let (o, c) = other(id, cert_id, requester);
            let got = store
                .acme_insert_order(Some(&o), &[], Some(c))
                .await
                .unwrap();
            assert_eq!(got, want, "{name}: {id}");
        }
        let (o, _) = other("r-x5", "AAA.Ab_1", "eab:team-a");
        assert!(
            store
                .acme_insert_order(
                    Some(&o),
                    &[],
                    // r-x4 is an order of acct1 too, stored as live.
                    Some(claim(vec![winner.clone(), "r-x4".into()]))
                )
                .await
                .unwrap(),
            "{name}: after the stored order failed"
        );
        // Only orders made since `since` are looked at again (the caller
        // checked the older ones itself).
        let (o, mut c) = other("r-x6", "AAA.Ab_1", "eab:team-a");
        c.since = 2;
        assert!(
            store
                .acme_insert_order(Some(&o), &[], Some(c))
                .await
                .unwrap(),
            "{name}: older orders are the caller's to check"
        );
        fresh.close().await;

        // The audit chain holds the EAB, account and deactivation rows (not
        // the refused account or the stale change) and still verifies.
        let report = store.verify_audit().await.unwrap();
        assert_eq!(report.rows, 3, "{name}");
        assert!(report.first_bad.is_none(), "{name}: {:?}", report.first_bad);
        store.close().await;
    }
}

/// An issuance and the order it completes commit together: when the order
/// left `processing` first, nothing is issued, and its batch neighbours are
/// not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_issuance_and_the_order_it_completes_commit_together() {
    use sigil_store::{AcmeTable, StateWrite};
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 0).await;
        with_account(&store).await;
        for i in 1..=8 {
            let o = acme_object(&format!("or{i}"), "processing", "{}");
            store.acme_insert_order(Some(&o), &[], None).await.unwrap();
        }
        // Order 3 timed out before its issuance landed.
        let timed_out = acme_object("or3", "invalid", r#"{"error":"late"}"#);
        assert!(
            store
                .acme_update(AcmeTable::Orders, "processing", &timed_out)
                .await
                .unwrap()
        );
        let tasks: Vec<_> = (1..=8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let c = cert(i);
                    let to = acme_object(
                        &format!("or{i}"),
                        "valid",
                        &format!("{{\"certificate\":\"{}\"}}", c.serial),
                    );
                    store
                        .commit(Change::Issue {
                            cert: c,
                            token: None,
                            renews: None,
                            event: event(i),
                            completes: Some(Box::new(StateWrite::Update {
                                table: AcmeTable::Orders,
                                from: "processing".into(),
                                to,
                            })),
                        })
                        .await
                })
            })
            .collect();
        for (i, t) in (1..=8).zip(tasks) {
            let r = t.await.unwrap();
            if i == 3 {
                assert!(
                    matches!(&r, Err(sigil_store::Error::Conflict(m)) if m.contains("or3")),
                    "{name}: {r:?}"
                );
            } else {
                assert!(r.is_ok(), "{name}: order {i}: {r:?}");
            }
        }
        assert_eq!(store.certificate_count().await.unwrap(), 7, "{name}");
        assert!(
            store.certificate(&cert(3).serial).await.unwrap().is_none(),
            "{name}"
        );
        // Issuer, account and seven issuances.
        let report = store.verify_audit().await.unwrap();
        assert_eq!(report.rows, 9, "{name}");
        assert!(report.first_bad.is_none(), "{name}: {:?}", report.first_bad);
        let fresh = Store::open(&url).await.unwrap();
        for (who, s) in [("served", &store), ("stored", &fresh)] {
            for i in 1..=8 {
                let o = s
                    .acme_object(AcmeTable::Orders, &format!("or{i}"))
                    .await
                    .unwrap()
                    .unwrap();
                if i == 3 {
                    assert_eq!(o.status, "invalid", "{name} {who}");
                    assert_eq!(o.body, r#"{"error":"late"}"#, "{name} {who}");
                } else {
                    assert_eq!(o.status, "valid", "{name} {who}: or{i}");
                    assert!(o.body.contains(&cert(i).serial), "{name} {who}: or{i}");
                }
            }
        }
        fresh.close().await;
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_lifecycle_steps_only_from_the_right_state() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 3).await;
        let old = issuer().id;
        let next = NewIssuer {
            id: "ffeeddccbbaa99887766554433221100".into(),
            subject: "CN=Next".into(),
            installed_at: 5,
            key_ref: Some("intermediate-ffee.key".into()),
            ..issuer()
        };
        let step = |change: IssuerChange| Change::Issuer {
            change,
            event: event(100),
        };
        let state = |id: String| {
            let store = store.clone();
            async move { store.issuer(&id).await.unwrap().unwrap().state }
        };
        // Out of order: nothing staged yet.
        let early = store
            .commit(step(IssuerChange::Activate {
                id: next.id.clone(),
                at: 6,
            }))
            .await;
        assert!(
            matches!(early, Err(sigil_store::Error::Conflict(_))),
            "{name}: {early:?}"
        );
        store
            .commit(step(IssuerChange::Stage(next.clone())))
            .await
            .unwrap();
        assert_eq!(state(next.id.clone()).await, IssuerState::Staged, "{name}");
        assert_eq!(state(old.clone()).await, IssuerState::Active, "{name}");
        // The active issuer cannot be staged again.
        let restage = store.commit(step(IssuerChange::Stage(issuer()))).await;
        assert!(
            matches!(restage, Err(sigil_store::Error::Conflict(_))),
            "{name}: {restage:?}"
        );
        store
            .commit(step(IssuerChange::Schedule {
                id: next.id.clone(),
                at: 50,
            }))
            .await
            .unwrap();
        let row = store.issuer(&next.id).await.unwrap().unwrap();
        assert_eq!(row.activate_at, Some(50), "{name}");
        assert_eq!(row.key_ref.as_deref(), Some("intermediate-ffee.key"));
        store
            .commit(step(IssuerChange::Activate {
                id: next.id.clone(),
                at: 50,
            }))
            .await
            .unwrap();
        assert_eq!(state(next.id.clone()).await, IssuerState::Active, "{name}");
        assert_eq!(state(old.clone()).await, IssuerState::Previous, "{name}");
        let row = store.issuer(&next.id).await.unwrap().unwrap();
        assert_eq!(
            (row.activate_at, row.changed_at),
            (None, Some(50)),
            "{name}"
        );
        // A second activation (another node) loses the compare-and-set.
        let again = store
            .commit(step(IssuerChange::Activate {
                id: next.id.clone(),
                at: 51,
            }))
            .await;
        assert!(
            matches!(again, Err(sigil_store::Error::Conflict(_))),
            "{name}: {again:?}"
        );
        // Only a previous issuer retires.
        let wrong = store
            .commit(step(IssuerChange::Retire {
                id: next.id.clone(),
                at: 60,
            }))
            .await;
        assert!(
            matches!(wrong, Err(sigil_store::Error::Conflict(_))),
            "{name}: {wrong:?}"
        );
        assert!(
            store.issuer_has_unexpired(&old, 19).await.unwrap(),
            "{name}"
        );
        assert!(
            !store.issuer_has_unexpired(&old, 20).await.unwrap(),
            "{name}"
        );
        store
            .commit(step(IssuerChange::Retire {
                id: old.clone(),
                at: 60,
            }))
            .await
            .unwrap();
        assert_eq!(state(old.clone()).await, IssuerState::Retired, "{name}");
        let active: Vec<_> = store
            .issuers()
            .await
            .unwrap()
            .into_iter()
            .filter(|i| i.state == IssuerState::Active)
            .collect();
        assert_eq!(active.len(), 1, "{name}");
        assert!(
            store.verify_audit().await.unwrap().first_bad.is_none(),
            "{name}"
        );
        store.close().await;
    }
}

/// `cross_check_records` on every backend: a clean database passes; a
/// certificate edited, deleted or inserted behind the CA's back, a second
/// issuance row for one certificate, and a revocation inserted, deleted or
/// pointed at another audit row are each named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cross_check_names_rows_changed_behind_the_ca() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = Store::open(&url).await.unwrap();
        store
            .commit(Change::Issuer {
                change: IssuerChange::Install(issuer()),
                event: AuditEvent {
                    kind: "issuer.installed".into(),
                    ..event(0)
                },
            })
            .await
            .unwrap();
        for i in 1..=6 {
            let c = NewCertificate {
                der: vec![0x30, 0x01, i as u8],
                ..cert(i)
            };
            let sha = hex::encode(sha2::Sha256::digest(&c.der));
            store
                .commit(Change::Issue {
                    event: AuditEvent {
                        kind: "cert.issued".into(),
                        subject: c.serial.clone(),
                        detail: serde_json::json!({ "sha256": sha }),
                        ..event(i)
                    },
                    cert: c,
                    token: None,
                    renews: None,
                    completes: None,
                })
                .await
                .unwrap();
        }
        for i in [4, 5, 6] {
            store
                .commit(Change::Revoke {
                    revocation: revocation(i),
                    event: AuditEvent {
                        kind: "cert.revoked".into(),
                        subject: cert(i).serial,
                        ..event(10 + i)
                    },
                })
                .await
                .unwrap();
        }
        let clean = store.cross_check_records().await.unwrap();
        assert_eq!(
            (clean.certificates, clean.revocations, clean.problem_count),
            (6, 3, 0),
            "{name}: {:?}",
            clean.problems
        );

        let pool = store.dangerous_raw_pool();
        sqlx::query("UPDATE certificates SET der = $1 WHERE serial = $2")
            .bind(vec![0x30u8, 0x01, 0x7f])
            .bind(cert(1).serial)
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM certificates WHERE serial = $1")
            .bind(cert(2).serial)
            .execute(pool)
            .await
            .unwrap();
        // The revoked certificate made to look expired, so CRLs leave it out.
        sqlx::query("UPDATE certificates SET not_after = 0 WHERE serial = $1")
            .bind(cert(4).serial)
            .execute(pool)
            .await
            .unwrap();
        let forged = cert(9);
        sqlx::query(
            "INSERT INTO certificates (serial, issuer_id, profile, requester, names, \
             key_fingerprint, not_before, not_after, issued_at, der) \
             VALUES ($1, $2, 'mtls', 'operator:mallory', '[]', 'fp', 0, 20, 1, $3)",
        )
        .bind(forged.serial.as_str())
        .bind(forged.issuer_id.as_str())
        .bind(vec![0x30u8, 0x00])
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO revocations (serial, issuer_id, reason, revoked_at, revoked_by, audit_seq) \
             VALUES ($1, $2, 1, 99, 'operator:mallory', 1)",
        )
        .bind(cert(3).serial)
        .bind(issuer().id)
        .execute(pool)
        .await
        .unwrap();
        // Whoever edits the tables directly can drop the triggers that keep
        // revocations final.
        let drops: &[&str] = match store.backend() {
            sigil_store::Backend::Sqlite => &[
                "DROP TRIGGER revocations_final_update",
                "DROP TRIGGER revocations_final_delete",
                "DROP TRIGGER blocked_keys_final_delete",
            ],
            sigil_store::Backend::Postgres => &[
                "DROP TRIGGER revocations_final ON revocations",
                "DROP TRIGGER blocked_keys_final ON blocked_keys",
            ],
        };
        for sql in drops {
            sqlx::query(sqlx::AssertSqlSafe(*sql))
                .execute(pool)
                .await
                .unwrap();
        }
        // A revocation deleted, so the certificate looks valid again.
        sqlx::query("DELETE FROM revocations WHERE serial = $1")
            .bind(cert(5).serial)
            .execute(pool)
            .await
            .unwrap();
        // A revocation pointed at another audit row.
        sqlx::query("UPDATE revocations SET audit_seq = 2 WHERE serial = $1")
            .bind(cert(6).serial)
            .execute(pool)
            .await
            .unwrap();
        // A revocation's reason and time edited (keyCompromise made a
        // routine supersession).
        sqlx::query("UPDATE revocations SET reason = 4, revoked_at = 98 WHERE serial = $1")
            .bind(cert(4).serial)
            .execute(pool)
            .await
            .unwrap();
        // A compromised key's block deleted: it could be certified again.
        sqlx::query("DELETE FROM blocked_keys WHERE fingerprint = $1")
            .bind(cert(6).key_fingerprint)
            .execute(pool)
            .await
            .unwrap();
        // A second issuance row for one certificate (its latest is the one
        // checked: it records no digest, so only its presence counts).
        store
            .commit(Change::Record(AuditEvent {
                kind: "cert.renewed".into(),
                subject: cert(3).serial,
                ..event(30)
            }))
            .await
            .unwrap();

        let report = store.cross_check_records().await.unwrap();
        let text = report.problems.join("\n");
        assert_eq!(report.problem_count, 11, "{name}:\n{text}");
        assert_eq!(
            (report.certificates, report.revocations),
            (6, 3),
            "{name}:\n{text}"
        );
        for (serial, why) in [
            (cert(1).serial, "SHA-256 differs"),
            (cert(4).serial, "expiry, issuer, names or CRL shard edited"),
            (cert(2).serial, "no longer in the certificates table"),
            (forged.serial, "no issuance row"),
            (cert(3).serial, "no cert.revoked audit row"),
            (cert(3).serial, "both record issuing"),
            (cert(5).serial, "the revocation row is gone"),
            (cert(6).serial, "points at audit row 2, but row"),
            (cert(4).serial, "reason, time or revoker edited"),
            (cert(6).serial, "its key is not blocked"),
            // The forged keyCompromise revocation blocked nothing either.
            (cert(3).serial, "its key is not blocked"),
        ] {
            assert!(
                report
                    .problems
                    .iter()
                    .any(|p| p.contains(&serial) && p.contains(why)),
                "{name}: {serial} / {why}:\n{text}"
            );
        }
        store.close().await;
    }
}

/// A TCP relay to PostgreSQL. Armed, it passes the next COMMIT on, waits for
/// the server's reply, and drops the connection instead of relaying it: the
/// client cannot tell whether its transaction landed. Down, it drops every
/// connection as soon as either side sends.
struct CommitCutter {
    url: String,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Go down at the next cut, before the COMMIT goes on.
    down_at_cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CommitCutter {
    async fn start(url: &str) -> CommitCutter {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let (scheme, rest) = url.split_once("://").unwrap();
        let (user, rest) = rest.split_once('@').unwrap();
        let (hostport, path) = rest.split_once('/').unwrap();
        let upstream = tokio::net::lookup_host(hostport)
            .await
            .unwrap()
            .next()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let down_at_cut = Arc::new(AtomicBool::new(false));
        let (a, d, dc) = (armed.clone(), down.clone(), down_at_cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(server) = tokio::net::TcpStream::connect(upstream).await {
                    let flags = Flags {
                        armed: a.clone(),
                        down: d.clone(),
                        down_at_cut: dc.clone(),
                    };
                    tokio::spawn(relay(client, server, flags));
                }
            }
        });
        let sep = if path.contains('?') { '&' } else { '?' };
        CommitCutter {
            url: format!("{scheme}://{user}@{addr}/{path}{sep}sslmode=disable"),
            armed,
            down,
            down_at_cut,
        }
    }
}

/// A relay's view of its [`CommitCutter`]'s switches.
struct Flags {
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    down_at_cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn relay(client: tokio::net::TcpStream, server: tokio::net::TcpStream, flags: Flags) {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Flags {
        armed,
        down,
        down_at_cut,
    } = flags;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let cut = std::sync::Arc::new(AtomicBool::new(false));
    let (cut2, down2) = (cut.clone(), down.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n @ 1..) = sr.read(&mut buf).await {
            if cut2.load(SeqCst) || down2.load(SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 65536];
    while let Ok(n @ 1..) = cr.read(&mut buf).await {
        let commit = buf[..n].windows(7).any(|w| w == b"COMMIT\0");
        if commit && armed.swap(false, SeqCst) {
            // Cut before the server can answer, then let the COMMIT through.
            cut.store(true, SeqCst);
            if down_at_cut.swap(false, SeqCst) {
                down.store(true, SeqCst);
            }
            let _ = sw.write_all(&buf[..n]).await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            return;
        }
        if down.load(SeqCst) || sw.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A COMMIT whose reply is lost after the server committed is reported as
/// landed, not run again: no duplicate-serial error for an issuance that is
/// stored, no second audit row for a record. When the database cannot be
/// asked, the caller hears that the outcome is unknown, and nothing is rerun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_is_lost_is_neither_repeated_nor_reported_failed() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let Some((_, url)) = testing::backends(dir.path())
        .await
        .into_iter()
        .find(|(name, _)| *name == "postgres")
    else {
        return;
    };
    let cutter = CommitCutter::start(&url).await;
    let store = Store::open(&cutter.url).await.unwrap();
    store
        .commit(Change::Issuer {
            change: IssuerChange::Install(issuer()),
            event: event(0),
        })
        .await
        .unwrap();

    cutter.armed.store(true, SeqCst);
    let issued = store
        .commit(Change::Issue {
            cert: cert(1),
            token: None,
            renews: None,
            event: event(1),
            completes: None,
        })
        .await;
    assert!(!cutter.armed.load(SeqCst), "the COMMIT was not cut");
    assert_eq!(issued.unwrap().seq, 2);

    cutter.armed.store(true, SeqCst);
    let recorded = store.commit(Change::Record(event(2))).await;
    assert_eq!(recorded.unwrap().seq, 3);

    // The commit lands, and the database then cannot be reached.
    cutter.down_at_cut.store(true, SeqCst);
    cutter.armed.store(true, SeqCst);
    let unknown = store.commit(Change::Record(event(3))).await;
    assert!(cutter.down.load(SeqCst), "the COMMIT was not cut");
    assert!(
        matches!(unknown, Err(sigil_store::Error::Uncertain(_))),
        "{unknown:?}"
    );
    cutter.down.store(false, SeqCst);

    let report = store.verify_audit().await.unwrap();
    assert_eq!(report.rows, 4, "each change is in the chain once");
    assert!(report.first_bad.is_none(), "{:?}", report.first_bad);
    assert_eq!(store.certificate_count().await.unwrap(), 1);
    store.close().await;
}

/// A CRL snapshot's list and numbers go together. On PostgreSQL, a snapshot
/// taken while another node holds the issuer's numbering waits for it, and
/// then lists what was revoked meanwhile, under the higher number: a CRL
/// numbered later never lists less.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crl_snapshot_numbered_later_lists_what_was_revoked_meanwhile() {
    let serials = |s: &sigil_store::CrlSnapshot| -> Vec<String> {
        s.entries.iter().map(|e| e.serial.clone()).collect()
    };
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let a = seeded(&url, 3).await;
        let id = issuer().id;
        let revoke = |i: usize| {
            a.commit(Change::Revoke {
                revocation: revocation(i),
                event: event(10 + i),
            })
        };
        revoke(1).await.unwrap();
        let s = a.crl_snapshot(&id, 0, 2, 4).await.unwrap();
        assert_eq!((s.first_number, s.shards), (1, 2), "{name}");
        assert_eq!(serials(&s), [cert(1).serial], "{name}");
        // Expired before `not_after_min`: not listed.
        assert!(
            a.crl_snapshot(&id, 20, 0, 4)
                .await
                .unwrap()
                .entries
                .is_empty()
        );
        if name != "postgres" {
            continue;
        }
        // Another node in the middle of its snapshot.
        let mut other = a.dangerous_raw_pool().begin().await.unwrap();
        sqlx::query("SELECT last FROM crl_numbers WHERE issuer_id = $1 FOR UPDATE")
            .bind(&id)
            .fetch_one(&mut *other)
            .await
            .unwrap();
        let b = Store::open(&url).await.unwrap();
        let waiting = tokio::spawn({
            let (b, id) = (b.clone(), id.clone());
            async move { b.crl_snapshot(&id, 0, 0, 4).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "waits for the other node");
        revoke(2).await.unwrap();
        sqlx::query("UPDATE crl_numbers SET last = last + 1 WHERE issuer_id = $1")
            .bind(&id)
            .execute(&mut *other)
            .await
            .unwrap();
        other.commit().await.unwrap();
        let s = waiting.await.unwrap().unwrap();
        assert_eq!(
            s.first_number,
            3 + 1 + 1 + 1,
            "after the other node's number"
        );
        assert_eq!(serials(&s), [cert(1).serial, cert(2).serial]);
        b.close().await;
        a.close().await;
    }
}

/// Snapshots taken while revocations commit, from two handles at once:
/// ordered by number, each lists everything the one before it listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_crl_snapshots_never_list_less_under_a_higher_number() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        const N: usize = 120;
        let a = seeded(&url, N).await;
        let b = if name == "postgres" {
            Store::open(&url).await.unwrap()
        } else {
            a.clone()
        };
        let id = issuer().id;
        let mut tasks = Vec::new();
        for i in 1..=N {
            let writer = a.clone();
            tasks.push(tokio::spawn(async move {
                writer
                    .commit(Change::Revoke {
                        revocation: revocation(i),
                        event: event(100 + i),
                    })
                    .await
                    .unwrap();
                None
            }));
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                Some(s.crl_snapshot(&id, 0, 0, 4).await.unwrap())
            }));
        }
        let mut snaps = Vec::new();
        for t in tasks {
            if let Some(s) = t.await.unwrap() {
                snaps.push(s);
            }
        }
        snaps.sort_by_key(|s| s.first_number);
        let listed = |s: &sigil_store::CrlSnapshot| -> std::collections::BTreeSet<String> {
            s.entries.iter().map(|e| e.serial.clone()).collect()
        };
        for w in snaps.windows(2) {
            assert!(
                listed(&w[0]).is_subset(&listed(&w[1])),
                "{name}: CRL {} lists what {} does not",
                w[0].first_number,
                w[1].first_number
            );
        }
        let last = a.crl_snapshot(&id, 0, 0, 4).await.unwrap();
        assert_eq!(last.entries.len(), N, "{name}");
        if name == "postgres" {
            b.close().await;
        }
        a.close().await;
    }
}

/// The retention pass: only rows that expired before the cutoff go, in
/// batches of the size asked for; certificates and the audit chain stay;
/// a deleted order is not served from the object cache afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_go_in_batches_and_nothing_else_does() {
    use sigil_store::{AcmeTable, Expired, SignedOcsp, SpentToken};
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 0).await;
        with_account(&store).await;
        // Cutoff 500. Five orders and authorizations expired at 100; one of
        // each made at 10 but alive until 1000 (a long reuse window), and one
        // of each made at 600.
        let object = |id: String, created_at: i64, expires_at: i64| sigil_store::AcmeObject {
            created_at,
            expires_at,
            ..acme_object(&id, "valid", "{}")
        };
        let mut made = Vec::new();
        for (i, (created, expires)) in [(10, 100); 5]
            .into_iter()
            .chain([(10, 1000), (600, 1000)])
            .enumerate()
        {
            let authz = object(format!("a{i}"), created, expires);
            let order = object(format!("o{i}"), created, expires);
            store
                .acme_insert_order(Some(&order), &[(authz, format!("dns:h{i}.internal"))], None)
                .await
                .unwrap();
            made.push(i);
        }
        // Finalized replacements, expired at 100: one from before
        // `replaced_until` was recorded (kept), one with it (deleted).
        for (id, body) in [
            ("o-legacy", r#"{"replaces":"aki.serial"}"#),
            ("o-ari", r#"{"replaces":"aki.serial","replaced_until":100}"#),
        ] {
            let o = sigil_store::AcmeObject {
                created_at: 10,
                expires_at: 100,
                ..acme_object(id, "valid", body)
            };
            store.acme_insert_order(Some(&o), &[], None).await.unwrap();
        }
        // Tokens spent on certificates: two expired at 100, one at 1000.
        for (i, expires_at) in [(1, 100), (2, 100), (3, 1000)] {
            store
                .commit(Change::Issue {
                    cert: cert(i),
                    token: Some(SpentToken {
                        expires_at,
                        serial: Some(cert(i).serial),
                        ..spent(&format!("jti-{i}"))
                    }),
                    renews: None,
                    event: event(i),
                    completes: None,
                })
                .await
                .unwrap();
        }
        let ocsp = |i: usize, next_update: i64, certs: &str| SignedOcsp {
            serial: cert(i).serial,
            issuer_id: issuer().id,
            this_update: next_update - 50,
            next_update,
            der: vec![0x30, 0x03, 0x0a, 0x01, 0x00],
            certs: Some(certs.to_string()),
            stored_at: next_update - 50,
        };
        let certs = |digest: &str| sigil_store::OcspCerts {
            digest: digest.to_string(),
            der: vec![0xa0, 0x00],
        };
        // Responder certificates: "a" last used at 350 by answers that
        // expire, "b" at 950, and "c" never.
        store
            .save_ocsp(&[ocsp(1, 100, "a"), ocsp(2, 400, "a")], &[certs("a")])
            .await
            .unwrap();
        store
            .save_ocsp(&[ocsp(3, 1000, "b")], &[certs("b")])
            .await
            .unwrap();
        store.save_ocsp(&[], &[certs("c")]).await.unwrap();
        // Whole answers left in the legacy table by an earlier version: two
        // expired, one not.
        sqlx::any::install_default_drivers();
        let mut raw = sqlx::AnyConnection::connect(&url).await.unwrap();
        for (i, next_update) in [(1, 100), (2, 400), (3, 1000)] {
            sqlx::query(
                "INSERT INTO ocsp_responses (serial, issuer_id, this_update, next_update, der, stored_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(cert(i).serial)
            .bind(issuer().id)
            .bind(next_update - 50)
            .bind(next_update)
            .bind(vec![0x30_u8, 0x03, 0x0a, 0x01, 0x00])
            .bind(next_update - 50)
            .execute(&mut raw)
            .await
            .unwrap();
        }

        // Batches of two: 6 orders take four statements, the last one empty;
        // 5 authorizations three, the last one short.
        let mut drained = Vec::new();
        for what in Expired::ALL {
            let mut batches = Vec::new();
            loop {
                let n = store.delete_expired(what, 500, 2).await.unwrap();
                batches.push(n);
                if n < 2 {
                    break;
                }
            }
            drained.push((what.table(), batches));
        }
        assert_eq!(
            drained,
            [
                ("acme_orders", vec![2, 2, 2, 0]),
                ("acme_authzs", vec![2, 2, 1]),
                ("used_tokens", vec![2, 0]),
                ("ocsp_responses", vec![2, 0]),
                ("ocsp_answers", vec![2, 0]),
                ("ocsp_certs", vec![2, 0]),
            ],
            "{name}"
        );
        for i in made {
            for (table, id) in [
                (AcmeTable::Orders, format!("o{i}")),
                (AcmeTable::Authzs, format!("a{i}")),
            ] {
                let kept = store.acme_object(table, &id).await.unwrap().is_some();
                assert_eq!(kept, i >= 5, "{name}: {id} kept: {kept}");
            }
        }
        for (id, kept) in [("o-legacy", true), ("o-ari", false)] {
            let got = store.acme_object(AcmeTable::Orders, id).await.unwrap();
            assert_eq!(got.is_some(), kept, "{name}: {id}");
        }
        assert!(!store.token_spent("jti-1").await.unwrap(), "{name}");
        assert!(!store.token_spent("jti-2").await.unwrap(), "{name}");
        assert!(store.token_spent("jti-3").await.unwrap(), "{name}");
        let mut left = Vec::new();
        store
            .stored_ocsp(&issuer().id, 0, 0, |r| left.push(r.serial))
            .await
            .unwrap();
        assert_eq!(left, [cert(3).serial], "{name}");
        let kept: Vec<String> = (store.ocsp_certs(-1).await.unwrap())
            .into_iter()
            .map(|c| c.digest)
            .collect();
        assert_eq!(kept, ["b"], "{name}");
        let legacy_left: Vec<String> = sqlx::query_scalar("SELECT serial FROM ocsp_responses")
            .fetch_all(&mut raw)
            .await
            .unwrap();
        assert_eq!(legacy_left, [cert(3).serial], "{name}");
        raw.close().await.unwrap();
        // Nothing else was touched.
        assert_eq!(store.certificate_count().await.unwrap(), 3, "{name}");
        let report = store.verify_audit().await.unwrap();
        assert!(report.first_bad.is_none(), "{name}: {:?}", report.first_bad);
        assert_eq!(report.rows, 1 + 1 + 3, "{name}");
        assert!(store.acme_account("acct1").await.unwrap().is_some());
        store.close().await;
    }
}

/// Pre-signed OCSP responses on every backend: saved many to a statement,
/// streamed back (only those valid past the cutoff and stored after the
/// given time, however old their thisUpdate), and never replaced by an
/// older response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsp_responses_are_saved_in_batches_and_only_newer_ones_replace_them() {
    use sigil_store::SignedOcsp;
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 0).await;
        let response = |i: usize, this_update: i64, stored_at: i64| SignedOcsp {
            serial: cert(i).serial,
            issuer_id: issuer().id,
            this_update,
            next_update: this_update + 3600,
            der: vec![0x30, 0x01, u8::try_from(this_update % 250).unwrap()],
            certs: i.is_multiple_of(2).then(|| {
                "3348d235677271cdc737f6786340c5c4d735c352ba3b52ea8f5a518bb14ed051".to_string()
            }),
            stored_at,
        };
        let certs = sigil_store::OcspCerts::new(vec![0xa0, 0x02, 0x30, 0x00]);
        assert_eq!(
            certs.digest,
            "3348d235677271cdc737f6786340c5c4d735c352ba3b52ea8f5a518bb14ed051"
        );
        // 70 rows: two full statements and a short one.
        let first: Vec<SignedOcsp> = (1..=70).map(|i| response(i, 1000, 1000)).collect();
        store
            .save_ocsp(&first, std::slice::from_ref(&certs))
            .await
            .unwrap();
        // An older response for 1, a newer one for 2, and a new certificate
        // whose response was signed with the first ones and stored later.
        store
            .save_ocsp(
                &[
                    response(1, 900, 1200),
                    response(2, 1100, 1200),
                    response(71, 1000, 1200),
                ],
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            store.ocsp_certs(999).await.unwrap(),
            std::slice::from_ref(&certs),
            "{name}"
        );
        let mut all = std::collections::BTreeMap::new();
        store
            .stored_ocsp(&issuer().id, 0, 0, |r| {
                assert_eq!(
                    r.certs.is_some(),
                    usize::from_str_radix(&r.serial, 16).unwrap() % 2 == 0,
                    "{name}"
                );
                all.insert(r.serial.clone(), (r.this_update, r.der));
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 71, "{name}");
        assert_eq!(all[&cert(71).serial].0, 1000, "{name}");
        assert_eq!(all[&cert(1).serial], (1000, vec![0x30, 0x01, 0]), "{name}");
        assert_eq!(
            all[&cert(2).serial],
            (1100, vec![0x30, 0x01, 100]),
            "{name}"
        );
        assert_eq!(all[&cert(70).serial].0, 1000, "{name}");

        // Only those stored after 1000 (the older response for 1 was not),
        // and only those valid past 4650.
        let mut newer = Vec::new();
        store
            .stored_ocsp(&issuer().id, 0, 1000, |r| {
                newer.push((r.serial, r.stored_at))
            })
            .await
            .unwrap();
        newer.sort();
        assert_eq!(
            newer,
            [(cert(2).serial, 1200), (cert(71).serial, 1200)],
            "{name}"
        );
        let mut later = 0;
        store
            .stored_ocsp(&issuer().id, 4650, -1, |_| later += 1)
            .await
            .unwrap();
        assert_eq!(later, 1, "{name}");
        // Named again later: marked used then (and never back).
        assert!(store.ocsp_certs(1000).await.unwrap().is_empty(), "{name}");
        store
            .save_ocsp(&[response(4, 1300, 1300)], std::slice::from_ref(&certs))
            .await
            .unwrap();
        store
            .save_ocsp(&[response(6, 1300, 1250)], std::slice::from_ref(&certs))
            .await
            .unwrap();
        assert_eq!(store.ocsp_certs(1299).await.unwrap().len(), 1, "{name}");
        assert!(store.ocsp_certs(1300).await.unwrap().is_empty(), "{name}");
        store.close().await;
    }
}

/// Requests are checked against revocations when they arrive; one committed
/// between that check and the issuance's own commit still stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_committed_since_the_request_was_checked_stops_its_issuance() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in testing::backends(dir.path()).await {
        let store = seeded(&url, 2).await;
        store
            .commit(Change::Revoke {
                revocation: revocation(1),
                event: event(50),
            })
            .await
            .unwrap();
        store
            .commit(Change::Revoke {
                revocation: sigil_store::NewRevocation {
                    reason: 4,
                    block_key: None,
                    ..revocation(2)
                },
                event: event(51),
            })
            .await
            .unwrap();
        let issue = |i: usize, key: &str, renews: Option<usize>| Change::Issue {
            cert: NewCertificate {
                key_fingerprint: key.into(),
                ..cert(i)
            },
            token: None,
            renews: renews.map(|r| cert(r).serial),
            event: event(i),
            completes: None,
        };
        // Alone, and batched with issuances that go through.
        let mut handles = Vec::new();
        for change in [
            issue(3, "fp1", None),
            issue(4, "fp4", None),
            issue(5, "fp2", Some(2)),
            issue(6, "fp6", Some(1)),
            issue(7, "fp7", None),
        ] {
            let s = store.clone();
            handles.push(tokio::spawn(async move { s.commit(change).await }));
        }
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.unwrap());
        }
        assert!(
            matches!(&results[0], Err(sigil_store::Error::KeyBlocked(fp)) if fp == "fp1"),
            "{name}: {:?}",
            results[0]
        );
        assert!(results[1].is_ok(), "{name}: {:?}", results[1]);
        for (i, r) in [(5, 2), (6, 1)] {
            let got = &results[i - 3];
            assert!(
                matches!(got, Err(sigil_store::Error::Revoked(s)) if *s == cert(r).serial),
                "{name}: {got:?}"
            );
        }
        assert!(results[4].is_ok(), "{name}: {:?}", results[4]);
        // Only the two that went through are stored, with their audit rows.
        assert_eq!(store.certificate_count().await.unwrap(), 4, "{name}");
        for i in [3, 5, 6] {
            assert!(
                store.certificate(&cert(i).serial).await.unwrap().is_none(),
                "{name}: {i}"
            );
        }
        let report = store.verify_audit().await.unwrap();
        assert_eq!(report.rows, 1 + 2 + 2 + 2, "{name}");
        assert!(report.first_bad.is_none(), "{name}");
        store.close().await;
    }
}
