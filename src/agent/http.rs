//! Serving the agent's HTTP endpoints (`/metrics`, `/healthz`, `/readyz`, the health-check
//! node ports).
//!
//! Not `axum::serve`: it cannot be told to allow half-closed connections, and hyper then drops
//! the answer whenever the client shuts down its sending side after the request and the
//! answer is not ready yet (`printf 'GET / ...' | nc`, and load-balancer health checkers that
//! do the same). kube-proxy's health server answers those; so does this one.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Serves `app` on `listener` over HTTP/1, one task per connection, until the task is dropped.
/// Returns only when accepting fails.
pub(super) async fn serve(listener: TcpListener, app: Router) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .half_close(true)
                .serve_connection(TokioIo::new(stream), service);
            // A client gone away mid-answer is its own business.
            let _ = connection.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Shutdown, TcpStream};
    use std::time::Duration;

    use super::*;

    /// The answer comes after the client has closed its sending side (the handler is slow on
    /// purpose, so the close always arrives first).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
        let app = Router::new().route(
            "/",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                "late but there"
            }),
        );
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(serve(listener, app));
        let response = tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response);
            response
        })
        .await
        .unwrap();
        server.abort();
        assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response:?}");
        assert!(response.ends_with("late but there"), "{response:?}");
    }
}
