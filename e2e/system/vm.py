"""The node: a qemu VM booting Debian's cloud kernel with the agent inside.

Its only network card is qemu user networking with ``restrict=on``: nothing leaves the VM
except connections to 10.0.2.100:6443, which ``guestfwd`` hands to a ``busybox nc`` relay (one
per connection, as a kube client opens several) to the emulator's ``vm`` listener on the
host's loopback. The one way in is ``hostfwd`` from ``agent_metrics_port`` on the host's
loopback to the agent's metrics port (10265), for Prometheus. The host runs commands inside
through a virtio-serial port (not a network).
"""

import base64
import pathlib
import socket
import subprocess
import time


class VmError(RuntimeError):
    pass


class Vm:
    def __init__(self, kernel: str, initrd: str, api_port: int, agent_metrics_port: int, work: pathlib.Path,
                 timeout: float, kernel_args: str = ""):
        """``kernel_args``: more of the guest's kernel command line (``e2e.agent=manual``: the
        guest does not start the agent; the host does, through ``run``)."""
        self.console_path = work / "vm-console.log"
        self.socket_path = work / "vm-control.sock"
        self.socket_path.unlink(missing_ok=True)
        self.console = open(self.console_path, "w")
        self.booted_at = time.monotonic()
        self.process = subprocess.Popen(
            [
                "timeout", "--kill-after=10", str(int(timeout)),
                "qemu-system-x86_64", "-m", "1024", "-nographic", "-no-reboot",
                "-kernel", kernel, "-initrd", initrd,
                "-append", " ".join(filter(None, ["console=ttyS0 quiet panic=-1", kernel_args])),
                "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{agent_metrics_port}-:10265,"
                f"guestfwd=tcp:10.0.2.100:6443-cmd:/bin/busybox nc 127.0.0.1 {api_port}",
                "-device", "virtio-net-pci,netdev=n0",
                "-chardev", f"socket,id=ctl,path={self.socket_path},server=on,wait=off",
                "-device", "virtio-serial-pci",
                "-device", "virtserialport,chardev=ctl,name=e2e",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.console,
            stderr=subprocess.STDOUT,
        )
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 0

    def console_text(self) -> str:
        return self.console_path.read_text(errors="replace").replace("\r", "")

    def wait_ready(self, timeout: float) -> float:
        """Waits for the guest's control loop; returns the boot time in seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "E2E-CONTROL-READY" in self.console_text():
                break
            if self.process.poll() is not None:
                raise VmError(f"qemu exited with status {self.process.returncode} before the guest was ready")
            time.sleep(0.2)
        else:
            raise VmError(f"the guest was not ready within {timeout:.0f}s")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(self.socket_path))
        ready = time.monotonic() - self.booted_at
        status, out = self.run("echo hello", 30)
        if (status, out) != (0, "hello"):
            raise VmError(f"the guest's control loop answered {status} {out!r}")
        return ready

    def run(self, script: str, timeout: float = 60) -> tuple[int, str]:
        """Runs a shell script in the guest; returns its exit status and output."""
        if self._sock is None:
            raise VmError("the VM is not ready")
        self._next_id += 1
        rid = f"c{self._next_id}"
        self._sock.sendall(f"{rid} {base64.b64encode(script.encode()).decode()}\n".encode())
        self._sock.settimeout(1.0)
        deadline = time.monotonic() + timeout
        out = []
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(f"{rid}| "):
                    out.append(text[len(rid) + 2:])
                elif text.startswith(f"{rid} END "):
                    return int(text.split()[-1]), "\n".join(out)
            if time.monotonic() > deadline:
                raise VmError(f"a guest command did not finish within {timeout:.0f}s")
            if self.process.poll() is not None:
                raise VmError("the VM stopped")
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise VmError("the guest closed the control channel")
            self._buffer += chunk

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.sendall(b"bye x\n")
            except OSError:
                pass
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(10)
