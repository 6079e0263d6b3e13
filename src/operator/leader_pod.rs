//! The leader labels its own Pod `portpolicy.io/leader=true`, and the webhook Service in
//! `config/` selects that label, so admission reviews reach the replica whose ledger assigns
//! ports instead of half of them reaching a follower (which allows them unchanged).
//!
//! - On winning the Lease it labels its Pod, then removes the label from every other Pod of the
//!   namespace that still has it (a leader killed without cleaning up, or one whose removal at
//!   exit could not reach the API server and that the kubelet restarted in the same Pod).
//! - On losing the lead or on shutdown it removes its own label (bounded in time; the next
//!   leader clears it otherwise).
//!
//! Every write is a JSON merge patch of `metadata.labels` alone: setting a label that is set,
//! or removing one that is absent, changes nothing, so retries are harmless. Handover leaves a
//! moment with no labelled Pod (no endpoint: the API server ignores the webhook, as
//! `failurePolicy: Ignore` says, and the reconcile moves the port) or with two (a review that
//! reaches the old leader is allowed unchanged); neither gives two Services one port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use super::lease::Leadership;

/// The label the leader sets on its own Pod; config/webhook.yaml's Service selects it.
pub const LEADER_LABEL: &str = "portpolicy.io/leader";
/// Its value while the Pod's replica leads.
pub const LEADER_VALUE: &str = "true";

const RETRY: Duration = Duration::from_secs(2);

/// This replica's own Pod, as the downward API names it.
#[derive(Clone)]
pub struct LeaderPod {
    api: Api<Pod>,
    name: String,
    /// Whether this process set the label (and has not removed it since).
    labelled: Arc<AtomicBool>,
}

impl LeaderPod {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        LeaderPod {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            labelled: Arc::default(),
        }
    }

    async fn set_label(&self, pod: &str, value: Option<&str>) -> Result<(), kube::Error> {
        let patch = json!({"metadata": {"labels": {LEADER_LABEL: value}}});
        self.api
            .patch_metadata(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }

    /// Removes the label from this replica's Pod if this process set it; bounded by `limit`,
    /// for shutdown. (A follower writes nothing.)
    pub async fn unlabel(&self, limit: Duration) {
        if !self.labelled.load(Ordering::SeqCst) {
            return;
        }
        match tokio::time::timeout(limit, self.set_label(&self.name, None)).await {
            Ok(Ok(())) => {
                self.labelled.store(false, Ordering::SeqCst);
                tracing::info!(pod = %self.name, label = LEADER_LABEL, "removed the leader label from this Pod")
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, pod = %self.name, "cannot remove the leader label; the next leader does")
            }
            Err(_) => tracing::warn!(
                pod = %self.name,
                "the API server did not answer the leader label's removal; the next leader removes it"
            ),
        }
    }

    /// Removes the label from every other Pod that has it; returns their names.
    async fn clear_others(&self) -> Result<Vec<String>, kube::Error> {
        let selector = format!("{LEADER_LABEL}={LEADER_VALUE}");
        let labelled = self
            .api
            .list_metadata(&ListParams::default().labels(&selector))
            .await?;
        let mut cleared = Vec::new();
        for pod in labelled.items {
            let Some(name) = pod.metadata.name else { continue };
            if name != self.name {
                self.set_label(&name, None).await?;
                cleared.push(name);
            }
        }
        Ok(cleared)
    }

    /// Keeps the label on this replica's Pod while it leads (runs until dropped). A replica
    /// restarted in a Pod that still has the label (its removal at exit failed) leaves it: the
    /// next leader removes it, or it leads again itself; a follower writes nothing.
    pub async fn follow(self, leadership: Leadership) {
        loop {
            leadership.leading().await;
            let mut labelled = false;
            while leadership.is_leading() {
                let step = async {
                    if !labelled {
                        // Set first: a removal at shutdown must follow a write that may have
                        // landed even if its answer never came.
                        self.labelled.store(true, Ordering::SeqCst);
                        self.set_label(&self.name, Some(LEADER_VALUE)).await?;
                        labelled = true;
                        tracing::info!(pod = %self.name, label = LEADER_LABEL, "labelled this Pod as the leader: the webhook Service routes reviews here");
                    }
                    self.clear_others().await
                };
                match step.await {
                    Ok(cleared) => {
                        if !cleared.is_empty() {
                            tracing::info!(pods = ?cleared, "removed the leader label from Pods that no longer lead");
                        }
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, pod = %self.name, "cannot set the leader label; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(RETRY) => {}
                            () = leadership.lost() => {}
                        }
                    }
                }
            }
            leadership.lost().await;
            self.unlabel(RETRY).await;
        }
    }
}
