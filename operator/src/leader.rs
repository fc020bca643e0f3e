//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can
//! run and only one reconciles. kube-rs has no elector of its own; this is
//! the usual protocol: take the lease when it is free or expired, renew it
//! well before it expires, and stop at once when a renewal fails.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

/// Why this replica stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum LeadershipLost {
    #[error("another replica took the lease")]
    TakenOver,
    #[error("could not renew the lease: {0}")]
    RenewFailed(String),
}

/// Runs `work` while this replica holds the lease (acquired before):
/// renews the lease meanwhile, drops `work` at once when leadership is lost,
/// and gives the lease up at the end so a standby takes over without
/// waiting for it to expire.
pub async fn run_while_leading<F: Future>(elector: &Elector, work: F) -> Result<F::Output, LeadershipLost> {
    let outcome = tokio::select! {
        output = work => Ok(output),
        lost = elector.hold() => Err(lost),
    };
    elector.release().await;
    outcome
}

pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    lease_duration: Duration,
    /// A leader that has not renewed for this long stops leading, well
    /// before the lease expires and a standby may take it (client-go's
    /// renew deadline): two leaders never overlap, even when a renewal
    /// hangs.
    renew_deadline: Duration,
    retry_every: Duration,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }

    /// Waits until this replica holds the lease. Says once, and again when
    /// the holder changes, which operator it waits for: a second operator
    /// standing by is what keeps two from writing the same objects.
    pub async fn acquire(&self) {
        let mut waiting_for = None;
        let mut last_error = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Holder::Us) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(Holder::Other(holder)) => {
                    if waiting_for.as_ref() != Some(&holder) {
                        info!(lease = %self.name, %holder, "another operator holds the lease; standing by");
                        waiting_for = Some(holder);
                    }
                    last_error = None;
                }
                // Said at warn, once per distinct error: an operator that can
                // never lead (no such namespace, no RBAC for leases) must not
                // wait in silence.
                Err(e) => {
                    let error = e.to_string();
                    if last_error.as_ref() != Some(&error) {
                        warn!(lease = %self.name, namespace = %self.namespace, %error, "cannot take the lease; retrying");
                        last_error = Some(error);
                    }
                }
            }
            tokio::time::sleep(self.retry_every).await;
        }
    }

    /// Renews the lease until another replica holds it or no renewal
    /// succeeded within the renew deadline (failed attempts are retried
    /// meanwhile, so a short API server restart does not cost the lease);
    /// returns then, and the caller must stop leading.
    pub async fn hold(&self) -> LeadershipLost {
        let renew_every = self.lease_duration / 3;
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(renew_every).await;
            loop {
                let left = self.renew_deadline.saturating_sub(renewed.elapsed());
                match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                    Ok(Ok(Holder::Us)) => break,
                    Ok(Ok(Holder::Other(_))) => return LeadershipLost::TakenOver,
                    Ok(Err(e)) if renewed.elapsed() + self.retry_every >= self.renew_deadline => {
                        return LeadershipLost::RenewFailed(e.to_string());
                    }
                    Ok(Err(e)) => {
                        warn!(lease = %self.name, error = %e, "could not renew the lease; retrying");
                        tokio::time::sleep(self.retry_every).await;
                    }
                    Err(_) => {
                        return LeadershipLost::RenewFailed(format!("no answer within {:?}", self.renew_deadline));
                    }
                }
            }
            renewed = tokio::time::Instant::now();
        }
    }

    /// Gives the lease up on a clean shutdown so a standby takes over at
    /// once. If that fails the lease simply expires.
    pub async fn release(&self) {
        let released = async {
            let mut lease = self.api.get(&self.name).await?;
            if holder(&lease) != Some(&self.identity) {
                return Ok(());
            }
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
                spec.renew_time = None;
            }
            self.api.replace(&self.name, &PostParams::default(), &lease).await.map(drop)
        };
        match released.await {
            Ok(()) => info!(lease = %self.name, "released the lease"),
            Err(e) => warn!(lease = %self.name, error = %e, "could not release the lease; it expires on its own"),
        }
    }

    /// Who holds the lease after the call. Writes go through `replace`
    /// with the read resourceVersion, so two replicas racing for an
    /// expired lease cannot both win.
    async fn try_acquire_or_renew(&self) -> Result<Holder, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(now, None, 0)),
            };
            self.api.create(&PostParams::default(), &lease).await?;
            return Ok(Holder::Us);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(&self.identity);
        if !mine && !expired(&spec, now) {
            return Ok(Holder::Other(spec.holder_identity.unwrap_or_default()));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(now, acquired, transitions));
        self.api.replace(&lease.name_any(), &PostParams::default(), &lease).await?;
        Ok(Holder::Us)
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

/// Who holds the lease.
enum Holder {
    Us,
    Other(String),
}

fn holder(lease: &Lease) -> Option<&String> {
    lease.spec.as_ref()?.holder_identity.as_ref()
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return true;
    };
    if spec.holder_identity.as_deref().is_none_or(str::is_empty) {
        return true;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed.saturating_add(duration).is_ok_and(|deadline| deadline < now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(Into::into),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(1_000 - renewed_secs_ago).expect("time"))),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_expires_after_its_duration_or_without_holder() {
        let now = Timestamp::from_second(1_000).expect("time");
        assert!(!expired(&spec(Some("a"), 5), now));
        assert!(expired(&spec(Some("a"), 16), now));
        assert!(expired(&spec(None, 1), now));
        assert!(expired(&LeaseSpec::default(), now));
    }
}
