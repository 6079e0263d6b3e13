//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both allocate.
//!
//! kube-runtime 5 has no elector, so this is a small one in the client-go style: the holder
//! renews every [`RENEW_EVERY`]; another replica takes over only once `renewTime +
//! leaseDurationSeconds` has passed. Every write carries the Lease's resourceVersion, so two
//! replicas racing for an expired Lease cannot both win: the API server rejects the second
//! write with 409. A leader that cannot renew before its own lease would expire stops (the
//! process exits and restarts as a follower) rather than risk allocating next to a new leader.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

pub const LEASE_NAME: &str = "portpolicy-operator";
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// What a replica should do with the Lease as it stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// No Lease exists: create it holding it.
    Create,
    /// This replica holds it: renew.
    Renew,
    /// Someone else held it and let it expire: take it over.
    TakeOver,
    /// Someone else holds it: wait.
    Follow { holder: String },
}

pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            Decision::TakeOver
        } else {
            Decision::Create
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let expired = match &spec.renew_time {
        Some(MicroTime(renewed)) => *renewed + duration < now,
        None => true,
    };
    if holder.is_empty() || expired {
        Decision::TakeOver
    } else {
        Decision::Follow { holder }
    }
}

/// The Lease as this replica writes it when it holds it.
pub fn held_lease(previous: Option<&Lease>, name: &str, namespace: &str, me: &str, now: Timestamp) -> Lease {
    let old = previous.and_then(|l| l.spec.clone()).unwrap_or_default();
    let taking_over = old.holder_identity.as_deref() != Some(me);
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version: previous.and_then(|l| l.metadata.resource_version.clone()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(me.into()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: if taking_over {
                Some(MicroTime(now))
            } else {
                old.acquire_time
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                old.lease_transitions.unwrap_or(0) + i32::from(taking_over && previous.is_some()),
            ),
            ..Default::default()
        }),
    }
}

pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    identity: String,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, identity: &str) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            identity: identity.into(),
        }
    }

    /// One round: returns whether this replica holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let lease = self.api.get_opt(LEASE_NAME).await?;
        let now = Timestamp::now();
        let result = match decide(lease.as_ref(), &self.identity, now) {
            Decision::Follow { .. } => return Ok(false),
            Decision::Create => {
                let new = held_lease(None, LEASE_NAME, &self.namespace, &self.identity, now);
                self.api.create(&PostParams::default(), &new).await
            }
            Decision::Renew | Decision::TakeOver => {
                let new = held_lease(lease.as_ref(), LEASE_NAME, &self.namespace, &self.identity, now);
                self.api.replace(LEASE_NAME, &PostParams::default(), &new).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Another replica wrote first: it wins this round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, "acquired leadership");
                    return;
                }
                Ok(false) => tracing::debug!("another replica leads; waiting"),
                Err(error) => tracing::warn!(%error, "cannot read or write the leader Lease"),
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews until a renewal fails for longer than the lease lasts; then returns, and the caller
    /// must stop acting as leader.
    pub async fn hold(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("leadership lost to another replica");
                    return;
                }
                Err(error) => tracing::warn!(%error, "cannot renew the leader Lease"),
            }
            // Stop a little before the others may take over, not after.
            if last_renewed.elapsed() + RENEW_EVERY >= LEASE_DURATION {
                tracing::error!("could not renew the leader Lease in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: i64) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                lease_transitions: Some(2),
                ..Default::default()
            }),
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", t(100)), Decision::Create);
        assert_eq!(decide(Some(&lease("a", 90)), "a", t(100)), Decision::Renew);
        assert_eq!(
            decide(Some(&lease("b", 90)), "a", t(100)),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(decide(Some(&lease("b", 80)), "a", t(100)), Decision::TakeOver);
        assert_eq!(decide(Some(&lease("", 99)), "a", t(100)), Decision::TakeOver);
    }

    #[test]
    fn takeover_counts_transitions_and_keeps_resource_version() {
        let old = lease("b", 80);
        let new = held_lease(Some(&old), LEASE_NAME, "ns", "a", t(100));
        assert_eq!(new.metadata.resource_version.as_deref(), Some("7"));
        let spec = new.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.acquire_time, Some(MicroTime(t(100))));
        let renewed = held_lease(Some(&lease("a", 95)), LEASE_NAME, "ns", "a", t(100))
            .spec
            .unwrap();
        assert_eq!(renewed.lease_transitions, Some(2));
    }
}
