"""The admission webhook, called directly: the emulator has no admission chain, so the harness
plays the API server's part. It posts AdmissionReviews (as kube-apiserver sends them) over
HTTPS to the leader's webhook port, trusting only the caBundle the leader wrote into the
MutatingWebhookConfiguration, applies the patch the way the API server would and creates the
Service with kubectl; the operator must then leave its nodePort as it is (the first port is the
final one). A review that reaches the follower is allowed unchanged. The leader's Pod carries
the label the webhook Service selects, and only it."""

import base64
import json
import socket
import ssl
import time
import urllib.request
import uuid

from cluster import REPLICAS, wait_for

WEBHOOK_HOST = "portpolicy-webhook.portpolicy-system.svc"
LEADER_LABEL = "portpolicy.io/leader"
NAMESPACE = "portpolicy-system"


def review_for(service: dict, dry_run: bool = False) -> dict:
    """The AdmissionReview kube-apiserver sends for a Service CREATE (after defaulting, before
    the registry allocates ports)."""
    meta = service["metadata"]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Service"},
            "resource": {"group": "", "version": "v1", "resource": "services"},
            "requestKind": {"group": "", "version": "v1", "kind": "Service"},
            "requestResource": {"group": "", "version": "v1", "resource": "services"},
            "name": meta["name"],
            "namespace": meta["namespace"],
            "operation": "CREATE",
            "userInfo": {"username": "kubernetes-admin", "groups": ["kubeadm:cluster-admins", "system:authenticated"]},
            "object": service,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "kubectl-client-side-apply"},
        },
    }


def defaulted_service(name: str) -> dict:
    """shopfront's manifest under another name, as the API server has it at admission."""
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "shop", "labels": {"proxy": "portpolicy"},
                     "creationTimestamp": None},
        "spec": {
            "type": "NodePort",
            "selector": {"app": "shopfront"},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
            "sessionAffinity": "None",
            "externalTrafficPolicy": "Cluster",
            "internalTrafficPolicy": "Cluster",
            "ipFamilyPolicy": "SingleStack",
        },
        "status": {"loadBalancer": {}},
    }


def post(port: int, body: dict, context: ssl.SSLContext) -> tuple[int, dict]:
    """POST /mutate-v1-service over TLS to 127.0.0.1:port, checking the name the API server
    would (the webhook Service's)."""
    data = json.dumps(body).encode()
    head = (
        f"POST /mutate-v1-service?timeout=2s HTTP/1.1\r\nHost: {WEBHOOK_HOST}:443\r\n"
        f"Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=WEBHOOK_HOST) as tls:
            tls.sendall(head + data)
            chunks = []
            while True:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLEOFError, ConnectionResetError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
    response = b"".join(chunks)
    header, _, payload = response.partition(b"\r\n\r\n")
    code = int(header.split(b" ")[1])
    if b"transfer-encoding: chunked" in header.lower():
        payload = dechunk(payload)
    return code, json.loads(payload)


def dechunk(payload: bytes) -> bytes:
    out = b""
    while payload:
        size, _, rest = payload.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        payload = rest[n + 2:]
    return out


def reservations(metrics_url: str) -> float | None:
    try:
        with urllib.request.urlopen(metrics_url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("portpolicy_operator_webhook_reservations "):
            return float(line.split()[1])
    return None


def apply_patch(obj: dict, patch: list[dict]) -> dict:
    """The RFC 6902 `add` operations the webhook sends, applied as the API server would."""
    obj = json.loads(json.dumps(obj))
    for op in patch:
        if op["op"] != "add":
            raise ValueError(f"unexpected patch operation {op}")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        at = obj
        for part in parts[:-1]:
            at = at[int(part)] if isinstance(at, list) else at.setdefault(part, {})
        at[parts[-1]] = op["value"]
    return obj


def scenario_webhook(run) -> None:
    run.ensure_proxied()
    leader = wait_for(run.holder, 30)
    if leader not in REPLICAS:
        run.check("webhook-leader-known", False, f"no leader (holder {leader!r})")
        return
    follower = next(r for r in REPLICAS if r != leader)

    # The leader labels its own Pod (the emulator took the PATCH), and only it: the Service
    # selects the leader.
    def labelled():
        pods = run.kubectl.json("get", "pods", "-n", NAMESPACE, "-l", f"{LEADER_LABEL}=true") or {}
        return sorted(p["metadata"]["name"] for p in pods.get("items", []))
    got = wait_for(lambda: labelled() == [leader] and labelled(), 15, 0.5)
    run.check("webhook-leader-pod-labelled", bool(got), f"Pods with {LEADER_LABEL}=true: {labelled()}, leader {leader}")
    svc = run.kubectl.json("get", "service", "-n", NAMESPACE, "portpolicy-webhook") or {}
    selector = svc.get("spec", {}).get("selector", {})
    pod = run.kubectl.json("get", "pod", "-n", NAMESPACE, leader) or {}
    pod_labels = pod.get("metadata", {}).get("labels", {})
    run.check(
        "webhook-service-selects-the-leader",
        selector.get(LEADER_LABEL) == "true" and all(pod_labels.get(k) == v for k, v in selector.items()),
        f"selector {selector}, leader pod labels {pod_labels}",
    )

    # The CA the leader published.
    def bundle():
        mwc = run.kubectl.json("get", "mutatingwebhookconfiguration", "portpolicy-operator") or {}
        hooks = mwc.get("webhooks") or [{}]
        return hooks[0].get("clientConfig", {}).get("caBundle")
    ca_b64 = wait_for(bundle, 20, 0.5)
    if not run.check("webhook-ca-bundle-published", bool(ca_b64), "caBundle still empty after 20 s"):
        return
    trusted = ssl.create_default_context(cadata=base64.b64decode(ca_b64).decode())
    leader_port = run.replica(leader).webhook_port

    # Two reviews in flight: two distinct ports of the policy's range.
    first = defaulted_service("webhook-first")
    review = review_for(first)
    started = time.monotonic()
    code, answer = post(leader_port, review, trusted)
    took = time.monotonic() - started
    response = answer.get("response", {})
    patch = json.loads(base64.b64decode(response["patch"])) if response.get("patch") else []
    port = next((op["value"] for op in patch if op["path"] == "/spec/ports/0/nodePort"), None)
    run.timings["webhook review (HTTPS, new connection)"] = took
    run.check(
        "webhook-review-assigns-a-port-in-range",
        code == 200 and response.get("allowed") is True and response.get("patchType") == "JSONPatch"
        and response.get("uid") == review["request"]["uid"]
        and port in range(32000, 32100),
        f"HTTP {code}, response {response}, patch {patch}",
    )
    second = defaulted_service("webhook-second")
    _, answer2 = post(leader_port, review_for(second), trusted)
    patch2 = json.loads(base64.b64decode(answer2["response"].get("patch") or "W10="))
    port2 = next((op["value"] for op in patch2 if op["path"] == "/spec/ports/0/nodePort"), None)
    run.check("webhook-reviews-in-flight-get-distinct-ports", port2 in range(32000, 32100) and port2 != port,
              f"first {port}, second {port2}")
    # A dry run is answered with a patch and reserves nothing (the leader's gauge of
    # reservations in flight stays at the two above).
    before = reservations(run.replica(leader).metrics_url)
    _, dry = post(leader_port, review_for(defaulted_service("webhook-dry"), dry_run=True), trusted)
    after = reservations(run.replica(leader).metrics_url)
    run.check("webhook-dry-run-reserves-nothing",
              dry["response"].get("patch") is not None and before == after and before is not None and before >= 2,
              f"dry-run response {dry['response']}; reservations {before} then {after}")
    if port is None:
        return

    # The API server stores the patched object; the operator must leave the port alone.
    created = apply_patch(first, patch)
    del created["status"]
    created["metadata"].pop("creationTimestamp", None)
    run.kubectl("apply", "-f", "-", input=json.dumps(created))
    handled = wait_for(
        lambda: ((run.service("webhook-first") or {}).get("metadata", {}).get("labels", {})
                 .get("service.kubernetes.io/service-proxy-name") == "portpolicy"), 30, 0.5)
    time.sleep(3)  # a reconcile or two after it was handled
    now = run.node_port_of("webhook-first")
    moved = [e for e in run.api.requests() if e.get("resource") == "services" and e.get("name") == "webhook-first"
             and e.get("verb") in ("patch", "update") and 200 <= e.get("code", 0) < 300
             and (e.get("fieldManager") or "") == "portpolicy-operator"]
    run.check(
        "webhook-port-is-the-final-port",
        bool(handled) and now == port,
        f"nodePort {now} (webhook gave {port}); reconciled: {bool(handled)}; operator writes: {len(moved)}",
    )

    # A Service created without the webhook meanwhile (the review for webhook-second is still
    # in flight) does not get the port that review handed out.
    run.create_service("webhook-bypassed")
    bypassed = run.allocated("webhook-bypassed", 30)
    run.check("reconcile-skips-ports-of-reviews-in-flight", bool(bypassed) and bypassed not in (port, port2),
              f"webhook-bypassed got {bypassed}; in flight {port2}, created {port}")

    # A review that reaches the follower (its CA is its own and unpublished: only the leader's
    # is trusted, so this one connection does not check the certificate) is allowed unchanged.
    untrusted = ssl.create_default_context()
    untrusted.check_hostname = False
    untrusted.verify_mode = ssl.CERT_NONE
    code, answer = post(run.replica(follower).webhook_port, review_for(defaulted_service("webhook-follower")), untrusted)
    response = answer.get("response", {})
    run.check(
        "webhook-follower-allows-unchanged",
        code == 200 and response.get("allowed") is True and not response.get("patch")
        and any("does not lead" in w for w in response.get("warnings") or []),
        f"HTTP {code}, response {response}",
    )
    for name in ("webhook-first", "webhook-bypassed"):
        run.kubectl("delete", "service", "-n", "shop", name, "--ignore-not-found", check=False)
