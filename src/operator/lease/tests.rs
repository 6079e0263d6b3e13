//! The elector against a mocked API server, on tokio's paused clock: what it sends, when it
//! leads, when it stops leading and how fast a follower takes over.

use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::*;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

const LEASE_URI: &str =
    "/apis/coordination.k8s.io/v1/namespaces/portpolicy-system/leases/portpolicy-operator";

fn elector(me: &str) -> (Elector, Handle) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    handle.allow(1000);
    let client = Client::new(service, "default");
    (
        Elector::new(client, "portpolicy-system", me, Timing::default()),
        handle,
    )
}

fn lease(holder: &str, rv: &str, duration: i32, transitions: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "portpolicy-operator", "namespace": "portpolicy-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
            "renewTime": "2026-11-26T12:00:00.000000Z", "leaseTransitions": transitions}})
}

async fn next(handle: &mut Handle) -> (String, String, Value, Send) {
    try_next(handle).await.expect("a request")
}

async fn try_next(handle: &mut Handle) -> Option<(String, String, Value, Send)> {
    let (request, send) = handle.next_request().await?;
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Some((method, uri, body, send))
}

fn reply(send: Send, status: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound",
        "message": "leases.coordination.k8s.io \"portpolicy-operator\" not found"})
}

/// Answers GETs with `current` and echoes PUTs back with the next resourceVersion, recording
/// each write's body and when it arrived.
async fn answer_as_api_server(
    mut handle: Handle,
    mut current: Value,
    writes: tokio::sync::mpsc::UnboundedSender<(Instant, Value)>,
) {
    let mut rv = 10;
    while let Some((method, uri, body, send)) = try_next(&mut handle).await {
        assert!(uri.starts_with(LEASE_URI), "{uri}");
        match method.as_str() {
            "GET" => reply(send, 200, &current),
            "PUT" => {
                assert_eq!(
                    body["metadata"]["resourceVersion"],
                    current["metadata"]["resourceVersion"]
                );
                rv += 1;
                current = body.clone();
                current["metadata"]["resourceVersion"] = json!(rv.to_string());
                let _ = writes.send((Instant::now(), body));
                reply(send, 200, &current);
            }
            other => panic!("unexpected {other} {uri}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn first_replica_creates_the_lease_and_leads() {
    let (mut elector, mut handle) = elector("operator-a");
    let api = tokio::spawn(async move {
        let (method, uri, _, send) = next(&mut handle).await;
        assert_eq!((method.as_str(), uri.as_str()), ("GET", LEASE_URI));
        reply(send, 404, &not_found());
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "POST");
        assert_eq!(
            uri,
            "/apis/coordination.k8s.io/v1/namespaces/portpolicy-system/leases?"
        );
        assert_eq!(body["spec"]["holderIdentity"], "operator-a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(body["spec"]["leaseTransitions"], 0);
        let mut created = body.clone();
        created["metadata"]["resourceVersion"] = json!("1");
        reply(send, 201, &created);
        handle
    });
    assert_eq!(elector.round().await.unwrap(), Round::Leading);
    api.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn follower_waits_a_whole_lease_on_its_own_clock_before_taking_over() {
    let (mut elector, handle) = elector("operator-a");
    let (writes, mut written) = tokio::sync::mpsc::unbounded_channel();
    // operator-b holds the Lease and then dies: the record never changes again.
    tokio::spawn(answer_as_api_server(
        handle,
        lease("operator-b", "7", 15, 3),
        writes,
    ));
    let start = Instant::now();
    assert_eq!(
        elector.round().await.unwrap(),
        Round::Following {
            holder: "operator-b".into()
        }
    );
    let renewed = elector.acquire().await;
    let (at, body) = written.recv().await.unwrap();
    let waited = at - start;
    assert!(
        waited >= Duration::from_secs(15) && waited < Duration::from_secs(17),
        "took over after {waited:?}"
    );
    assert!(renewed <= at);
    assert_eq!(body["spec"]["holderIdentity"], "operator-a");
    assert_eq!(
        body["spec"]["leaseTransitions"], 4,
        "a takeover counts as a transition"
    );
}

#[tokio::test(start_paused = true)]
async fn released_lease_is_taken_over_at_the_next_check() {
    let (mut elector, handle) = elector("operator-a");
    let (writes, mut written) = tokio::sync::mpsc::unbounded_channel();
    // What a leader leaves behind when it releases on shutdown.
    tokio::spawn(answer_as_api_server(handle, lease("", "9", 1, 3), writes));
    let start = Instant::now();
    elector.acquire().await;
    let (at, body) = written.recv().await.unwrap();
    assert!(at - start < Duration::from_secs(1), "took {:?}", at - start);
    assert_eq!(body["spec"]["holderIdentity"], "operator-a");
}

#[tokio::test(start_paused = true)]
async fn leader_that_gets_no_answer_steps_down_within_the_renew_deadline() {
    let (mut elector, mut handle) = elector("operator-a");
    let api = tokio::spawn(async move {
        let (_, _, _, send) = next(&mut handle).await;
        reply(send, 200, &lease("operator-a", "5", 15, 1));
        let (method, _, body, send) = next(&mut handle).await;
        assert_eq!(method, "PUT");
        let mut renewed = body;
        renewed["metadata"]["resourceVersion"] = json!("6");
        reply(send, 200, &renewed);
        // The API server freezes: every later request is received and never answered.
        let mut pending = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            pending.push((request, send));
        }
        pending.len()
    });
    let renewed = elector.acquire().await;
    let lost = tokio::time::timeout(Duration::from_secs(60), elector.hold(renewed))
        .await
        .expect("a leader whose Lease calls hang must give up, not wait for ever");
    assert_eq!(
        lost,
        LeadershipLost::RenewDeadlineExceeded {
            deadline: Duration::from_secs(10)
        }
    );
    let gave_up_after = Instant::now() - renewed;
    assert!(
        gave_up_after <= Duration::from_secs(10),
        "stopped leading {gave_up_after:?} after the last renewal; others may take over at 15 s"
    );
    drop(elector);
    assert!(api.await.unwrap() >= 1, "it kept trying to renew");
}

#[tokio::test(start_paused = true)]
async fn leader_that_finds_another_holder_stops_at_once() {
    let (mut elector, mut handle) = elector("operator-a");
    let api = tokio::spawn(async move {
        let (_, _, _, send) = next(&mut handle).await;
        reply(send, 200, &lease("operator-a", "5", 15, 1));
        let (_, _, body, send) = next(&mut handle).await;
        let mut renewed = body;
        renewed["metadata"]["resourceVersion"] = json!("6");
        reply(send, 200, &renewed);
        // Someone took it over (say, this replica's clock stalled).
        let (method, _, _, send) = next(&mut handle).await;
        assert_eq!(method, "GET");
        reply(send, 200, &lease("operator-b", "7", 15, 2));
        handle
    });
    let renewed = elector.acquire().await;
    assert_eq!(
        elector.hold(renewed).await,
        LeadershipLost::TakenOver {
            holder: "operator-b".into()
        }
    );
    api.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn release_empties_the_holder_with_the_last_resource_version() {
    let (mut elector, mut handle) = elector("operator-a");
    let api = tokio::spawn(async move {
        let (_, _, _, send) = next(&mut handle).await;
        reply(send, 200, &lease("operator-a", "5", 15, 1));
        let (_, _, body, send) = next(&mut handle).await;
        let mut renewed = body;
        renewed["metadata"]["resourceVersion"] = json!("6");
        reply(send, 200, &renewed);
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(
            (method.as_str(), uri.as_str()),
            ("PUT", &*format!("{LEASE_URI}?"))
        );
        assert_eq!(body["metadata"]["resourceVersion"], "6");
        assert_eq!(body["spec"]["holderIdentity"], "");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 1);
        assert_eq!(body["spec"]["leaseTransitions"], 1);
        let mut released = body;
        released["metadata"]["resourceVersion"] = json!("7");
        reply(send, 200, &released);
        handle
    });
    elector.acquire().await;
    assert!(elector.release().await);
    api.await.unwrap();
    // Released: there is nothing left to release.
    assert!(!elector.release().await);
}

#[tokio::test(start_paused = true)]
async fn follower_does_not_release_what_it_does_not_hold() {
    let (mut elector, mut handle) = elector("operator-a");
    let api = tokio::spawn(async move {
        let (_, _, _, send) = next(&mut handle).await;
        reply(send, 200, &lease("operator-b", "5", 15, 1));
        // No further request may come.
        handle.next_request().await.is_none()
    });
    assert!(matches!(elector.round().await.unwrap(), Round::Following { .. }));
    assert!(!elector.release().await);
    drop(elector);
    assert!(api.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn leadership_gate_reports_losses_and_gains() {
    let leadership = Leadership::new(false);
    let mut gains = Box::pin(leadership.acquisitions());
    // Not leading: lost() is immediate.
    tokio::time::timeout(Duration::from_millis(1), leadership.lost())
        .await
        .unwrap();
    leadership.set(true);
    assert!(leadership.is_leading());
    tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut gains))
        .await
        .expect("a gain")
        .unwrap();
    let lost = tokio::spawn({
        let l = leadership.clone();
        async move { l.lost().await }
    });
    tokio::task::yield_now().await;
    assert!(!lost.is_finished());
    leadership.set(false);
    lost.await.unwrap();
    // Lost and won again before anyone looked: still a gain, since the reconciles cancelled
    // by the loss must run again.
    leadership.set(true);
    tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut gains))
        .await
        .expect("a gain")
        .unwrap();
}

#[test]
fn timing_must_leave_the_leader_time_to_stop() {
    assert_eq!(Timing::default().validate(), Ok(()));
    let t = Timing {
        renew_deadline: Duration::from_secs(15),
        ..Timing::default()
    };
    assert!(t.validate().unwrap_err().contains("renew deadline"));
    let t = Timing {
        renew_period: Duration::from_secs(10),
        ..Timing::default()
    };
    assert!(t.validate().unwrap_err().contains("renew period"));
}
