//! Where the agent learns the cluster: a snapshot file it re-reads when it changes, or watches
//! on the API server. Both send [`Event`]s to the sync loop; the loop programs nothing before
//! [`Event::Ready`], so a restarting agent never mistakes a half-read cluster for an empty one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, TypeMeta};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::sync::Change;
use crate::snapshot_files::load_paths;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::governance::{NamespaceLabels, PolicySet};
use portpolicy_core::ipvs::ProxyMode;
use portpolicy_core::snapshot::Loaded;
use portpolicy_core::well_known::{SERVICE_PROXY_NAME, SERVICE_PROXY_NAME_LABEL};
use pruned::Pruned;

mod pruned;

#[derive(Debug)]
pub(super) enum Event {
    /// A change, with when it reached the agent as objects (a watch event's arrival; a changed
    /// snapshot once read): the agent measures from there to the kernel's acknowledgement.
    Change(Change, Instant),
    /// Everything the source knows at start has been sent.
    Ready,
    /// The source's current state cannot be used (a snapshot that cannot be read whole); the
    /// agent keeps what it has. Cleared by the next [`Change::Snapshot`].
    Refused(String),
}

/// Files under `paths` with their modification time and size: the snapshot changed when this
/// did. Unreadable entries count as absent.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    fn walk(path: &Path, out: &mut Vec<(PathBuf, Option<SystemTime>, u64)>) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            for entry in entries {
                walk(&entry, out);
            }
        } else {
            out.push((path.to_path_buf(), meta.modified().ok(), meta.len()));
        }
    }
    let mut out = Vec::new();
    for path in paths {
        walk(path, &mut out);
    }
    out
}

/// Why a loaded snapshot cannot stand for the cluster, if it cannot: some text in it could not
/// be read (a file cut off mid-write, invalid YAML, an unreadable entry), or it holds nothing.
/// Programming it would withdraw every rule for what it lacks, so it is refused whole.
pub(super) fn refusal(loaded: &Loaded) -> Option<String> {
    if let Some(first) = loaded.unreadable.first() {
        let more = loaded.unreadable.len() - 1;
        let more = if more > 0 {
            format!(" (and {more} more)")
        } else {
            String::new()
        };
        return Some(format!("the snapshot cannot be read whole: {first}{more}"));
    }
    if loaded.snapshot.object_count() == 0 {
        return Some("the snapshot holds no objects".to_string());
    }
    None
}

/// Loads the snapshot now and again whenever a file's mtime or size changes. A snapshot that
/// cannot be read whole is refused ([`refusal`]): the last good one stays in force, and the
/// loop is told, for `/readyz` and the metrics.
pub(super) async fn snapshot_source(paths: Vec<PathBuf>, poll: Duration, tx: mpsc::Sender<Event>) {
    let mut last = None;
    let mut ready_sent = false;
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = fingerprint(&paths);
        if last.as_ref() == Some(&now) {
            continue;
        }
        let seen = Instant::now();
        let read = paths.clone();
        let loaded = match tokio::task::spawn_blocking(move || load_paths(&read)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "snapshot loader panicked");
                continue;
            }
        };
        last = Some(now);
        if let Some(why) = refusal(&loaded) {
            for problem in &loaded.unreadable {
                tracing::error!(%problem, "snapshot");
            }
            tracing::error!(reason = %why, "snapshot refused; keeping the last good one");
            if tx.send(Event::Refused(why)).await.is_err() {
                return;
            }
            continue;
        }
        for problem in &loaded.problems {
            tracing::warn!(%problem, "snapshot");
        }
        tracing::info!(
            objects = loaded.snapshot.object_count(),
            load_ms = seen.elapsed().as_secs_f64() * 1000.0,
            "snapshot loaded"
        );
        if tx
            .send(Event::Change(
                Change::Snapshot(Box::new(loaded.snapshot)),
                Instant::now(),
            ))
            .await
            .is_err()
        {
            return;
        }
        if !ready_sent {
            ready_sent = true;
            if tx.send(Event::Ready).await.is_err() {
                return;
            }
        }
    }
}

/// Which Services and EndpointSlices the agent lists and watches. In delegated mode it proxies
/// only Services labeled for it, so it asks the API server for only those and their
/// EndpointSlices: the EndpointSlice controller copies a Service's labels onto its slices
/// (kube-proxy selects its slices by the same label, the other way round). The agent then
/// neither receives nor holds the rest of the cluster's Services and endpoints. A Service that
/// loses the label leaves the selection, which the watch reports as a deletion. Replacement
/// mode proxies unlabeled Services too, which no selector can say beside the label.
pub(super) fn proxied_objects(mode: ProxyMode) -> watcher::Config {
    match mode {
        ProxyMode::Delegated => {
            watcher::Config::default().labels(&format!("{SERVICE_PROXY_NAME_LABEL}={SERVICE_PROXY_NAME}"))
        }
        ProxyMode::Replacement => watcher::Config::default(),
    }
}

/// Watches Services, EndpointSlices, this Node, PortPolicies and Namespaces (labels only).
/// Each watch retries with backoff on errors; an object that does not parse is logged and
/// skipped, never stopping its watch.
pub(super) async fn kube_source(client: Client, node_name: String, mode: ProxyMode, tx: mpsc::Sender<Event>) {
    let (ready_tx, mut ready_rx) = mpsc::channel::<&'static str>(8);
    let services = tokio::spawn(watch_objects::<Service>(
        client.clone(),
        proxied_objects(mode),
        tx.clone(),
        ready_tx.clone(),
        |s| Change::Service(Box::new(s)),
        |namespace, name| Some(Change::ServiceDeleted { namespace, name }),
    ));
    let slices = tokio::spawn(watch_objects::<EndpointSlice>(
        client.clone(),
        proxied_objects(mode),
        tx.clone(),
        ready_tx.clone(),
        |s| Change::Slice(Box::new(s)),
        |namespace, name| Some(Change::SliceDeleted { namespace, name }),
    ));
    let node = tokio::spawn(watch_objects::<Node>(
        client.clone(),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        tx.clone(),
        ready_tx.clone(),
        |n| Change::Node(Box::new(n)),
        // A deleted Node keeps its last addresses: the node is going away anyway.
        |_, _| None,
    ));
    let policies = tokio::spawn(watch_policies(client, tx.clone(), ready_tx));
    // The watches end with this task, even when it is aborted.
    let mut watches = Watches([services, slices, node, policies]);
    let mut pending: BTreeSet<&str> = ["Service", "EndpointSlice", "Node", "policies"].into();
    while let Some(kind) = ready_rx.recv().await {
        pending.remove(kind);
        if pending.is_empty() {
            let _ = tx.send(Event::Ready).await;
            break;
        }
    }
    let [services, slices, node, policies] = &mut watches.0;
    let _ = futures::future::join4(services, slices, node, policies).await;
}

/// The watch tasks of [`kube_source`], aborted when it stops.
struct Watches([tokio::task::JoinHandle<()>; 4]);

impl Drop for Watches {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn typed<K>(mut object: DynamicObject) -> Result<K, serde_json::Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    object.types = Some(TypeMeta {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
    });
    serde_json::to_value(object).and_then(serde_json::from_value)
}

async fn watch_objects<K>(
    client: Client,
    config: watcher::Config,
    tx: mpsc::Sender<Event>,
    ready: mpsc::Sender<&'static str>,
    upsert: fn(K) -> Change,
    delete: fn(String, String) -> Option<Change>,
) where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug + Send + 'static,
{
    let kind: &'static str = match K::kind(&()).as_ref() {
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        _ => "Node",
    };
    // Each listed or watched object is decoded straight into what portpolicy reads of it: a
    // list page never holds whole objects, and one object that does not read never fails its
    // list (kube's watcher fails a whole page on one object's error, and retries it forever).
    let api: Api<Pruned<K>> = Api::all(client);
    let mut stream = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut known: BTreeSet<(String, String)> = BTreeSet::new();
    let mut listing: BTreeSet<(String, String)> = BTreeSet::new();
    let mut announced = false;
    let apply = |object: Pruned<K>| -> Option<Change> {
        match object {
            Pruned::Read(k) => Some(upsert(k)),
            Pruned::Unreadable { metadata, error } => {
                let namespace = metadata.namespace.unwrap_or_default();
                let name = metadata.name.unwrap_or_default();
                tracing::warn!(kind, namespace, name, %error, "object does not parse; skipped");
                None
            }
        }
    };
    while let Some(event) = stream.next().await {
        let seen = Instant::now();
        let changes: Vec<Change> = match event {
            Err(e) => {
                tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
                continue;
            }
            Ok(WatchEvent::Init) => {
                listing.clear();
                continue;
            }
            Ok(WatchEvent::InitApply(object)) => {
                listing.insert(object.key());
                apply(object).into_iter().collect()
            }
            Ok(WatchEvent::InitDone) => {
                // Objects deleted while the watch was down are missing from the new list.
                let gone: Vec<(String, String)> = known.difference(&listing).cloned().collect();
                known = std::mem::take(&mut listing);
                if !announced {
                    announced = true;
                    let _ = ready.send(kind).await;
                }
                gone.into_iter()
                    .filter_map(|(ns, name)| delete(ns, name))
                    .collect()
            }
            Ok(WatchEvent::Apply(object)) => {
                known.insert(object.key());
                apply(object).into_iter().collect()
            }
            Ok(WatchEvent::Delete(object)) => {
                let (ns, name) = object.key();
                known.remove(&(ns.clone(), name.clone()));
                delete(ns, name).into_iter().collect()
            }
        };
        for change in changes {
            if tx.send(Event::Change(change, seen)).await.is_err() {
                return;
            }
        }
    }
}

enum PolicyEvent {
    Policy(WatchEvent<DynamicObject>),
    Namespace(WatchEvent<PartialObjectMeta<Namespace>>),
}

/// PortPolicies and Namespace labels decide schedulers and node-port ownership; any change to
/// either recompiles the policy set once both are listed.
async fn watch_policies(client: Client, tx: mpsc::Sender<Event>, ready: mpsc::Sender<&'static str>) {
    let policy_api: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<PortPolicy>(&()));
    let namespace_api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    let policies = watcher::watcher(policy_api, watcher::Config::default())
        .default_backoff()
        .map(|e| e.map(PolicyEvent::Policy));
    let namespaces = watcher::watcher(namespace_api, watcher::Config::default())
        .default_backoff()
        .map(|e| e.map(PolicyEvent::Namespace));
    let mut stream = std::pin::pin!(futures::stream::select(policies, namespaces));
    let mut policy_objects: BTreeMap<String, PortPolicy> = BTreeMap::new();
    let mut policy_listing: Option<BTreeMap<String, PortPolicy>> = None;
    let mut labels = NamespaceLabels::default();
    let mut labels_listing: Option<NamespaceLabels> = None;
    let (mut policies_listed, mut namespaces_listed, mut announced) = (false, false, false);
    while let Some(event) = stream.next().await {
        match event {
            // No PortPolicy CRD installed means no policies, not "wait forever": the agent in
            // replacement mode runs without the operator.
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.is_not_found() && !policies_listed =>
            {
                tracing::warn!("the PortPolicy CRD is not installed; running without policies");
                policy_objects.clear();
                policies_listed = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy or namespace watch failed; retrying with backoff");
                continue;
            }
            Ok(PolicyEvent::Policy(event)) => match event {
                WatchEvent::Init => {
                    policy_listing = Some(BTreeMap::new());
                    continue;
                }
                WatchEvent::InitApply(o) => {
                    if let (Some(listing), Some((name, p))) = (policy_listing.as_mut(), parse_policy(o)) {
                        listing.insert(name, p);
                    }
                    continue;
                }
                WatchEvent::InitDone => {
                    policy_objects = policy_listing.take().unwrap_or_default();
                    policies_listed = true;
                }
                WatchEvent::Apply(o) => {
                    if let Some((name, p)) = parse_policy(o) {
                        policy_objects.insert(name, p);
                    }
                }
                WatchEvent::Delete(o) => {
                    policy_objects.remove(&o.metadata.name.unwrap_or_default());
                }
            },
            Ok(PolicyEvent::Namespace(event)) => match event {
                WatchEvent::Init => {
                    labels_listing = Some(NamespaceLabels::default());
                    continue;
                }
                WatchEvent::InitApply(ns) => {
                    if let Some(listing) = labels_listing.as_mut() {
                        listing.insert(&ns.metadata.name.unwrap_or_default(), ns.metadata.labels.as_ref());
                    }
                    continue;
                }
                WatchEvent::InitDone => {
                    labels = labels_listing.take().unwrap_or_default();
                    namespaces_listed = true;
                }
                WatchEvent::Apply(ns) => {
                    if !labels.insert(&ns.metadata.name.unwrap_or_default(), ns.metadata.labels.as_ref()) {
                        continue;
                    }
                }
                WatchEvent::Delete(ns) => labels.remove(&ns.metadata.name.unwrap_or_default()),
            },
        }
        if !(policies_listed && namespaces_listed) {
            continue;
        }
        let change = Change::Policies {
            policies: PolicySet::compile(policy_objects.values()),
            namespace_labels: labels.clone(),
        };
        if tx.send(Event::Change(change, Instant::now())).await.is_err() {
            return;
        }
        if !announced {
            announced = true;
            let _ = ready.send("policies").await;
        }
    }
}

fn parse_policy(object: DynamicObject) -> Option<(String, PortPolicy)> {
    let name = object.metadata.name.clone().unwrap_or_default();
    match typed::<PortPolicy>(object) {
        Ok(p) => Some((name, p)),
        Err(e) => {
            tracing::warn!(policy = name, error = %e, "PortPolicy does not parse; skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_from_the_api_are_typed_one_by_one() {
        let good: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
        }))
        .unwrap();
        let service: Service = typed(good).unwrap();
        assert_eq!(service.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
        // A malformed object is an error for that object alone (the watch logs and skips it).
        let bad: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"ports": "not a list"}
        }))
        .unwrap();
        assert!(typed::<Service>(bad).is_err());
    }

    /// Delegated mode against a mocked API server: every list and watch of Services and
    /// EndpointSlices asks for the proxy-name label; the Node, policies and Namespaces do not.
    #[tokio::test]
    async fn delegated_mode_asks_only_for_services_handed_to_portpolicy_and_their_slices() {
        use http::{Request, Response};
        use kube::client::Body;

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        handle.allow(1000);
        let client = Client::new(service, "default");
        let (tx, mut rx) = mpsc::channel(64);
        let source = tokio::spawn(kube_source(client, "node-a".into(), ProxyMode::Delegated, tx));
        let mut uris = Vec::new();
        // Watches are held open, unanswered, until the test ends.
        let mut watches = Vec::new();
        let ready = async {
            loop {
                match rx.recv().await {
                    Some(Event::Ready) => break,
                    Some(_) => {}
                    None => panic!("the source stopped"),
                }
            }
        };
        tokio::pin!(ready);
        let deadline = tokio::time::sleep(Duration::from_secs(20));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut ready => break,
                _ = &mut deadline => panic!("never ready; requests: {uris:#?}"),
                request = handle.next_request() => {
                    let (request, send) = request.expect("a request");
                    let uri = request.uri().to_string().replace("%2F", "/").replace("%3D", "=");
                    if uri.contains("watch=true") {
                        watches.push(send);
                    } else {
                        let list = serde_json::json!({"apiVersion": "v1", "kind": "List",
                            "metadata": {"resourceVersion": "1"}, "items": []});
                        send.send_response(Response::new(Body::from(serde_json::to_vec(&list).unwrap())));
                    }
                    uris.push(uri);
                }
            }
        }
        source.abort();
        let selector = "labelSelector=service.kubernetes.io/service-proxy-name=portpolicy";
        for path in ["/api/v1/services?", "/apis/discovery.k8s.io/v1/endpointslices?"] {
            let asked: Vec<&String> = uris.iter().filter(|u| u.starts_with(path)).collect();
            assert!(!asked.is_empty(), "no request for {path}: {uris:#?}");
            for uri in asked {
                assert!(uri.contains(selector), "{uri}");
            }
        }
        let others: Vec<&String> = uris
            .iter()
            .filter(|u| u.starts_with("/api/v1/nodes?") || u.starts_with("/api/v1/namespaces?"))
            .collect();
        assert!(!others.is_empty(), "{uris:#?}");
        assert!(others.iter().all(|u| !u.contains("labelSelector")), "{others:#?}");
        drop(watches);
    }

    #[tokio::test]
    async fn the_snapshot_is_reloaded_when_its_file_changes() {
        let dir = std::env::temp_dir().join(format!("portpolicy-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.yaml");
        std::fs::write(&file, "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(snapshot_source(vec![dir.clone()], Duration::from_millis(20), tx));
        async fn next(rx: &mut mpsc::Receiver<Event>) -> Event {
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap()
        }
        let Event::Change(Change::Snapshot(s), _) = next(&mut rx).await else {
            panic!("expected a snapshot")
        };
        assert_eq!(s.nodes.len(), 1);
        assert!(matches!(next(&mut rx).await, Event::Ready));
        // Same mtime resolution issues aside, the size changes too.
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: b}\n",
        )
        .unwrap();
        let Event::Change(Change::Snapshot(s), _) = next(&mut rx).await else {
            panic!("expected a snapshot")
        };
        assert_eq!(s.nodes.len(), 2);
        // Nothing changes: nothing is sent.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rx.recv())
                .await
                .is_err()
        );
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
