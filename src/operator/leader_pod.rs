//! The leader labels its own Pod `portpolicy.io/leader=true`, and the webhook Service in
//! `config/` selects that label, so admission reviews reach the replica whose ledger assigns
//! ports instead of half of them reaching a follower (which allows them unchanged).
//!
//! - On winning the Lease, and every 10 s while it leads, it makes sure its Pod has the label
//!   and removes the label from every other Pod of the namespace that still has it (a leader
//!   killed without cleaning up, or one whose removal at exit could not reach the API server
//!   and that the kubelet restarted in the same Pod). The check is one list of the labelled
//!   Pods; it undoes a removal another process sent late (a dead leader's, held up).
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
/// How often the leader checks that its Pod, and only it, has the label.
const CHECK: Duration = Duration::from_secs(10);

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

    /// Makes this Pod the only one with the label: lists the labelled Pods (a read, all there
    /// is to it while nothing changed), labels this one if it is missing, and removes the label
    /// from the others. Returns whether this Pod was labelled, and the Pods cleared.
    async fn converge(&self) -> Result<(bool, Vec<String>), kube::Error> {
        let selector = format!("{LEADER_LABEL}={LEADER_VALUE}");
        let labelled = self
            .api
            .list_metadata(&ListParams::default().labels(&selector))
            .await?;
        let names: Vec<String> = labelled
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        let mut set = false;
        // Noted before the write (which may land even if its answer never comes), and when the
        // label is there already (set by this Pod's previous process): removed on exit.
        self.labelled.store(true, Ordering::SeqCst);
        if !names.contains(&self.name) {
            self.set_label(&self.name, Some(LEADER_VALUE)).await?;
            set = true;
        }
        let mut cleared = Vec::new();
        for name in names.into_iter().filter(|n| *n != self.name) {
            self.set_label(&name, None).await?;
            cleared.push(name);
        }
        Ok((set, cleared))
    }

    /// Keeps the label on this replica's Pod, and on no other, while it leads (runs until
    /// dropped): at once when it starts leading, then every [`CHECK`], so that a removal
    /// another process sent late (a dead leader's, held up by the network) is undone. A
    /// replica restarted in a Pod that still has the label (its removal at exit failed) leaves
    /// it: the next leader removes it, or it leads again itself; a follower writes nothing.
    pub async fn follow(self, leadership: Leadership) {
        loop {
            leadership.leading().await;
            while leadership.is_leading() {
                let wait = match self.converge().await {
                    Ok((set, cleared)) => {
                        if set {
                            tracing::info!(pod = %self.name, label = LEADER_LABEL, "labelled this Pod as the leader: the webhook Service routes reviews here");
                        }
                        if !cleared.is_empty() {
                            tracing::info!(pods = ?cleared, "removed the leader label from Pods that no longer lead");
                        }
                        CHECK
                    }
                    Err(error) => {
                        tracing::warn!(%error, pod = %self.name, "cannot set the leader label; retrying");
                        RETRY
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = leadership.lost() => {}
                }
            }
            self.unlabel(RETRY).await;
        }
    }
}
