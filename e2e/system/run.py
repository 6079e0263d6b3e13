"""The system e2e's scenarios (see e2e/run-system, which prepares everything and runs this).

Every check prints one ``PASS name`` or ``FAIL name: why`` line; the run ends with exactly one
``N passed, M failed`` line and exits non-zero when anything failed. Scenarios run in order on
one cluster, each leaving it as the next expects; one that cannot run counts as failed.
"""

import argparse
import pathlib
import signal
import subprocess
import sys
import time
import traceback

from cluster import REPLICAS, ApiServer, Kubectl, Replica, describe, free_port, wait_for, writes
from scenario_webhook import scenario_webhook
from scenario_prometheus import Prometheus, scenario_prometheus
from vm import Vm, VmError

HERE = pathlib.Path(__file__).resolve().parent
MANIFESTS = HERE / "manifests"
LEASE = ("portpolicy-system", "portpolicy-operator")
LEASE_SECONDS = 15
POLICY_RANGE = range(32000, 32100)
# The label the operator sets on Services it hands to its agent (kube-proxy skips them).
PROXY_NAME = "service.kubernetes.io/service-proxy-name"


class Run:
    def __init__(self, args):
        self.args = args
        self.work = pathlib.Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        # Logs of this run only (the replicas append across their restarts within a run).
        for stale in ("kubectl.log", "operator-op-a.log", "operator-op-b.log", "agent.log"):
            (self.work / stale).unlink(missing_ok=True)
        self.passed = self.failed = 0
        self.timings: dict[str, float] = {}
        self.api: ApiServer | None = None
        self.vm: Vm | None = None
        self.replicas: list[Replica] = []
        self.node_port: int | None = None
        self.prometheus: Prometheus | None = None

    # --- reporting -------------------------------------------------------------------------------
    def check(self, name: str, ok: bool, why: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {why}", flush=True)
        return ok

    def note(self, text: str) -> None:
        print(f"e2e: {text}", file=sys.stderr, flush=True)

    # --- cluster helpers ---------------------------------------------------------------------------
    def lease(self) -> dict | None:
        return self.kubectl.json("get", "lease", "-n", LEASE[0], LEASE[1])

    def holder(self) -> str | None:
        lease = self.lease()
        return (lease or {}).get("spec", {}).get("holderIdentity")

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def service(self, name: str, ns: str = "shop") -> dict | None:
        return self.kubectl.json("get", "service", "-n", ns, name)

    def node_port_of(self, name: str, ns: str = "shop") -> int | None:
        svc = self.service(name, ns)
        ports = (svc or {}).get("spec", {}).get("ports") or [{}]
        return ports[0].get("nodePort")

    def allocated(self, name: str, timeout: float) -> int | None:
        """The nodePort the operator gave shop/`name`: in the policy's range, on a Service it
        handed to the agent. The emulator's random pick falls in the range too, 100 times in
        2,768, so only the operator's label shows that the operator chose it."""
        def chosen():
            svc = self.service(name) or {}
            labels = svc.get("metadata", {}).get("labels") or {}
            port = ((svc.get("spec", {}).get("ports") or [{}])[0]).get("nodePort")
            return labels.get(PROXY_NAME) == "portpolicy" and port in POLICY_RANGE and port
        return wait_for(chosen, timeout, 0.5)

    def create_service(self, name: str) -> None:
        """A NodePort Service of the proxied policy. (Through apply: kubectl's typed commands
        such as `kubectl create service` send protobuf, which the emulator does not read.)"""
        manifest = (MANIFESTS / "workload.yaml").read_text().replace("name: shopfront", f"name: {name}")
        self.kubectl("apply", "-f", "-", input=manifest)

    def guest(self, script: str, timeout: float = 60) -> tuple[int, str]:
        return self.vm.run(script, timeout)

    def ipvs(self) -> str:
        return self.guest("ipvsadm -Ln")[1]

    def answers(self, port: int, count: int) -> list[str]:
        """Bodies of ``count`` requests from the external client to the node port."""
        script = (
            f"i=0; while [ $i -lt {count} ]; do "
            f"nsip netns exec ext sh -c \"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 10.1.0.1 {port} | tail -n 1\"; "
            "echo; i=$((i + 1)); done"
        )
        # Refused or timed-out connections print nc's complaint, not a pod's name.
        return [line for line in self.guest(script)[1].splitlines() if line.startswith("pod-")]

    def ensure_proxied(self) -> int | None:
        """The proxied policy, the shopfront Service and its first EndpointSlice, as the traffic
        scenario leaves them, so that each scenario also runs alone (``--only``); applying them
        again changes nothing. Returns shopfront's nodePort once it is in the policy's range."""
        self.kubectl("apply", "-f", str(pathlib.Path(self.args.repo) / "config" / "samples" / "proxied.yaml"))
        self.kubectl("apply", "-f", str(MANIFESTS / "workload.yaml"))
        if self.node_port is None:
            self.kubectl("apply", "-f", str(MANIFESTS / "slice-one.yaml"))
        port = wait_for(lambda: (p := self.node_port_of("shopfront")) in POLICY_RANGE and p, 60, 0.5)
        if port and self.node_port is None:
            self.node_port = port
        return port

    # --- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        started = time.monotonic()
        self.api = ApiServer(pathlib.Path(self.args.emulator), self.work)
        self.kubectl = Kubectl(self.args.kubectl, self.api.kubeconfigs["kubectl"], self.work / "kubectl.log")
        repo = pathlib.Path(self.args.repo)
        self.kubectl("apply", "-f", str(repo / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd/portpolicies.portpolicy.io", "--timeout=30s")
        self.kubectl("apply", "-k", str(repo / "config"))
        self.kubectl("apply", "-f", str(MANIFESTS / "node.yaml"))
        self.kubectl("apply", "-f", str(MANIFESTS / "operator-pods.yaml"))
        self.kubectl("apply", "-f", str(repo / "config" / "samples" / "services.yaml"))
        self.kubectl("apply", "-f", str(repo / "config" / "samples" / "edge.yaml"))
        agent_metrics_port = free_port()
        self.vm = Vm(self.args.kernel, self.args.initrd, self.api.ports["vm"], agent_metrics_port, self.work,
                     timeout=900)
        for name in REPLICAS:
            replica = Replica(name, self.args.bin, self.api, free_port(), self.work)
            replica.start()
            self.replicas.append(replica)
        if self.args.prometheus:
            self.prometheus = Prometheus(self.args.prometheus, repo, self.work,
                                         [r.metrics_port for r in self.replicas], agent_metrics_port)
        self.timings["host setup"] = time.monotonic() - started
        boot = self.vm.wait_ready(180)
        self.timings["VM boot"] = boot
        self.note(f"host set up in {self.timings['host setup']:.1f}s, VM control ready after {boot:.1f}s")

    def teardown(self) -> None:
        if self.prometheus:
            self.prometheus.stop()
        for replica in self.replicas:
            replica.stop()
        if self.vm:
            try:
                agent_log = self.guest("cat /tmp/agent.log", 20)[1] if self.vm._sock else ""
                (self.work / "agent.log").write_text(agent_log)
            except (VmError, OSError):
                pass
            self.vm.stop()
        if self.api:
            self.api.stop()

    # --- scenarios ---------------------------------------------------------------------------------
    def scenario_replicas_ready(self) -> None:
        ready = wait_for(lambda: all(r.ready() for r in self.replicas), 60, 0.5)
        states = ", ".join(f"{r.name}: {'200' if r.ready() else 'not 200'}" for r in self.replicas)
        self.check("both-operator-replicas-ready", bool(ready), f"/readyz after 60 s: {states}")
        holder = wait_for(self.holder, 30)
        self.check("one-replica-holds-the-lease", holder in ("op-a", "op-b"), f"Lease holder: {holder!r}")

    def scenario_node_port_and_traffic(self) -> None:
        port = self.ensure_proxied()
        self.check(
            "service-gets-node-port-from-policy-range",
            bool(port),
            f"shop/shopfront has nodePort {self.node_port_of('shopfront')}, not one of 32000-32099",
        )
        if not port:
            return
        # The emulator's random pick can fall inside the policy's range (100 of 2,768 ports), so
        # the port alone does not show that the operator has acted yet: its label does.
        proxy_name = lambda: ((self.service("shopfront") or {}).get("metadata", {}).get("labels") or {}).get(PROXY_NAME)
        handed = wait_for(lambda: proxy_name() == "portpolicy", 30, 0.5)
        self.check("service-handed-to-the-agent", bool(handed), f"proxy-name label is {proxy_name()!r}")
        programmed = lambda t: f"10.1.0.1:{port}" in t and "10.0.11.2:8080" in t
        table = wait_for(lambda: programmed(self.ipvs()), 60, 1)
        self.check("agent-programs-the-node-port", bool(table), f"ipvsadm -Ln:\n{self.ipvs()}")
        got = sorted(set(self.answers(port, 4)))
        self.check("traffic-through-node-port-reaches-the-pod", got == ["pod-a1"], f"answers: {got}")
        self.mark_agents_ready()

    def mark_agents_ready(self) -> None:
        """The DaemonSet controller's part: the agent DaemonSet's pod is the VM's agent."""
        ds = wait_for(lambda: self.kubectl.json("get", "ds", "-n", "portpolicy-system", "portpolicy-agent-proxied"), 20)
        if ds:
            status = '{"status":{"desiredNumberScheduled":1,"currentNumberScheduled":1,"numberReady":1,"updatedNumberScheduled":1,"numberAvailable":1}}'
            self.kubectl("patch", "ds", "-n", "portpolicy-system", "portpolicy-agent-proxied",
                         "--subresource=status", "--type=merge", "-p", status, check=False)

    def scenario_endpoint_slices(self) -> None:
        port = self.node_port or self.ensure_proxied()
        if not port:
            self.check("endpointslice-change-adds-a-real-server", False, "no node port from the previous scenario")
            return
        self.kubectl("apply", "-f", str(MANIFESTS / "slice-two.yaml"))
        added = wait_for(lambda: "10.0.12.2:8080" in self.ipvs(), 30, 0.5)
        got = sorted(set(self.answers(port, 6))) if added else []
        self.check("endpointslice-change-adds-a-real-server", got == ["pod-a1", "pod-a2"],
                   f"answers {got}; ipvsadm -Ln:\n{self.ipvs()}")
        self.kubectl("apply", "-f", str(MANIFESTS / "slice-drained.yaml"))

        def drained():
            table = self.ipvs()
            lines = [l for l in table.splitlines() if "10.0.11.2:8080" in l]
            # Gone, or weight 0 while its connections drain.
            return all(l.split()[3] == "0" for l in lines) and table
        ok = wait_for(drained, 30, 0.5)
        got = sorted(set(self.answers(port, 6))) if ok else []
        self.check("endpointslice-change-drains-a-real-server", got == ["pod-a2"],
                   f"answers {got}; ipvsadm -Ln:\n{self.ipvs()}")

    def operator_writes(self, since: float, exclude_leases: bool = True) -> list[dict]:
        entries = self.api.requests()
        out = []
        for replica in REPLICAS:
            for e in writes(entries, replica, since):
                if exclude_leases and (e.get("resource") == "leases" or self.leader_label(e)):
                    continue
                out.append(e)
        return out

    @staticmethod
    def leader_label(entry: dict) -> bool:
        """The leader labelling its own Pod for the webhook Service: part of leading, like
        the Lease."""
        return (entry.get("resource") == "pods" and entry.get("namespace") == "portpolicy-system"
                and entry.get("name") in REPLICAS and entry.get("verb") == "patch")

    def scenario_restart_writes_only_the_lease(self) -> None:
        # Settle first: nothing may still be in flight from the scenarios before.
        time.sleep(5)
        for replica in self.replicas:
            replica.stop()
        restarted = time.time()
        for replica in self.replicas:
            replica.start()
        wait_for(lambda: all(r.ready() for r in self.replicas) and self.holder(), 60, 0.5)
        time.sleep(10)  # a full reconcile of every policy, and a lease renewal or two
        written = self.operator_writes(restarted)
        leases = [e for e in writes(self.api.requests(), None, restarted) if e.get("resource") == "leases"]
        # A self-signed webhook certificate is made anew at each start, so the new leader
        # publishes its CA once; that is the one other write a restart may make.
        ca_bundles = [e for e in written if e.get("resource") == "mutatingwebhookconfigurations"]
        others = [e for e in written if e not in ca_bundles]
        self.check(
            "operator-restart-writes-nothing-but-the-lease",
            not others and bool(leases),
            f"{len(leases)} Lease writes and {len(others)} others: "
            + "; ".join(describe(e) for e in others[:6]),
        )
        self.check(
            "restarted-leader-publishes-its-webhook-ca-once",
            len(ca_bundles) == 1,
            f"{len(ca_bundles)} writes of the MutatingWebhookConfiguration: "
            + "; ".join(describe(e) for e in ca_bundles[:6]),
        )

    def scenario_sigterm_handover(self) -> None:
        self.ensure_proxied()
        leader = wait_for(self.holder, 30)
        if leader not in ("op-a", "op-b"):
            self.check("leader-sigterm-hands-over-within-seconds", False, f"no leader (holder {leader!r})")
            return
        other = "op-b" if leader == "op-a" else "op-a"
        # Like deleting its pod: the replica gets SIGTERM and is not restarted under its name.
        stopped = time.monotonic()
        self.replica(leader).terminate()
        took_over = wait_for(lambda: self.holder() == other, 30, 0.25)
        elapsed = time.monotonic() - stopped
        old = self.replica(leader).process
        exited = wait_for(lambda: old.poll() is not None, 20, 0.2)
        self.check("sigterm-stops-the-leader", bool(exited), f"{leader} still running 20 s after SIGTERM")
        if not exited:
            old.kill()
            old.wait()
        self.replica(leader).start()
        self.timings["SIGTERM handover"] = elapsed
        self.check(
            "leader-sigterm-hands-over-within-seconds",
            bool(took_over) and elapsed <= 5,
            f"{other} took the Lease after {elapsed:.1f}s" if took_over else f"{other} did not take the Lease in 30 s",
        )
        self.create_service("after-handover")
        port = self.allocated("after-handover", 45)
        self.check("allocation-goes-on-after-handover", bool(port),
                   f"shop/after-handover has nodePort {self.node_port_of('after-handover')}")

    def scenario_frozen_api_server(self) -> None:
        self.ensure_proxied()
        leader = wait_for(self.holder, 30)
        if leader not in ("op-a", "op-b"):
            self.check("leader-steps-down-when-the-api-server-hangs", False, f"no leader (holder {leader!r})")
            return
        # The follower goes first (like a one-replica Deployment), so that the leader's own
        # restarted process must lead again: it finds its own name in the Lease (or an empty
        # holder, if its release landed) and leads within moments of starting, before its caches
        # have listed. With a follower racing it the takeover path runs instead, which the
        # SIGTERM scenario already covers.
        follower = self.replica("op-b" if leader == "op-a" else "op-a")
        follower.terminate()
        follower_process = follower.process
        if follower_process and not wait_for(lambda: follower_process.poll() is not None, 20, 0.2):
            follower_process.kill()
        try:
            self.freeze_the_leader(self.replica(leader))
        finally:
            follower.start()

    def freeze_the_leader(self, replica: Replica) -> None:
        leader = replica.name
        exits_before = len(replica.exits)
        frozen_start = len(replica.starts) - 1  # which start of this replica is the leader now
        # Freeze it while the leader is busy with a new Service, so that writes are in flight.
        self.create_service("during-freeze")
        time.sleep(0.3)
        frozen_at = time.time()
        self.api.freeze()
        try:
            # The lease lasts 15 s; a leader that cannot renew must stop leading before then.
            stepped_down = wait_for(lambda: len(replica.exits) > exits_before, LEASE_SECONDS + 10, 0.25)
        finally:
            self.api.thaw()
        thawed_at = time.time()
        exit_at = replica.exits[exits_before][0] - frozen_at if len(replica.exits) > exits_before else None
        self.check(
            "leader-steps-down-when-the-api-server-hangs",
            bool(stepped_down),
            f"{leader} still running {LEASE_SECONDS + 10} s into the freeze",
        )
        if exit_at is not None:
            self.timings["step-down after freeze"] = exit_at
        # After the thaw, the restarted process must write nothing (but Leases) until it has
        # taken the Lease again. A request the old process had sent before it gave up can still
        # reach the server at the thaw, as on a real network: the old process's own listener
        # tells those apart, and they are reported, not failed (the operator cannot recall
        # them; its status writes carry resourceVersion preconditions).
        time.sleep(LEASE_SECONDS + 10)
        old_start = frozen_start
        entries = [e for e in self.api.requests() if e["t"] >= frozen_at]
        in_flight = [e for e in writes(entries, replica.listener(old_start)) if e.get("resource") != "leases"]
        violations, leads, led_again = [], False, False
        for e in entries:
            if not e["listener"].startswith(replica.name + ".") or e["listener"] == replica.listener(old_start):
                continue
            if e.get("resource") == "leases" and e.get("verb") in ("create", "update", "patch") and 200 <= e["code"] < 300:
                leads = e.get("holder") == leader
                led_again = led_again or leads
            elif e in writes([e]) and not leads:
                violations.append(e)
        if in_flight:
            self.note(
                f"{len(in_flight)} writes {leader} had in flight when frozen landed at the thaw: "
                + "; ".join(f"{describe(e)} at +{e['t'] - frozen_at:.1f}s" for e in in_flight[:5])
            )
        self.check(
            "no-writes-while-not-leading-after-a-freeze",
            not violations and len(replica.starts) > old_start + 1,
            f"{len(violations)} writes by the restarted {leader} before it led again: "
            + "; ".join(f"{describe(e)} at +{e['t'] - frozen_at:.1f}s" for e in violations[:5])
            if violations
            else f"{leader} was not restarted after stepping down",
        )
        self.check("restarted-leader-leads-again-after-a-freeze", led_again,
                   f"no restart of {leader} wrote the Lease as its holder after the thaw")
        self.create_service("after-freeze")
        port = self.allocated("after-freeze", 60)
        self.check("allocation-goes-on-after-the-freeze", bool(port),
                   f"shop/after-freeze has nodePort {self.node_port_of('after-freeze')} "
                   f"{time.time() - thawed_at:.0f}s after the thaw")

    def scenario_bad_objects(self) -> None:
        self.kubectl("apply", "-f", str(MANIFESTS / "bad-objects.yaml"))
        # Operators that start with the unreadable policy present must still list, lead and
        # reconcile everything else.
        time.sleep(3)
        for replica in self.replicas:
            replica.stop()
        for replica in self.replicas:
            replica.start()
        wait_for(self.holder, 30)
        self.kubectl("apply", "-f", str(MANIFESTS / "checkout.yaml"))
        port = wait_for(lambda: self.node_port_of("checkout") == 31043, 60, 0.5)
        self.check("the-rest-reconciles-beside-bad-objects", bool(port),
                   f"shop/checkout has nodePort {self.node_port_of('checkout')}, not its pin 31043")

        def events_naming(text: str) -> list[dict]:
            found = []
            for kind in ("events.events.k8s.io", "events"):
                listed = self.kubectl.json("get", kind, "-A") or {"items": []}
                for ev in listed["items"]:
                    blob = str(ev)
                    if text in blob and ev.get("type") == "Warning":
                        found.append(ev)
            return found

        ev = wait_for(lambda: events_naming("unreadable"), 45, 1)
        self.check("unreadable-policy-becomes-an-event-naming-it", bool(ev),
                   "no Warning event names PortPolicy unreadable")
        ev = wait_for(lambda: events_naming("Service/shop/fancy"), 45, 1)
        self.check("invalid-service-becomes-an-event-naming-it", bool(ev),
                   "no Warning event names Service/shop/fancy")
        edge = self.kubectl.json("get", "pp", "edge") or {}
        cond = {c["type"]: c for c in edge.get("status", {}).get("conditions", [])}
        allocated = cond.get("NodePortsAllocated", {})
        self.check(
            "invalid-service-is-a-problem-naming-its-field",
            allocated.get("reason") == "InvalidService" and "spec.type" in allocated.get("message", ""),
            f"edge NodePortsAllocated: {allocated}",
        )
        # Leave a readable cluster to the next scenario.
        self.kubectl("delete", "-f", str(MANIFESTS / "bad-objects.yaml"), "--wait=false", check=False)

    def scenario_delete_policy(self) -> None:
        port = self.node_port or self.ensure_proxied()
        result = self.kubectl("delete", "pp", "proxied", "--wait=true", "--timeout=45s", check=False, timeout=60)
        gone = self.kubectl.json("get", "pp", "proxied") is None
        self.check("deleting-the-policy-runs-its-finalizer", result.returncode == 0 and gone,
                   f"kubectl delete: {result.stderr.strip() or result.stdout.strip()}; still there: {not gone}")
        svc = self.service("shopfront") or {}
        label = svc.get("metadata", {}).get("labels", {}).get("service.kubernetes.io/service-proxy-name")
        self.check("finalizer-hands-the-service-back", label is None, f"proxy-name label still {label!r}")
        ds = self.kubectl.json("get", "ds", "-n", "portpolicy-system", "portpolicy-agent-proxied")
        self.check("agent-daemonset-goes-with-the-policy", ds is None, "portpolicy-agent-proxied still exists")
        if port:
            withdrawn = wait_for(lambda: f":{port} " not in self.ipvs().replace("\n", " \n") and f":{port}" not in self.ipvs(), 30, 0.5)
            self.check("agent-withdraws-the-rules", bool(withdrawn), f"ipvsadm -Ln:\n{self.ipvs()}")
            got = self.answers(port, 2)
            self.check("node-port-no-longer-answers", not got, f"answers: {got}")


SCENARIOS = [
    ("ready", Run.scenario_replicas_ready),
    ("traffic", Run.scenario_node_port_and_traffic),
    ("slices", Run.scenario_endpoint_slices),
    ("restart", Run.scenario_restart_writes_only_the_lease),
    ("sigterm", Run.scenario_sigterm_handover),
    ("freeze", Run.scenario_frozen_api_server),
    ("bad-objects", Run.scenario_bad_objects),
    ("webhook", scenario_webhook),
    ("delete", Run.scenario_delete_policy),
    ("prometheus", scenario_prometheus),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    for flag in ("repo", "bin", "kubectl", "kernel", "initrd", "work", "emulator"):
        parser.add_argument(f"--{flag}", required=True)
    parser.add_argument("--only", default="")
    parser.add_argument("--prometheus", default="", help="the prometheus binary; none: its scenario fails")
    parser.add_argument("--promtool", default="")
    parser.add_argument("--prepared-seconds", type=float, default=0)
    parser.add_argument("--bench", default="", help="a benchmark instead of the scenarios: watch-latency")
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints-per-service", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    run = Run(args)
    if args.bench:
        from bench_watch_latency import run_bench
        return run_bench(run, args)
    started = time.monotonic()
    # The emulator's own tests run while the VM boots (each test starts emulators of its own),
    # and end before any scenario starts, so they never compete with a scenario's timing.
    tests_output = open(run.work / "emulator-tests.log", "w+")
    tests = subprocess.Popen([sys.executable, "-m", "pytest"], cwd=args.emulator,
                             stdout=tests_output, stderr=subprocess.STDOUT, text=True)

    def emulator_tests() -> None:
        status = tests.wait()
        run.timings["emulator tests"] = time.monotonic() - started
        tests_output.seek(0)
        output = tests_output.read()
        summary = (output.strip().splitlines() or ["no output"])[-1]
        run.check("emulator-own-tests", status == 0, output[-4000:])
        run.note(f"emulator tests: {summary}")

    try:
        try:
            run.setup()
        finally:
            emulator_tests()
        only = [o for o in args.only.split(",") if o]
        for name, scenario in SCENARIOS:
            if only and not any(o in name for o in only):
                continue
            began = time.monotonic()
            try:
                scenario(run)
            except Exception as e:  # a scenario that cannot run is a failure, never a skip
                traceback.print_exc()
                run.check(f"{name}-ran", False, f"{type(e).__name__}: {e}")
            run.timings[name] = time.monotonic() - began
    except Exception as e:
        traceback.print_exc()
        run.check("system-setup", False, f"{type(e).__name__}: {e}")
    finally:
        run.teardown()
    total = time.monotonic() - started
    figures = ", ".join(f"{k} {v:.1f}s" for k, v in run.timings.items())
    run.note(f"preparation {args.prepared_seconds:.0f}s; scenarios and VM {total:.0f}s ({figures}); logs in {run.work}")
    print(f"{run.passed} passed, {run.failed} failed", flush=True)
    return 0 if run.failed == 0 and run.passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
