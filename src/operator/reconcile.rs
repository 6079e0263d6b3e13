//! Reconcile one PortPolicy: compute with the core, then write only what differs.
//!
//! Order matters for durability: the status (which carries the sticky allocation records) is
//! written before any Service gets a new nodePort, so a crash between the two leaves a record
//! without a port (given out again next time) rather than a port without a record.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::agent::{self, POLICY_LABEL};
use super::context::Context;
use super::core::{Computation, Inputs, compute};
use super::services::{self, FIELD_MANAGER, ServiceKey};
use super::status::{self, AgentFacts, PolicyFacts};
use super::{Error, Result};
use portpolicy_core::crd::{PortPolicy, PortPolicyStatus, condition};
use portpolicy_core::hash::fnv1a_64;
use portpolicy_core::intent::ServiceIntent;

pub(super) const FINALIZER: &str = "portpolicy.io/cleanup";
/// Annotation on the agent DaemonSet with a hash of what the operator applied, so an unchanged
/// DaemonSet is not applied again on every reconcile.
pub(super) const SPEC_HASH_ANNOTATION: &str = "portpolicy.io/spec-hash";
/// Retention expiry and drift are caught at this period even without a watch event.
const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles `policy` if this replica leads; a follower does nothing (the leader does it, and
/// a replica that starts leading reconciles everything). Losing leadership cancels the
/// reconcile at once, wherever it is.
pub(super) async fn reconcile(policy: Arc<PortPolicy>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.leadership.is_leading() {
        return Ok(Action::await_change());
    }
    let leadership = ctx.leadership.clone();
    tokio::select! {
        biased;
        () = leadership.lost() => Err(Error::LostLeadership),
        result = reconcile_leading(policy, ctx) => result,
    }
}

async fn reconcile_leading(policy: Arc<PortPolicy>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.inc();
    let _timer = ctx.metrics.duration.start_timer();
    ctx.caches.wait().await?;
    ctx.ensure_leading()?;
    let api: Api<PortPolicy> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, policy, |event| async {
        match event {
            Finalizer::Apply(policy) => apply(&policy, &ctx).await,
            Finalizer::Cleanup(policy) => cleanup(&policy, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e)
        | kube::runtime::finalizer::Error::RemoveFinalizer(e) => e.into(),
        other => Error::Finalizer(Box::new(other)),
    })
}

pub(super) fn error_policy(policy: Arc<PortPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .with_label_values(&[error.metric_label()])
        .inc();
    let name = policy.name_any();
    match error {
        // The new leader reconciles it; this process is on its way out (it exits, status 3).
        Error::LostLeadership => {
            tracing::info!(policy = %name, "reconcile cancelled: this replica stopped leading");
            Action::await_change()
        }
        // The operator is stopping.
        Error::CacheDropped(_) => Action::await_change(),
        Error::Conflict => {
            tracing::debug!(policy = %name, %error, "retrying");
            Action::requeue(Duration::from_secs(1))
        }
        Error::ApiServer(_) => {
            tracing::warn!(policy = %name, %error, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(5))
        }
        _ => {
            tracing::warn!(policy = %name, %error, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(15))
        }
    }
}

/// The core's view of the cluster as the stores hold it, with `policy` (the freshest copy, the
/// one the controller handed over) in place of the store's.
fn computation(policy: &PortPolicy, ctx: &Context) -> Computation {
    let mut policies = ctx.stores.policies.state();
    match policies.iter_mut().find(|p| p.name_any() == policy.name_any()) {
        Some(p) => *p = Arc::new(policy.clone()),
        None => policies.push(Arc::new(policy.clone())),
    }
    let services = ctx.stores.services.state();
    let pods = ctx.stores.pods.state();
    let namespaces = ctx.stores.namespaces.state();
    // Read after the stores: a reservation the watch confirmed since is a Service holding its
    // port in the next reconcile, and one made since is skipped by this one's writes only if
    // it is read here (see docs/operator.md on the window that leaves).
    let in_flight = (ctx.in_flight)();
    compute(&Inputs {
        policies: &policies,
        services: &services,
        pods: &pods,
        namespaces: &namespaces,
        cluster_range: ctx.settings.cluster_range,
        now: (ctx.clock)(),
        in_flight: &in_flight,
    })
}

async fn apply(policy: &PortPolicy, ctx: &Context) -> Result<Action> {
    let name = policy.name_any();
    if let Err(problems) = policy.compile() {
        // An invalid spec changes nothing but its own status: no Service, DaemonSet or record is
        // touched until the user fixes it.
        let facts = PolicyFacts {
            generation: policy.metadata.generation,
            spec_problems: problems,
            ..Default::default()
        };
        write_status_and_events(policy, &facts, ctx).await?;
        return Ok(Action::await_change());
    }

    let comp = computation(policy, ctx);
    // The DaemonSet first: its facts (and whether it could be created at all) go into the
    // status. A failure to apply it is reported there and returned after the rest is done.
    let daemon_set = sync_daemon_set(policy, desired_daemon_set(policy, ctx), ctx).await;
    let facts = comp.facts(policy, agent_facts(policy, &daemon_set, ctx));
    ctx.metrics.set_policy(
        &name,
        facts.node_ports.as_ref().map(|np| &np.counts),
        facts.conflicts.len(),
    );
    write_status_and_events(policy, &facts, ctx).await?;

    let mut refusals = comp.refusals(&name);
    for (key, intent) in comp.intents_in_write_order(&name) {
        let Some(live) = service_to_write(&key, &intent, ctx) else {
            continue;
        };
        let outcomes = comp.outcomes(&name, &live);
        match write_service(&key, &intent, ctx).await? {
            Written::Applied => {
                for outcome in outcomes {
                    ctx.metrics.count_allocation(&name, outcome);
                }
            }
            Written::Rejected(why) if !outcomes.is_empty() => {
                refusals.insert(format!("{}/{}: {why}", key.0, key.1));
            }
            Written::Rejected(_) | Written::Gone => {}
        }
    }
    ctx.metrics.note_refusals(&name, refusals);
    // An unreadable policy may govern Services nobody else does: release nothing until it is
    // fixed, as for an invalid one (the core already holds back for those).
    if ctx.unreadable.is_empty() {
        for key in comp.releases() {
            apply_service(&key, &ServiceIntent::new(&key.0, &key.1), ctx).await?;
        }
    }
    daemon_set?;
    Ok(Action::requeue(RESYNC))
}

/// A deleted policy lets go of its Services (proxy label, externalTrafficPolicy and nodePort
/// ownership; the nodePorts themselves stay with the Services). Its DaemonSet goes with it
/// through the garbage collector.
async fn cleanup(policy: &PortPolicy, ctx: &Context) -> Result<Action> {
    let name = policy.name_any();
    let comp = computation(policy, ctx);
    for key in comp.held_by(&name) {
        apply_service(&key, &ServiceIntent::new(&key.0, &key.1), ctx).await?;
    }
    ctx.metrics.forget_policy(&name);
    tracing::info!(policy = %name, "released the Services of a deleted policy");
    Ok(Action::await_change())
}

fn now_time(ctx: &Context) -> Time {
    let now = (ctx.clock)();
    Time(Timestamp::from_second(now.timestamp()).unwrap_or_default())
}

async fn write_status_and_events(policy: &PortPolicy, facts: &PolicyFacts, ctx: &Context) -> Result<()> {
    let old = policy.status.as_ref();
    let new = status::build_status(old, facts, &now_time(ctx));
    if !status::needs_write(old, &new) {
        return Ok(());
    }
    write_status(policy, &new, ctx).await?;
    for t in status::transitions(old, &new) {
        // Ready only sums up the others; each cause has its own event.
        if t.type_ == condition::READY {
            continue;
        }
        let bad = (t.type_ == condition::HOST_PORT_CONFLICT) == (t.status == "True");
        // A condition that starts out fine is not news.
        let was_present = old.is_some_and(|s| s.conditions.iter().any(|c| c.type_ == t.type_));
        if !bad && !was_present {
            continue;
        }
        // Nor does a new agent DaemonSet whose pods are still starting.
        if !was_present && t.type_ == condition::AGENTS_READY && t.reason == "NotReady" {
            continue;
        }
        let event = KubeEvent {
            type_: if bad {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.clone(),
            note: Some(truncate(&t.message, 1000)),
            action: format!("{}{}", t.type_, t.status),
            secondary: None,
        };
        ctx.ensure_leading()?;
        if let Err(error) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
            // An event is a notification, not state: failing to send one must not fail the
            // reconcile (and so repeat the writes).
            tracing::warn!(%error, policy = %policy.name_any(), "cannot publish event");
        }
    }
    Ok(())
}

pub(super) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

async fn write_status(policy: &PortPolicy, status: &PortPolicyStatus, ctx: &Context) -> Result<()> {
    let api: Api<PortPolicy> = Api::all(ctx.client.clone());
    let mut metadata = json!({"name": policy.name_any()});
    // The resourceVersion makes the write conditional: a replica working from an old copy of the
    // policy (and so of its allocation records) gets 409 and retries from fresh data.
    if let Some(rv) = &policy.metadata.resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    let body = json!({
        "apiVersion": PortPolicy::api_version(&()),
        "kind": PortPolicy::kind(&()),
        "metadata": metadata,
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    ctx.ensure_leading()?;
    match api
        .patch_status(&policy.name_any(), &params, &Patch::Apply(&body))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// What writing one Service came to.
enum Written {
    Applied,
    /// Deleted meanwhile.
    Gone,
    /// The API server refused it, for this reason.
    Rejected(String),
}

/// The Service as the store holds it, when `intent` is not already satisfied by it.
fn service_to_write(key: &ServiceKey, intent: &ServiceIntent, ctx: &Context) -> Option<Arc<Service>> {
    ctx.stores
        .services
        .get(&ObjectRef::<Service>::new(&key.1).within(&key.0))
        .filter(|live| !services::satisfied_by(intent, live))
}

async fn apply_service(key: &ServiceKey, intent: &ServiceIntent, ctx: &Context) -> Result<()> {
    if service_to_write(key, intent, ctx).is_some() {
        write_service(key, intent, ctx).await?;
    }
    Ok(())
}

async fn write_service(key: &ServiceKey, intent: &ServiceIntent, ctx: &Context) -> Result<Written> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &key.0);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    ctx.ensure_leading()?;
    match api
        .patch(&key.1, &params, &Patch::Apply(intent.apply_body()))
        .await
    {
        Ok(_) => {
            tracing::info!(service = %format!("{}/{}", key.0, key.1), "applied");
            Ok(Written::Applied)
        }
        // Deleted meanwhile: the next reconcile sees it gone.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Written::Gone),
        // The API server refuses (a port taken behind our back, say): report and go on with the
        // other Services; the allocator sees the truth on the next event.
        Err(kube::Error::Api(s)) if s.code == 422 => {
            tracing::warn!(service = %format!("{}/{}", key.0, key.1), message = %s.message, "rejected");
            Ok(Written::Rejected(s.message))
        }
        Err(e) => Err(e.into()),
    }
}

fn desired_daemon_set(policy: &PortPolicy, ctx: &Context) -> Option<DaemonSet> {
    let mut ds = agent::desired_daemon_set(policy, &ctx.settings.namespace, &ctx.settings.default_image)?;
    let text = serde_json::to_string(&ds).ok()?;
    let hash = fnv1a_64(text.as_bytes());
    ds.metadata
        .annotations
        .get_or_insert_default()
        .insert(SPEC_HASH_ANNOTATION.into(), format!("{hash:016x}"));
    Some(ds)
}

#[cfg(test)]
pub(super) fn desired_daemon_set_for_tests(policy: &PortPolicy, ctx: &Context) -> Option<DaemonSet> {
    desired_daemon_set(policy, ctx)
}

fn existing_daemon_set(policy: &PortPolicy, ctx: &Context) -> Option<Arc<DaemonSet>> {
    let name = agent::daemon_set_name(&policy.name_any());
    ctx.stores
        .daemon_sets
        .get(&ObjectRef::new(&name).within(&ctx.settings.namespace))
        .filter(|ds| ds.labels().get(POLICY_LABEL) == Some(&policy.name_any()))
}

/// The agent facts of the status. `daemon_set` is what applying the DaemonSet gave: the
/// DaemonSet as it now stands, or why it could not be applied. A DaemonSet that was just
/// created is not missing, only not ready yet; only a failed apply reports it missing.
fn agent_facts(
    policy: &PortPolicy,
    daemon_set: &Result<Option<DaemonSet>>,
    ctx: &Context,
) -> Option<AgentFacts> {
    policy.spec.agent.as_ref()?;
    let name = agent::daemon_set_name(&policy.name_any());
    Some(match daemon_set {
        Ok(Some(ds)) => {
            let (summary, ready) = agent::agents_ready(ds);
            AgentFacts {
                summary,
                ready,
                missing: None,
            }
        }
        Ok(None) => AgentFacts {
            summary: "0/0".into(),
            ready: false,
            missing: Some(format!(
                "DaemonSet {}/{name} does not exist",
                ctx.settings.namespace
            )),
        },
        Err(error) => AgentFacts {
            summary: "0/0".into(),
            ready: false,
            missing: Some(format!(
                "cannot apply DaemonSet {}/{name}: {}",
                ctx.settings.namespace,
                truncate(&error.to_string(), 300)
            )),
        },
    })
}

/// Brings the agent DaemonSet to `desired` (deletes an owned one when the policy has no agent
/// any more); returns the DaemonSet as it stands afterwards.
async fn sync_daemon_set(
    policy: &PortPolicy,
    desired: Option<DaemonSet>,
    ctx: &Context,
) -> Result<Option<DaemonSet>> {
    let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let existing = existing_daemon_set(policy, ctx);
    match desired {
        Some(ds) => {
            let hash = ds.annotations().get(SPEC_HASH_ANNOTATION);
            if let Some(existing) = existing
                .as_ref()
                .filter(|e| e.annotations().get(SPEC_HASH_ANNOTATION) == hash)
            {
                return Ok(Some((**existing).clone()));
            }
            let name = ds.name_any();
            let params = PatchParams::apply(FIELD_MANAGER).force();
            ctx.ensure_leading()?;
            let applied = api.patch(&name, &params, &Patch::Apply(&ds)).await?;
            tracing::info!(policy = %policy.name_any(), daemonset = %name, "applied the agent DaemonSet");
            Ok(Some(applied))
        }
        None => {
            let owned = existing.filter(|ds| {
                ds.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == policy.metadata.uid.as_ref() && o.controller == Some(true))
            });
            if let Some(ds) = owned {
                ctx.ensure_leading()?;
                match api.delete(&ds.name_any(), &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(None)
        }
    }
}
