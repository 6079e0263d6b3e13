//! The mutating admission webhook: `POST /mutate-v1-service` over HTTPS gives a governed
//! Service its policy's nodePorts at creation, so the first port it ever has is its last.
//!
//! Only the leader assigns ports (see docs/operator.md, "Admission webhook", for why this and
//! not reservations in the policy's status): its [`AdmissionLedger`] is fed by the same watches
//! as the reconcile, one event at a time, and a mutex around it makes every review of this
//! process see the ports the previous ones handed out. A follower that gets a review (its
//! Service endpoints lag a handover) allows it unchanged with a warning, as when the webhook
//! is down: the reconcile moves the port into the range afterwards.

pub mod tls;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use chrono::Utc;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::ResourceExt;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::Store;
use kube::runtime::watcher::Event;

use super::context::CacheSync;
use super::lease::Leadership;
use super::metrics::Metrics;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::governance::NamespaceLabels;
use portpolicy_core::nodeport::{AdmissionLedger, LedgerPolicies, ServiceReview};
use portpolicy_core::ports::PortRange;

/// The path the MutatingWebhookConfiguration in `config/` calls.
pub const MUTATE_SERVICE_PATH: &str = "/mutate-v1-service";

/// The webhook's state: the ledger and what decides whether this replica may answer.
#[derive(Clone)]
pub struct Webhook {
    ledger: Arc<Mutex<AdmissionLedger>>,
    cluster_range: PortRange,
    leadership: Leadership,
    caches: CacheSync,
    metrics: Metrics,
}

/// How a review was answered, as `webhook_reviews_total{outcome}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Patched,
    Unchanged,
    NotLeader,
    Invalid,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Patched => "patched",
            Outcome::Unchanged => "unchanged",
            Outcome::NotLeader => "not_leader",
            Outcome::Invalid => "invalid",
        }
    }
}

impl Webhook {
    pub fn new(
        cluster_range: PortRange,
        reservation_timeout: Duration,
        leadership: Leadership,
        caches: CacheSync,
        metrics: Metrics,
    ) -> Self {
        Webhook {
            cluster_range,
            ledger: Arc::new(Mutex::new(AdmissionLedger::new(
                cluster_range,
                reservation_timeout,
            ))),
            leadership,
            caches,
            metrics,
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, AdmissionLedger> {
        // A panic while holding the lock cannot leave the ledger half-updated in a way that
        // matters more than stopping to answer: keep serving with what it holds.
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A Service watch event, after the store applied it. A completed (re-)list replaces
    /// every Service, so deletions missed while the watch was down are not held forever.
    pub fn observe_service(&self, event: &Event<Service>, store: &Store<Service>) {
        match event {
            Event::Apply(service) => self.ledger().upsert_service(service),
            Event::Delete(service) => {
                let namespace = service.namespace().unwrap_or_default();
                self.ledger().remove_service(&namespace, &service.name_any());
            }
            Event::InitDone => {
                let services = store.state();
                let mut ledger = self.ledger();
                ledger.clear_services();
                for service in services {
                    ledger.upsert_service(&service);
                }
            }
            Event::Init | Event::InitApply(_) => {}
        }
    }

    /// Any PortPolicy event, after the store applied it: specs and records are re-read.
    /// Compiled before taking the lock, so reviews wait only for the swap.
    pub fn observe_policies(&self, store: &Store<PortPolicy>) {
        let policies = store.state();
        let compiled = LedgerPolicies::compile(policies.iter().map(|p| &**p), self.cluster_range, Utc::now());
        self.ledger().install_policies(compiled);
    }

    /// Any Namespace event, after the store applied it.
    pub fn observe_namespaces(&self, store: &Store<Namespace>) {
        let labels: NamespaceLabels = store
            .state()
            .iter()
            .map(|ns| (ns.name_any(), ns.metadata.labels.clone().unwrap_or_default()))
            .collect();
        self.ledger().set_namespaces(labels);
    }

    /// The ports handed out by reviews whose Services the watch has not shown yet.
    pub fn in_flight_ports(&self) -> Vec<u16> {
        self.ledger().in_flight_ports()
    }

    /// Releases timed-out reservations and keeps the gauge current, once a second.
    pub async fn expire_reservations(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (released, pending) = {
                let mut ledger = self.ledger();
                (ledger.expire(Utc::now()), ledger.pending_reservations())
            };
            if released > 0 {
                tracing::info!(
                    released,
                    "released nodePort reservations whose Services never appeared"
                );
            }
            self.metrics.webhook_reservations.set(pending as i64);
        }
    }

    /// Answers one HTTP body: an `admission.k8s.io/v1` AdmissionReview. Never fails: a body
    /// that cannot be read gets a response that says why.
    pub fn answer(&self, body: &[u8]) -> (AdmissionReview<DynamicObject>, Outcome) {
        let timer = self.metrics.webhook_review_duration.start_timer();
        let (response, outcome) = self.respond(body);
        timer.observe_duration();
        self.metrics
            .webhook_reviews
            .with_label_values(&[outcome.label()])
            .inc();
        if outcome == Outcome::Patched {
            self.metrics
                .webhook_reservations
                .set(self.ledger().pending_reservations() as i64);
        }
        (response.into_review(), outcome)
    }

    fn respond(&self, body: &[u8]) -> (AdmissionResponse, Outcome) {
        let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
            Ok(review) => review,
            Err(error) => {
                let message =
                    format!("cannot read the body as an admission.k8s.io/v1 AdmissionReview: {error}");
                return (AdmissionResponse::invalid(message), Outcome::Invalid);
            }
        };
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(request) => request,
            Err(_) => {
                let message = "the AdmissionReview has no request";
                return (AdmissionResponse::invalid(message), Outcome::Invalid);
            }
        };
        let allowed = AdmissionResponse::from(&request);
        let unchanged = |message: String| {
            let mut response = allowed.clone();
            response.result.message = message;
            (response, Outcome::Unchanged)
        };
        let kind = &request.kind;
        if (kind.group.as_str(), kind.version.as_str(), kind.kind.as_str()) != ("", "v1", "Service") {
            return unchanged(format!(
                "portpolicy assigns nodePorts to v1 Services only; {}/{} {} allowed unchanged",
                kind.group, kind.version, kind.kind
            ));
        }
        if !matches!(request.operation, Operation::Create | Operation::Update) {
            return unchanged(format!(
                "{:?} needs no nodePort; allowed unchanged",
                request.operation
            ));
        }
        let read = |object: Option<&DynamicObject>, what: &str| -> Result<Option<Service>, String> {
            let Some(object) = object else { return Ok(None) };
            let value = serde_json::to_value(object).map_err(|e| e.to_string())?;
            serde_path_to_error::deserialize::<_, Service>(value)
                .map(Some)
                .map_err(|e| {
                    format!(
                        "cannot read the {what} as a Service at {}: {}",
                        e.path(),
                        e.inner()
                    )
                })
        };
        let (mut service, old) = match (
            read(request.object.as_ref(), "object"),
            read(request.old_object.as_ref(), "oldObject"),
        ) {
            (Ok(Some(service)), Ok(old)) => (service, old),
            (Ok(None), _) => return unchanged("the review has no object; allowed unchanged".into()),
            (Err(message), _) | (_, Err(message)) => {
                return unchanged(format!("{message}; allowed unchanged"));
            }
        };
        if service
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default()
            .is_empty()
        {
            service.metadata.namespace = request.namespace.clone();
        }
        let object = format!(
            "Service/{}/{}",
            service.namespace().unwrap_or_default(),
            service.metadata.name.as_deref().unwrap_or(&request.name)
        );
        if !self.leadership.is_leading() {
            let mut response = allowed.clone();
            response.warnings = Some(vec![format!(
                "{object}: this portpolicy replica does not lead; the leader moves its nodePorts into its policy's range after creation"
            )]);
            return (response, Outcome::NotLeader);
        }
        let waiting = self.caches.not_synced();
        if !waiting.is_empty() {
            let mut response = allowed.clone();
            response.warnings = Some(vec![format!(
                "{object}: the portpolicy operator is still listing the cluster; its nodePorts are moved into its policy's range after creation"
            )]);
            return (response, Outcome::NotLeader);
        }
        let admission = self.ledger().review(
            &ServiceReview {
                service: &service,
                old: old.as_ref(),
                uid: &request.uid,
                dry_run: request.dry_run,
            },
            Utc::now(),
        );
        let mut response = allowed.clone();
        if !admission.warnings.is_empty() {
            response.warnings = Some(admission.warnings.clone());
        }
        if admission.patch.is_empty() {
            return (response, Outcome::Unchanged);
        }
        let patch: json_patch::Patch = match serde_json::from_value(serde_json::Value::Array(admission.patch))
        {
            Ok(patch) => patch,
            Err(error) => return unchanged(format!("cannot build the patch: {error}; allowed unchanged")),
        };
        match response.clone().with_patch(patch) {
            Ok(patched) => {
                tracing::info!(
                    service = %object,
                    policy = admission.policy.as_deref().unwrap_or_default(),
                    assigned = ?admission.assigned,
                    dry_run = request.dry_run,
                    "assigned nodePorts at admission"
                );
                (patched, Outcome::Patched)
            }
            Err(error) => unchanged(format!("cannot serialize the patch: {error}; allowed unchanged")),
        }
    }
}

pub fn router(webhook: Webhook) -> Router {
    Router::new()
        .route(MUTATE_SERVICE_PATH, post(mutate_handler))
        .with_state(webhook)
}

async fn mutate_handler(State(webhook): State<Webhook>, body: Bytes) -> impl IntoResponse {
    let (review, _) = webhook.answer(&body);
    // kube-core serializes `response.patch` (a Vec<u8>) as an array of numbers; the API server
    // reads it as Go's []byte, a base64 string, and would fail the call (so, with
    // failurePolicy Ignore, never apply a patch). The system e2e caught this.
    let body = serde_json::to_value(&review)
        .map(|mut value| {
            if let Some(patch) = review.response.as_ref().and_then(|r| r.patch.clone())
                && let Ok(encoded) = serde_json::to_value(k8s_openapi::ByteString(patch))
            {
                value["response"]["patch"] = encoded;
            }
            value
        })
        .and_then(|value| serde_json::to_vec(&value));
    let body = body.unwrap_or_else(|e| {
        format!("{{\"kind\":\"AdmissionReview\",\"apiVersion\":\"admission.k8s.io/v1\",\"response\":{{\"uid\":\"\",\"allowed\":true,\"status\":{{\"message\":\"cannot serialize the response: {e}\"}}}}}}").into_bytes()
    });
    ([(header::CONTENT_TYPE, "application/json")], body)
}
