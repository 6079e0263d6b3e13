//! `/metrics`, `/healthz` and `/readyz` over HTTP.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::Error;
use super::context::{CacheState, CacheSync};
use super::lease::Leadership;
use super::metrics::Metrics;

/// What the probes report. Ready means every watch cache has listed; leading does not matter: a
/// follower is ready too (it serves metrics and takes over warm), so a Deployment can roll.
#[derive(Clone)]
pub struct Health {
    pub caches: CacheSync,
    pub leadership: Leadership,
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

pub fn router(metrics: Metrics, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn ready_handler(State(state): State<AppState>) -> impl IntoResponse {
    let role = if state.health.leadership.is_leading() {
        "leading"
    } else {
        "following"
    };
    let waiting = state.health.caches.not_synced();
    if waiting.is_empty() {
        return (StatusCode::OK, format!("ok: caches synced, {role}\n"));
    }
    let caches: Vec<String> = waiting
        .iter()
        .map(|(cache, s)| match s {
            CacheState::Dropped => format!("{cache} (watch ended)"),
            _ => cache.to_string(),
        })
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("caches not synced: {}\n", caches.join(", ")),
    )
}

/// Binds first, so a taken or invalid address stops the operator at start instead of leaving
/// a replica that no probe can reach.
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| Error::MetricsServer { address, source })
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics, health: Health) -> Result<(), Error> {
    let address = listener.local_addr().map_err(|source| Error::MetricsServer {
        address: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics, health))
        .await
        .map_err(|source| Error::MetricsServer { address, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::context::CacheState;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        use tower::ServiceExt;
        let response = router
            .oneshot(
                axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_once_every_cache_listed_whether_leading_or_not() {
        let caches = CacheSync::new(&["portpolicies", "services"]);
        let health = Health {
            caches: caches.clone(),
            leadership: Leadership::new(false),
        };
        let app = router(Metrics::new(), health);
        let (status, body) = get(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "caches not synced: portpolicies, services\n");
        caches.mark("services", CacheState::Listed);
        let (_, body) = get(app.clone(), "/readyz").await;
        assert_eq!(body, "caches not synced: portpolicies\n");
        caches.mark("portpolicies", CacheState::Listed);
        let (status, body) = get(app.clone(), "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok: caches synced, following\n")
        );
        caches.mark("services", CacheState::Dropped);
        let (status, body) = get(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "caches not synced: services (watch ended)\n");
        assert_eq!(get(app, "/healthz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_taken_metrics_address_is_an_error() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let taken = first.local_addr().unwrap();
        let error = bind(taken).await.unwrap_err();
        assert!(matches!(error, Error::MetricsServer { address, .. } if address == taken));
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains(&taken.to_string()), "{error}");
    }
}
