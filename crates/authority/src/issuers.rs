//! Issuing CAs over time: which one issues, which ones still answer for the
//! certificates they issued, and the audited steps of a rotation
//! (stage → schedule or activate → previous → retired).

use crate::{ActiveIssuer, Authority, Error, unix_ms};
use serde_json::json;
use sigil_core::IssuerInfo;
use sigil_signer::CaKey;
use sigil_store::{
    AuditEvent, AuditReceipt, CertificateRow, Change, IssuerChange, IssuerRow, IssuerState, Store,
};
use std::collections::HashMap;
use std::sync::Arc;
use time::OffsetDateTime;

/// How long after its last certificate expires a previous issuer keeps
/// publishing (revoked entries stay on CRLs this long past expiry too).
pub const RETIRE_GRACE_SECS: i64 = 3600;

/// Finds the private key of a stored issuer. The binary implements it (key
/// files, passphrases); the authority only asks when an issuer appears.
pub trait IssuerKeys: Send + Sync {
    /// Loads the key of `issuer`.
    fn load(&self, issuer: &IssuerRow) -> Result<CaKey, Error>;

    /// Encrypts a key (PKCS#8) so that it can be kept in the database and
    /// opened by every node holding the same secrets (the shared OCSP
    /// responder key). `None`: this store cannot seal keys.
    fn seal(&self, _pkcs8: &[u8]) -> Option<Result<Vec<u8>, Error>> {
        None
    }

    /// Opens a key sealed by [`IssuerKeys::seal`].
    fn unseal(&self, _sealed: &[u8]) -> Result<CaKey, Error> {
        Err(Error::Unavailable(
            "this node cannot open sealed keys".into(),
        ))
    }
}

/// The issuers this node holds keys for, by state.
#[derive(Debug, Clone)]
pub(crate) struct IssuerSet {
    pub(crate) active: Arc<ActiveIssuer>,
    /// Every loaded issuer (the active one too) with its state.
    pub(crate) all: Vec<(IssuerState, Arc<ActiveIssuer>)>,
}

impl IssuerSet {
    pub(crate) fn single(active: ActiveIssuer) -> IssuerSet {
        let active = Arc::new(active);
        IssuerSet {
            all: vec![(IssuerState::Active, active.clone())],
            active,
        }
    }

    fn states(&self) -> Vec<(String, IssuerState)> {
        let mut v: Vec<_> = self
            .all
            .iter()
            .map(|(s, i)| (i.info().id.to_string(), *s))
            .collect();
        v.sort();
        v
    }
}

/// The (id, state) pairs of stored issuers this node should hold.
fn wanted(rows: &[IssuerRow]) -> Vec<(String, IssuerState)> {
    let mut v: Vec<_> = rows
        .iter()
        .filter(|r| r.state != IssuerState::Retired)
        .map(|r| (r.id.clone(), r.state))
        .collect();
    v.sort();
    v
}

/// What a lifecycle step is about, for its audit record.
fn event(
    kind: &str,
    actor: &str,
    subject: &str,
    now: OffsetDateTime,
    detail: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        ts_ms: unix_ms(now),
        kind: kind.into(),
        actor: actor.to_string(),
        subject: subject.to_string(),
        detail,
    }
}

/// Maps a lost compare-and-set to the operator's explanation.
fn out_of_order(e: sigil_store::Error, what: String) -> Error {
    match e {
        sigil_store::Error::Conflict(_) => Error::Rotation(what),
        other => Error::Store(other),
    }
}

fn new_issuer(
    info: &IssuerInfo,
    key_ref: Option<String>,
    now: OffsetDateTime,
) -> sigil_store::NewIssuer {
    sigil_store::NewIssuer {
        id: info.id.to_string(),
        cert_der: info.der.clone(),
        subject: info.subject.clone(),
        not_before: info.not_before.unix_timestamp(),
        not_after: info.not_after.unix_timestamp(),
        installed_at: now.unix_timestamp(),
        key_ref,
    }
}

fn cert_detail(info: &IssuerInfo) -> serde_json::Value {
    json!({
        "subject": info.subject,
        "issuer": info.issuer,
        "not_after": info.not_after.unix_timestamp(),
        "sha256": sigil_core::sha256_hex(&info.der),
    })
}

/// Installs an issuer that takes over issuance at once (the first
/// intermediate); an active one becomes previous. Audited `issuer.installed`.
pub async fn install(
    store: &Store,
    info: &IssuerInfo,
    key_ref: Option<String>,
    actor: &str,
    now: OffsetDateTime,
) -> Result<AuditReceipt, Error> {
    Ok(store
        .commit(Change::Issuer {
            change: IssuerChange::Install(new_issuer(info, key_ref, now)),
            event: event(
                "issuer.installed",
                actor,
                info.id.as_str(),
                now,
                cert_detail(info),
            ),
        })
        .await?)
}

/// Installs the next issuer as staged: in the trust bundle, not issuing.
/// Audited `issuer.staged`.
pub async fn stage(
    store: &Store,
    info: &IssuerInfo,
    key_ref: String,
    actor: &str,
    now: OffsetDateTime,
) -> Result<AuditReceipt, Error> {
    let mut detail = cert_detail(info);
    detail["key_ref"] = json!(key_ref);
    store
        .commit(Change::Issuer {
            change: IssuerChange::Stage(new_issuer(info, Some(key_ref), now)),
            event: event("issuer.staged", actor, info.id.as_str(), now, detail),
        })
        .await
        .map_err(|e| {
            out_of_order(
                e,
                format!(
                    "issuer {} is already installed and in use; stage a certificate for a new key (`sigil intermediate rotate`)",
                    info.id
                ),
            )
        })
}

/// Withdraws the staged issuer `id`: it leaves the trust bundle and never
/// issues. Audited `issuer.unstaged`.
pub async fn unstage(
    store: &Store,
    id: &str,
    actor: &str,
    now: OffsetDateTime,
) -> Result<AuditReceipt, Error> {
    store
        .commit(Change::Issuer {
            change: IssuerChange::Unstage {
                id: id.to_string(),
                at: now.unix_timestamp(),
            },
            event: event("issuer.unstaged", actor, id, now, json!({})),
        })
        .await
        .map_err(|e| out_of_order(e, format!("issuer {id} is not staged (any more)")))
}

/// Records a cross-certificate between two roots (audited
/// `root.cross_cert_installed`); the caller has checked it against the
/// configured roots.
pub async fn install_cross(
    store: &Store,
    info: &IssuerInfo,
    actor: &str,
    now: OffsetDateTime,
) -> Result<AuditReceipt, Error> {
    let id = sigil_core::sha256_hex(&info.der);
    Ok(store
        .commit(Change::Issuer {
            change: IssuerChange::CrossCert {
                id: id.clone(),
                der: info.der.clone(),
                subject: info.subject.clone(),
                issuer: info.issuer.clone(),
                not_after: info.not_after.unix_timestamp(),
                at: now.unix_timestamp(),
            },
            event: event(
                "root.cross_cert_installed",
                actor,
                &id,
                now,
                cert_detail(info),
            ),
        })
        .await?)
}

/// Makes the staged issuer `id` take over issuance now (the active one
/// becomes previous), or schedules it for `at`. Audited
/// `issuer.activated` / `issuer.activation_scheduled`.
pub async fn activate(
    store: &Store,
    id: &str,
    at: Option<OffsetDateTime>,
    actor: &str,
    now: OffsetDateTime,
) -> Result<AuditReceipt, Error> {
    let previous = store
        .issuers()
        .await?
        .into_iter()
        .find(|r| r.state == IssuerState::Active)
        .map(|r| r.id);
    let (change, kind, when) = match at {
        Some(t) if t > now => (
            IssuerChange::Schedule {
                id: id.to_string(),
                at: t.unix_timestamp(),
            },
            "issuer.activation_scheduled",
            t,
        ),
        _ => (
            IssuerChange::Activate {
                id: id.to_string(),
                at: now.unix_timestamp(),
            },
            "issuer.activated",
            now,
        ),
    };
    store
        .commit(Change::Issuer {
            change,
            event: event(
                kind,
                actor,
                id,
                now,
                json!({"at": when.unix_timestamp(), "previous": previous}),
            ),
        })
        .await
        .map_err(|e| {
            out_of_order(
                e,
                format!(
                    "issuer {id} is not staged (see `sigil status`), so it cannot be activated"
                ),
            )
        })
}

impl Authority {
    /// The issuer taking new issuance.
    pub fn active_issuer(&self) -> Arc<ActiveIssuer> {
        crate::read(&self.issuers).active.clone()
    }

    /// A loaded issuer (staged, active or previous) by id.
    pub fn loaded_issuer(&self, id: &str) -> Option<Arc<ActiveIssuer>> {
        crate::read(&self.issuers)
            .all
            .iter()
            .find(|(_, i)| i.info().id.as_str() == id)
            .map(|(_, i)| i.clone())
    }

    /// Issuers whose certificates relying parties still check: the active
    /// one first, then previous ones.
    pub fn serving_issuers(&self) -> Vec<Arc<ActiveIssuer>> {
        let set = crate::read(&self.issuers);
        let mut v = vec![set.active.clone()];
        v.extend(
            set.all
                .iter()
                .filter(|(s, _)| *s == IssuerState::Previous)
                .map(|(_, i)| i.clone()),
        );
        v
    }

    /// Loaded issuers with their states: staged, active and previous (the
    /// ones whose CRLs and OCSP responders are kept ready; a staged one's,
    /// so its first certificates find them the moment it is activated).
    pub fn issuer_states(&self) -> Vec<(IssuerState, Arc<ActiveIssuer>)> {
        crate::read(&self.issuers).all.clone()
    }

    /// Installed cross-certificates between roots that have not expired.
    pub async fn cross_certs(&self) -> Result<Vec<Vec<u8>>, Error> {
        Ok(self
            .store
            .cross_certs(self.clock.now().unix_timestamp())
            .await?)
    }

    /// Chains for a stored certificate other than the default one, each
    /// ending in a cross-certificate (leaf, issuer, cross-certificate; PEM):
    /// for clients that trust only the root that cross-signed the issuer's
    /// root.
    pub async fn alternate_chains(&self, row: &CertificateRow) -> Result<Vec<String>, Error> {
        let issuer_der = match self.loaded_issuer(&row.issuer_id) {
            Some(i) => i.info().der.clone(),
            None => match self.store.issuer(&row.issuer_id).await? {
                Some(r) => r.cert_der,
                None => return Ok(Vec::new()),
            },
        };
        // As of the last sync (at most a second old), else from the database.
        let synced = crate::read(&self.cache.cross_certs).clone();
        let cross = match synced {
            Some(list) => list,
            None => Arc::new(
                self.cross_certs()
                    .await?
                    .iter()
                    .filter_map(|der| IssuerInfo::from_der(der).ok())
                    .collect(),
            ),
        };
        let now = self.clock.now();
        let mut chains = Vec::new();
        for info in cross.iter().filter(|i| i.not_after > now) {
            if sigil_core::template::verify_issued_by(&issuer_der, info).is_ok() {
                chains.push(format!(
                    "{}{}{}",
                    crate::pem("CERTIFICATE", &row.der),
                    crate::pem("CERTIFICATE", &issuer_der),
                    crate::pem("CERTIFICATE", &info.der)
                ));
            }
        }
        Ok(chains)
    }

    /// Carries out due lifecycle steps (a scheduled activation, retiring a
    /// previous issuer whose certificates all expired) and reloads the
    /// issuers when their states changed, here or on another node. Returns
    /// whether the states changed and whether the active issuer changed.
    pub(crate) async fn sync_issuers(
        &self,
        mut rows: Vec<IssuerRow>,
    ) -> Result<(bool, bool), Error> {
        let now = self.clock.now();
        let t = now.unix_timestamp();
        let mut stepped = false;
        for r in rows.iter().filter(|r| r.state == IssuerState::Staged) {
            if r.activate_at.is_some_and(|at| at <= t) {
                // Every node may try; the compare-and-set lets one win.
                match activate(&self.store, &r.id, None, "system:scheduler", now).await {
                    Ok(_) => {
                        tracing::info!(issuer = %r.id, "scheduled activation: issuer now active")
                    }
                    Err(Error::Rotation(_)) => {}
                    Err(e) => return Err(e),
                }
                stepped = true;
                break;
            }
        }
        let last = self
            .cache
            .retire_checked
            .load(std::sync::atomic::Ordering::Acquire);
        if t - last >= 60 {
            self.cache
                .retire_checked
                .store(t, std::sync::atomic::Ordering::Release);
            for r in rows.iter().filter(|r| r.state == IssuerState::Previous) {
                let cutoff = t - RETIRE_GRACE_SECS;
                let done = r.not_after <= cutoff
                    || !self.store.issuer_has_unexpired(&r.id, cutoff).await?;
                if !done {
                    continue;
                }
                let step = self
                    .store
                    .commit(Change::Issuer {
                        change: IssuerChange::Retire {
                            id: r.id.clone(),
                            at: t,
                        },
                        event: event(
                            "issuer.retired",
                            "system:scheduler",
                            &r.id,
                            now,
                            json!({"reason": "its last certificate expired", "not_after": r.not_after}),
                        ),
                    })
                    .await;
                match step {
                    Ok(_) => {
                        tracing::info!(issuer = %r.id, "issuer retired: its last certificate expired")
                    }
                    Err(sigil_store::Error::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                stepped = true;
            }
        }
        if stepped {
            rows = self.store.issuers().await?;
        }
        // Recorded with the loaded set it goes with (a key still loading is
        // not reported as one this node cannot hold).
        let listed: Vec<String> = rows
            .iter()
            .filter(|r| r.state != IssuerState::Retired)
            .map(|r| r.id.clone())
            .collect();
        let want = wanted(&rows);
        let current = crate::read(&self.issuers).clone();
        if want == current.states() {
            *crate::write(&self.cache.listed) = listed;
            return Ok((false, false));
        }
        let Some(keys) = self.keys.clone() else {
            return Err(Error::Config(
                "the issuers changed in the database, but this process cannot load issuer keys"
                    .into(),
            ));
        };
        let loaded: HashMap<String, Arc<ActiveIssuer>> = current
            .all
            .iter()
            .map(|(_, i)| (i.info().id.to_string(), i.clone()))
            .collect();
        let mut all = Vec::new();
        let mut active = None;
        for r in rows.into_iter().filter(|r| r.state != IssuerState::Retired) {
            let issuer = match loaded.get(&r.id) {
                Some(i) => i.clone(),
                None => {
                    // A key that failed to load is retried once a minute,
                    // not on every sync (a wrong passphrase costs a KDF run).
                    let retry_at = crate::read(&self.cache.load_failures).get(&r.id).copied();
                    if retry_at.is_some_and(|at| t < at) {
                        if r.state == IssuerState::Active {
                            return Err(Error::Unavailable(format!(
                                "the key of active issuer {} could not be loaded; retrying",
                                r.id
                            )));
                        }
                        continue;
                    }
                    match self.load_issuer(keys.clone(), r.clone()).await {
                        Ok(i) => {
                            crate::write(&self.cache.load_failures).remove(&r.id);
                            Arc::new(i)
                        }
                        Err(e) => {
                            crate::write(&self.cache.load_failures).insert(r.id.clone(), t + 60);
                            if r.state == IssuerState::Active {
                                return Err(e);
                            }
                            tracing::error!(issuer = %r.id, state = %r.state, error = %e, "cannot load issuer key; retrying in a minute");
                            continue;
                        }
                    }
                }
            };
            if r.state == IssuerState::Active {
                active = Some(issuer.clone());
            }
            all.push((r.state, issuer));
        }
        let Some(active) = active else {
            return Err(Error::Unavailable(
                "no issuer is active in the database".into(),
            ));
        };
        let rotated = active.info().id != current.active.info().id;
        if rotated {
            tracing::info!(issuer = %active.info().id, previous = %current.active.info().id, "active issuer changed");
        }
        let next = IssuerSet { active, all };
        // While a key keeps failing to load, every sync lands here with the
        // same set: that is no change (else CRLs and OCSP answers would be
        // signed again every second).
        let changed = rotated || next.states() != current.states();
        *crate::write(&self.issuers) = next;
        *crate::write(&self.cache.listed) = listed;
        Ok((changed, rotated))
    }

    async fn load_issuer(
        &self,
        keys: Arc<dyn IssuerKeys>,
        row: IssuerRow,
    ) -> Result<ActiveIssuer, Error> {
        let urls = self.settings.urls.clone();
        // Decrypting a key file is deliberately slow: off the runtime.
        tokio::task::spawn_blocking(move || {
            let key = keys.load(&row)?;
            ActiveIssuer::new(&row.cert_der, key, &urls)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("loading an issuer key failed: {e}")))?
    }
}
