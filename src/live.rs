//! `portpolicy plan` on a live cluster: list, read-only, the kinds a snapshot file would hold.
//!
//! Each kind is listed cluster-wide in pages, as `kubectl get -A` does, and every page goes
//! through the same loader as a file ([`portpolicy_core::snapshot::Loader`]), so a live plan
//! and a plan of `kubectl get -o yaml` output of the same cluster are the same plan. A kind the
//! user's RBAC does not let it list (403), or whose API is not served (the PortPolicy CRD not
//! installed: 404), is a problem naming the kind; the rest is planned without it.
//!
//! Raw list requests rather than typed `Api::list`: the loader wants the objects as the API
//! server wrote them (to name a bad object's field and keep the others), not typed objects it
//! would have to turn back into JSON.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use portpolicy_core::snapshot::{Loaded, Loader};
use serde_json::Value;

/// Which cluster to read, as kubectl's flags name it.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `--kubeconfig`; otherwise `KUBECONFIG`, `~/.kube/config`, then the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`; otherwise the kubeconfig's current context.
    pub context: Option<String>,
}

/// One kind to list: its list path and the `apiVersion`/`kind` its items are given (list
/// responses leave them out of each item).
struct ListedKind {
    api_version: &'static str,
    kind: &'static str,
    resource: &'static str,
    path: &'static str,
}

const KINDS: [ListedKind; 9] = [
    ListedKind {
        api_version: "portpolicy.io/v1alpha1",
        kind: "PortPolicy",
        resource: "portpolicies.portpolicy.io",
        path: "/apis/portpolicy.io/v1alpha1/portpolicies",
    },
    ListedKind {
        api_version: "v1",
        kind: "Namespace",
        resource: "namespaces",
        path: "/api/v1/namespaces",
    },
    ListedKind {
        api_version: "v1",
        kind: "Node",
        resource: "nodes",
        path: "/api/v1/nodes",
    },
    ListedKind {
        api_version: "v1",
        kind: "Service",
        resource: "services",
        path: "/api/v1/services",
    },
    ListedKind {
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        resource: "endpointslices.discovery.k8s.io",
        path: "/apis/discovery.k8s.io/v1/endpointslices",
    },
    ListedKind {
        api_version: "v1",
        kind: "Pod",
        resource: "pods",
        path: "/api/v1/pods",
    },
    ListedKind {
        api_version: "apps/v1",
        kind: "DaemonSet",
        resource: "daemonsets.apps",
        path: "/apis/apps/v1/daemonsets",
    },
    ListedKind {
        api_version: "apps/v1",
        kind: "Deployment",
        resource: "deployments.apps",
        path: "/apis/apps/v1/deployments",
    },
    ListedKind {
        api_version: "apps/v1",
        kind: "StatefulSet",
        resource: "statefulsets.apps",
        path: "/apis/apps/v1/statefulsets",
    },
];

/// Objects per list request, as kubectl pages (`--chunk-size`, default 500).
const PAGE: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no usable cluster configuration: {0}")]
    Config(String),
    #[error("cannot build a client for the cluster: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot reach the cluster: {0}")]
    Unreachable(#[source] kube::Error),
}

/// The client configuration kubectl would use with the same flags, and a name for it.
pub async fn config(target: &Target) -> Result<(Config, String), LiveError> {
    let options = KubeConfigOptions {
        context: target.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &target.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|source| LiveError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| LiveError::Config(e.to_string()))?
        }
        None if target.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| LiveError::Config(e.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|e| LiveError::Config(e.to_string()))?,
    };
    let name = match &target.context {
        Some(context) => format!("context {context} ({})", config.cluster_url),
        None => config.cluster_url.to_string(),
    };
    Ok((config, name))
}

/// Lists every kind portpolicy reads from the cluster at `config`. A cluster that does not
/// answer at all is an error; once it has answered, each kind that fails is a problem.
pub async fn load_cluster(config: Config) -> Result<Loaded, LiveError> {
    let client = Client::try_from(config).map_err(LiveError::Client)?;
    let mut loader = Loader::new();
    let mut answered = false;
    for kind in &KINDS {
        match list_kind(&client, kind, &mut loader).await {
            Ok(()) => answered = true,
            Err(kube::Error::Api(status)) => {
                answered = true;
                kind_refused(kind, &status, &mut loader);
            }
            Err(e) if !answered => return Err(LiveError::Unreachable(e)),
            Err(e) => loader.unreadable(kind.kind, format!("cannot list {}: {e}", kind.resource)),
        }
    }
    Ok(loader.finish())
}

fn kind_refused(kind: &ListedKind, status: &kube::core::Status, loader: &mut Loader) {
    match status.code {
        403 => loader.problem(
            kind.kind,
            format!(
                "forbidden: this user may not list {} cluster-wide ({}); planned without them",
                kind.resource, status.message
            ),
        ),
        404 if kind.kind == "PortPolicy" => loader.problem(
            kind.kind,
            "the PortPolicy CRD is not installed in this cluster; planned without policies",
        ),
        _ => loader.unreadable(
            kind.kind,
            format!(
                "cannot list {}: {} ({})",
                kind.resource, status.message, status.code
            ),
        ),
    }
}

/// Lists one kind page by page into `loader`.
async fn list_kind(client: &Client, kind: &ListedKind, loader: &mut Loader) -> Result<(), kube::Error> {
    let mut token: Option<String> = None;
    let mut index = 0usize;
    // Bounded: a server that keeps returning a continue token is cut off after this many pages.
    for _page in 0..100_000 {
        let mut url = format!("{}?limit={PAGE}", kind.path);
        if let Some(t) = &token {
            url.push_str("&continue=");
            url.push_str(&percent_encode(t));
        }
        let request = http::Request::get(&url)
            .body(Vec::new())
            .map_err(kube::Error::HttpError)?;
        let text = client.request_text(request).await?;
        let mut list: Value = match serde_json::from_str(&text) {
            Ok(list) => list,
            Err(e) => {
                loader.unreadable(
                    kind.kind,
                    format!("the API server's list of {} is not JSON: {e}", kind.resource),
                );
                return Ok(());
            }
        };
        token = list
            .pointer("/metadata/continue")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        if let Some(Value::Array(items)) = list.get_mut("items").map(Value::take) {
            for mut item in items {
                if let Some(obj) = item.as_object_mut() {
                    obj.insert("apiVersion".into(), kind.api_version.into());
                    obj.insert("kind".into(), kind.kind.into());
                }
                loader.add_value(
                    &format!("{} from the API server, item {index}", kind.resource),
                    item,
                );
                index += 1;
            }
        }
        if token.is_none() {
            return Ok(());
        }
    }
    loader.unreadable(
        kind.kind,
        format!("listing {} did not end; cut off", kind.resource),
    );
    Ok(())
}

/// A continue token in a query string (tokens are base64, whose `+`, `/` and `=` must be escaped).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_are_escaped() {
        assert_eq!(percent_encode("eyJ2Ijo+/x="), "eyJ2Ijo%2B%2Fx%3D");
    }
}
