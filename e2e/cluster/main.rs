//! Cluster end-to-end suite for `portpolicy operator`.
//!
//! Opt-in: it needs a disposable cluster (kind or k3d) in the current kubectl context with the
//! `portpolicy:dev` image loaded. It is `#[ignore]`d, so a plain `cargo test` reports it as
//! ignored rather than passed, and once asked for (`-- --ignored`) it also wants
//! `PORTPOLICY_E2E_CLUSTER=1`, because it changes the cluster of the current context. See
//! docs/operator.md for the steps. It drives the cluster with kubectl only, the way a user would:
//! install crds/ and config/, apply the samples, and read back `kubectl get pp`, Service
//! nodePorts, conditions and the agent DaemonSet.

use std::process::Command;
use std::time::{Duration, Instant};

const ENABLE: &str = "PORTPOLICY_E2E_CLUSTER";
const SYSTEM: &str = "portpolicy-system";

/// Asked for with `--ignored` but not enabled: fail, never pass without having run.
fn require_enabled() {
    assert!(
        std::env::var(ENABLE).as_deref() == Ok("1"),
        "the cluster e2e suite changes the cluster of the current kubectl context: set {ENABLE}=1 to run it"
    );
}

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

/// Runs kubectl; returns stdout, or the failure with stderr.
fn kubectl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("kubectl")
        .args(args)
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run kubectl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) -> String {
    kubectl(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `check` until it returns Some, or fails after `timeout` with the last observation.
fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > timeout => panic!("{what}: not within {timeout:?}; last: {last}"),
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

fn jsonpath(kind_name: &[&str], path: &str) -> Result<String, String> {
    let mut args = vec!["get"];
    args.extend_from_slice(kind_name);
    let expr = format!("jsonpath={path}");
    args.extend_from_slice(&["-o", &expr]);
    kubectl(&args).map(|s| s.trim().to_string())
}

fn node_port(ns: &str, service: &str) -> Result<u16, String> {
    jsonpath(&["service", "-n", ns, service], "{.spec.ports[0].nodePort}")?
        .parse()
        .map_err(|e| format!("{service}: {e}"))
}

fn condition(policy: &str, type_: &str) -> Result<String, String> {
    jsonpath(
        &["portpolicy", policy],
        &format!("{{.status.conditions[?(@.type==\"{type_}\")].status}}"),
    )
}

fn install() {
    must(&["apply", "-f", "crds/"]);
    must(&[
        "wait",
        "--for=condition=Established",
        "crd/portpolicies.portpolicy.io",
        "--timeout=60s",
    ]);
    must(&["apply", "-k", "config/"]);
    must(&[
        "-n",
        SYSTEM,
        "rollout",
        "status",
        "deployment/portpolicy-operator",
        "--timeout=180s",
    ]);
}

#[test]
#[ignore = "needs a disposable cluster: PORTPOLICY_E2E_CLUSTER=1 cargo test --test cluster -- --ignored"]
fn operator_end_to_end() {
    require_enabled();
    let minute = Duration::from_secs(60);
    install();
    must(&["apply", "-f", "config/samples/services.yaml"]);
    for sample in ["edge", "monitoring", "proxied"] {
        must(&["apply", "-f", &format!("config/samples/{sample}.yaml")]);
    }

    // nodePorts move from the API server's random pick into each policy's range.
    let web = eventually(
        "shop/web gets a nodePort from edge",
        minute,
        || match node_port("shop", "web")? {
            p @ 31000..=31089 => Ok(p),
            p => Err(format!("nodePort {p}")),
        },
    );
    eventually(
        "shop/api gets a nodePort from proxied",
        minute,
        || match node_port("shop", "api")? {
            p @ 32000..=32099 => Ok(p),
            p => Err(format!("nodePort {p}")),
        },
    );
    eventually("edge is Ready", minute, || {
        match condition("edge", "Ready")?.as_str() {
            "True" => Ok(()),
            other => Err(other.to_string()),
        }
    });

    // The printer columns.
    let table = must(&["get", "pp"]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "RANGE", "USED", "CONFLICTS", "AGENTS", "READY", "AGE"] {
        assert!(
            header.contains(column),
            "`kubectl get pp` lacks {column}:\n{table}"
        );
    }
    let edge = table
        .lines()
        .find(|l| l.starts_with("edge "))
        .expect("an edge row");
    assert!(edge.contains("31000-31099"), "{edge}");

    // proxied: Local traffic and the proxy-name label on its Service, and its agent DaemonSet.
    assert_eq!(
        jsonpath(&["service", "-n", "shop", "api"], "{.spec.externalTrafficPolicy}").unwrap(),
        "Local"
    );
    assert_eq!(
        jsonpath(
            &["service", "-n", "shop", "api"],
            "{.metadata.labels.service\\.kubernetes\\.io/service-proxy-name}"
        )
        .unwrap(),
        "portpolicy"
    );
    let owner = eventually("the agent DaemonSet exists", minute, || {
        jsonpath(
            &["daemonset", "-n", SYSTEM, "portpolicy-agent-proxied"],
            "{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}/{.metadata.ownerReferences[0].controller}",
        )
    });
    assert_eq!(owner, "PortPolicy/proxied/true");
    assert!(condition("proxied", "AgentsReady").is_ok());

    // A re-created Service gets its old nodePort back.
    must(&["delete", "service", "-n", "shop", "web", "--wait=true"]);
    std::thread::sleep(Duration::from_secs(3));
    must(&["apply", "-f", "config/samples/services.yaml"]);
    eventually(
        "re-created shop/web gets its old nodePort",
        minute,
        || match node_port("shop", "web")? {
            p if p == web => Ok(()),
            p => Err(format!("nodePort {p}, had {web}")),
        },
    );

    // A hostPort outside what monitoring allows is reported as a conflict.
    // The namespace may be left over from an earlier run.
    let _ = kubectl(&["create", "namespace", "monitoring"]);
    must(&[
        "run",
        "-n",
        "monitoring",
        "exporter",
        "--image=registry.k8s.io/pause:3.10",
        "--port=9300",
        "--overrides={\"spec\":{\"containers\":[{\"name\":\"exporter\",\"image\":\"registry.k8s.io/pause:3.10\",\
         \"ports\":[{\"containerPort\":9300,\"hostPort\":9300}]}]}}",
    ]);
    eventually(
        "monitoring reports the hostPort",
        Duration::from_secs(120),
        || match condition("monitoring", "HostPortConflict")?.as_str() {
            "True" => Ok(()),
            other => Err(other.to_string()),
        },
    );
    let count = jsonpath(&["portpolicy", "monitoring"], "{.status.conflictCount}").unwrap();
    assert_eq!(count, "1");

    // Deleting a policy gives its Services back (the finalizer drops the proxy-name label).
    must(&["delete", "portpolicy", "proxied", "--wait=true", "--timeout=60s"]);
    eventually("shop/api lost the proxy-name label", minute, || {
        match jsonpath(&["service", "-n", "shop", "api"], "{.metadata.labels}")? {
            labels if !labels.contains("service-proxy-name") => Ok(()),
            labels => Err(labels),
        }
    });
    eventually(
        "the agent DaemonSet is garbage-collected",
        minute,
        || match kubectl(&["get", "daemonset", "-n", SYSTEM, "portpolicy-agent-proxied"]) {
            Err(e) if e.contains("NotFound") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    for sample in ["edge", "monitoring"] {
        must(&[
            "delete",
            "-f",
            &format!("config/samples/{sample}.yaml"),
            "--wait=true",
        ]);
    }
    must(&["delete", "namespace", "monitoring", "shop", "--wait=false"]);
}
