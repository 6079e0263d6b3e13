//! A generated cluster dump shaped like `kubectl get namespaces,nodes,portpolicies,services,
//! endpointslices,pods -A -o yaml` on a real cluster: one `v1` `List`, keys in the order kubectl
//! prints them (sorted), no managedFields (kubectl hides them by default), every field the API
//! server fills in (uids, resourceVersions, timestamps, owner references, status).
//!
//! Shared by the benches and the tests, so the loader's figures and its real-size tests read the
//! same kind of file. A crate of its own so that it is built optimized even in test builds
//! (see the workspace's `[profile.dev.package]`): a debug-built generator would spend most of a
//! real-size test writing the file.

use serde_json::{Value, json};

/// How big the generated cluster is.
#[derive(Clone, Copy, Debug)]
pub struct DumpShape {
    pub namespaces: usize,
    pub nodes: usize,
    pub services: usize,
    /// One EndpointSlice per Service, with this many endpoints.
    pub endpoints_per_service: usize,
    pub pods: usize,
}

impl DumpShape {
    /// The size the issue asks `plan` to load: 10,000 Services, 100,000 endpoints, 50,000 Pods.
    pub const LARGE: DumpShape = DumpShape {
        namespaces: 100,
        nodes: 500,
        services: 10_000,
        endpoints_per_service: 10,
        pods: 50_000,
    };

    /// The same cluster divided by `factor` (at least one of everything).
    pub fn scaled_down(self, factor: usize) -> DumpShape {
        let f = |n: usize| (n / factor).max(1);
        DumpShape {
            namespaces: f(self.namespaces),
            nodes: f(self.nodes),
            services: f(self.services),
            endpoints_per_service: self.endpoints_per_service,
            pods: f(self.pods),
        }
    }

    pub fn endpoints(&self) -> usize {
        self.services * self.endpoints_per_service
    }

    /// Objects in the list: the namespaces, nodes, one PortPolicy, the Services, their slices
    /// and the Pods.
    pub fn objects(&self) -> usize {
        self.namespaces + self.nodes + 1 + 2 * self.services + self.pods
    }

    /// Services of type NodePort (one in five), each holding a distinct port of the default range.
    pub fn is_node_port(&self, service: usize) -> bool {
        service.is_multiple_of(5) && service / 5 < 2_768
    }
}

fn namespace_name(i: usize) -> String {
    format!("team-{i:02}")
}

fn uid(kind: u32, i: usize) -> String {
    format!("{kind:08x}-4b5a-4c6d-9e8f-{i:012x}")
}

fn pod_name(shape: &DumpShape, i: usize) -> String {
    let app = i % shape.services.max(1);
    format!("app-{app}-7d9f8c6b5-{:05x}", i)
}

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 64 + i / 65_536, (i / 256) % 256, i % 256)
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

pub fn namespace(i: usize) -> Value {
    let name = namespace_name(i);
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {
            "creationTimestamp": "2026-10-01T08:00:00Z",
            "labels": {"kubernetes.io/metadata.name": name, "team": name},
            "name": name, "resourceVersion": format!("{}", 1000 + i), "uid": uid(1, i),
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

pub fn node(i: usize) -> Value {
    let name = node_name(i);
    let zone = format!("zone-{}", i % 3);
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"lastHeartbeatTime": "2026-11-26T11:59:00Z", "lastTransitionTime": "2026-10-01T08:05:00Z",
            "message": message, "reason": reason, "status": status, "type": kind})
    };
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "creationTimestamp": "2026-10-01T08:00:00Z",
            "labels": {
                "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "topology.kubernetes.io/zone": zone,
            },
            "name": name, "resourceVersion": format!("{}", 5000 + i), "uid": uid(2, i),
        },
        "spec": {"podCIDR": format!("10.244.{}.0/24", i % 256), "podCIDRs": [format!("10.244.{}.0/24", i % 256)]},
        "status": {
            "addresses": [
                {"address": format!("192.168.{}.{}", i / 250, 10 + i % 250), "type": "InternalIP"},
                {"address": name, "type": "Hostname"},
            ],
            "allocatable": {"cpu": "8", "ephemeral-storage": "95491862Ki", "memory": "32676344Ki", "pods": "110"},
            "capacity": {"cpu": "8", "ephemeral-storage": "103609600Ki", "memory": "32778744Ki", "pods": "110"},
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64", "bootID": uid(3, i), "containerRuntimeVersion": "containerd://1.7.24",
                "kernelVersion": "6.1.0-28-cloud-amd64", "kubeProxyVersion": "", "kubeletVersion": "v1.34.1",
                "machineID": format!("{i:032x}"), "operatingSystem": "linux",
                "osImage": "Debian GNU/Linux 12 (bookworm)", "systemUUID": uid(4, i),
            },
        },
    })
}

/// A PortPolicy governing the even-numbered namespaces' NodePort Services.
pub fn policy() -> Value {
    json!({
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
        "metadata": {"creationTimestamp": "2026-10-01T08:00:00Z", "generation": 1, "name": "edge",
            "resourceVersion": "900", "uid": uid(5, 0)},
        "spec": {
            "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
            "serviceSelector": {"matchLabels": {"tier": "edge"}},
            "nodePorts": {"range": "30000-32767", "retentionSeconds": 86400},
            "hostPorts": {"allowed": ["9100-9199"]},
        },
    })
}

pub fn service(shape: &DumpShape, i: usize) -> Value {
    let ns = namespace_name(i % shape.namespaces);
    let app = format!("app-{i}");
    let cluster_ip = format!("10.96.{}.{}", i / 250, 1 + i % 250);
    let mut ports = vec![json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080})];
    if i.is_multiple_of(3) {
        ports.push(json!({"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": "metrics"}));
    }
    let node_port = shape.is_node_port(i);
    if node_port {
        ports[0]["nodePort"] = json!(30_000 + i / 5);
        for p in ports.iter_mut().skip(1) {
            // The second port of a NodePort Service is waiting for the allocator.
            p.as_object_mut().map(|p| p.remove("nodePort"));
        }
    }
    let mut spec = json!({
        "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "ports": ports,
        "selector": {"app": app}, "sessionAffinity": "None",
        "type": if node_port { "NodePort" } else { "ClusterIP" },
    });
    if node_port {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "annotations": {"meta.helm.sh/release-name": app, "meta.helm.sh/release-namespace": ns},
            "creationTimestamp": "2026-11-20T10:00:00Z",
            "labels": {"app": app, "app.kubernetes.io/managed-by": "Helm",
                "tier": if node_port { "edge" } else { "internal" }},
            "name": app, "namespace": ns, "resourceVersion": format!("{}", 200_000 + i), "uid": uid(6, i),
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

pub fn endpoint_slice(shape: &DumpShape, i: usize) -> Value {
    let ns = namespace_name(i % shape.namespaces);
    let app = format!("app-{i}");
    let endpoints: Vec<Value> = (0..shape.endpoints_per_service)
        .map(|e| {
            let pod = (i * shape.endpoints_per_service + e) % shape.pods.max(1);
            json!({
                "addresses": [pod_ip(pod)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node_name(pod % shape.nodes),
                "targetRef": {"kind": "Pod", "name": pod_name(shape, pod), "namespace": ns, "uid": uid(8, pod)},
                "zone": format!("zone-{}", (pod % shape.nodes) % 3),
            })
        })
        .collect();
    let mut ports = vec![json!({"name": "http", "port": 8080, "protocol": "TCP"})];
    if i.is_multiple_of(3) {
        ports.push(json!({"name": "metrics", "port": 9090, "protocol": "TCP"}));
    }
    json!({
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": endpoints,
        "kind": "EndpointSlice",
        "metadata": {
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-20T10:00:05Z"},
            "creationTimestamp": "2026-11-20T10:00:01Z",
            "generateName": format!("{app}-"), "generation": 3,
            "labels": {"app": app, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": app},
            "name": format!("{app}-{:05x}", i), "namespace": ns,
            "ownerReferences": [{"apiVersion": "v1", "blockOwnerDeletion": true, "controller": true,
                "kind": "Service", "name": app, "uid": uid(6, i)}],
            "resourceVersion": format!("{}", 300_000 + i), "uid": uid(7, i),
        },
        "ports": ports,
    })
}

/// A Deployment's Pod as the API server returns it. One Pod in 20 has a hostPort.
pub fn pod(shape: &DumpShape, i: usize) -> Value {
    let app_index = i % shape.services.max(1);
    let ns = namespace_name(app_index % shape.namespaces);
    let app = format!("app-{app_index}");
    let name = pod_name(shape, i);
    let image = format!("registry.example.com/{app}:v1.2.{}", i % 10);
    let mut ports = vec![json!({"containerPort": 8080, "name": "http", "protocol": "TCP"})];
    if i.is_multiple_of(20) {
        ports.push(
            json!({"containerPort": 9100, "hostPort": 9100 + (i % 7), "name": "metrics", "protocol": "TCP"}),
        );
    }
    let node = node_name(i % shape.nodes);
    let transition = |kind: &str| json!({"lastProbeTime": null, "lastTransitionTime": "2026-11-20T10:00:05Z", "status": "True", "type": kind});
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-20T09:59:00Z"},
            "creationTimestamp": "2026-11-20T10:00:00Z",
            "generateName": format!("{app}-7d9f8c6b5-"),
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5"},
            "name": name, "namespace": ns,
            "ownerReferences": [{"apiVersion": "apps/v1", "blockOwnerDeletion": true, "controller": true,
                "kind": "ReplicaSet", "name": format!("{app}-7d9f8c6b5"), "uid": uid(9, app_index)}],
            "resourceVersion": format!("{}", 400_000 + i), "uid": uid(8, i),
        },
        "spec": {
            "containers": [{
                "env": [{"name": "LOG_LEVEL", "value": "info"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
                "image": image, "imagePullPolicy": "IfNotPresent", "name": "app", "ports": ports,
                "readinessProbe": {"failureThreshold": 3, "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                    "periodSeconds": 10, "successThreshold": 1, "timeoutSeconds": 1},
                "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "volumeMounts": [{"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "name": "kube-api-access-x7k2p", "readOnly": true}],
            }],
            "dnsPolicy": "ClusterFirst", "enableServiceLinks": true, "nodeName": node,
            "preemptionPolicy": "PreemptLowerPriority", "priority": 0, "restartPolicy": "Always",
            "schedulerName": "default-scheduler", "securityContext": {}, "serviceAccount": "default",
            "serviceAccountName": "default", "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
                {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300},
            ],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
                {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}, "path": "namespace"}]}},
            ]}}],
        },
        "status": {
            "conditions": [transition("PodReadyToStartContainers"), transition("Initialized"), transition("Ready"),
                transition("ContainersReady"), transition("PodScheduled")],
            "containerStatuses": [{
                "containerID": format!("containerd://{i:064x}"), "image": image,
                "imageID": "registry.example.com/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "lastState": {}, "name": "app", "ready": true, "restartCount": 0, "started": true,
                "state": {"running": {"startedAt": "2026-11-20T10:00:04Z"}},
                "volumeMounts": [{"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "name": "kube-api-access-x7k2p", "readOnly": true, "recursiveReadOnly": "Disabled"}],
            }],
            "hostIP": format!("192.168.{}.{}", (i % shape.nodes) / 250, 10 + (i % shape.nodes) % 250),
            "hostIPs": [{"ip": format!("192.168.{}.{}", (i % shape.nodes) / 250, 10 + (i % shape.nodes) % 250)}],
            "phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}], "qosClass": "Burstable",
            "startTime": "2026-11-20T10:00:01Z",
        },
    })
}

/// Every object of the dump, in the order kubectl lists the kinds it was asked for.
pub fn items(shape: DumpShape) -> impl Iterator<Item = Value> {
    let s = shape;
    (0..s.namespaces)
        .map(namespace)
        .chain((0..s.nodes).map(node))
        .chain(std::iter::once_with(policy))
        .chain((0..s.services).map(move |i| service(&s, i)))
        .chain((0..s.services).map(move |i| endpoint_slice(&s, i)))
        .chain((0..s.pods).map(move |i| pod(&s, i)))
}

/// The dump as `kubectl get ... -A -o yaml` prints it.
pub fn yaml(shape: DumpShape) -> String {
    let mut out = String::with_capacity(shape.objects() * 3000);
    out.push_str("apiVersion: v1\nitems:\n");
    for item in items(shape) {
        write_sequence_item(&item, 0, &mut out);
    }
    out.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
    out
}

/// The dump as `kubectl get ... -A -o json` prints it.
pub fn json(shape: DumpShape) -> String {
    let mut out = String::with_capacity(shape.objects() * 4000);
    out.push_str("{\n    \"apiVersion\": \"v1\",\n    \"items\": [\n");
    for (i, item) in items(shape).enumerate() {
        if i > 0 {
            out.push_str(",\n");
        }
        out.push_str(&serde_json::to_string_pretty(&item).expect("values serialize"));
    }
    out.push_str("\n    ],\n    \"kind\": \"List\",\n    \"metadata\": {\n        \"resourceVersion\": \"\"\n    }\n}\n");
    out
}

/// One object (or `List`) as kubectl's YAML printer writes it.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_mapping_body(value, 0, false, &mut out),
        other => {
            write_scalar(other, &mut out);
            out.push('\n');
        }
    }
    out
}

// kubectl's YAML printer (sigs.k8s.io/yaml over go-yaml): keys sorted, two-space indent,
// sequence items at their key's indent, `{}`/`[]` for empty collections, strings quoted only
// when they would read as something else.

fn write_sequence_item(value: &Value, indent: usize, out: &mut String) {
    pad(indent, out);
    out.push_str("- ");
    match value {
        Value::Object(map) if !map.is_empty() => write_mapping_body(value, indent + 2, true, out),
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            for item in items {
                write_sequence_item(item, indent + 2, out);
            }
        }
        scalar => {
            write_scalar(scalar, out);
            out.push('\n');
        }
    }
}

/// A mapping's entries at `indent`; the first one continues the current line when `inline`.
fn write_mapping_body(value: &Value, indent: usize, inline: bool, out: &mut String) {
    let Value::Object(map) = value else { unreachable!() };
    // serde_json's map is sorted by key (no `preserve_order` here), as kubectl prints.
    for (n, (key, child)) in map.iter().enumerate() {
        if n > 0 || !inline {
            pad(indent, out);
        }
        write_string(key, out);
        out.push(':');
        match child {
            Value::Object(m) if !m.is_empty() => {
                out.push('\n');
                write_mapping_body(child, indent + 2, false, out);
            }
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                for item in items {
                    write_sequence_item(item, indent, out);
                }
            }
            scalar => {
                out.push(' ');
                write_scalar(scalar, out);
                out.push('\n');
            }
        }
    }
}

fn write_scalar(value: &Value, out: &mut String) {
    use std::fmt::Write;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_string(s, out),
        Value::Object(_) => out.push_str("{}"),
        Value::Array(_) => out.push_str("[]"),
    }
}

fn write_string(s: &str, out: &mut String) {
    if needs_quotes(s) {
        out.push_str(&serde_json::to_string(s).expect("strings serialize"));
    } else {
        out.push_str(s);
    }
}

fn needs_quotes(s: &str) -> bool {
    let Some(first) = s.bytes().next() else {
        return true;
    };
    const RESERVED: [&str; 10] = ["true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"];
    let number_like = first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'.');
    RESERVED.iter().any(|r| s.eq_ignore_ascii_case(r))
        || (number_like && (s.parse::<f64>().is_ok() || s.contains(':')))
        || b"-?:,[]{}#&*!|>'\"%@` ".contains(&first)
        || s.contains(": ")
        || s.contains(" #")
        || s.ends_with(':')
        || s.ends_with(' ')
        || s.chars().any(char::is_control)
}

fn pad(indent: usize, out: &mut String) {
    const SPACES: &str = "                                                                ";
    out.push_str(&SPACES[..indent.min(SPACES.len())]);
}
