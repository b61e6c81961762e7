"""jobs/: the `ray job submit` entrypoints (issue 7).

Unit tests check how a job turns its options and `--config` YAML into the CLI's argv. The
integration tests start a real Ray head with `ray start --head` (token authentication on,
its own temp dir and ports, so it cannot clash with other Ray instances of this machine) and
a SeaweedFS S3 server, submit jobs with the `ray job submit` CLI as users do, poll them with
`JobSubmissionClient` (`ray job status` exits 0 even for a failed job), and check the outputs
on S3 and the job logs.

The jobs are submitted with working_dir = this checkout and *without* the `pip` section of
jobs/runtime_env.yaml: Ray puts the unpacked working_dir on the PYTHONPATH of the job's
driver and workers, so they import this checkout's sctd_ray whether or not it is installed,
and a pip install on the "cluster" would need a package index. The runtime_env file itself is
validated below, and its `excludes` are the ones used for these submissions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sctd_ray.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
sys.path.insert(0, str(JOBS))
import sctd_job  # noqa: E402
from s3server import _die_with_parent  # noqa: E402

TARGET = "fm-mix5"


# ------------------------------------------------------------------ options -> argv (no Ray)
def _write(tmp_path, data, name="job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return str(path)


def test_config_keys_become_cli_options_and_command_line_wins(tmp_path):
    cfg = _write(tmp_path, {"zoo": "s3://b/zoo", "target": ["s3://b/t1", "s3://b/t2"], "out": "s3://b/old",
                            "batch_size": 64, "metrics": ["sctd", "leep"], "quiet": True,
                            "teachers": None, "s3-endpoint": "http://127.0.0.1:1"})
    argv = sctd_job.build_argv("assess", ["--config", cfg, "--out", "s3://b/new", "--workers=3"])
    assert argv == ["assess", "--zoo", "s3://b/zoo", "--target", "s3://b/t1", "--target", "s3://b/t2",
                    "--batch-size", "64", "--metrics", "sctd,leep", "--quiet",
                    "--s3-endpoint", "http://127.0.0.1:1", "--out", "s3://b/new", "--workers=3", "--resume"]
    args = build_parser().parse_args(argv)  # the CLI itself accepts it
    assert (args.out, args.target, args.batch_size, args.workers, args.resume, args.quiet) == \
        ("s3://b/new", ["s3://b/t1", "s3://b/t2"], 64, 3, True, True)


def test_without_config_the_argv_is_the_cli_argv_plus_resume():
    argv = ["--zoo", "z", "--target", "t", "--out", "o", "--resume"]
    assert sctd_job.build_argv("assess", argv) == ["assess", *argv]  # --resume not doubled


def test_false_flag_is_left_out(tmp_path):
    cfg = _write(tmp_path, {"zoo": "z", "target": "t", "out": "o", "quiet": False})
    assert sctd_job.build_argv("assess", ["--config", cfg]) == \
        ["assess", "--zoo", "z", "--target", "t", "--out", "o", "--resume"]


def test_false_flag_with_a_true_default_uses_its_no_option(tmp_path):
    """`export: false` for `sctd distill` (--export is on by default) must give --no-export."""
    cfg = _write(tmp_path, {"run": "s3://b/run", "target": "t", "export": False, "quiet": True})
    argv = sctd_job.build_argv("distill", ["--config", cfg])
    assert "--no-export" in argv and "--export" not in argv
    assert build_parser().parse_args(argv).export is False
    argv = sctd_job.build_argv("distill", ["--config", cfg, "--export"])  # command line wins
    assert "--no-export" not in argv and build_parser().parse_args(argv).export is True
    cfg = _write(tmp_path, {"run": "r", "target": "t", "no-export": True})
    assert build_parser().parse_args(sctd_job.build_argv("distill", ["--config", cfg])).export is False


def test_job_only_options_are_not_passed_to_the_cli(tmp_path):
    argv = ["--zoo", "z", "--target", "t", "--out", "o"]
    full, job = sctd_job.build_job("assess", ["--request-gpus", "4", *argv, "--request-gpus-timeout=60"])
    assert full == ["assess", *argv, "--resume"] and job == {"request-gpus": 4, "request-gpus-timeout": 60.0}
    cfg = _write(tmp_path, {"zoo": "z", "target": "t", "out": "o", "request_gpus": 2})
    full, job = sctd_job.build_job("assess", ["--config", cfg])
    assert "--request-gpus" not in " ".join(full) and job["request-gpus"] == 2
    full, job = sctd_job.build_job("assess", ["--config", cfg, "--request-gpus", "3"])  # command line wins
    assert job["request-gpus"] == 3


@pytest.mark.parametrize("data, expected", [
    ({"zoo": "z", "bogus_option": 1}, "unknown key 'bogus_option'"),
    ({"zoo": "z", "quiet": "yes"}, "is a flag: expected true or false"),
    ("- a\n- b\n", "must be a mapping"),
    ("zoo: [unclosed\n", "is not valid YAML"),
    ({"zoo": "z", "request-gpus": "many"}, "expected int"),
    ({"zoo": "z", "request-gpus": -1}, "expected a number >= 0"),
])
def test_bad_config_is_one_clear_error(tmp_path, data, expected):
    cfg = _write(tmp_path, data)
    with pytest.raises(sctd_job.JobConfigError, match=expected.replace("(", r"\(")):
        sctd_job.build_argv("assess", ["--config", cfg])


@pytest.mark.parametrize("argv, expected", [
    (["--config", "{tmp}/job.yaml"], "unknown key 'bogus'"),
    (["--config", "{tmp}/missing.yaml"], "cannot read job file"),
    (["--zoo", "z"], "the following arguments are required"),
    (["--request-gpus"], "--request-gpus needs a value"),
    (["--zoo", "z", "--target", "t", "--out", "runs/r1"], "--out 'runs/r1' is relative"),
    (["--zoo", "z", "--target", "t", "--out=r1"], "--out 'r1' is relative"),
])
def test_job_reports_errors_in_its_last_line_and_exit_status(tmp_path, capsys, monkeypatch, argv, expected):
    """What `ray job logs` ends with: one [sctd-job] FAILED line with the reason, no traceback."""
    for name in ("TQDM_MININTERVAL", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # run() sets them for the job's process
    _write(tmp_path, {"zoo": "z", "target": "t", "out": "o", "bogus": 1})
    code = sctd_job.run("assess", [a.format(tmp=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1]
    assert code == 2, out + err
    assert last.startswith("[sctd-job]") and "FAILED" in last and expected in last, last
    assert "Traceback" not in err


def test_a_job_file_on_s3_that_cannot_be_read_is_one_line(s3_bucket, capsys):
    code = sctd_job.run("assess", ["--config", f"{s3_bucket}/jobs/nope.yaml"])
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1]
    assert code == 2 and "FAILED" in last and f"cannot read job file {s3_bucket}/jobs/nope.yaml" in last, last
    assert "Traceback" not in err


def test_a_job_without_s3_credentials_says_where_a_job_gets_them(tmp_path, capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")   # never reached: no keys to sign with
    code = sctd_job.run("assess", ["--zoo", "s3://zoo-bucket/zoo", "--target", "t", "--out", str(tmp_path / "o")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 2
    assert "no usable S3 credentials" in last and "env_vars in the runtime env" in last, last


def test_job_script_exits_with_the_cli_status(tmp_path):
    """The script itself (as `ray job submit` runs it): a user error in the CLI -> exit 2, last line."""
    p = subprocess.run([sys.executable, str(JOBS / "assess.py"), "--zoo", str(tmp_path / "no-zoo"),
                        "--target", "t", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 2, p.stdout + p.stderr
    assert "FAILED" in last and "sctd: error:" in last and "no-zoo" in last, last
    assert "Traceback" not in p.stderr


def test_sigterm_in_the_distillation_stage_stops_the_job(demo_zoo, tmp_path):
    """`ray job stop` sends SIGTERM: during the Tune stage too, the job stops like Ctrl-C (exit
    130, a STOPPED last line), not as a failure, nor as the abort (exit 134, a stack dump) of
    the signal handler Ray's core installs. The scan script is run as `ray job submit` runs it."""
    import threading

    p = subprocess.Popen([sys.executable, str(JOBS / "scan.py"), "--zoo", demo_zoo, "--target",
                          str(Path(demo_zoo) / "targets" / TARGET), "--out", str(tmp_path / "run"),
                          "--top-k", "1", "--samples", "1", "--budget", "300", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines, started = [], threading.Event()

    def read():
        for line in p.stdout:
            lines.append(line)
            if line.startswith(f"distill {TARGET}:"):
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(300), "".join(lines)
        time.sleep(5)                      # the trials are running
        p.send_signal(signal.SIGTERM)
        err = p.stderr.read()
        code = p.wait(timeout=180)
    finally:
        p.kill()
    reader.join(10)
    last = lines[-1]
    assert code == 130, "".join(lines) + err
    assert "STOPPED" in last and "resubmit to resume" in last, last
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]


def test_example_job_files_are_valid_cli_options():
    examples = sorted((JOBS / "examples").glob("*.yaml"))
    assert {p.stem for p in examples} >= {"assess", "scan"}
    for path in examples:
        argv = sctd_job.build_argv(path.stem, ["--config", str(path)])
        build_parser().parse_args(argv)


def test_runtime_env_yaml_is_valid_and_ships_the_package(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]  # pip install the checkout
    pre = yaml.safe_load((JOBS / "runtime_env_preinstalled.yaml").read_text())
    RuntimeEnv(**pre)
    assert pre == {k: v for k, v in env.items() if k != "pip"}  # the same, minus the install
    # What `ray job submit` uploads with these excludes: the package, its build file, the jobs.
    pkg = tmp_path / "pkg.zip"
    create_package(str(REPO), pkg, include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(pkg).namelist())
    assert {"pyproject.toml", "sctd_ray/cli.py", "sctd_ray/__init__.py", "sctd_ray/zoo/store.py",
            "jobs/scan.py", "jobs/sctd_job.py"} <= names
    assert not any(n.startswith((".git/", "runs/")) or "__pycache__" in n or n.endswith(".safetensors")
                   for n in names)


def test_runtime_envs_give_a_stopped_job_time_to_stop():
    """`ray job stop` SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM (Ray's
    default: 3 s), and Ray reads that from the job's runtime env: too short for a scan in its
    Tune stage to stop its trials, write its summary and report and say STOPPED."""
    envs = {name: yaml.safe_load((JOBS / name).read_text())
            for name in ("runtime_env.yaml", "runtime_env_preinstalled.yaml")}
    rayjob = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    envs["rayjob.yaml"] = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    for name, env in envs.items():
        assert int(env["env_vars"].get("RAY_JOB_STOP_WAIT_TIME_S", 3)) >= 30, name


class _TwoNodes:
    """A stand-in for `ray` on a cluster of two nodes, of which only `seeing` share the driver's
    filesystem (tasks pinned to the other one find no file)."""

    def __init__(self, seeing=("a",)):
        self.seeing = seeing
        self.pinned = []

    def nodes(self):
        return [{"Alive": True, "NodeID": c * 56, "NodeManagerAddress": f"10.0.0.{i}"}
                for i, c in enumerate("ab", 1)]

    def remote(self, **_):
        fake = self

        class Remote:
            def __init__(self, fn):
                self.fn, self.node = fn, None

            def options(self, scheduling_strategy):
                r = Remote(self.fn)
                r.node = scheduling_strategy.node_id
                return r

            def remote(self, path):
                fake.pinned.append(self.node[0])
                return self.fn(path) if self.node[0] in fake.seeing else False
        return Remote

    def get(self, value, timeout=None):
        return value


def test_a_local_out_that_other_nodes_do_not_see_is_refused(tmp_path, monkeypatch):
    """On a cluster of several nodes, a local --out on the head is written by the workers and
    trials of the other nodes into their own disks (result files a resubmitted job never finds,
    trials failing Ray's storage check): one line before any work, unless every node sees it."""
    import sctd_ray.assess.scan as scan

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    fake = _TwoNodes(seeing=("a",))
    monkeypatch.setattr(scan, "ensure_ray", lambda address=None: fake)
    out = tmp_path / "run"
    with pytest.raises(sctd_job.JobConfigError, match=r"1 of the cluster's 2 nodes do not see it \(10\.0\.0\.2"):
        sctd_job.check_out_is_shared(["scan", "--out", str(out), "--resume"], None)
    assert sorted(fake.pinned) == ["a", "b"] and not out.exists()   # no marker, no folder left behind

    fake = _TwoNodes(seeing=("a", "b"))   # a shared filesystem (NFS): fine
    monkeypatch.setattr(scan, "ensure_ray", lambda address=None: fake)
    out.mkdir()
    sctd_job.check_out_is_shared(["distill", "--run", str(out), "--target", "t"], None)
    assert sorted(fake.pinned) == ["a", "b"] and os.listdir(out) == []   # the marker is gone
    monkeypatch.setattr(scan, "ensure_ray", lambda address=None: pytest.fail("s3:// needs no check"))
    sctd_job.check_out_is_shared(["scan", "--out", "s3://b/run"], None)


# ------------------------------------------------------------------ a real Ray head
def _free_port(avoid=()) -> int:
    """A free loopback port not in ``avoid`` (Ray refuses a component port inside the worker
    port range, or one that another component uses)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def _free_range(n: int = 200) -> int:
    import random

    for _ in range(100):
        base = random.randrange(20000, 60000 - n)
        ok = True
        for port in range(base, base + n, 17):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range for Ray workers")


class RayHead:
    """`ray start --head --block` with token auth, its own temp dir and ports; `stop()` ends
    only the processes it started (`ray stop` would stop every Ray of this user)."""

    def __init__(self):
        self.token = uuid.uuid4().hex
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sctdj-", dir="/tmp"))  # short: unix sockets
        self.worker_base = _free_range()
        workers = range(self.worker_base, self.worker_base + 200)
        self.ports = {}
        for k in ("port", "dashboard-port", "ray-client-server-port", "object-manager-port",
                  "node-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                  "runtime-env-agent-port", "metrics-export-port"):
            self.ports[k] = _free_port(avoid=set(workers) | set(self.ports.values()))
        self.proc = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def env(self) -> dict[str, str]:
        """Environment for `ray` CLI clients of this head (and for the head itself)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "AWS_", "RAY_API_SERVER"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   PYTHONUNBUFFERED="1",
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # a test head: stop at once, no 30 s drain
        return env

    def extra_args(self) -> list[str]:
        """More `ray start` options (subclasses: tests/test_autoscaling.py)."""
        return []

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def start(self, timeout: float = 120) -> "RayHead":
        base = self.worker_base
        cmd = ["ray", "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
               "--object-store-memory=300000000", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               f"--min-worker-port={base}", f"--max-worker-port={base + 199}",
               *(f"--{k}={v}" for k, v in self.ports.items()), *self.extra_args()]
        self.log = open(self.temp_dir / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Ready = a trivial job runs (the job agent is up and can start drivers)."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                client = self.client()
                job = client.submit_job(entrypoint="python -c \"print('ready')\"")
                status = wait_job(client, job, timeout=max(5.0, deadline - time.monotonic()))
                if str(status) == "SUCCEEDED":
                    return
                last = f"warm-up job {status}: {client.get_job_logs(job)[-500:]}"
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(1)
        raise RuntimeError(f"Ray head not ready after {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        path = self.temp_dir / "ray-start.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def _our_pids(self) -> list[int]:
        """Processes of this head: its session, or any process carrying its unique token
        (job drivers may run in sessions of their own)."""
        sid = self.proc.pid
        needle = f"RAY_AUTH_TOKEN={self.token}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                stat = (d / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[3]) == sid or needle in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            deadline = time.monotonic() + 10
            while (pids := self._our_pids()) and time.monotonic() < deadline:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL if time.monotonic() > deadline - 5 else signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)
            self.proc.wait(timeout=10)
            self.proc = None
            self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_job(client, job_id: str, timeout: float = 300):
    """Poll until the job is in a terminal state; returns its JobStatus."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f}s:\n"
                               f"{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead().start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def zoo_on_s3(request, s3, tmp_path_factory):
    """The demo zoo ("small") pushed to a fresh bucket: returns (bucket uri, S3 env)."""
    try:  # a session-wide demo zoo, if conftest provides one
        local = request.getfixturevalue("demo_zoo")
    except pytest.FixtureLookupError:
        from sctd_ray.zoo.demo import build_demo

        local = str(tmp_path_factory.mktemp("jobs-demo") / "zoo")
        build_demo(local, "small")
    env = s3.env()
    bucket = "s3://" + s3.make_bucket("jobs-" + uuid.uuid4().hex[:16])
    subprocess.run([sys.executable, "-m", "sctd_ray.cli", "zoo", "push", str(local), f"{bucket}/zoo",
                    "--quiet"], env={**os.environ, **env}, check=True, timeout=300)
    return bucket, env


def submit(head: RayHead, s3_env: dict, script: str, *args: str) -> str:
    """`ray job submit --no-wait` from the repo root, as a user does; returns the job id."""
    runtime_env = yaml.safe_load((JOBS / "runtime_env_preinstalled.yaml").read_text())
    runtime_env["env_vars"].update(s3_env)
    del runtime_env["working_dir"]  # given as --working-dir, as a user would
    job_id = f"sctd-test-{uuid.uuid4().hex[:10]}"
    p = subprocess.run(["ray", "job", "submit", "--address", head.address, "--submission-id", job_id,
                        "--no-wait", "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
                        "--", "python", f"jobs/{script}", *args],
                       cwd=REPO, env=head.env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return job_id


def finish(head: RayHead, job_id: str, timeout: float = 300):
    """Wait for a job; returns (status, driver exit code, logs)."""
    client = head.client()
    status = wait_job(client, job_id, timeout)
    return str(status), client.get_job_info(job_id).driver_exit_code, client.get_job_logs(job_id)


def _read_parquet(s3_env: dict, uri: str) -> pd.DataFrame:
    import io

    from sctd_ray.zoo.store import open_store

    parent, _, name = uri.rpartition("/")
    old = {k: os.environ.get(k) for k in s3_env}
    os.environ.update(s3_env)
    try:
        store = open_store(parent)
        return pd.read_parquet(io.BytesIO(store.read_bytes(name)))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _s3_keys(s3, bucket_uri: str, prefix: str) -> list[str]:
    bucket = bucket_uri.removeprefix("s3://")
    client = s3.client()
    keys, token = [], None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


@pytest.mark.integration
def test_head_requires_the_token(ray_head):
    url = f"{ray_head.address}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code in (401, 403)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ray_head.token}"})
    assert urllib.request.urlopen(req, timeout=10).status == 200


@pytest.mark.integration
def test_scan_job_writes_its_outputs_to_s3_and_a_resubmitted_job_resumes(ray_head, zoo_on_s3, s3):
    bucket, env = zoo_on_s3
    name = bucket.removeprefix("s3://")
    teachers = {k.split("/")[2] for k in _s3_keys(s3, bucket, "zoo/teachers/")}
    args = ["--zoo", f"{bucket}/zoo", "--target", f"{bucket}/zoo/targets/{TARGET}", "--out", f"{bucket}/runs/scan",
            "--top-k", "1", "--samples", "1", "--budget", "60"]  # 2 short trials: the teacher's and ce's
    job_id = submit(ray_head, env, "scan.py", *args)
    status, code, logs = finish(ray_head, job_id, timeout=600)
    assert (status, code) == ("SUCCEEDED", 0), logs[-3000:]
    assert f"job {job_id} on" in logs and "running: sctd scan" in logs  # the job's own lines
    assert "teachers to score" in logs and f"{len(teachers)}/{len(teachers)}" in logs  # the scan's progress
    assert logs.strip().splitlines()[-1].endswith("(exit 0)")
    keys = set(_s3_keys(s3, bucket, "runs/scan/"))
    assert {"runs/scan/ranking.parquet", "runs/scan/run.json", "runs/scan/report.html",
            "runs/scan/distill/summary.json"} <= keys, sorted(keys)
    ranking = _read_parquet(env, f"{bucket}/runs/scan/ranking.parquet")
    assert set(ranking.teacher_id) == teachers and (ranking.status == "ok").all()
    students = {k.split("/")[2] for k in _s3_keys(s3, bucket, "zoo/teachers/")} - teachers
    assert students, "no student exported to the zoo"

    # As if the job had died after the others: drop two teachers' results and submit the same
    # job again. It scores what is missing (those two, and the zoo's new student) and keeps the rest.
    results = sorted(k for k in keys if k.startswith("runs/scan/results/"))
    for key in results[:2]:
        s3.client().delete_object(Bucket=name, Key=key)
    status, code, logs = finish(ray_head, submit(ray_head, env, "scan.py", *args), timeout=600)
    assert (status, code) == ("SUCCEEDED", 0), logs[-3000:]
    assert f"; {len(teachers) - 2} pairs already done" in logs, logs[-3000:]
    assert set(results) <= set(_s3_keys(s3, bucket, "runs/scan/results/"))
    again = _read_parquet(env, f"{bucket}/runs/scan/ranking.parquet")
    key = ["teacher_id", "sctd", "status"]
    pd.testing.assert_frame_equal(ranking[key].sort_values("teacher_id").reset_index(drop=True),
                                  again[again.teacher_id.isin(teachers)][key].sort_values("teacher_id")
                                  .reset_index(drop=True))


@pytest.mark.integration
def test_job_with_bad_zoo_fails_with_a_clear_message(ray_head, zoo_on_s3):
    bucket, env = zoo_on_s3
    bad = f"{bucket}/no-such-zoo"
    status, code, logs = finish(ray_head, submit(
        ray_head, env, "scan.py", "--zoo", bad, "--target", f"{bucket}/zoo/targets/{TARGET}",
        "--out", f"{bucket}/runs/bad"))
    assert (status, code) == ("FAILED", 2), logs[-3000:]
    last = logs.strip().splitlines()[-1]
    assert "FAILED" in last and bad in last, logs[-3000:]
    assert "Traceback" not in logs


@pytest.mark.integration
def test_job_waiting_for_gpus_that_never_come_fails_clearly(ray_head, zoo_on_s3):
    """`--request-gpus` on a cluster that cannot add GPU workers (this head has none)."""
    bucket, env = zoo_on_s3
    status, code, logs = finish(ray_head, submit(
        ray_head, env, "assess.py", "--request-gpus", "1", "--request-gpus-timeout", "3",
        "--zoo", f"{bucket}/zoo", "--target", f"{bucket}/zoo/targets/{TARGET}", "--out", f"{bucket}/runs/gpu"))
    assert (status, code) == ("FAILED", 2), logs[-3000:]
    last = logs.strip().splitlines()[-1]
    assert "FAILED" in last and "the cluster has 0 of 1 GPU(s) after 3s" in last, logs[-3000:]
    assert "the job ended before sctd assess started (status 2)" in last, last
    assert "running: sctd" not in logs  # the command never started


def _stop_once_logged(ray_head, job_id, marker: str, timeout: float):
    """`ray job stop` once ``marker`` is in the job's log: (status, logs, the last log line)."""
    client = ray_head.client()
    deadline = time.monotonic() + timeout
    while marker not in client.get_job_logs(job_id):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        assert str(client.get_job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED")
        time.sleep(1)
    p = subprocess.run(["ray", "job", "stop", "--address", ray_head.address, job_id],
                       env=ray_head.env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    status = wait_job(client, job_id, timeout=180)
    time.sleep(1)  # the driver's last lines reach the log file as it exits
    logs = client.get_job_logs(job_id)
    return status, logs, logs.strip().splitlines()[-1]


@pytest.mark.integration
def test_stopped_job_says_so_in_its_last_line(ray_head, zoo_on_s3):
    """`ray job stop` (SIGTERM) while the job waits: STOPPED, and a last line that says how to go on."""
    bucket, env = zoo_on_s3
    job_id = submit(ray_head, env, "assess.py", "--request-gpus", "1", "--request-gpus-timeout", "600",
                    "--zoo", f"{bucket}/zoo", "--target", f"{bucket}/zoo/targets/{TARGET}",
                    "--out", f"{bucket}/runs/stopped")
    status, logs, last = _stop_once_logged(ray_head, job_id, "requested 1 GPU", timeout=120)
    assert str(status) == "STOPPED"
    assert "STOPPED" in last and "resubmit to resume" in last, logs[-3000:]


@pytest.mark.integration
def test_job_stopped_in_the_distillation_stage_says_so_and_resumes(ray_head, zoo_on_s3, s3):
    """`ray job stop` while the Tune trials run: the job gets the time it needs to stop them (the
    runtime env's RAY_JOB_STOP_WAIT_TIME_S; Ray's 3 s SIGKILLed it with no last line and no
    report), ends STOPPED with a last line saying so, and a resubmitted job finishes the run."""
    bucket, env = zoo_on_s3
    args = ["--zoo", f"{bucket}/zoo", "--target", f"{bucket}/zoo/targets/{TARGET}",
            "--out", f"{bucket}/runs/stop-distill", "--top-k", "1", "--samples", "1", "--budget", "60",
            "--no-export"]
    job_id = submit(ray_head, env, "scan.py", *args)
    # "running, ": a `distill [..] trials: ..` line
    status, logs, last = _stop_once_logged(ray_head, job_id, "running, ", timeout=300)
    assert str(status) == "STOPPED"
    assert "STOPPED" in last and "status 130" in last and "resubmit to resume" in last, logs[-3000:]
    assert "runs/stop-distill/report.html" in _s3_keys(s3, bucket, "runs/stop-distill/")

    status, code, logs = finish(ray_head, submit(ray_head, env, "scan.py", *args), timeout=600)
    assert (status, code) == ("SUCCEEDED", 0), logs[-3000:]
    assert "resuming the search" in logs, logs[-3000:]


def test_the_shared_folder_check_never_ends_a_job_in_a_traceback(tmp_path, monkeypatch, capsys):
    """A --out the head cannot write is left to the command's own one-line error; a node the
    check cannot ask (its runtime env still installing past the timeout, a node gone since the
    listing) is named in a line, and the job goes on: neither is an 'unexpected' traceback."""
    import sctd_ray.assess.scan as scan

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(scan, "ensure_ray", lambda address=None: _TwoNodes(seeing=("a", "b")))
    sctd_job.check_out_is_shared(["scan", "--out", str(blocker / "run")], None)   # not a folder: no check

    class Unanswered(_TwoNodes):
        def get(self, value, timeout=None):
            if value is False:   # node b's task
                raise TimeoutError("Get timed out: some object(s) not ready.")
            return value

    fake = Unanswered(seeing=("a",))
    monkeypatch.setattr(scan, "ensure_ray", lambda address=None: fake)
    out = tmp_path / "run"
    sctd_job.check_out_is_shared(["scan", "--out", str(out)], None)
    said = capsys.readouterr().out
    assert "could not check" in said and "10.0.0.2" in said and "TimeoutError" in said, said
    assert not out.exists()
