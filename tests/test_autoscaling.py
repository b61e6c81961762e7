"""`--request-gpus` on an autoscaling cluster (jobs/sctd_job.py, docs/cluster.md section 3).

Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1`, provider type `fake_multinode`) runs a real
autoscaler on this machine: a head with 0 GPUs and a worker type {CPU: 1, GPU: 1}, 0 to 2 nodes,
idle timeout 6 s. Each "GPU node" is a real raylet of its own with a GPU *resource*; torch sees
no CUDA there, so the scan's GPU workers score on the CPU (same numbers as a local scan).
`ray.cluster_utils.AutoscalingCluster` is not used: it runs `ray stop --force` (every Ray of
this user) and reads an example.yaml that the installed Ray lacks.

The head is tests/test_jobs.py's `RayHead` (token auth, its own ports and temp dir; `stop()`
also ends the fake nodes, which inherit its token), jobs go in with `ray job submit`.
"""

from __future__ import annotations

import json
import subprocess
import time

import pandas as pd
import pytest

from test_jobs import RayHead, finish, submit

IDLE_TIMEOUT_S = 6
GPU_NODE_TYPE = "ray.worker.gpu"


class FakeAutoscalingHead(RayHead):
    """A `RayHead` whose autoscaler adds and removes 1-GPU fake nodes."""

    def __init__(self, max_gpu_nodes: int = 2):
        super().__init__()
        gcs = f"127.0.0.1:{self.ports['port']}"
        config = {
            "cluster_name": "sctd-test-fake", "max_workers": max_gpu_nodes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "gcs_address": gcs,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
                GPU_NODE_TYPE: {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200_000_000},
                                "node_config": {}, "min_workers": 0, "max_workers": max_gpu_nodes}},
            "head_node_type": "ray.head.default", "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
            "upscaling_speed": 1.0, "auth": {}, "docker": {}, "file_mounts": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}
        self.config_path = self.temp_dir / "autoscaling.json"
        self.config_path.write_text(json.dumps(config))
        self.gcs = gcs

    def extra_args(self) -> list[str]:
        return [f"--autoscaling-config={self.config_path}"]

    def env(self) -> dict[str, str]:
        return {**super().env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}

    def ray_cli(self, *args: str, timeout: float = 60) -> str:
        p = subprocess.run(["ray", *args], env=self.env(), capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    def autoscaler(self) -> tuple[int, str]:
        """(GPU worker nodes the autoscaler calls active, its `From request_resources:` line)."""
        out = self.ray_cli("status", "--address", self.gcs)
        lines = [ln.strip() for ln in out.splitlines()]
        active = lines[lines.index("Active:") + 1:lines.index("Pending:")]
        gpu_nodes = sum(int(ln.split()[0]) for ln in active if ln.endswith(GPU_NODE_TYPE))
        return gpu_nodes, lines[lines.index("From request_resources:") + 1]

    def state(self, kind: str) -> list[dict]:
        return json.loads(self.ray_cli("list", kind, "--address", self.gcs, "--format", "json",
                                       "--limit", "1000"))


@pytest.fixture(scope="module")
def fake_cluster():
    head = FakeAutoscalingHead().start()
    try:
        yield head
    finally:
        head.stop()


def wait_for(what, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s"
        time.sleep(1)


@pytest.mark.integration
def test_request_gpus_scales_up_scans_on_the_gpu_nodes_and_scales_down(fake_cluster, demo_zoo, tmp_path):
    head = fake_cluster
    assert head.autoscaler() == (0, "(none)")
    out = tmp_path / "run"
    status, code, logs = finish(head, submit(head, {}, "assess.py", "--request-gpus", "2", "--zoo", demo_zoo,
                                             "--target", f"{demo_zoo}/targets/fm-mix5", "--out", str(out)),
                                timeout=240)
    assert (status, code) == ("SUCCEEDED", 0), logs[-3000:]
    assert "requested 2 GPU worker(s) from the autoscaler" in logs and "2 GPU(s) in the cluster after" in logs
    assert "8 teachers to score on 2 worker(s)" in logs, logs[-3000:]   # sized to the GPUs it asked for
    assert logs.strip().splitlines()[-1].endswith("(exit 0)")
    # the fake GPUs are resources only: each worker says it scores on the CPU
    assert "scan: 2 of 2 GPU worker(s) scored on the CPU" in logs, logs[-3000:]

    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["workers"] == 2 and run["settings"]["resources"]["num_gpus"] == 1
    ranking = pd.read_parquet(out / "ranking.parquet")
    assert len(ranking) == 8 and (ranking.status == "ok").all()

    # one shard actor per GPU node, none on the head
    gpu_nodes = {n["node_id"] for n in head.state("nodes") if n["resources_total"].get("GPU")}
    shards = [a for a in head.state("actors") if a["class_name"] == "ShardActor"]
    assert len(shards) == 2 and {a["node_id"] for a in shards} <= gpu_nodes, (shards, gpu_nodes)
    assert len({a["node_id"] for a in shards}) == 2

    # the request is withdrawn and the idle GPU nodes go
    wait_for("request withdrawn, GPU nodes removed", lambda: head.autoscaler() == (0, "(none)"),
             timeout=IDLE_TIMEOUT_S + 30)


@pytest.mark.integration
def test_more_gpus_than_the_cluster_can_start_is_one_line_and_keeps_the_request(fake_cluster, demo_zoo, tmp_path):
    """3 GPUs of a 2-node cluster: the two that come stay until the wait ends (Ray Data's
    AutoscalingCoordinator, left by the scan above, re-sends its own request every 20 s, which
    replaced a plain `request_resources`), then one clear last line, exit 2, no run folder."""
    head = fake_cluster
    out = tmp_path / "run"
    status, code, logs = finish(head, submit(head, {}, "assess.py", "--request-gpus", "3",
                                             "--request-gpus-timeout", "25", "--zoo", demo_zoo,
                                             "--target", f"{demo_zoo}/targets/fm-mix5", "--out", str(out)),
                                timeout=120)
    assert (status, code) == ("FAILED", 2), logs[-3000:]
    last = logs.strip().splitlines()[-1]
    assert "the job ended before sctd assess started (status 2)" in last, last
    assert "--request-gpus 3: the cluster has 2 of 3 GPU(s) after 25s" in last, last
    assert "Traceback" not in logs and not out.exists()
    wait_for("request withdrawn, GPU nodes removed", lambda: head.autoscaler() == (0, "(none)"),
             timeout=IDLE_TIMEOUT_S + 30)
