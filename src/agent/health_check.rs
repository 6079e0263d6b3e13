//! Health-check node ports: one HTTP listener per Local-policy LoadBalancer Service, answering
//! like kube-proxy (pkg/proxy/healthcheck/service_health.go) so cloud load balancers send
//! traffic only to nodes that have a local endpoint.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::task::JoinHandle;

use super::metrics::AgentHealth;
use portpolicy_core::ipvs::HealthCheckRule;

/// What one listener answers for; the count changes live as endpoints come and go.
#[derive(Debug)]
struct Target {
    namespace: String,
    name: String,
    local_endpoints: AtomicUsize,
    health: AgentHealth,
}

#[derive(Serialize)]
struct Body<'a> {
    service: ServiceName<'a>,
    #[serde(rename = "localEndpoints")]
    local_endpoints: usize,
    #[serde(rename = "serviceProxyHealthy")]
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

async fn answer(State(target): State<Arc<Target>>) -> Response {
    let local_endpoints = target.local_endpoints.load(Ordering::Relaxed);
    let healthy = target.health.healthy();
    let body = serde_json::to_string(&Body {
        service: ServiceName {
            namespace: &target.namespace,
            name: &target.name,
        },
        local_endpoints,
        service_proxy_healthy: healthy,
    })
    .unwrap_or_default();
    let status = if local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(local_endpoints),
    );
    response
}

struct Listener {
    target: Arc<Target>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The set of running listeners, reconciled with the plan on every sync.
pub(super) struct HealthCheckServers {
    bind: IpAddr,
    health: AgentHealth,
    listeners: BTreeMap<u16, Listener>,
}

impl HealthCheckServers {
    /// Listeners bind `bind` (`0.0.0.0` on a node, loopback in tests).
    pub(super) fn new(bind: IpAddr, health: AgentHealth) -> Self {
        HealthCheckServers {
            bind,
            health,
            listeners: BTreeMap::new(),
        }
    }

    #[cfg(test)]
    fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Starts, updates and stops listeners to match the plan. Must run inside a tokio runtime.
    /// Returns the ports that could not be bound (they are retried on the next call).
    pub(super) fn update(&mut self, rules: &[HealthCheckRule]) -> Vec<(u16, std::io::Error)> {
        let wanted: BTreeMap<u16, &HealthCheckRule> = rules.iter().map(|p| (p.node_port, p)).collect();
        self.listeners.retain(|port, l| {
            wanted
                .get(port)
                .is_some_and(|p| p.namespace == l.target.namespace && p.name == l.target.name)
        });
        let mut failures = Vec::new();
        for (port, rule) in wanted {
            if let Some(listener) = self.listeners.get(&port) {
                listener
                    .target
                    .local_endpoints
                    .store(rule.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let target = Arc::new(Target {
                namespace: rule.namespace.clone(),
                name: rule.name.clone(),
                local_endpoints: AtomicUsize::new(rule.local_endpoints),
                health: self.health.clone(),
            });
            match bind(SocketAddr::new(self.bind, port)) {
                Ok(listener) => {
                    let app = Router::new().fallback(answer).with_state(target.clone());
                    let task = tokio::spawn(async move {
                        if let Err(e) = super::http::serve(listener, app).await {
                            tracing::warn!(port, error = %e, "health-check listener stopped");
                        }
                    });
                    tracing::info!(port, service = %format!("{}/{}", rule.namespace, rule.name), "health-check node port listening");
                    self.listeners.insert(port, Listener { target, task });
                }
                Err(e) => failures.push((port, e)),
            }
        }
        failures
    }
}

fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::agent::test_support::{free_port, http_get};

    fn rule(port: u16, local_endpoints: usize) -> HealthCheckRule {
        HealthCheckRule {
            namespace: "shop".into(),
            name: "web".into(),
            node_port: port,
            local_endpoints,
        }
    }

    async fn get(port: u16, path: &str) -> std::io::Result<String> {
        let path = path.to_string();
        tokio::task::spawn_blocking(move || http_get(port, &path)).await?
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        response.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn answers_like_kube_proxy_and_follows_the_plan() {
        let health = AgentHealth::new(Duration::from_secs(60));
        health.record(true, Instant::now());
        let mut servers = HealthCheckServers::new(Ipv4Addr::LOCALHOST.into(), health.clone());
        let port = free_port();
        assert!(servers.update(&[rule(port, 2)]).is_empty());

        let ok = get(port, "/healthz").await.unwrap();
        assert!(
            ok.starts_with("HTTP/1.0 200") || ok.starts_with("HTTP/1.1 200"),
            "{ok}"
        );
        assert_eq!(header(&ok, "content-type"), Some("application/json"));
        assert_eq!(header(&ok, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&ok, "x-load-balancing-endpoint-weight"), Some("2"));
        assert!(ok.ends_with(
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        ));

        // The last local endpoint went away: same listener, new answer, any path.
        assert!(servers.update(&[rule(port, 0)]).is_empty());
        let gone = get(port, "/anything").await.unwrap();
        assert!(gone.contains(" 503 "), "{gone}");
        assert_eq!(header(&gone, "x-load-balancing-endpoint-weight"), Some("0"));
        assert!(gone.ends_with(r#""localEndpoints":0,"serviceProxyHealthy":true}"#));

        // Local endpoints but an unhealthy agent: 503 too.
        assert!(servers.update(&[rule(port, 1)]).is_empty());
        health.record(false, Instant::now());
        let sick = get(port, "/").await.unwrap();
        assert!(sick.contains(" 503 "), "{sick}");
        assert!(sick.ends_with(r#""localEndpoints":1,"serviceProxyHealthy":false}"#));

        // Removed from the plan: the port closes.
        assert!(servers.update(&[]).is_empty());
        assert!(servers.ports().is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(get(port, "/").await.is_err());
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_and_retried() {
        let health = AgentHealth::new(Duration::from_secs(60));
        health.record(true, Instant::now());
        let blocker = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = blocker.local_addr().unwrap().port();
        let mut servers = HealthCheckServers::new(Ipv4Addr::LOCALHOST.into(), health);
        let failures = servers.update(&[rule(port, 1)]);
        assert_eq!(failures.len(), 1);
        assert!(servers.ports().is_empty());
        drop(blocker);
        assert!(servers.update(&[rule(port, 1)]).is_empty());
        assert_eq!(servers.ports(), [port]);
        assert!(get(port, "/").await.unwrap().contains(" 200 "));
    }
}
