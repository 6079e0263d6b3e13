//! Wiring: watches, the controller, leader election, the HTTP server and shutdown.
//!
//! Every replica runs every watch and keeps every cache, so a follower is Ready and takes over
//! warm. Reconciles run only on the leader ([`Leadership`] gates them and every write in them);
//! a leader that stops leading cancels its reconciles at once and exits (status 3), to be
//! restarted as a follower with fresh caches. On SIGTERM or Ctrl-C the controller finishes its
//! running reconciles, then the Lease is released so a follower takes over at its next check.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, Service};
use kube::api::{ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event, watcher};
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Api, Client, Resource, ResourceExt};

use super::agent::POLICY_LABEL;
use super::context::{
    CacheState, CacheSync, Context, Settings, Stores, UnreadablePolicies, UnreadablePolicy,
};
use super::leader_pod::LeaderPod;
use super::lease::{Elector, Leadership, Timing};
use super::metrics::{Metrics, WATCHED_RESOURCES};
use super::reconcile::{error_policy, reconcile, truncate};
use super::server::{self, Health};
use super::services::{self, key_of};
use super::webhook::tls::{self, CertificateSource};
use super::webhook::{self, Webhook};
use super::{Error, Result};
use crate::agent::parse_duration;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::hostport::HostPortPod;
use portpolicy_core::ports::PortRange;
use portpolicy_core::problem::{Problem, object_ref};
use portpolicy_core::service::ServiceModel;

/// How long running reconciles may take to finish after SIGTERM before they are dropped; well
/// inside the default 30 s termination grace period, leaving time to release the Lease.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Flags of `portpolicy operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PORTPOLICY_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,
    /// The operator's namespace, where agent DaemonSets and the leader Lease live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "portpolicy-system")]
    pub namespace: String,
    /// Default agent image (the operator's own).
    #[arg(
        long,
        env = "PORTPOLICY_IMAGE",
        default_value = "ghcr.io/portpolicy/portpolicy:latest"
    )]
    pub image: String,
    /// The cluster's --service-node-port-range.
    #[arg(
        long = "service-node-port-range",
        alias = "node-port-range",
        env = "PORTPOLICY_NODE_PORT_RANGE",
        default_value = "30000-32767"
    )]
    pub node_port_range: PortRange,
    /// This replica's name in the leader Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// This replica's own Pod in --namespace (the downward API's POD_NAME). The leader labels
    /// it `portpolicy.io/leader=true`, which the webhook Service selects, so admission reviews
    /// reach the leader only. Without it no Pod is labelled.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Policies reconciled at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u16,
    /// How long followers wait on a leader that stopped renewing (whole seconds).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,
    /// A leader that could not renew for this long stops writing and follows again; shorter
    /// than the lease duration.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    /// How often the leader renews the Lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_renew_period: Duration,
    /// How often a follower checks the Lease (and so how fast it takes over a released one).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,
    /// Address of the admission webhook (HTTPS, `POST /mutate-v1-service`).
    #[arg(long, env = "PORTPOLICY_WEBHOOK_ADDRESS", default_value = "0.0.0.0:9443")]
    pub webhook_address: SocketAddr,
    /// The webhook's serving certificate (PEM), reloaded when it changes. Without it and
    /// --tls-key-file, a self-signed CA and certificate are made at start and the leader
    /// writes the CA into the MutatingWebhookConfiguration's caBundle.
    #[arg(long, env = "PORTPOLICY_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The key of --tls-cert-file (PEM), reloaded with it.
    #[arg(long, env = "PORTPOLICY_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// How often the certificate files are checked for a change.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_period: Duration,
    /// The Service in front of the webhook, in --namespace: the self-signed certificate's name.
    #[arg(long, default_value = "portpolicy-webhook")]
    pub webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle the leader sets (self-signed only).
    #[arg(long, default_value = "portpolicy-operator")]
    pub webhook_configuration: String,
    /// How long a nodePort handed out at admission stays reserved for a Service the watch has
    /// not shown yet (its create failed, or is still on its way).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub webhook_reservation_timeout: Duration,
}

impl OperatorArgs {
    pub fn certificate_source(&self) -> CertificateSource {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => CertificateSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => {
                let (service, ns) = (&self.webhook_service, &self.namespace);
                CertificateSource::SelfSigned {
                    dns_names: vec![
                        format!("{service}.{ns}.svc"),
                        format!("{service}.{ns}.svc.cluster.local"),
                        format!("{service}.{ns}"),
                        service.clone(),
                    ],
                }
            }
        }
    }

    pub fn timing(&self) -> Timing {
        Timing {
            lease_duration: self.leader_elect_lease_duration,
            renew_deadline: self.leader_elect_renew_deadline,
            renew_period: self.leader_elect_renew_period,
            follow_period: self.leader_elect_retry_period,
        }
    }
}

/// Keeps a cache marked as dropped once its watch stream is gone.
struct WatchAlive {
    caches: CacheSync,
    resource: &'static str,
}

impl Drop for WatchAlive {
    fn drop(&mut self) {
        self.caches.mark(self.resource, CacheState::Dropped);
    }
}

/// Marks `resource` listed in `caches` whenever its watch completes a list (after the store
/// has applied it), and dropped when the stream is.
fn track_listing<K>(caches: &CacheSync, resource: &'static str) -> impl FnMut(&Event<K>) + Send + 'static {
    let alive = WatchAlive {
        caches: caches.clone(),
        resource,
    };
    move |event| {
        if matches!(event, Event::InitDone) {
            alive.caches.mark(alive.resource, CacheState::Listed);
        }
    }
}

fn count_errors(metrics: &Metrics, resource: &'static str) -> impl Fn(&watcher::Error) + Send + 'static {
    let errors = metrics.watch_errors.with_label_values(&[resource]);
    move |error| {
        errors.inc();
        tracing::warn!(error = %truncate(&error.to_string(), 300), resource, "watch error; retrying");
    }
}

/// Watches `api` into a store, counting errors; a bad object or a failed watch is retried with
/// backoff and never ends the stream.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    metrics: &Metrics,
    caches: &CacheSync,
    resource: &'static str,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .inspect_ok(track_listing(caches, resource))
        .touched_objects()
        .inspect_err(count_errors(metrics, resource));
    (reader, stream)
}

/// Reads one watched PortPolicy as this operator's type, or says which field cannot be read.
pub fn read_policy(object: &DynamicObject) -> std::result::Result<PortPolicy, Box<UnreadablePolicy>> {
    let name = object.name_any();
    let unreadable = |field: String, message: String| {
        Box::new(UnreadablePolicy {
            reference: ObjectReference {
                api_version: Some(PortPolicy::api_version(&()).into()),
                kind: Some(PortPolicy::kind(&()).into()),
                name: Some(name.clone()),
                uid: object.metadata.uid.clone(),
                ..Default::default()
            },
            resource_version: object.metadata.resource_version.clone(),
            problem: Problem::new(
                object_ref("PortPolicy", None, &name),
                field,
                truncate(&message, 300),
            ),
        })
    };
    let value = serde_json::to_value(object).map_err(|e| unreadable(String::new(), e.to_string()))?;
    serde_path_to_error::deserialize::<_, PortPolicy>(value).map_err(|e| {
        // Spelled as `plan` spells it, a missing field included (`spec`, not the root).
        let field = portpolicy_core::snapshot::error_field(&e);
        unreadable(field, e.into_inner().to_string())
    })
}

/// Turns the untyped policy watch into a typed one. PortPolicies are listed and watched
/// untyped and read one by one, because one object that does not read as a `PortPolicy` (a
/// field of the wrong type, say from a CRD older than this operator) would otherwise fail the
/// whole list, keep the policy cache from ever filling, and so stop every reconcile. Such a
/// policy is left out of the cache (an earlier readable copy is removed from it) and kept in
/// `unreadable`, which reports it.
struct PolicyReader {
    unreadable: UnreadablePolicies,
    metrics: Metrics,
    /// Unreadable policies seen during a re-list, swapped in when it completes.
    relisting: Option<BTreeMap<String, UnreadablePolicy>>,
}

impl PolicyReader {
    fn note(&self, name: &str, policy: &UnreadablePolicy) {
        let known = self.unreadable.get();
        if known.get(name).map(|p| &p.problem) != Some(&policy.problem) {
            tracing::warn!(problem = %policy.problem, "cannot read a PortPolicy; it is not reconciled until fixed");
        }
    }

    fn read(&mut self, event: Event<DynamicObject>) -> Option<Event<PortPolicy>> {
        let out = match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                Some(Event::Init)
            }
            Event::InitApply(object) => match read_policy(&object) {
                Ok(policy) => Some(Event::InitApply(policy)),
                Err(policy) => {
                    self.note(&object.name_any(), &policy);
                    self.relisting
                        .get_or_insert_default()
                        .insert(object.name_any(), *policy);
                    None
                }
            },
            Event::InitDone => {
                self.unreadable.replace(self.relisting.take().unwrap_or_default());
                Some(Event::InitDone)
            }
            Event::Apply(object) => match read_policy(&object) {
                Ok(policy) => {
                    self.unreadable.remove(&object.name_any());
                    Some(Event::Apply(policy))
                }
                Err(policy) => {
                    self.note(&object.name_any(), &policy);
                    self.unreadable.insert(object.name_any(), *policy);
                    Some(Event::Delete(placeholder(&object)))
                }
            },
            Event::Delete(object) => {
                self.unreadable.remove(&object.name_any());
                Some(Event::Delete(placeholder(&object)))
            }
        };
        self.metrics.unreadable_policies.set(self.unreadable.len() as i64);
        out
    }
}

/// A policy with only `object`'s metadata: enough for the store to remove it by name.
fn placeholder(object: &DynamicObject) -> PortPolicy {
    PortPolicy {
        metadata: object.metadata.clone(),
        spec: Default::default(),
        status: None,
    }
}

/// Publishes one Warning event per unreadable policy (and per resourceVersion of it), while
/// this replica leads.
async fn report_unreadable(ctx: Arc<Context>) {
    let mut changes = ctx.unreadable.subscribe();
    let mut reported: BTreeMap<String, Option<String>> = BTreeMap::new();
    loop {
        ctx.leadership.leading().await;
        let current = changes.borrow_and_update().clone();
        reported.retain(|name, _| current.contains_key(name));
        for (name, policy) in current {
            if reported.get(&name) == Some(&policy.resource_version) || !ctx.leadership.is_leading() {
                continue;
            }
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: "Unreadable".into(),
                note: Some(truncate(
                    &format!("{}; not reconciled until fixed", policy.problem),
                    1000,
                )),
                action: "Read".into(),
                secondary: None,
            };
            match ctx.recorder.publish(&event, &policy.reference).await {
                Ok(()) => {
                    reported.insert(name, policy.resource_version);
                }
                Err(error) => tracing::warn!(%error, policy = %name, "cannot publish event"),
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = ctx.leadership.lost() => {}
        }
    }
}

fn all_policies(store: &Store<PortPolicy>) -> Vec<ObjectRef<PortPolicy>> {
    store.state().iter().map(|p| ObjectRef::from_obj(&**p)).collect()
}

fn namespace_labels(namespaces: &Store<Namespace>, ns: &str) -> portpolicy_core::governance::Labels {
    let namespace = namespaces.get(&ObjectRef::new(ns));
    portpolicy_core::governance::namespace_labels(
        ns,
        namespace.as_ref().and_then(|n| n.metadata.labels.as_ref()),
    )
}

/// Policies a Service change concerns: those selecting it, those holding a record for it (it
/// may be a re-created Service getting its port back, or a deleted one to record as released),
/// and all of them when the operator holds fields on a Service that no policy selects now.
fn policies_for_service(
    service: &Service,
    policies: &Store<PortPolicy>,
    namespaces: &Store<Namespace>,
) -> Vec<ObjectRef<PortPolicy>> {
    let (ns, name) = key_of(&ServiceModel::read(service));
    let ns_labels = namespace_labels(namespaces, &ns);
    let mut out = Vec::new();
    for policy in policies.state() {
        let selects = policy
            .compile()
            .is_ok_and(|c| c.selects_service(Some(&ns_labels), service.metadata.labels.as_ref()));
        let recorded = policy
            .status
            .iter()
            .flat_map(|s| &s.allocations)
            .any(|r| r.namespace == ns && r.service == name);
        if selects || recorded {
            out.push(ObjectRef::from_obj(&*policy));
        }
    }
    if out.is_empty() && services::managed_by_operator(service) {
        return all_policies(policies);
    }
    out
}

/// Policies a Pod change concerns: only Pods that can hold host ports matter, and only to the
/// policies whose namespace selector covers them.
fn policies_for_pod(
    pod: &HostPortPod,
    policies: &Store<PortPolicy>,
    namespaces: &Store<Namespace>,
) -> Vec<ObjectRef<PortPolicy>> {
    if pod.spec.containers.is_empty() && pod.spec.init_containers.is_empty() {
        return Vec::new();
    }
    let ns_labels = namespace_labels(namespaces, pod.namespace());
    policies
        .state()
        .iter()
        .filter(|p| p.compile().is_ok_and(|c| c.selects_namespace(Some(&ns_labels))))
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// Resolves on the first SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
            },
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("interrupted: shutting down");
    }
}

pub async fn run(args: OperatorArgs) -> Result<()> {
    let timing = args.timing();
    timing.validate().map_err(Error::Config)?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Error::Config("set POD_NAME or --identity for the leader Lease".into()))?;
    let client = Client::try_default()
        .await
        .map_err(|e| Error::Config(format!("cannot configure the Kubernetes client: {e}")))?;
    let metrics = Metrics::new();
    let caches = CacheSync::new(&WATCHED_RESOURCES);
    let leadership = Leadership::new(false);
    let health = Health {
        caches: caches.clone(),
        leadership: leadership.clone(),
    };
    let listener = server::bind(args.metrics_address).await?;
    let certificates = args.certificate_source();
    let (tls_config, self_signed_ca) = tls::serving_config(&certificates).await?;
    let webhook_listener = tls::bind(args.webhook_address)?;
    let webhook = Webhook::new(
        args.node_port_range,
        args.webhook_reservation_timeout,
        leadership.clone(),
        caches.clone(),
        metrics.clone(),
    );
    let shutdown = shutdown_signal().boxed().shared();

    let list = watcher::Config::default().any_semantic();
    let unreadable = UnreadablePolicies::default();
    let (policies, policy_writer) = reflector::store();
    let mut reader = PolicyReader {
        unreadable: unreadable.clone(),
        metrics: metrics.clone(),
        relisting: None,
    };
    let policy_api = Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<PortPolicy>(&()));
    let (webhook_policies, policy_store) = (webhook.clone(), policies.clone());
    let policy_events = watcher(policy_api, list.clone())
        .default_backoff()
        .try_filter_map(move |event| std::future::ready(Ok(reader.read(event))))
        .reflect(policy_writer)
        .inspect_ok(move |event| {
            // Once per list, not per listed object.
            if !matches!(event, Event::Init | Event::InitApply(_)) {
                webhook_policies.observe_policies(&policy_store)
            }
        })
        .inspect_ok(track_listing(&caches, "portpolicies"))
        .touched_objects()
        .inspect_err(count_errors(&metrics, "portpolicies"));
    // Services feed the webhook's ledger event by event, before the cache counts as listed.
    let (services, service_writer) = reflector::store();
    let (webhook_services, service_store) = (webhook.clone(), services.clone());
    let service_events = watcher(Api::<Service>::all(client.clone()), list.clone())
        .default_backoff()
        .reflect(service_writer)
        .inspect_ok(move |event| webhook_services.observe_service(event, &service_store))
        .inspect_ok(track_listing(&caches, "services"))
        .touched_objects()
        .inspect_err(count_errors(&metrics, "services"));
    let (pods, pod_events) = reflect(
        Api::<HostPortPod>::all(client.clone()),
        list.clone(),
        &metrics,
        &caches,
        "pods",
    );
    let (namespaces, namespace_events) = reflect(
        Api::<Namespace>::all(client.clone()),
        list.clone(),
        &metrics,
        &caches,
        "namespaces",
    );
    let (webhook_namespaces, namespace_store) = (webhook.clone(), namespaces.clone());
    let namespace_events =
        namespace_events.inspect_ok(move |_| webhook_namespaces.observe_namespaces(&namespace_store));
    let (daemon_sets, daemon_set_events) = reflect(
        Api::<DaemonSet>::namespaced(client.clone(), &args.namespace),
        list.clone().labels(POLICY_LABEL),
        &metrics,
        &caches,
        "daemonsets",
    );
    // Nodes only matter when their labels change (policies' node selectors); their frequent
    // status heartbeats must not trigger anything, and their (large) objects are never stored.
    let node_events = watcher(Api::<PartialObjectMeta<Node>>::all(client.clone()), list.clone())
        .default_backoff()
        .inspect_ok(track_listing(&caches, "nodes"))
        .touched_objects()
        .predicate_filter(predicates::labels, Default::default())
        .inspect_err(count_errors(&metrics, "nodes"));

    let stores = Stores {
        policies: policies.clone(),
        services,
        pods,
        namespaces: namespaces.clone(),
        daemon_sets,
    };
    let settings = Settings {
        namespace: args.namespace.clone(),
        default_image: args.image.clone(),
        cluster_range: args.node_port_range,
    };
    let mut context = Context::new(
        client.clone(),
        stores,
        caches.clone(),
        leadership.clone(),
        metrics.clone(),
        settings,
        Some(identity.clone()),
    );
    context.unreadable = unreadable;
    let reviews = webhook.clone();
    context.in_flight = Arc::new(move || reviews.in_flight_ports());
    let ctx = Arc::new(context);
    let tls_upkeep = match (&certificates, self_signed_ca) {
        (CertificateSource::Files { cert, key }, _) => tls::reload_on_change(
            tls_config.clone(),
            cert.clone(),
            key.clone(),
            args.tls_reload_period,
        )
        .boxed(),
        (CertificateSource::SelfSigned { .. }, Some(ca)) => tls::publish_ca_bundle(
            client.clone(),
            args.webhook_configuration.clone(),
            ca,
            leadership.clone(),
        )
        .boxed(),
        (CertificateSource::SelfSigned { .. }, None) => futures::future::pending().boxed(),
    };
    let webhook_server = tls::serve(webhook_listener, tls_config, webhook::router(webhook.clone()));
    let leader_pod = args
        .pod_name
        .as_deref()
        .filter(|name| !name.is_empty())
        .map(|name| LeaderPod::new(client.clone(), &args.namespace, name));
    let label_upkeep = match &leader_pod {
        Some(pod) => pod.clone().follow(leadership.clone()).boxed(),
        None => {
            tracing::info!(
                "no POD_NAME (--pod-name): no Pod is labelled as the leader for the webhook Service"
            );
            futures::future::pending().boxed()
        }
    };
    let mut elector = Elector::new(client, &args.namespace, &identity, timing);

    let (p1, n1) = (policies.clone(), namespaces.clone());
    let (p2, n2) = (policies.clone(), namespaces.clone());
    let (p3, p4) = (policies.clone(), policies.clone());
    let controller = Controller::for_stream(policy_events, policies)
        .with_config(
            ControllerConfig::default()
                .concurrency(args.concurrency)
                .debounce(Duration::from_secs(1)),
        )
        .owns_stream(daemon_set_events)
        .watches_stream(service_events, move |svc| policies_for_service(&svc, &p1, &n1))
        .watches_stream(pod_events, move |pod| policies_for_pod(&pod, &p2, &n2))
        .watches_stream(namespace_events, move |_| all_policies(&p3))
        .watches_stream(node_events, move |_| all_policies(&p4))
        // A replica that starts leading reconciles everything: as a follower it skipped it all.
        .reconcile_all_on(leadership.acquisitions())
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Err(kube::runtime::controller::Error::ReconcilerFailed(error, object)) => {
                    tracing::debug!(%error, policy = %object.name, "reconcile failed")
                }
                Err(error) => tracing::debug!(%error, "controller event"),
                Ok(_) => {}
            }
        });
    let forced = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };

    let outcome = tokio::select! {
        () = controller => {
            tracing::info!("controller stopped");
            Ok(())
        }
        () = forced => {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "reconciles still running after the shutdown grace period; dropping them"
            );
            Ok(())
        }
        // Leadership is already false: no write starts, and leaving this select drops the
        // running reconciles.
        _ = elector.lead(&leadership, &metrics) => Err(Error::LostLeadership),
        () = report_unreadable(ctx) => unreachable!("the reporter runs until dropped"),
        () = webhook.expire_reservations() => unreachable!("the expiry runs until dropped"),
        () = tls_upkeep => unreachable!("certificate upkeep runs until dropped"),
        () = label_upkeep => unreachable!("the leader label's upkeep runs until dropped"),
        result = webhook_server => {
            return Err(Error::Config(format!(
                "the webhook server on {} stopped: {}",
                args.webhook_address,
                result.err().map_or_else(|| "no error".to_string(), |e| e.to_string())
            )));
        }
        result = server::serve(listener, metrics.clone(), health) => {
            return Err(result.err().unwrap_or(Error::MetricsServer {
                address: args.metrics_address,
                source: std::io::Error::other("the server stopped"),
            }));
        }
    };
    // Nothing writes any more (the controller, its reconciles and the reporter are dropped), so
    // the Lease can go: a follower takes over at its next check. (After a lost lead this only
    // succeeds if nobody else holds it and the API server answers in time.)
    // At the same time, reviews stop coming here once the label is gone (the next leader
    // removes it otherwise); both are bounded, so a lost API server delays the exit by 2 s.
    let unlabel = async {
        if let Some(pod) = &leader_pod {
            pod.unlabel(Duration::from_secs(2)).await;
        }
    };
    tokio::join!(elector.release(), unlabel);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    fn store<K: kube::Resource<DynamicType = ()> + Clone + 'static>(objects: Vec<K>) -> Store<K> {
        let (reader, mut writer) = reflector::store();
        for o in objects {
            writer.apply_watcher_event(&Event::Apply(o));
        }
        reader
    }

    fn policy(name: &str, spec: serde_json::Value) -> PortPolicy {
        serde_json::from_value(
            json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": name}, "spec": spec}),
        )
        .unwrap()
    }

    fn names(refs: Vec<ObjectRef<PortPolicy>>) -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn service_changes_go_to_selecting_or_recording_policies() {
        let mut recording = policy(
            "recording",
            json!({"serviceSelector": {"matchLabels": {"x": "y"}}}),
        );
        recording.status = Some(
            serde_json::from_value(json!({"allocations": [{"namespace": "shop", "service": "web",
            "kind": "Service", "nodePort": 31000}]}))
            .unwrap(),
        );
        let policies = store(vec![
            policy(
                "edge",
                json!({"namespaceSelector": {"matchLabels": {"team": "shop"}}}),
            ),
            policy(
                "other",
                json!({"namespaceSelector": {"matchLabels": {"team": "else"}}}),
            ),
            recording,
        ]);
        let namespaces = store(vec![
            serde_json::from_value::<Namespace>(
                json!({"metadata": {"name": "shop", "labels": {"team": "shop"}}}),
            )
            .unwrap(),
        ]);
        let web: Service =
            serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "shop"}})).unwrap();
        let mut got = names(policies_for_service(&web, &policies, &namespaces));
        got.sort();
        assert_eq!(got, ["edge", "recording"]);

        let pod_without_host_ports: HostPortPod = serde_json::from_value(json!({"metadata": {"name": "p",
            "namespace": "shop"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]}}))
        .unwrap();
        assert!(policies_for_pod(&pod_without_host_ports, &policies, &namespaces).is_empty());
        let pod: HostPortPod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "shop"},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]}}))
        .unwrap();
        let mut got = names(policies_for_pod(&pod, &policies, &namespaces));
        got.sort();
        // "recording" has no namespace selector: its hostPort rules cover every namespace.
        assert_eq!(got, ["edge", "recording"]);
    }

    fn dynamic(name: &str, retention: serde_json::Value) -> DynamicObject {
        serde_json::from_value(
            json!({"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": name, "resourceVersion": "1"},
            "spec": {"nodePorts": {"range": "31000-31099", "retentionSeconds": retention}}}),
        )
        .unwrap()
    }

    #[test]
    fn unreadable_policies_stay_out_of_the_cache_and_the_rest_goes_in() {
        let metrics = Metrics::new();
        let unreadable = UnreadablePolicies::default();
        let mut reader = PolicyReader {
            unreadable: unreadable.clone(),
            metrics: metrics.clone(),
            relisting: None,
        };
        let (store, mut writer) = reflector::store::<PortPolicy>();
        let mut feed = |event| {
            if let Some(event) = reader.read(event) {
                writer.apply_watcher_event(&event);
            }
        };
        feed(Event::Init);
        feed(Event::InitApply(dynamic("broken", json!("a day"))));
        feed(Event::InitApply(dynamic("edge", json!(60))));
        feed(Event::InitDone);
        let mut names: Vec<_> = store.state().iter().map(|p| p.name_any()).collect();
        names.sort();
        assert_eq!(names, ["edge"]);
        let known = unreadable.get();
        assert_eq!(known["broken"].problem.field, "spec.nodePorts.retentionSeconds");
        assert_eq!(metrics.unreadable_policies.get(), 1);

        // Fixed: it goes into the cache and off the list.
        feed(Event::Apply(dynamic("broken", json!(3600))));
        assert!(unreadable.is_empty());
        assert_eq!(store.state().len(), 2);
        // Broken again: the readable copy leaves the cache, so its old spec is not acted on.
        feed(Event::Apply(dynamic("edge", json!(true))));
        assert_eq!(store.state().len(), 1);
        assert_eq!(unreadable.len(), 1);
        // Deleted while unreadable.
        feed(Event::Delete(dynamic("edge", json!(true))));
        assert!(unreadable.is_empty());
        assert_eq!(metrics.unreadable_policies.get(), 0);
    }
}
