"""The emulator as a process on loopback, and a small HTTP client for it (stdlib only)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

EMULATOR_DIR = pathlib.Path(__file__).resolve().parent.parent
REPO = EMULATOR_DIR.parent.parent


class Emulator:
    def __init__(self, *args: str):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="kube-emulator-test-"))
        state = self.dir / "state.json"
        self.log = self.dir / "requests.jsonl"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kube_emulator", "--listen", "test=0", "--state", str(state), "--log", str(self.log), *args],
            cwd=EMULATOR_DIR,
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            if state.exists():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the emulator did not start")
        self.port = json.loads(state.read_text())["listeners"]["test"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.kubeconfig = self.dir / "kubeconfig"
        self.kubeconfig.write_text(
            f"apiVersion: v1\nkind: Config\nclusters: [{{name: e, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: e, user: {}}]\ncontexts: [{name: e, context: {cluster: e, user: e}}]\ncurrent-context: e\n"
        )

    def request(self, method: str, path: str, body=None, content_type="application/json", accept=None):
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", content_type)
        if accept:
            req.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def ok(self, method: str, path: str, body=None, **kw):
        code, out = self.request(method, path, body, **kw)
        assert code in (200, 201), (code, out)
        return out

    def watch(self, path: str, seconds: float = 2.0, until: int | None = None) -> list[dict]:
        """The events of a watch, for ``seconds`` or until ``until`` events came."""
        events = []
        try:
            with urllib.request.urlopen(self.url + path, timeout=seconds) as resp:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline and (until is None or len(events) < until):
                    line = resp.readline()
                    if not line:
                        break
                    if line.strip():
                        events.append(json.loads(line))
        except (TimeoutError, OSError):
            pass
        return events

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [os.environ.get("KUBECTL", "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def emulator():
    e = Emulator("--bookmark-seconds", "0.3")
    yield e
    e.stop()


@pytest.fixture()
def short_history():
    e = Emulator("--history", "3")
    yield e
    e.stop()


def service(name: str, ns: str = "shop", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


@pytest.fixture()
def shop(emulator):
    emulator.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "shop", "labels": {"team": "shop"}}})
    return emulator


@pytest.fixture()
def crd(emulator):
    text = (REPO / "crds" / "portpolicy.yaml").read_text()
    result = emulator.kubectl("apply", "-f", "-", input=text)
    assert result.returncode == 0, result.stderr
    return emulator
