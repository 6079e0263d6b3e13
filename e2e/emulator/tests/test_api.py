"""The emulator against what a kube-runtime client and kubectl rely on."""

import json

from conftest import Emulator, service

SVC = "/api/v1/namespaces/shop/services"
APPLY = "application/apply-patch+yaml"


def apply(e, path, body, manager, force=True, subresource=""):
    query = f"?fieldManager={manager}" + ("&force=true" if force else "")
    return e.request("PATCH", path + subresource + query, body, content_type=APPLY)


def test_discovery_lists_builtins_and_groups_added_by_a_crd(crd):
    e = crd
    assert e.ok("GET", "/api")["versions"] == ["v1"]
    core = {r["name"] for r in e.ok("GET", "/api/v1")["resources"]}
    assert {"namespaces", "nodes", "pods", "services", "services/status"} <= core
    groups = {g["name"] for g in e.ok("GET", "/apis")["groups"]}
    assert {"apps", "coordination.k8s.io", "events.k8s.io", "discovery.k8s.io", "portpolicy.io"} <= groups
    pp = e.ok("GET", "/apis/portpolicy.io/v1alpha1")["resources"]
    assert {(r["name"], r["kind"], r["namespaced"]) for r in pp} == {
        ("portpolicies", "PortPolicy", False),
        ("portpolicies/status", "PortPolicy", False),
    }
    assert pp[0]["shortNames"] == ["pp"]


def test_every_write_gets_a_new_resource_version_and_stale_writes_conflict(shop):
    e = shop
    created = e.ok("POST", SVC, service("web", ports=[{"port": 80}]))
    rv1 = int(created["metadata"]["resourceVersion"])
    created["metadata"]["labels"] = {"a": "b"}
    updated = e.ok("PUT", f"{SVC}/web", created)
    rv2 = int(updated["metadata"]["resourceVersion"])
    assert rv2 > rv1
    created["metadata"]["labels"] = {"a": "c"}  # still carries rv1
    code, status = e.request("PUT", f"{SVC}/web", created)
    assert (code, status["reason"]) == (409, "Conflict")
    assert "the object has been modified" in status["message"]
    code, status = e.request("PATCH", f"{SVC}/web", {"metadata": {"resourceVersion": str(rv1)}},
                             content_type="application/merge-patch+json")
    assert (code, status["reason"]) == (409, "Conflict")


def test_error_reasons(shop):
    e = shop
    code, status = e.request("GET", f"{SVC}/missing")
    assert (code, status["kind"], status["reason"]) == (404, "Status", "NotFound")
    assert status["message"] == 'services "missing" not found'
    e.ok("POST", SVC, service("web", ports=[{"port": 80}]))
    code, status = e.request("POST", SVC, service("web", ports=[{"port": 80}]))
    assert (code, status["reason"]) == (409, "AlreadyExists")
    code, status = e.request("POST", SVC, service("bad", type="NodePort", ports=[{"port": 80, "nodePort": 80}]))
    assert (code, status["reason"]) == (422, "Invalid")
    assert status["details"]["causes"][0]["field"] == "spec.ports[0].nodePort"
    code, status = e.request("POST", "/api/v1/namespaces/nowhere/services", service("x", ns="nowhere"))
    assert (code, status["reason"]) == (404, "NotFound")


def test_node_ports_are_allocated_unowned_and_kept_when_an_update_leaves_them_out(shop):
    e = shop
    svc = e.ok("POST", SVC + "?fieldManager=kubectl-create", service("web", type="NodePort", ports=[{"port": 80}]))
    port = dict(svc["spec"]["ports"][0])
    assert 30000 <= port["nodePort"] <= 32767 and port["protocol"] == "TCP"
    owned = json.dumps(svc["metadata"]["managedFields"])
    assert "f:nodePort" not in owned and "f:protocol" in owned  # defaults are the creator's
    code, taken = e.request("POST", SVC, service("other", type="NodePort",
                                                 ports=[{"port": 80, "nodePort": port["nodePort"]}]))
    assert code == 422 and "already allocated" in taken["message"]
    del svc["spec"]["ports"][0]["nodePort"]
    again = e.ok("PUT", f"{SVC}/web", svc)
    assert again["spec"]["ports"][0]["nodePort"] == port["nodePort"]


def test_list_and_watch_honour_label_and_field_selectors(shop):
    e = shop
    e.ok("POST", SVC, service("a", ports=[{"port": 80}]) | {"metadata": {"name": "a", "labels": {"tier": "edge"}}})
    e.ok("POST", SVC, service("b", ports=[{"port": 80}]))
    names = lambda q: [o["metadata"]["name"] for o in e.ok("GET", SVC + q)["items"]]
    assert names("?labelSelector=tier%3Dedge") == ["a"]
    assert names("?labelSelector=tier") == ["a"]
    assert names("?labelSelector=%21tier") == ["b"]
    assert names("?labelSelector=tier%20in%20(edge,core)") == ["a"]
    assert names("?fieldSelector=metadata.name%3Db") == ["b"]
    assert names("?fieldSelector=metadata.name%21%3Db") == ["a"]
    rv = e.ok("GET", SVC)["metadata"]["resourceVersion"]
    # b gains the label (ADDED to this watch), a loses it (DELETED to this watch).
    e.ok("PATCH", f"{SVC}/b", {"metadata": {"labels": {"tier": "edge"}}}, content_type="application/merge-patch+json")
    e.ok("PATCH", f"{SVC}/a", {"metadata": {"labels": None}}, content_type="application/merge-patch+json")
    events = e.watch(f"{SVC}?watch=true&labelSelector=tier&resourceVersion={rv}", until=3)
    seen = [(ev["type"], ev["object"]["metadata"]["name"]) for ev in events if ev["type"] != "BOOKMARK"]
    assert seen == [("ADDED", "b"), ("DELETED", "a")]


def test_watch_resumes_from_a_version_sends_bookmarks_and_all_objects_without_one(shop):
    e = shop
    e.ok("POST", SVC, service("a", ports=[{"port": 80}]))
    rv = e.ok("GET", SVC)["metadata"]["resourceVersion"]
    e.ok("POST", SVC, service("b", ports=[{"port": 80}]))
    events = e.watch(f"{SVC}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true", seconds=1.5)
    types = [(ev["type"], ev["object"]["metadata"].get("name")) for ev in events]
    assert types[0] == ("ADDED", "b")
    assert ("BOOKMARK", None) in types
    bookmark = next(ev for ev in events if ev["type"] == "BOOKMARK")
    assert int(bookmark["object"]["metadata"]["resourceVersion"]) >= int(rv) + 1
    from_start = e.watch(f"{SVC}?watch=true", seconds=0.5)
    assert sorted(ev["object"]["metadata"]["name"] for ev in from_start) == ["a", "b"]


def test_watch_from_a_compacted_version_gets_410(short_history):
    e = short_history
    e.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "shop"}})
    rv = e.ok("GET", SVC)["metadata"]["resourceVersion"]
    for name in "abcd":
        e.ok("POST", SVC, service(name, ports=[{"port": 80}]))
    events = e.watch(f"{SVC}?watch=true&resourceVersion={rv}", seconds=1, until=1)
    assert events[0]["type"] == "ERROR"
    assert (events[0]["object"]["code"], events[0]["object"]["reason"]) == (410, "Expired")
    assert "too old resource version" in events[0]["object"]["message"]


def test_seeded_objects_are_as_if_created_through_the_api(tmp_path):
    seed = tmp_path / "seed.jsonl"
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
        service("a", clusterIP="10.96.5.5", ports=[{"port": 80}]) | {"metadata": {"name": "a", "namespace": "shop", "labels": {"tier": "edge"}}},
        service("b", type="NodePort", ports=[{"port": 80}]),
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "a-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "a"}},
         "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}]},
    ]
    seed.write_text("".join(json.dumps(o) + "\n" for o in objects))
    e = Emulator("--seed", str(seed), "--seed-manager", "bench-loader")
    try:
        listed = e.ok("GET", SVC)
        a, b = listed["items"]
        assert (a["spec"]["clusterIP"], a["spec"]["sessionAffinity"], a["spec"]["ports"][0]["protocol"]) == (
            "10.96.5.5", "None", "TCP")
        assert 30000 <= b["spec"]["ports"][0]["nodePort"] <= 32767 and b["spec"]["clusterIP"]
        assert int(a["metadata"]["resourceVersion"]) < int(b["metadata"]["resourceVersion"]) <= int(
            listed["metadata"]["resourceVersion"])
        assert a["metadata"]["uid"] != b["metadata"]["uid"]
        assert [m["manager"] for m in a["metadata"]["managedFields"]] == ["bench-loader"]
        assert e.ok("GET", SVC + "?labelSelector=tier%3Dedge")["items"][0]["metadata"]["name"] == "a"
        slices = e.ok("GET", "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices")["items"]
        assert [s["metadata"]["name"] for s in slices] == ["a-1"]
        # Watched from the list's version, a seeded object's change is the one event.
        e.ok("PATCH", f"{SVC}/a", {"metadata": {"labels": {"tier": "core"}}}, content_type="application/merge-patch+json")
        events = e.watch(f"{SVC}?watch=true&resourceVersion={listed['metadata']['resourceVersion']}", seconds=1, until=1)
        assert [(ev["type"], ev["object"]["metadata"]["name"]) for ev in events] == [("MODIFIED", "a")]
        assert all(json.loads(line)["verb"] != "create" for line in e.log.read_text().splitlines())
    finally:
        e.stop()


def test_status_subresource_separates_spec_and_status(crd):
    e = crd
    pp = "/apis/portpolicy.io/v1alpha1/portpolicies"
    created = e.ok("POST", pp, {"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
                                "metadata": {"name": "edge"}, "spec": {}, "status": {"nodePortsUsed": "9/9"}})
    assert "status" not in created and created["metadata"]["generation"] == 1
    code, body = apply(e, f"{pp}/edge", {"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
                                         "metadata": {"name": "edge"}, "status": {"nodePortsUsed": "1/10"},
                                         "spec": {"nodePorts": {"range": "1-2"}}}, "op", subresource="/status")
    assert code == 200 and body["status"] == {"nodePortsUsed": "1/10"} and body["spec"] == {}
    assert body["metadata"]["generation"] == 1
    body = e.ok("PATCH", f"{pp}/edge", {"spec": {"nodePorts": {"range": "31000-31099"}}, "status": None},
                content_type="application/merge-patch+json")
    assert body["status"] == {"nodePortsUsed": "1/10"} and body["metadata"]["generation"] == 2
    code, _ = apply(e, f"{pp}/nothing", {"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
                                         "metadata": {"name": "nothing"}, "status": {}}, "op", subresource="/status")
    assert code == 404


def test_server_side_apply_creates_and_merges_ports_by_port_and_protocol(shop):
    e = shop
    code, svc = apply(e, f"{SVC}/dns", service("dns", type="NodePort", ports=[
        {"name": "tcp", "port": 53, "protocol": "TCP"}, {"name": "udp", "port": 53, "protocol": "UDP"},
        {"name": "web", "port": 80}]) | {"metadata": {"name": "dns", "labels": {"app": "dns"}}}, "user", force=False)
    assert code == 201
    before = {(p["port"], p["protocol"]): p["nodePort"] for p in svc["spec"]["ports"]}
    intent = {"apiVersion": "v1", "kind": "Service",
              "metadata": {"name": "dns", "namespace": "shop", "labels": {"proxy": "portpolicy"}},
              "spec": {"ports": [{"port": 53, "protocol": "UDP", "nodePort": 31053}]}}
    code, svc = apply(e, f"{SVC}/dns", intent, "portpolicy-operator")
    assert code == 200
    ports = {(p["port"], p["protocol"]): p for p in svc["spec"]["ports"]}
    assert len(svc["spec"]["ports"]) == 3
    assert ports[(53, "UDP")]["nodePort"] == 31053 and ports[(53, "UDP")]["name"] == "udp"
    assert ports[(53, "TCP")]["nodePort"] == before[(53, "TCP")]
    assert svc["metadata"]["labels"] == {"app": "dns", "proxy": "portpolicy"}
    mine = next(m for m in svc["metadata"]["managedFields"] if m["manager"] == "portpolicy-operator")
    assert mine["fieldsV1"]["f:spec"]["f:ports"] == {
        'k:{"port":53,"protocol":"UDP"}': {".": {}, "f:nodePort": {}, "f:port": {}, "f:protocol": {}}}
    # An empty apply hands everything back: the label goes, the allocated nodePort stays.
    code, svc = apply(e, f"{SVC}/dns", {"apiVersion": "v1", "kind": "Service",
                                        "metadata": {"name": "dns", "namespace": "shop"}}, "portpolicy-operator")
    assert code == 200 and svc["metadata"]["labels"] == {"app": "dns"}
    assert {(p["port"], p["protocol"]): p["nodePort"] for p in svc["spec"]["ports"]}[(53, "UDP")] == 31053
    assert all(m["manager"] != "portpolicy-operator" for m in svc["metadata"]["managedFields"])


def test_apply_conflicts_unless_forced(shop):
    e = shop
    apply(e, f"{SVC}/web", service("web", type="NodePort", externalTrafficPolicy="Cluster",
                                   ports=[{"port": 80}]), "user", force=False)
    other = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
             "spec": {"externalTrafficPolicy": "Local"}}
    code, status = apply(e, f"{SVC}/web", other, "operator", force=False)
    assert (code, status["reason"]) == (409, "Conflict")
    assert 'conflict with "user"' in status["message"] and ".spec.externalTrafficPolicy" in status["message"]
    code, svc = apply(e, f"{SVC}/web", other, "operator", force=True)
    assert code == 200 and svc["spec"]["externalTrafficPolicy"] == "Local"


def test_finalizers_hold_deletion_until_the_last_is_removed(crd):
    e = crd
    pp = "/apis/portpolicy.io/v1alpha1/portpolicies"
    e.ok("POST", pp, {"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
                      "metadata": {"name": "edge"}, "spec": {}})
    # How kube-runtime's finalizer helper adds the first one: `test` null passes for a missing path.
    add = [{"op": "test", "path": "/metadata/finalizers", "value": None},
           {"op": "add", "path": "/metadata/finalizers", "value": ["portpolicy.io/cleanup"]}]
    e.ok("PATCH", f"{pp}/edge", add, content_type="application/json-patch+json")
    code, status = e.request("PATCH", f"{pp}/edge", add, content_type="application/json-patch+json")
    assert (code, status["reason"]) == (422, "Invalid")
    rv = e.ok("GET", pp)["metadata"]["resourceVersion"]
    marked = e.ok("DELETE", f"{pp}/edge")
    assert marked["metadata"]["deletionTimestamp"]
    assert e.ok("GET", f"{pp}/edge")["metadata"]["finalizers"] == ["portpolicy.io/cleanup"]
    e.ok("PATCH", f"{pp}/edge", [{"op": "remove", "path": "/metadata/finalizers/0"}],
         content_type="application/json-patch+json")
    assert e.request("GET", f"{pp}/edge")[0] == 404
    events = e.watch(f"{pp}?watch=true&resourceVersion={rv}", until=2)
    assert [ev["type"] for ev in events] == ["MODIFIED", "DELETED"]


def test_dependents_go_with_their_owner(crd):
    e = crd
    pp = e.ok("POST", "/apis/portpolicy.io/v1alpha1/portpolicies", {
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy", "metadata": {"name": "edge"}, "spec": {}})
    e.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "sys"}})
    e.ok("POST", "/apis/apps/v1/namespaces/sys/daemonsets", {"metadata": {"name": "agent", "ownerReferences": [
        {"apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy", "name": "edge", "uid": pp["metadata"]["uid"],
         "controller": True}]}, "spec": {}})
    e.ok("DELETE", "/apis/portpolicy.io/v1alpha1/portpolicies/edge")
    assert e.request("GET", "/apis/apps/v1/namespaces/sys/daemonsets/agent")[0] == 404


def test_partial_object_metadata_and_tables(crd):
    e = crd
    e.ok("POST", "/api/v1/nodes", {"metadata": {"name": "n1", "labels": {"a": "b"}},
                                   "status": {"addresses": [{"type": "InternalIP", "address": "10.1.0.1"}]}})
    meta = e.ok("GET", "/api/v1/nodes", accept="application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
    assert meta["kind"] == "PartialObjectMetadataList"
    assert set(meta["items"][0]) == {"kind", "apiVersion", "metadata"}
    e.ok("POST", "/apis/portpolicy.io/v1alpha1/portpolicies", {
        "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy", "metadata": {"name": "edge"},
        "spec": {"nodePorts": {"range": "31000-31099"}}})
    e.ok("PATCH", "/apis/portpolicy.io/v1alpha1/portpolicies/edge/status", {"status": {
        "nodePortsUsed": "2/100", "conflictCount": 0,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}},
         content_type="application/merge-patch+json")
    table = e.ok("GET", "/apis/portpolicy.io/v1alpha1/portpolicies",
                 accept="application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Range", "Used", "Conflicts", "Agents",
                                                               "Ready", "Age"]
    assert table["rows"][0]["cells"][:6] == ["edge", "31000-31099", "2/100", 0, None, "True"]
    result = e.kubectl("get", "portpolicies")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "RANGE", "USED", "CONFLICTS", "AGENTS", "READY", "AGE"]
    assert row.split()[:5] == ["edge", "31000-31099", "2/100", "0", "True"]


def test_kubectl_applies_the_project_manifests_twice(crd):
    e = crd
    for _ in range(2):
        result = e.kubectl("apply", "-k", str(__import__("conftest").REPO / "config"))
        assert result.returncode == 0, result.stderr
    result = e.kubectl("get", "deploy", "-n", "portpolicy-system", "-o", "jsonpath={.items[*].metadata.name}")
    assert result.stdout == "portpolicy-operator"
