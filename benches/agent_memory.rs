//! The agent's memory under watch at 10,000 Services and 100,000 endpoints, where issue 15 asks
//! for it: the agent's own API watches (`kube_source`) listing a fake API server over HTTP,
//! every change fed to its planner as the agent's loop feeds it, then its first sync into the
//! in-memory fake kernel (`portpolicy::agent::first_sync_under_watch`).
//!
//! The fake API server serves, as an API server answers a delegated-mode agent, 10,000
//! ClusterIP Services and their 10,000 EndpointSlices (10 ready endpoints each), shaped as the
//! system e2e's emulator stores them (managedFields, uid, defaults; compact JSON, as a real API
//! server writes it), the Node, the Namespaces (metadata only) and no PortPolicies. It runs in a
//! process of its own, so that the agent's process counts only the agent. Two cases, each in a
//! fresh agent process: the initial lists paginated (`limit=500` with continue tokens, as a real
//! API server answers kube's watcher) and unpaginated (the whole list in one response, as the
//! emulator answers).
//!
//! Printed for each: the heap's peak during the initial sync and the heap kept after it (a
//! counting allocator, `benches/support`; the watches still open; the fake kernel's own table
//! excluded), the process's resident memory (VmRSS, VmHWM), glibc's own account of its heap
//! (`mallinfo2`: bytes in use, and free bytes it holds), and the resident memory after
//! `malloc_trim(0)`, which hands free pages back: what the allocator kept from the peak.
//!
//! `cargo bench --bench agent_memory`; `AGENT_MEMORY_SERVICES` and
//! `AGENT_MEMORY_ENDPOINTS` change the cluster's size. Without `--bench` (as `cargo test
//! --all-targets` runs it) the cluster is 1,000 Services.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use portpolicy::agent::fake::{FakeDataplane, FakeKernel};
use portpolicy::agent::first_sync_under_watch;
use portpolicy::agent::metrics::Metrics;
use portpolicy::agent::nft::MasqueradeOptions;
use portpolicy::agent::sync::Syncer;
use portpolicy_core::ipvs::{ProxyConfig, ProxyMode};
use serde_json::{Value, json};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK, reset_peak};

const ROLE: &str = "AGENT_MEMORY_ROLE";
const NODE: &str = "node-a";
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("server") => serve(),
        Ok("agent") => agent(),
        _ => parent(),
    }
}

// --- the parent: one server and one agent process per case ------------------------------------

struct Figures {
    fields: Vec<(String, String)>,
}

impl Figures {
    fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map_or("?", |(_, v)| v.as_str())
    }
}

fn parent() {
    // `cargo test --all-targets` runs this without `--bench`: a tenth of the size, as a check
    // that the agent's watches program every Service and endpoint listed.
    let full = std::env::args().any(|a| a == "--bench");
    let services = size("AGENT_MEMORY_SERVICES", if full { 10_000 } else { 1_000 });
    let endpoints = size("AGENT_MEMORY_ENDPOINTS", 10);
    let exe = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    for (case, paged) in [
        ("paginated (limit=500)", true),
        ("unpaginated (one response)", false),
    ] {
        let mut server = Command::new(&exe)
            .env(ROLE, "server")
            .env("AGENT_MEMORY_PAGED", if paged { "1" } else { "0" })
            .env("AGENT_MEMORY_SERVICES", services.to_string())
            .env("AGENT_MEMORY_ENDPOINTS", endpoints.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the fake API server said {line:?}"));
        let output = Command::new(&exe)
            .env(ROLE, "agent")
            .env("AGENT_MEMORY_SERVER", format!("http://127.0.0.1:{port}"))
            .env("AGENT_MEMORY_SERVICES", services.to_string())
            .env("AGENT_MEMORY_ENDPOINTS", endpoints.to_string())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        // Closing its stdin stops the server.
        drop(server.stdin.take());
        let _ = server.wait();
        assert!(output.status.success(), "the agent process failed");
        let text = String::from_utf8(output.stdout).unwrap();
        let fields = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        rows.push((case, Figures { fields }));
    }
    println!(
        "agent under watch, {services} Services, {} endpoints (delegated mode, fake kernel)",
        services * endpoints
    );
    println!(
        "| initial list | heap peak | heap kept | VmRSS | VmHWM | glibc in use / free held | VmRSS after malloc_trim | first sync |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (case, f) in &rows {
        println!(
            "| {case} | {} MiB | {} MiB | {} MiB | {} MiB | {} / {} MiB | {} MiB | {} s |",
            f.get("heap_peak_mib"),
            f.get("heap_kept_mib"),
            f.get("vm_rss_mib"),
            f.get("vm_hwm_mib"),
            f.get("glibc_in_use_mib"),
            f.get("glibc_free_mib"),
            f.get("vm_rss_trimmed_mib"),
            f.get("first_sync_seconds"),
        );
    }
    for (case, f) in &rows {
        println!(
            "{case}: kept by the syncer {} MiB, by the watches {} MiB; {} B kept per endpoint; \
             fake kernel table {} MiB (not counted as kept)",
            f.get("syncer_kept_mib"),
            f.get("watches_kept_mib"),
            f.get("kept_per_endpoint"),
            f.get("fake_kernel_mib"),
        );
    }
}

// --- the agent -------------------------------------------------------------------------------

/// glibc's `struct mallinfo2` (glibc 2.33 and later).
#[repr(C)]
#[derive(Default)]
struct Mallinfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

// Bench-only: glibc's own account of its heap, and handing free pages back.
#[allow(unsafe_code)]
mod glibc {
    unsafe extern "C" {
        pub(super) fn mallinfo2() -> super::Mallinfo2;
        pub(super) fn malloc_trim(pad: usize) -> i32;
    }
}

#[allow(unsafe_code)]
fn mallinfo() -> Mallinfo2 {
    // SAFETY: a plain C call that returns a struct by value.
    unsafe { glibc::mallinfo2() }
}

#[allow(unsafe_code)]
fn trim() {
    // SAFETY: a plain C call.
    unsafe {
        glibc::malloc_trim(0);
    }
}

/// VmRSS and VmHWM of this process, in bytes.
fn resident() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn agent() {
    let services = size("AGENT_MEMORY_SERVICES", 10_000);
    let endpoints = size("AGENT_MEMORY_ENDPOINTS", 10);
    let server = std::env::var("AGENT_MEMORY_SERVER").unwrap();
    // The agent's own runtime (src/main.rs): multi-threaded, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = kube::Client::try_from(kube::Config::new(server.parse().unwrap())).unwrap();
        let fake = FakeDataplane::new(FakeKernel::default());
        let config = ProxyConfig::new(NODE, ProxyMode::Delegated);
        let mut syncer = Syncer::new(fake.clone(), config, MasqueradeOptions::default(), Metrics::new());
        let before = LIVE.load(Ordering::Relaxed);
        reset_peak();
        let started = Instant::now();
        let (outcome, watching) =
            first_sync_under_watch(client, NODE, ProxyMode::Delegated, &mut syncer).await;
        let elapsed = started.elapsed();
        assert!(outcome.succeeded(), "{:?}", outcome.errors);
        let peak = PEAK.load(Ordering::Relaxed) - before;
        let with_kernel = LIVE.load(Ordering::Relaxed) - before;
        {
            let kernel = fake.state();
            let real: usize = kernel.table.values().map(|s| s.real_servers.len()).sum();
            assert_eq!(
                (kernel.table.len(), real),
                (services, services * endpoints),
                "every Service and endpoint programmed"
            );
        }
        *fake.state() = FakeKernel::default();
        let kept = LIVE.load(Ordering::Relaxed) - before;
        let (rss, hwm) = resident();
        let info = mallinfo();
        trim();
        let (trimmed, _) = resident();
        let out = [
            ("heap_peak_mib", mib(peak)),
            ("heap_kept_mib", mib(kept)),
            (
                "kept_per_endpoint",
                (kept / (services * endpoints).max(1)).to_string(),
            ),
            ("fake_kernel_mib", mib(with_kernel - kept)),
            ("vm_rss_mib", mib(rss)),
            ("vm_hwm_mib", mib(hwm)),
            ("glibc_in_use_mib", mib(info.uordblks + info.hblkhd)),
            ("glibc_free_mib", mib(info.fordblks)),
            ("vm_rss_trimmed_mib", mib(trimmed)),
            ("first_sync_seconds", format!("{:.2}", elapsed.as_secs_f64())),
        ];
        // Who keeps what: the syncer (planner, model of the kernel, wanted set elements), then
        // the watches (their tasks and state).
        let live = LIVE.load(Ordering::Relaxed);
        drop(syncer);
        let syncer_kept = live - LIVE.load(Ordering::Relaxed);
        drop(watching);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let watches_kept = live - syncer_kept - LIVE.load(Ordering::Relaxed);
        let mut stdout = std::io::stdout().lock();
        for (k, v) in out {
            writeln!(stdout, "{k}={v}").unwrap();
        }
        writeln!(stdout, "syncer_kept_mib={}", mib(syncer_kept)).unwrap();
        writeln!(stdout, "watches_kept_mib={}", mib(watches_kept)).unwrap();
    });
}

// --- the fake API server ---------------------------------------------------------------------

struct Collections {
    paged: bool,
    services: Vec<String>,
    slices: Vec<String>,
    node: String,
    namespaces: Vec<String>,
    resource_version: u64,
}

fn managed_fields(api_version: &str, fields: Value) -> Value {
    json!([{"manager": "e2e-seed", "operation": "Update", "apiVersion": api_version,
        "time": "2026-12-06T23:29:28Z", "fieldsType": "FieldsV1", "fieldsV1": fields}])
}

fn uid(kind: u32, i: usize) -> String {
    format!("{i:08x}-dc18-44c4-a66d-{kind:012x}")
}

/// The objects of the system e2e's watch-latency benchmark, as its emulator lists them.
fn collections(services: usize, endpoints: usize, paged: bool) -> Collections {
    let mut rv = 1000u64;
    let mut next_rv = || {
        rv += 1;
        rv.to_string()
    };
    let mut service_objects = Vec::with_capacity(services);
    let mut slice_objects = Vec::with_capacity(services);
    for i in 0..services {
        let name = format!("s{i}");
        let ip =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 1, 0)) + i as u32).to_string();
        let service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": name, "namespace": "bench",
                "labels": {"app": name, PROXY_NAME_LABEL: "portpolicy"},
                "uid": uid(1, i), "creationTimestamp": "2026-12-06T23:29:28Z", "generation": 1,
                "managedFields": managed_fields("v1", json!({
                    "f:metadata": {"f:labels": {"f:app": {}, "f:service.kubernetes.io/service-proxy-name": {}}},
                    "f:spec": {"f:clusterIP": {}, "f:clusterIPs": {}, "f:internalTrafficPolicy": {},
                        "f:ports": {"k:{\"port\":80,\"protocol\":\"TCP\"}": {"f:name": {}, "f:port": {},
                            "f:protocol": {}, "f:targetPort": {}, ".": {}}},
                        "f:selector": {"f:app": {}}, "f:sessionAffinity": {}, "f:type": {}}})),
                "resourceVersion": next_rv(),
            },
            "spec": {
                "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
            },
        });
        let first = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + (i * endpoints) as u32;
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-1"), "namespace": "bench",
                "labels": {"kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "app": name, PROXY_NAME_LABEL: "portpolicy"},
                "uid": uid(2, i), "creationTimestamp": "2026-12-06T23:29:28Z", "generation": 1,
                "managedFields": managed_fields("discovery.k8s.io/v1", json!({
                    "f:addressType": {}, "f:endpoints": {},
                    "f:metadata": {"f:labels": {"f:app": {}, "f:endpointslice.kubernetes.io/managed-by": {},
                        "f:kubernetes.io/service-name": {}, "f:service.kubernetes.io/service-proxy-name": {}}},
                    "f:ports": {}})),
                "resourceVersion": next_rv(),
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": (0..endpoints).map(|k| json!({
                "addresses": [std::net::Ipv4Addr::from(first + k as u32).to_string()],
                "nodeName": NODE,
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })).collect::<Vec<_>>(),
        });
        service_objects.push(service.to_string());
        slice_objects.push(slice.to_string());
    }
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "uid": uid(3, 0), "resourceVersion": next_rv(),
            "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "10.1.0.1"}, {"type": "Hostname", "address": NODE}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    })
    .to_string();
    let namespaces = ["bench", "default", "kube-system"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": name, "uid": uid(4, i), "resourceVersion": next_rv(),
                    "labels": {"kubernetes.io/metadata.name": name}}})
            .to_string()
        })
        .collect();
    Collections {
        paged,
        services: service_objects,
        slices: slice_objects,
        node,
        namespaces,
        resource_version: rv,
    }
}

fn serve() {
    let collections = Arc::new(collections(
        size("AGENT_MEMORY_SERVICES", 10_000),
        size("AGENT_MEMORY_ENDPOINTS", 10),
        std::env::var("AGENT_MEMORY_PAGED").as_deref() == Ok("1"),
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("port {}", listener.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        let app = axum::Router::new().fallback(answer).with_state(collections);
        tokio::spawn(async move { axum::serve(listener, app).await });
        // Until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        })
        .await
        .unwrap();
    });
}

fn list_response(
    api_version: &str,
    kind: &str,
    items: &[String],
    rv: u64,
    continue_: Option<usize>,
) -> Response {
    let mut body = String::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 200);
    body.push_str(&format!(
        r#"{{"apiVersion":"{api_version}","kind":"{kind}","metadata":{{"resourceVersion":"{rv}""#
    ));
    if let Some(next) = continue_ {
        body.push_str(&format!(r#","continue":"{next}""#));
    }
    body.push_str(r#"},"items":["#);
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    ([("content-type", "application/json")], body).into_response()
}

async fn answer(State(c): State<Arc<Collections>>, uri: Uri) -> Response {
    let query: Vec<(&str, &str)> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|q| q.split_once('='))
        .collect();
    let param = |name: &str| query.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    if matches!(param("watch"), Some("true" | "1")) {
        // Nothing changes: an open watch that never says anything.
        let events = futures::stream::pending::<Result<Bytes, Infallible>>();
        return ([("content-type", "application/json")], Body::from_stream(events)).into_response();
    }
    let node = std::slice::from_ref(&c.node);
    let (api_version, kind, items): (&str, &str, &[String]) = match uri.path() {
        "/api/v1/services" => ("v1", "ServiceList", &c.services),
        "/apis/discovery.k8s.io/v1/endpointslices" => ("discovery.k8s.io/v1", "EndpointSliceList", &c.slices),
        "/api/v1/nodes" => ("v1", "NodeList", node),
        "/api/v1/namespaces" => ("meta.k8s.io/v1", "PartialObjectMetadataList", &c.namespaces),
        "/apis/portpolicy.io/v1alpha1/portpolicies" => ("portpolicy.io/v1alpha1", "PortPolicyList", &[]),
        other => panic!("the fake API server has no {other}"),
    };
    let limit = param("limit").and_then(|l| l.parse::<usize>().ok());
    match limit {
        Some(limit) if c.paged => {
            let start = param("continue").and_then(|t| t.parse().ok()).unwrap_or(0);
            let end = (start + limit).min(items.len());
            let next = (end < items.len()).then_some(end);
            list_response(api_version, kind, &items[start..end], c.resource_version, next)
        }
        _ => list_response(api_version, kind, items, c.resource_version, None),
    }
}
