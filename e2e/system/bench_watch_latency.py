"""``e2e/run-system --bench watch-latency``: the agent's latency from a watch event to the
kernel, with the agent watching an API server that holds 10,000 Services.

The emulator starts with ``--services`` ClusterIP Services (one port each) and their
EndpointSlices (``--endpoints-per-service`` ready endpoints each) already in its store, created
as through the API (``--seed``), all labelled for portpolicy as the operator labels the
Services it hands over (and the EndpointSlice controller copies the label onto their slices).
The real agent in the real-kernel VM, in delegated mode as in the system e2e, lists and
watches them through the API like any client. No operator replicas and no Prometheus: nothing
else writes while it is measured, and the agent needs neither.

Then ``--rounds`` times, each on another Service: one EndpointSlice's first endpoint is
replaced with a new address by a merge PATCH from the host, and two figures are taken:

- change-to-kernel: the agent's own, from the watch event's arrival in the agent to the
  kernel's acknowledgement of the sync that applied it (``change_to_kernel_ms`` of its
  "synced" log line, also ``portpolicy_agent_change_to_kernel_seconds``);
- api-write-to-kernel: from just before the host sends the PATCH to the host hearing that
  the kernel lists the new real server. The probe, ``portpolicy debug ipvs-wait`` started in
  the guest through the control channel half a second before the write, asks the kernel for
  that Service's real servers over netlink every ``PROBE_MS`` ms from one process (a loop of
  ``ipvsadm -Ln -t`` runs cost over 100 ms of the one vCPU each under emulation, and slowed
  the agent down twice over); its exit comes back over the control channel. So the figure is
  an upper bound, late by up to one look and the channel's way back.

After each round ``ipvsadm -Ln -t VIP:80`` must list the new real server and no longer the
replaced one (or at weight 0): a round whose change never shows in the kernel is a failure,
not a skipped sample. As many rounds again, alternating with those, run without the probe:
the agent's figure with nothing else running in the guest while it syncs (the probe, and the
control channel answering when it exits, share the one vCPU with the end of the agent's
sync). The agent must have programmed every Service
and real server before the first round. Its periodic full resync is set to an hour, so that
every sync measured is a change's own (checked: no full sync and no re-list in the rounds).
The samples are kept in ``watch-latency.json`` beside the other logs.
"""

import http.client
import ipaddress
import json
import os
import pathlib
import re
import threading
import time
import traceback
import urllib.request
from datetime import datetime

from cluster import ApiServer, Kubectl, free_port, http_status, wait_for
from vm import Vm, VmError

NAMESPACE = "bench"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
# Cluster IPs from 10.96.1.0 (inside the emulator's 10.96.0.0/16), endpoints from 10.128.0.1,
# each round's new endpoint from 10.250.0.1: none meets the VM's own addresses (10.0.x, 10.1.0.x).
FIRST_CLUSTER_IP = ipaddress.ip_address("10.96.1.0")
FIRST_ENDPOINT = ipaddress.ip_address("10.128.0.1")
FIRST_NEW_ENDPOINT = ipaddress.ip_address("10.250.0.1")
# How often the guest's probe asks the kernel for the changed Service's real servers.
PROBE_MS = 5
# Seconds from the write to the first look at the agent's log.
SETTLE_SECONDS = 1.5
# Each round's Service: a stride through the Services, so that rounds touch different ones.
STRIDE = 7919
AGENT = (
    "KUBECONFIG=/etc/kubeconfig RUST_LOG=info portpolicy agent --node-name node-a"
    " --metrics-address 0.0.0.0:10265 --resync-period 1h"
)
SYNCED = re.compile(r"^(\S+)\s.*\bsynced\b.*\bfull=(\w+) operations=(\d+)(?: change_to_kernel_ms=([0-9.]+))?")


def cluster_ip(i: int) -> str:
    return str(FIRST_CLUSTER_IP + i)


def endpoint(i: int, k: int, per_service: int) -> str:
    return str(FIRST_ENDPOINT + i * per_service + k)


def seed_objects(services: int, per_service: int):
    """The Namespace, then each Service and its EndpointSlice, as the seed file holds them."""
    yield {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    for i in range(services):
        name = f"s{i}"
        ip = cluster_ip(i)
        yield {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name, PROXY_NAME_LABEL: "portpolicy"}},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": ip,
                "clusterIPs": [ip],
                "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            },
        }
        yield {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-1",
                "namespace": NAMESPACE,
                "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "app": name,
                    PROXY_NAME_LABEL: "portpolicy",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [slice_endpoint(endpoint(i, k, per_service)) for k in range(per_service)],
        }


def slice_endpoint(address: str) -> dict:
    return {"addresses": [address], "nodeName": "node-a",
            "conditions": {"ready": True, "serving": True, "terminating": False}}


def percentiles(values: list[float]) -> str:
    """p50, p99 (nearest rank) and max; with fewer than 100 samples p99 is the largest."""
    if not values:
        return "none"
    v = sorted(values)
    rank = lambda p: v[max(0, -(-len(v) * p // 100) - 1)]
    return f"p50 {rank(50):.1f} p99 {rank(99):.1f} max {v[-1]:.1f} n {len(v)}"


class Bench:
    def __init__(self, run, args):
        self.run, self.args = run, args
        self.services, self.per_service, self.rounds = args.services, args.endpoints_per_service, args.rounds
        self.figures: dict = {"services": self.services, "endpoints_per_service": self.per_service}
        self.api_port: int | None = None

    def note(self, text: str) -> None:
        self.run.note(f"watch-latency: {text}")

    def guest(self, script: str, timeout: float = 60) -> tuple[int, str]:
        return self.run.vm.run(script, timeout)

    # --- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        run, work = self.run, self.run.work
        started = time.monotonic()
        seed = work / "bench-seed.jsonl"
        with open(seed, "w") as f:
            for obj in seed_objects(self.services, self.per_service):
                f.write(json.dumps(obj, separators=(",", ":")) + "\n")
        run.api = ApiServer(self.args_path("emulator"), work, seed=seed, start_timeout=600)
        seeded = time.monotonic() - started
        self.figures["seed_seconds"] = seeded
        self.note(f"emulator holds {self.services} Services and {self.services} EndpointSlices "
                  f"({self.services * self.per_service} endpoints) after {seeded:.1f}s ({seed.stat().st_size >> 20} MiB seed)")
        run.kubectl = Kubectl(self.args.kubectl, run.api.kubeconfigs["kubectl"], work / "kubectl.log")
        # The agent watches PortPolicies and its Node too.
        run.kubectl("apply", "-f", str(self.args_path("repo") / "crds"))
        run.kubectl("wait", "--for=condition=Established", "crd/portpolicies.portpolicy.io", "--timeout=30s")
        run.kubectl("apply", "-f", str(self.args_path("repo") / "e2e" / "system" / "manifests" / "node.yaml"))
        self.api_port = run.api.ports["kubectl"]
        self.metrics_port = free_port()
        run.vm = Vm(self.args.kernel, self.args.initrd, run.api.ports["vm"], self.metrics_port, work,
                    timeout=3600, kernel_args="e2e.agent=manual")
        boot = run.vm.wait_ready(300)
        run.timings["VM boot"] = boot
        self.note(f"VM control ready after {boot:.1f}s")

    def args_path(self, name: str) -> pathlib.Path:
        return pathlib.Path(getattr(self.args, name))

    def agent_memory(self) -> str:
        return " ".join(self.guest("grep -E '^(VmRSS|VmHWM)' /proc/$(cat /run/agent.pid)/status")[1].split())

    def start_agent(self) -> bool:
        """Starts the agent and waits for its first full sync; checks every Service and real
        server is in the kernel."""
        run = self.run
        started = time.monotonic()
        status, out = self.guest(f"{AGENT} > /tmp/agent.log 2>&1 3>&- &\necho $! > /run/agent.pid")
        if status != 0:
            run.check("watch-latency-agent-starts", False, out)
            return False
        readyz = f"http://127.0.0.1:{self.metrics_port}/readyz"
        ready = wait_for(lambda: http_status(readyz) == 200, 1800, 0.25)
        first_sync = time.monotonic() - started
        log = self.guest("cat /tmp/agent.log", 60)[1]
        if not ready:
            run.check("watch-latency-first-full-sync", False,
                      f"/readyz not 200 {first_sync:.0f}s after the agent started; log:\n" + "\n".join(log.splitlines()[-15:]))
            return False
        self.figures["first_sync_host_seconds"] = first_sync
        lines = log.splitlines()
        first_synced = next((m for m in map(SYNCED.match, lines) if m), None)
        if lines and first_synced:
            agent_seconds = _seconds_between(lines[0].split()[0], first_synced.group(1))
            self.figures["first_sync_agent_log_seconds"] = agent_seconds
            self.figures["first_sync_operations"] = int(first_synced.group(3))
            self.figures["first_sync_change_to_kernel_ms"] = float(first_synced.group(4) or "nan")
        self.figures["agent_memory_after_first_sync"] = self.agent_memory()
        # How much of it was the sync itself (IPVS, addresses, nftables), from the agent's
        # metrics; the rest is receiving, parsing and planning the lists.
        metrics = _metrics(f"http://127.0.0.1:{self.metrics_port}/metrics")
        self.figures["first_sync_own_seconds"] = metrics.get("portpolicy_agent_sync_duration_seconds_sum")
        self.note(f"agent ready {first_sync:.1f}s after its start (log: {self.figures.get('first_sync_agent_log_seconds', 0):.1f}s "
                  f"from its first line to its first sync, {self.figures.get('first_sync_operations')} operations, "
                  f"first event to kernel {self.figures.get('first_sync_change_to_kernel_ms', 0) / 1000:.1f}s, "
                  f"of which the sync itself {self.figures['first_sync_own_seconds'] or float('nan'):.1f}s); "
                  f"{self.figures['agent_memory_after_first_sync']}")
        # Every Service and every real server before the first round, listed by ipvsadm.
        counting = time.monotonic()
        status, out = self.guest("ipvsadm -Ln > /tmp/ipvs.txt; echo $(grep -c '^TCP ' /tmp/ipvs.txt) "
                                 "$(grep -c -- '->.*Masq' /tmp/ipvs.txt); rm /tmp/ipvs.txt", 600)
        self.note(f"ipvsadm -Ln listed the table in {time.monotonic() - counting:.1f}s: {out}")
        try:
            virtual, real = (int(x) for x in out.split())
        except ValueError:
            virtual = real = -1
        return run.check(
            "watch-latency-agent-programs-every-service",
            status == 0 and virtual == self.services and real == self.services * self.per_service,
            f"ipvsadm lists {virtual} virtual servers and {real} real servers, "
            f"not {self.services} and {self.services * self.per_service}",
        )

    # --- rounds --------------------------------------------------------------------------------
    def patch_slice(self, conn: http.client.HTTPConnection, index: int, endpoints: list[str]) -> int:
        body = json.dumps({"endpoints": [slice_endpoint(a) for a in endpoints]})
        conn.request(
            "PATCH",
            f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/s{index}-1?fieldManager=e2e-bench",
            body,
            {"Content-Type": "application/merge-patch+json", "User-Agent": "e2e-bench"},
        )
        response = conn.getresponse()
        response.read()
        return response.status

    def synced_lines(self, after: int) -> list[re.Match]:
        out = self.guest(f"grep change_to_kernel_ms /tmp/agent.log | tail -n +{after + 1}")[1]
        return [m for m in map(SYNCED.match, out.splitlines()) if m]

    def synced_count(self) -> int:
        return int(self.guest("grep -c change_to_kernel_ms /tmp/agent.log")[1].strip() or 0)

    def guest_cost_ms(self, command: str, times: int = 10) -> float:
        """Milliseconds one run of ``command`` takes in the guest, over ``times`` runs."""
        out = self.guest(f"s=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt {times} ]; do {command}; "
                         "i=$((i + 1)); done; echo $s $(cut -d' ' -f1 /proc/uptime)", 300)[1]
        t0, t1 = (float(x) for x in out.split()[-2:])
        return (t1 - t0) * 1000 / times

    def one_round(self, conn: http.client.HTTPConnection, r: int, watched: bool) -> dict:
        """One EndpointSlice change: its first endpoint gets a new address. Watched: the guest's
        probe looks for it in the kernel from before the write. Unwatched: nothing runs in the
        guest until the agent has logged the sync (the agent's figure without an observer)."""
        index = (r * STRIDE) % self.services
        endpoints = self.current.setdefault(index, [endpoint(index, k, self.per_service) for k in range(self.per_service)])
        old, address = endpoints[0], str(FIRST_NEW_ENDPOINT + r - 1)
        endpoints[0] = address
        vip = cluster_ip(index)
        sample = {"round": r, "watched": watched, "service": f"s{index}", "vip": vip, "address": address}
        before = self.synced_count()
        seen: dict = {}

        def watch_kernel():
            try:
                seen["status"], seen["out"] = self.guest(
                    f"portpolicy debug ipvs-wait tcp {vip}:80 {address}:8080 --interval-ms {PROBE_MS} --timeout-ms 60000", 180)
            except (VmError, OSError) as e:
                seen["status"], seen["out"] = -1, repr(e)
            seen["at"] = time.monotonic()

        if watched:
            probe = threading.Thread(target=watch_kernel, daemon=True)
            probe.start()
            time.sleep(0.5)  # the probe is looking before the write (checked: polls > 0)
        written = time.monotonic()
        sample["patch_status"] = self.patch_slice(conn, index, endpoints)
        sample["patch_ms"] = (time.monotonic() - written) * 1000
        if watched:
            probe.join(200)
            out = seen.get("out", "")
            if seen.get("status") == 0 and out.startswith("polls"):
                _, polls, _, elapsed = out.split()
                sample["api_to_kernel_ms"] = (seen["at"] - written) * 1000
                sample["polls"] = int(polls)
                sample["probe_period_ms"] = int(elapsed) / max(1, int(polls))
            else:
                sample["probe_failed"] = out[-300:] or f"status {seen.get('status')}"
        # Nothing more runs in the guest until the agent has most likely logged the sync (it
        # takes a fraction of this; it is polled below if not), so that reading its log does
        # not compete with the end of its sync.
        time.sleep(max(0.0, written + SETTLE_SECONDS - time.monotonic()))
        lines = wait_for(lambda: self.synced_lines(before), 60, 0.2) or []
        sample["agent_syncs"] = len(lines)
        if lines:
            last = lines[-1]
            sample["change_to_kernel_ms"] = float(last.group(4))
            sample["operations"] = int(last.group(3))
            sample["full"] = any(m.group(2) == "true" for m in lines)
        # ipvsadm's word, after the fact: the new real server is listed, the replaced one is
        # gone or drained (weight 0).
        listing = self.guest(f"ipvsadm -Ln -t {vip}:80")[1]
        weights = {f[1]: f[3] for f in (line.split() for line in listing.splitlines()) if len(f) >= 4 and f[0] == "->"}
        sample["ipvsadm_ok"] = f"{address}:8080" in weights and weights.get(f"{old}:8080", "0") == "0"
        if not sample["ipvsadm_ok"]:
            sample["ipvsadm"] = listing
        return sample

    def measure(self) -> None:
        run = self.run
        # What the figures are made of, in this VM: the control channel's round trip (the most
        # the way back can add to a watched round), one `nft -f -` (the agent runs one per
        # sync that changes set elements; here with nothing to do) and one ipvsadm listing.
        trips = []
        for _ in range(10):
            t = time.monotonic()
            self.guest("true")
            trips.append((time.monotonic() - t) * 1000)
        self.figures["control_round_trip_ms"] = percentiles(trips)
        self.figures["nft_empty_transaction_ms"] = self.guest_cost_ms("nft -f - < /dev/null")
        self.figures["ipvsadm_one_service_ms"] = self.guest_cost_ms(f"ipvsadm -Ln -t {cluster_ip(0)}:80 > /dev/null")
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=30)
        self.current: dict[int, list[str]] = {}
        samples = []
        vm_lists_before = self.agent_lists()
        load_before = os.getloadavg()
        began = time.time()
        # Watched and unwatched rounds alternate, so that both meet the same load over time.
        total = 2 * self.rounds
        for r in range(1, total + 1):
            sample = self.one_round(conn, r, watched=r % 2 == 1)
            samples.append(sample)
            self.note(f"round {r}/{total}{'' if sample['watched'] else ' (unwatched)'}: {sample['service']} "
                      f"api-write-to-kernel {sample.get('api_to_kernel_ms', float('nan')):.0f} ms ({sample.get('polls')} polls), "
                      f"agent change-to-kernel {sample.get('change_to_kernel_ms', float('nan')):.1f} ms "
                      f"({sample.get('operations')} operations, {sample['agent_syncs']} syncs), PATCH {sample['patch_ms']:.0f} ms"
                      + ("" if sample["ipvsadm_ok"] else f"; ipvsadm:\n{sample['ipvsadm']}"))
        load_after = os.getloadavg()
        self.figures["agent_memory_after_rounds"] = self.agent_memory()
        self.figures["rounds_seconds"] = time.time() - began
        self.figures["load_average_before"] = load_before
        self.figures["load_average_after"] = load_after
        self.figures["samples"] = samples
        watched = [s for s in samples if s["watched"]]
        unwatched = [s for s in samples if not s["watched"]]

        missing = [s for s in samples if s["patch_status"] != 200 or not s["ipvsadm_ok"]
                   or (s["watched"] and "api_to_kernel_ms" not in s)]
        run.check("watch-latency-every-change-reaches-the-kernel", not missing,
                  "; ".join(f"round {s['round']} ({s['service']}): PATCH {s['patch_status']}, "
                            f"probe {s.get('probe_failed', 'saw it' if s['watched'] else 'none (unwatched)')}, ipvsadm {s.get('ipvsadm', 'lists it')!r}"
                            for s in missing[:5]))
        unreported = [s["round"] for s in samples if not s["agent_syncs"]]
        run.check("watch-latency-agent-reports-every-change", not unreported,
                  f"no change_to_kernel_ms line for rounds {unreported}")
        # A full sync or a re-list during the rounds would measure the repair path, not a watch event's.
        full = [s["round"] for s in samples if s.get("full")]
        lists = self.agent_lists() - vm_lists_before
        run.check("watch-latency-rounds-are-watch-events-not-resyncs", not full and lists == 0,
                  f"full syncs in rounds {full}; {lists} lists by the agent during the rounds")
        late = [s["round"] for s in watched if s.get("polls") == 0]
        run.check("watch-latency-probe-looks-before-the-change", not late,
                  f"rounds {late}: the change was in the kernel at the probe's first look (it started late)")

        label = f"{self.services} Services x {self.per_service} endpoints"
        agent = lambda rounds: [s["change_to_kernel_ms"] for s in rounds if "change_to_kernel_ms" in s]
        host = [s["api_to_kernel_ms"] for s in watched if "api_to_kernel_ms" in s]
        periods = [s["probe_period_ms"] for s in watched if s.get("polls")]
        period = sum(periods) / len(periods) if periods else float("nan")
        self.figures["probe_period_ms"] = period
        ops = sorted({s.get("operations") for s in samples if "operations" in s})
        f = self.figures
        print(f"latency first-sync s ({label}): agent start to /readyz {f['first_sync_host_seconds']:.1f}; agent log, first "
              f"line to first sync {f.get('first_sync_agent_log_seconds', float('nan')):.1f} "
              f"({f.get('first_sync_operations')} operations)", flush=True)
        print(f"latency change-to-kernel ms (agent, {label}): {percentiles(agent(watched))}", flush=True)
        print(f"latency change-to-kernel ms (agent, {label}, unwatched rounds): {percentiles(agent(unwatched))}", flush=True)
        print(f"latency api-write-to-kernel ms (host, {label}, netlink probe every {PROBE_MS} ms, "
              f"{period:.1f} ms a look): {percentiles(host)}", flush=True)
        print(f"latency api-write-response ms (PATCH, host): {percentiles([s['patch_ms'] for s in samples])}", flush=True)
        print(f"latency control-channel round trip ms: {f['control_round_trip_ms']}", flush=True)
        self.note(f"operations per change: {ops}; in the guest one empty nft -f - takes {f['nft_empty_transaction_ms']:.0f} ms, "
                  f"one ipvsadm -Ln -t {f['ipvsadm_one_service_ms']:.0f} ms; host load average {load_before[0]:.1f} "
                  f"before, {load_after[0]:.1f} after the rounds ({f['rounds_seconds']:.0f}s); agent memory after "
                  f"the first sync {f['agent_memory_after_first_sync']}, after the rounds {f['agent_memory_after_rounds']}")

    def agent_lists(self) -> int:
        return len([e for e in self.run.api.requests() if e["listener"] == "vm" and e.get("verb") == "list"])


def _metrics(url: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            try:
                samples[name] = float(value)
            except ValueError:
                pass
    return samples


def _seconds_between(a: str, b: str) -> float:
    """Seconds between two of the agent's RFC 3339 log timestamps."""
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))
    return (parse(b) - parse(a)).total_seconds()


def run_bench(run, args) -> int:
    """Runs the benchmark on ``run`` (run.py's Run: its check, note, logs and teardown) and
    prints the summary line; returns the exit status."""
    bench = Bench(run, args)
    started = time.monotonic()
    try:
        bench.setup()
        if bench.start_agent():
            bench.measure()
        else:
            run.check("watch-latency-rounds-ran", False, "the agent did not program every Service first")
    except Exception as e:  # a benchmark that cannot run is a failure, never a skip
        traceback.print_exc()
        run.check("watch-latency-ran", False, f"{type(e).__name__}: {e}")
    finally:
        run.teardown()
        with open(run.work / "watch-latency.json", "w") as f:
            json.dump(bench.figures, f, indent=1)
    run.note(f"preparation {args.prepared_seconds:.0f}s; benchmark and VM {time.monotonic() - started:.0f}s; "
             f"logs and samples (watch-latency.json) in {run.work}")
    print(f"{run.passed} passed, {run.failed} failed", flush=True)
    return 0 if run.failed == 0 and run.passed > 0 else 1
