"""A real Prometheus in the system e2e.

Debian's ``prometheus`` runs on the host from setup to teardown, scraping both operator
replicas (job ``portpolicy-operator``) and the VM's agent (job ``portpolicy-agent``, through
qemu's ``hostfwd``) every second, with the alert rules of ``config/alerts`` loaded, so it sees
every scenario. The ``prometheus`` scenario moves the cluster and asks Prometheus, over its
HTTP API, whether the series an on-call engineer looks at move with it: a Service moved into
its policy's range, a hostPort conflict appearing (its alert pending) and clearing, the agent
syncing an EndpointSlice change, the leader gauge 1 on exactly the replica holding the Lease.
It also runs ``promtool check metrics`` on every ``/metrics`` and checks that every metric the
alert rules and the Grafana dashboard query is one the running binaries export (the agent's
from the real-kernel VM, which hosts without IPVS cannot run).
"""

import json
import pathlib
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

from cluster import free_port, wait_for

POLICY = "proxied"
POLICY_RANGE = range(32000, 32100)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return None


class Prometheus:
    """Prometheus on the host's loopback; its log and data in the work directory."""

    def __init__(self, binary: str, repo: pathlib.Path, work: pathlib.Path, operators: list[int], agent: int):
        self.port = free_port()
        self.operator_targets = [f"127.0.0.1:{p}" for p in operators]
        self.agent_target = f"127.0.0.1:{agent}"
        data = work / "prometheus-data"
        shutil.rmtree(data, ignore_errors=True)
        config = work / "prometheus.yml"
        # JSON is YAML.
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(repo / "config" / "alerts" / "portpolicy-rules.yaml")],
            "scrape_configs": [
                {"job_name": "portpolicy-operator", "static_configs": [{"targets": self.operator_targets}]},
                {"job_name": "portpolicy-agent",
                 "static_configs": [{"targets": [self.agent_target], "labels": {"node": "node-a"}}]},
            ],
        }, indent=1))
        self.log = open(work / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return (http_get(self.url + "/-/ready", 2) or (0,))[0] == 200

    def api(self, path: str, **params) -> dict:
        """The ``data`` of a successful API answer; raises with Prometheus's error otherwise."""
        query = urllib.parse.urlencode(params, doseq=True)
        got = http_get(f"{self.url}/api/v1/{path}?{query}")
        if got is None:
            raise RuntimeError("no answer from Prometheus")
        answer = json.loads(got[1])
        if answer.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {got[1][:500]}")
        return answer["data"]

    def query(self, expr: str) -> list[tuple[dict, float]]:
        """The instant vector ``expr`` gives, as (labels, value) pairs."""
        return [(r["metric"], float(r["value"][1])) for r in self.api("query", query=expr)["result"]]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, if it gives exactly one series."""
        try:
            result = self.query(expr)
        except RuntimeError:
            return None
        return result[0][1] if len(result) == 1 else None

    def wait(self, expr: str, predicate, timeout: float):
        """Polls until ``expr`` has one value satisfying ``predicate``; returns (value, seconds) or
        (last value, None)."""
        started = time.monotonic()
        got = wait_for(lambda: (v := self.value(expr)) is not None and predicate(v) and (v,), timeout, 0.25)
        return (got[0], time.monotonic() - started) if got else (self.value(expr), None)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def promtool_check_metrics(promtool: str, text: str) -> str:
    """promtool's complaints about one exposition ("" when it has none)."""
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    said = (out.stdout + out.stderr).strip()
    return said or ("" if out.returncode == 0 else f"exit status {out.returncode}")


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"portpolicy_[A-Za-z0-9_:]+", expr))


def dashboard_expressions(repo: pathlib.Path) -> list[tuple[str, str]]:
    dashboard = json.loads((repo / "config" / "grafana" / "portpolicy-dashboard.json").read_text())
    out = []
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                out.append((f"panel {panel.get('title', '?')!r}", target["expr"]))
    for variable in (dashboard.get("templating") or {}).get("list", []):
        if variable.get("definition"):
            out.append((f"variable {variable.get('name')}", variable["definition"]))
    return out


def free_node_port(run) -> int:
    """A nodePort outside the policy's range that no Service holds."""
    listed = run.kubectl.json("get", "services", "-A") or {"items": []}
    taken = {p.get("nodePort") for s in listed["items"] for p in (s.get("spec", {}).get("ports") or [])}
    return next(p for p in range(30100, 32000) if p not in taken)


def exporter_pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "monitoring", "labels": {"app": "exporter"}},
            "spec": {"nodeName": "node-a", "containers": [{
                "name": "exporter", "image": "exporter",
                "ports": [{"containerPort": 9100, "hostPort": 9100, "protocol": "TCP"}]}]}}


def scenario_prometheus(run) -> None:
    prom: Prometheus | None = run.prometheus
    if prom is None:
        run.check("prometheus-scrapes-the-system", False,
                  "Debian's prometheus package is not installed and could not be (needs root and apt-get)")
        return
    if not wait_for(prom.ready, 30, 0.5):
        run.check("prometheus-scrapes-the-system", False, "Prometheus not ready in 30 s; see prometheus.log")
        return
    repo = pathlib.Path(run.args.repo)

    # Every target scraped: both replicas, and the agent in the VM through the forwarded port.
    targets = set(prom.operator_targets) | {prom.agent_target}

    def all_up():
        up = {labels["instance"] for labels, v in prom.query('up{job=~"portpolicy-.+"}') if v == 1}
        return up >= targets and up
    up = wait_for(all_up, 60, 0.5)
    run.check("prometheus-scrapes-both-replicas-and-the-agent", bool(up),
              f"up: {prom.query('up')}; wanted {sorted(targets)}")

    # The leader gauge is 1 on exactly one replica, the one holding the Lease.
    def one_leader():
        holder = run.holder()
        leading = [labels["instance"] for labels, v in prom.query("portpolicy_operator_leader") if v == 1]
        expected = holder and f"127.0.0.1:{run.replica(holder).metrics_port}"
        return leading == [expected] and prom.value("sum(portpolicy_operator_leader)") == 1 and (holder, leading)
    leader = wait_for(one_leader, 30, 0.5)
    run.check("leader-gauge-is-1-on-exactly-the-replica-holding-the-lease", bool(leader),
              f"Lease holder {run.holder()!r}; portpolicy_operator_leader: {prom.query('portpolicy_operator_leader')}")

    # A Service created with a nodePort outside the enforced range: moved into it, counted as
    # `moved`, and one more port used.
    if not run.ensure_proxied():
        run.check("prometheus-sees-a-service-moved-into-the-range", False, "shop/shopfront got no port of proxied")
        return
    moved = f'sum(portpolicy_operator_node_port_allocations_total{{policy="{POLICY}",outcome="moved"}})'
    used = f'max(portpolicy_operator_node_ports_used{{policy="{POLICY}"}})'
    time.sleep(3)  # a few scrapes, so that Prometheus has the values after shopfront's move
    moved_before, _ = prom.wait(moved, lambda v: True, 20)
    used_before, _ = prom.wait(used, lambda v: True, 20)
    node_port = free_node_port(run)
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "observed", "namespace": "shop", "labels": {"proxy": "portpolicy"}},
               "spec": {"type": "NodePort", "selector": {"app": "observed"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": node_port}]}}
    run.kubectl("apply", "-f", "-", input=json.dumps(service))
    moved_after, took, used_after = None, None, None
    if moved_before is not None and used_before is not None:
        moved_after, took = prom.wait(moved, lambda v: v >= moved_before + 1, 30)
        used_after, _ = prom.wait(used, lambda v: v == used_before + 1, 20)
    got = wait_for(lambda: (p := run.node_port_of("observed")) in POLICY_RANGE and p, 30, 0.5)
    if took is not None:
        run.timings["allocation visible in Prometheus"] = took
    run.check("prometheus-sees-a-service-moved-into-the-range",
              bool(got) and took is not None and used_after == (used_before or 0) + 1,
              f"nodePort {node_port} -> {run.node_port_of('observed')}; {moved}: {moved_before} -> {moved_after}; "
              f"{used}: {used_before} -> {used_after}")

    # Two exporters on node-a want hostPort 9100: a conflict of every policy governing their
    # namespace (proxied governs all), its alert pending; one goes, and it clears.
    conflicts = f'max(portpolicy_operator_host_port_conflicts{{policy="{POLICY}"}})'
    pending = f'count(ALERTS{{alertname="PortPolicyHostPortConflicts",policy="{POLICY}",alertstate="pending"}})'
    before, _ = prom.wait(conflicts, lambda v: v == 0, 20)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "monitoring"}}
    for manifest in (namespace, exporter_pod("exporter-1"), exporter_pod("exporter-2")):
        run.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    during, appeared = prom.wait(conflicts, lambda v: v == 1, 30)
    alert, _ = prom.wait(pending, lambda v: v == 1, 15) if appeared is not None else (None, None)
    run.check("prometheus-sees-a-host-port-conflict-and-its-alert-pending",
              before == 0 and appeared is not None and alert == 1,
              f"{conflicts}: {before} before, {during} after two Pods took hostPort 9100; {pending}: {alert}")
    run.kubectl("delete", "pod", "-n", "monitoring", "exporter-2", "--wait=false")
    after, cleared = prom.wait(conflicts, lambda v: v == 0, 30)
    if cleared is not None:
        run.timings["conflict clear visible in Prometheus"] = cleared
    run.check("prometheus-sees-the-host-port-conflict-clear", cleared is not None,
              f"{conflicts} is {after} after one of the two Pods went")
    run.kubectl("delete", "pod", "-n", "monitoring", "exporter-1", "--wait=false", check=False)
    run.kubectl("delete", "namespace", "monitoring", "--wait=false", check=False)

    # The agent syncs an EndpointSlice change: its operations and real servers grow and its
    # last successful sync moves on, as Prometheus scrapes them from the VM.
    run.kubectl("apply", "-f", str(run_manifests() / "slice-one.yaml"))
    settled = wait_for(lambda: "10.0.12.2:8080" not in (t := run.ipvs()) and "10.0.11.2:8080" in t, 30, 0.5)
    time.sleep(3)  # a few scrapes, so Prometheus has the agent's settled values
    ops = "sum(portpolicy_agent_ipvs_operations_total)"
    real = "sum(portpolicy_agent_real_servers)"
    synced = "max(portpolicy_agent_last_successful_sync_timestamp_seconds)"
    before = {e: prom.value(e) for e in (ops, real, synced)}
    run.kubectl("apply", "-f", str(run_manifests() / "slice-two.yaml"))
    after = {}
    took = None
    if settled and None not in before.values():
        started = time.monotonic()
        after[ops], t1 = prom.wait(ops, lambda v: v > before[ops], 30)
        after[real], t2 = prom.wait(real, lambda v: v > before[real], 30)
        after[synced], t3 = prom.wait(synced, lambda v: v > before[synced], 30)
        took = time.monotonic() - started if None not in (t1, t2, t3) else None
    if took is not None:
        run.timings["agent sync visible in Prometheus"] = took
    run.check("prometheus-sees-the-agent-sync-an-endpointslice-change", took is not None,
              f"settled on slice-one: {bool(settled)}; before {before}, after {after}; ipvsadm -Ln:\n{run.ipvs()}")
    run.kubectl("delete", "service", "-n", "shop", "observed", "--wait=false", check=False)

    # promtool's lint on every /metrics, the agent's from the VM included.
    complaints = []
    for target in sorted(targets):
        got = http_get(f"http://{target}/metrics")
        if not got or got[0] != 200:
            complaints.append(f"{target}: /metrics answered {got and got[0]}")
            continue
        said = promtool_check_metrics(run.args.promtool or "promtool", got[1])
        if said:
            complaints.append(f"{target}: {said}")
    run.check("promtool-check-metrics-passes-on-every-scrape", not complaints, "; ".join(complaints)[:3000])

    # Every metric the loaded alert rules and the dashboard query is one the binaries export, as
    # Prometheus scraped them, and Prometheus accepts every query.
    exported = set(prom.api("label/__name__/values", **{"match[]": '{job=~"portpolicy-.+"}'}))
    expressions = [(f"rule {r['name']}", r["query"])
                   for g in prom.api("rules")["groups"] for r in g["rules"]]
    expressions += dashboard_expressions(repo)
    problems = []
    for origin, expr in expressions:
        names = metric_names(expr)
        if not names:
            problems.append(f"{origin} queries no portpolicy metric: {expr}")
        problems += [f"{origin}: {n} is not exported" for n in sorted(names - exported)]
        if expr.startswith("label_values("):
            continue  # Grafana's, not PromQL
        try:
            prom.query(expr.replace("$__rate_interval", "1m").replace("$policy", ".*"))
        except RuntimeError as e:
            problems.append(f"{origin}: Prometheus refuses it: {e}")
    agent_names = {n for n in exported if n.startswith("portpolicy_agent_")}
    run.check("every-metric-the-alerts-and-dashboard-query-is-exported",
              len(expressions) >= 10 and bool(agent_names) and not problems,
              f"{len(expressions)} expressions, {len(agent_names)} agent series names; " + "; ".join(problems)[:3000])


def run_manifests() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent / "manifests"
