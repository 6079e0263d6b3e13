//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both write.
//!
//! Every replica runs its watches and keeps its caches; only the holder of the Lease reconciles
//! and writes ([`Leadership`] is the gate). The rules are client-go's:
//!
//! - The holder renews every [`Timing::renew_period`]. If it has not renewed for
//!   [`Timing::renew_deadline`] (every Lease request is bounded by that deadline, so a frozen API
//!   server cannot hold it up) it stops writing at once, and the operator exits (as
//!   kube-controller-manager does): restarted, it starts as a follower with fresh caches, and
//!   writes nothing until it wins the Lease again.
//! - A follower checks the Lease every [`Timing::follow_period`]. It takes over when the holder
//!   field is empty (a released Lease) or when the record has not changed for
//!   `leaseDurationSeconds` as measured on its own monotonic clock since it saw the record change,
//!   so a skewed wall clock between nodes cannot shorten a lease.
//! - Every write carries the Lease's resourceVersion, so of two replicas racing for a free Lease
//!   the API server accepts one and answers the other 409.
//! - On shutdown the holder releases the Lease (empty holder, 1 s duration, like client-go's
//!   `ReleaseOnCancel`), so a follower takes over within a second or two instead of a whole
//!   lease duration.
//!
//! Why not the `kube-lease-manager` crate (0.13 fits kube 5 and k8s-openapi 0.29): its
//! `watch()` hides renewal errors and keeps reporting leadership while the API server does not
//! answer, and the last successful renewal is not exposed, so a leader could not stop writing
//! in time; its requests have no timeout; a follower sleeps until the old lease would expire
//! and so does not see a release before then; and exclusion rests on server-side-apply field
//! ownership conflicts rather than resourceVersion preconditions. Each of those is one of the
//! defects this module exists to avoid, and the rules above are short.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::Metrics;

pub const LEASE_NAME: &str = "portpolicy-operator";

/// The election's periods; the defaults are client-go's (15 s lease, 10 s renew deadline),
/// with followers checking every second so a released Lease is taken over quickly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// `leaseDurationSeconds` written into the Lease: how long followers wait on a silent holder.
    pub lease_duration: Duration,
    /// The holder stops leading when it has not renewed for this long; less than the lease
    /// duration, so it has stopped before anyone may take over.
    pub renew_deadline: Duration,
    /// How often the holder renews.
    pub renew_period: Duration,
    /// How often a follower (or a replica that just lost the Lease) checks it.
    pub follow_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_period: Duration::from_secs(2),
            follow_period: Duration::from_secs(1),
        }
    }
}

impl Timing {
    /// Checks the ordering the election's safety rests on.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_duration.as_secs() < 1 || self.lease_duration.subsec_nanos() != 0 {
            return Err("the lease duration must be a whole number of seconds, at least 1".into());
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.renew_period >= self.renew_deadline {
            return Err(format!(
                "the renew period ({:?}) must be shorter than the renew deadline ({:?})",
                self.renew_period, self.renew_deadline
            ));
        }
        if self.follow_period.is_zero() || self.renew_period.is_zero() {
            return Err("the renew and follow periods must be above zero".into());
        }
        Ok(())
    }
}

/// Whether this replica leads. The elector sets it; reconciles check it before every write and
/// are cancelled when it turns false.
#[derive(Clone)]
pub struct Leadership {
    state: Arc<watch::Sender<Term>>,
}

/// `leading`, and how many times this replica started leading: a loss and a gain between two
/// looks must still count as a gain (the reconciles cancelled by the loss need redoing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Term {
    leading: bool,
    gained: u64,
}

impl Leadership {
    pub fn new(leading: bool) -> Self {
        Leadership {
            state: Arc::new(watch::Sender::new(Term {
                leading,
                gained: u64::from(leading),
            })),
        }
    }

    pub fn is_leading(&self) -> bool {
        self.state.borrow().leading
    }

    pub(crate) fn set(&self, leading: bool) {
        self.state.send_modify(|term| {
            if leading && !term.leading {
                term.gained += 1;
            }
            term.leading = leading;
        });
    }

    /// Resolves as soon as this replica leads (at once if it does now).
    pub async fn leading(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = rx.wait_for(|term| term.leading).await;
    }

    /// Resolves as soon as this replica does not lead (at once if it does not now).
    pub async fn lost(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|term| !term.leading).await;
    }

    /// Yields each time this replica starts leading, to reconcile everything then.
    pub fn acquisitions(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.state.subscribe();
        let seen = rx.borrow().gained;
        futures::stream::unfold((rx, seen), |(mut rx, seen)| async move {
            let term = *rx.wait_for(|term| term.gained > seen).await.ok()?;
            Some(((), (rx, term.gained)))
        })
    }
}

/// Why a leader stopped leading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeadershipLost {
    /// Another replica holds the Lease now.
    TakenOver { holder: String },
    /// No renewal succeeded within the renew deadline (the API server did not answer, or
    /// refused).
    RenewDeadlineExceeded { deadline: Duration },
}

impl fmt::Display for LeadershipLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeadershipLost::TakenOver { holder } => write!(f, "{holder} holds the leader Lease now"),
            LeadershipLost::RenewDeadlineExceeded { deadline } => write!(
                f,
                "could not renew the leader Lease for {}s (the renew deadline)",
                deadline.as_secs_f64()
            ),
        }
    }
}

/// The outcome of one look at the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Round {
    /// This replica holds the Lease (it just created, renewed or took it over).
    Leading,
    /// Another replica holds it and its lease has not run out.
    Following { holder: String },
}

/// The Lease record as last seen, and when (on this replica's monotonic clock) it last changed.
#[derive(Clone, Debug)]
struct Observed {
    spec: LeaseSpec,
    resource_version: Option<String>,
    changed_at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    identity: String,
    timing: Timing,
    observed: Option<Observed>,
    /// The holder last logged, so a follower logs each change of leader once.
    logged_leader: Option<String>,
    /// Whether the last round failed, so an outage is logged once as a warning, not every second.
    failing: bool,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, identity: &str, timing: Timing) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            identity: identity.into(),
            timing,
            observed: None,
            logged_leader: None,
            failing: false,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let resource_version = lease.metadata.resource_version.clone();
        match &mut self.observed {
            Some(o) if o.spec == spec => o.resource_version = resource_version,
            _ => {
                self.observed = Some(Observed {
                    spec,
                    resource_version,
                    changed_at: Instant::now(),
                })
            }
        }
    }

    /// Whether the observed holder (someone else) has let the lease run out.
    fn expired(&self, o: &Observed) -> bool {
        let seconds = o.spec.lease_duration_seconds.unwrap_or(0).max(0);
        o.changed_at + Duration::from_secs(seconds as u64) <= Instant::now()
    }

    /// The record this replica writes to hold the Lease, based on the observed one.
    fn held_record(&self, now: Timestamp) -> LeaseSpec {
        let old = self.observed.as_ref().map(|o| o.spec.clone()).unwrap_or_default();
        let renewing = old.holder_identity.as_deref() == Some(self.identity.as_str());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs() as i32),
            acquire_time: if renewing {
                old.acquire_time
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                old.lease_transitions.unwrap_or(0) + i32::from(!renewing && self.observed.is_some()),
            ),
            ..Default::default()
        }
    }

    fn lease(&self, spec: LeaseSpec, resource_version: Option<String>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                namespace: Some(self.namespace.clone()),
                resource_version,
                ..Default::default()
            },
            spec: Some(spec),
        }
    }

    /// One look at the Lease: read it, then create, renew or take it over if this replica may.
    /// Unbounded in time; callers bound it.
    pub async fn round(&mut self) -> Result<Round, kube::Error> {
        let Some(current) = self.api.get_opt(LEASE_NAME).await? else {
            let new = self.lease(self.held_record(Timestamp::now()), None);
            return match self.api.create(&PostParams::default(), &new).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Round::Leading)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(self.following_unknown()),
                Err(e) => Err(e),
            };
        };
        self.observe(&current);
        let observed = self.observed.clone().expect("just observed");
        let holder = observed.spec.holder_identity.clone().unwrap_or_default();
        if !holder.is_empty() && holder != self.identity && !self.expired(&observed) {
            return Ok(Round::Following { holder });
        }
        let new = self.lease(self.held_record(Timestamp::now()), observed.resource_version);
        match self.api.replace(LEASE_NAME, &PostParams::default(), &new).await {
            Ok(written) => {
                self.observe(&written);
                Ok(Round::Leading)
            }
            // Another replica wrote first: it wins this round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(self.following_unknown()),
            Err(e) => Err(e),
        }
    }

    fn following_unknown(&self) -> Round {
        let holder = self
            .observed
            .as_ref()
            .and_then(|o| o.spec.holder_identity.clone())
            .filter(|h| !h.is_empty() && *h != self.identity)
            .unwrap_or_else(|| "another replica".into());
        Round::Following { holder }
    }

    /// Looks at the Lease until this replica holds it; returns when the winning round started
    /// (the renew deadline counts from then).
    pub async fn acquire(&mut self) -> Instant {
        loop {
            let started = Instant::now();
            match tokio::time::timeout(self.timing.renew_deadline, self.round()).await {
                Ok(Ok(Round::Leading)) => {
                    self.failing = false;
                    self.logged_leader = Some(self.identity.clone());
                    tracing::info!(identity = %self.identity, "leading: this replica reconciles and writes");
                    return started;
                }
                Ok(Ok(Round::Following { holder })) => {
                    self.failing = false;
                    if self.logged_leader.as_deref() != Some(holder.as_str()) {
                        tracing::info!(
                            identity = %self.identity,
                            leader = %holder,
                            "following: watching and caching, writing nothing while another replica leads"
                        );
                        self.logged_leader = Some(holder);
                    }
                }
                Ok(Err(error)) => self.round_failed(&error.to_string()),
                Err(_) => self.round_failed(&format!(
                    "no answer within {}s",
                    self.timing.renew_deadline.as_secs_f64()
                )),
            }
            tokio::time::sleep(self.timing.follow_period).await;
        }
    }

    fn round_failed(&mut self, error: &str) {
        if self.failing {
            tracing::debug!(%error, "cannot read or write the leader Lease");
        } else {
            tracing::warn!(%error, "cannot read or write the leader Lease; retrying");
        }
        self.failing = true;
    }

    /// Renews until that fails: another replica took over, or no renewal succeeded within the
    /// renew deadline counted from `renewed` (the start of the last successful round).
    pub async fn hold(&mut self, mut renewed: Instant) -> LeadershipLost {
        let timing = self.timing;
        loop {
            tokio::time::sleep(timing.renew_period).await;
            let deadline = renewed + timing.renew_deadline;
            let attempts = async {
                loop {
                    let started = Instant::now();
                    match self.round().await {
                        Ok(Round::Leading) => return Ok(started),
                        Ok(Round::Following { holder }) => return Err(holder),
                        Err(error) => {
                            tracing::warn!(%error, "cannot renew the leader Lease; retrying");
                            tokio::time::sleep(timing.follow_period).await;
                        }
                    }
                }
            };
            match tokio::time::timeout_at(deadline, attempts).await {
                Ok(Ok(started)) => renewed = started,
                Ok(Err(holder)) => {
                    self.logged_leader = Some(holder.clone());
                    return LeadershipLost::TakenOver { holder };
                }
                Err(_) => {
                    self.logged_leader = None;
                    return LeadershipLost::RenewDeadlineExceeded {
                        deadline: timing.renew_deadline,
                    };
                }
            }
        }
    }

    /// Follows until this replica wins the Lease, then leads until it loses it: `leadership`
    /// is true exactly while this replica holds a Lease it renewed within the renew deadline.
    /// Returns why it stopped leading, with `leadership` already false. Dropping the future
    /// stops renewing.
    pub async fn lead(&mut self, leadership: &Leadership, metrics: &Metrics) -> LeadershipLost {
        let renewed = self.acquire().await;
        leadership.set(true);
        metrics.leader.set(1);
        let lost = self.hold(renewed).await;
        // Before anything else: no write may start from here on.
        leadership.set(false);
        metrics.leader.set(0);
        tracing::error!(identity = %self.identity, reason = %lost, "stopped leading: writing nothing from now on");
        lost
    }

    /// Hands the Lease back if this replica holds it (empty holder, 1 s duration), so a
    /// follower takes over at its next check. Call only once nothing writes any more.
    pub async fn release(&mut self) -> bool {
        let Some(observed) = self.observed.clone() else {
            return false;
        };
        if observed.spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return false;
        }
        let now = Timestamp::now();
        let spec = LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: observed.spec.lease_transitions,
            ..Default::default()
        };
        let lease = self.lease(spec, observed.resource_version);
        let params = PostParams::default();
        let request = self.api.replace(LEASE_NAME, &params, &lease);
        match tokio::time::timeout(self.timing.renew_period, request).await {
            Ok(Ok(released)) => {
                self.observe(&released);
                tracing::info!(identity = %self.identity, "released the leader Lease");
                true
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot release the leader Lease; it expires on its own");
                false
            }
            Err(_) => {
                tracing::warn!("the API server did not answer the Lease release; it expires on its own");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
