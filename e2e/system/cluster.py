"""The host side of the system e2e: the emulated API server as a process, kubectl against it,
its request log, and the operator replicas as processes (restarted when they exit, as the
kubelet would)."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def wait_for(predicate, timeout: float, interval: float = 0.2):
    """Polls until ``predicate()`` is truthy (returned) or ``timeout`` seconds pass (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def kubeconfig(path: pathlib.Path, port: int) -> pathlib.Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: emulator, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: e2e, user: {}}]\n"
        "contexts: [{name: emulator, context: {cluster: emulator, user: e2e}}]\n"
        "current-context: emulator\n"
    )
    return path


# Each start of an operator replica connects through a listener of its own (`op-a.0`,
# `op-a.1`, ...), so the request log tells a write the restarted process sent apart from one
# the previous process had in flight when it died.
REPLICAS = ("op-a", "op-b")
STARTS_PER_REPLICA = 8


class ApiServer:
    """The emulator, one loopback port per client so that its request log tells them apart."""

    LISTENERS = ("kubectl", "vm") + tuple(f"{r}.{n}" for r in REPLICAS for n in range(STARTS_PER_REPLICA))

    def __init__(self, emulator_dir: pathlib.Path, work: pathlib.Path, seed: pathlib.Path | None = None,
                 start_timeout: float = 20):
        """``seed``: JSON lines of objects the emulator creates before it listens (``--seed``)."""
        self.work = work
        self.log_path = work / "requests.jsonl"
        state = work / "emulator.json"
        for stale in (state, self.log_path):
            stale.unlink(missing_ok=True)
        args = [sys.executable, "-m", "kube_emulator", "--state", str(state), "--log", str(self.log_path)]
        for name in self.LISTENERS:
            args += ["--listen", f"{name}=0"]
        if seed:
            args += ["--seed", str(seed), "--seed-manager", "e2e-seed"]
        self.output = open(work / "emulator.log", "w")
        self.process = subprocess.Popen(args, cwd=emulator_dir, stdout=self.output, stderr=subprocess.STDOUT)
        if not wait_for(state.exists, start_timeout):
            raise RuntimeError("the emulator did not start; see emulator.log")
        self.ports = json.loads(state.read_text())["listeners"]
        self.kubeconfigs = {n: kubeconfig(work / f"kubeconfig-{n}", p) for n, p in self.ports.items()}

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def requests(self) -> list[dict]:
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def stop(self) -> None:
        self.thaw()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


def writes(entries: list[dict], listener: str | None = None, since: float = 0.0) -> list[dict]:
    """Accepted writes (2xx), optionally of one listener and after a time."""
    return [
        e
        for e in entries
        if e.get("verb") in WRITE_VERBS
        and 200 <= e.get("code", 0) < 300
        and e["t"] >= since
        and (listener is None or of_client(e, listener))
    ]


def of_client(entry: dict, client: str) -> bool:
    """True for requests of `client`: a listener name, or a replica name for all its starts."""
    return entry["listener"] == client or entry["listener"].startswith(client + ".")


def describe(entry: dict) -> str:
    where = "/".join(filter(None, [entry.get("namespace"), entry.get("resource"), entry.get("name"), entry.get("subresource")]))
    return f"{entry['verb']} {where} by {entry.get('fieldManager') or entry.get('userAgent')}"


class Kubectl:
    def __init__(self, binary: str, config: pathlib.Path, log: pathlib.Path):
        self.binary, self.config = binary, config
        self.log = open(log, "a")

    def __call__(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60):
        self.log.write(f"$ kubectl {' '.join(args)}\n")
        result = subprocess.run(
            [self.binary, "--kubeconfig", str(self.config), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.log.write(result.stdout + result.stderr)
        self.log.flush()
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def json(self, *args: str):
        result = self(*args, "-o", "json", check=False)
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)


def free_port() -> int:
    """A loopback port nothing listens on now. Fixed ports collide when two runs share a
    machine (another worktree's run, CI on a shared runner): the operator then cannot bind its
    metrics port and exits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


class Replica:
    """One operator replica: its own identity, metrics port and an API listener for each start.
    A supervisor thread starts it again a second after it exits, like a pod's restartPolicy
    Always."""

    def __init__(self, name: str, binary: str, api: ApiServer, metrics_port: int, work: pathlib.Path,
                 webhook_port: int | None = None):
        self.name, self.binary, self.api, self.metrics_port = name, binary, api, metrics_port
        # Its own webhook port: two replicas on one host cannot share the default 9443.
        self.webhook_port = webhook_port or free_port()
        self.log_path = work / f"operator-{name}.log"
        self.process: subprocess.Popen | None = None
        self.exits: list[tuple[float, int]] = []  # (time, status)
        self.starts: list[float] = []
        self._supervise = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def listener(self, start: int) -> str:
        """The listener the `start`-th process (0 is the first) talks through."""
        return f"{self.name}.{start}"

    def _spawn(self) -> None:
        start = len(self.starts)
        if start >= STARTS_PER_REPLICA:
            raise RuntimeError(f"{self.name} started more than {STARTS_PER_REPLICA} times; raise STARTS_PER_REPLICA")
        env = dict(
            os.environ,
            KUBECONFIG=str(self.api.kubeconfigs[self.listener(start)]),
            POD_NAME=self.name,
            POD_NAMESPACE="portpolicy-system",
            PORTPOLICY_METRICS_ADDRESS=f"127.0.0.1:{self.metrics_port}",
            PORTPOLICY_WEBHOOK_ADDRESS=f"127.0.0.1:{self.webhook_port}",
            PORTPOLICY_NODE_PORT_RANGE="30000-32767",
            PORTPOLICY_IMAGE="portpolicy:dev",
            # RUST_LOG=debug e2e/run-system ... passes through to the operators.
            RUST_LOG=os.environ.get("RUST_LOG", "info"),
        )
        log = open(self.log_path, "a")
        log.write(f"--- start {time.time():.3f}\n")
        log.flush()
        self.process = subprocess.Popen([self.binary, "operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts.append(time.time())

    def start(self) -> None:
        with self._lock:
            self._supervise = True
            self._spawn()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while True:
            with self._lock:
                if not self._supervise:
                    return
                process = self.process
            status = process.wait()
            with self._lock:
                if process is self.process:
                    self.exits.append((time.time(), status))
                if not self._supervise:
                    return
            time.sleep(1)
            with self._lock:
                if self._supervise and self.process is process:
                    self._spawn()

    def terminate(self) -> None:
        """SIGTERM without a restart, as when its pod is deleted; returns at once."""
        with self._lock:
            self._supervise = False
            process = self.process
        if process and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self) -> None:
        with self._lock:
            self._supervise = False
            process = self.process
        if process and process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def running(self) -> bool:
        return bool(self.process and self.process.poll() is None)

    def ready(self) -> bool:
        return http_status(self.metrics_url + "/readyz") == 200

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
