"""`sctd assess`: the distributed scan on real Ray and a real SeaweedFS (issue 4)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from s3server import serve_fake_s3

from sctd_ray.assess.engine import assess_teacher, batches_from_arrays
from sctd_ray.assess.scan import ScanSettings, run_scan
from sctd_ray.cli import main
from sctd_ray.data.targets import load_target
from sctd_ray.errors import SctdError
from sctd_ray.metrics import DEFAULT_RANK_BY, NAMES
from sctd_ray.zoo.loading import load_teacher
from sctd_ray.zoo.store import open_store

pytestmark = pytest.mark.integration


def _scores(df, target=None):
    df = df if target is None else df[df.target == target]
    return {(r.target, r.teacher_id): tuple(getattr(r, m) for m in NAMES)
            for r in df.itertuples() if r.status == "ok"}


def _close(a, b, rel=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rel, atol=1e-9, err_msg=str(k))


def _targets(zoo):
    return [str(Path(zoo) / "targets" / n) for n in ("fm-mix5", "dg-high5")]


@pytest.fixture(scope="module")
def reference(demo_zoo, ray_local):
    """In-process engine scores for every (teacher, target): the scan must reproduce them."""
    store = open_store(demo_zoo)
    out = {}
    for turi in _targets(demo_zoo):
        task = load_target(turi, splits=("train",))
        tb = batches_from_arrays(task.name, task.splits["train"].images, task.splits["train"].labels,
                                 task.num_classes)
        for tid in sorted(p.name for p in (Path(demo_zoo) / "teachers").iterdir()):
            s = assess_teacher(load_teacher(store, tid), tb, device="cpu")[task.name]
            out[(task.name, tid)] = tuple(s[m] for m in NAMES)
    return out


def test_scan_from_s3_equals_engine(demo_zoo, s3_bucket, reference, ray_local, tmp_path, monkeypatch):
    from sctd_ray.assess.results import ranking_table, read_results
    from sctd_ray.zoo.store import S3Store

    assert main(["zoo", "push", demo_zoo, f"{s3_bucket}/zoo", "--quiet"]) == 0
    targets = [f"{s3_bucket}/zoo/targets/{n}" for n in ("fm-mix5", "dg-high5")]
    result_reads, real_read = [], S3Store.read_bytes

    def read_bytes(self, key):   # the driver's reads (the actors run in other processes)
        if key.startswith("results/"):
            result_reads.append(key)
        return real_read(self, key)
    monkeypatch.setattr(S3Store, "read_bytes", read_bytes)
    res = run_scan(ScanSettings(zoo=f"{s3_bucket}/zoo", targets=targets, out=f"{s3_bucket}/run",
                                workers=2, progress=False))
    # the ranking comes from the rows the workers returned, not from a GET per result file,
    # and equals the ranking of the files they wrote
    assert result_reads == []
    monkeypatch.setattr(S3Store, "read_bytes", real_read)
    out = open_store(f"{s3_bucket}/run")
    assert len(read_results(out)) == len(reference)
    from_files = ranking_table(read_results(out), DEFAULT_RANK_BY, NAMES)
    pd.testing.assert_frame_equal(res.ranking, from_files)
    _close(_scores(res.ranking), reference)
    assert res.errors == 0
    assert out.exists("ranking.parquet") and out.exists("run.json")
    assert len(out.list("results/")) == len(reference)
    run = json.loads(out.read_bytes("run.json"))
    assert run["complete"] and run["timings"]["teachers_scored"] == 8
    assert run["settings"]["rank_by"] == DEFAULT_RANK_BY == "sctd_fused"
    for _, g in res.ranking.groupby("target"):  # rank 1 = highest sctd_fused (the default)
        g = g.sort_values("rank")
        assert list(g["rank"]) == list(range(1, len(g) + 1))
        assert g["sctd_fused"].is_monotonic_decreasing


@pytest.fixture
def s3_breaking_weights(s3):
    """An HTTP proxy in front of the `s3` server that breaks off the first response to each
    GET of a model.safetensors halfway through its body (headers and Content-Length intact,
    then the connection closes), as a network does now and then; everything else passes."""
    import http.client
    import http.server
    import socket

    upstream = s3.env()["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]
    broken: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection("127.0.0.1", int(upstream), timeout=60)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():   # Host too: the client signed it
                conn.putheader(k, v)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "transfer-encoding"):
                    self.send_header(k, v)
            if resp.getheader("Content-Length") is None:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            path = self.path.split("?")[0]
            if (self.command == "GET" and path.endswith("/model.safetensors") and path not in broken
                    and len(data) > 1000):
                broken.append(path)
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    with serve_fake_s3(Handler) as url:
        yield url, broken


def test_weights_whose_download_breaks_off_are_fetched_again(demo_zoo, s3_bucket, s3_breaking_weights,
                                                            reference, ray_local, tmp_path):
    """Issue 4: transient S3 errors are retried. A weights download cut off mid-body (which
    botocore does not retry: its retries end once the headers arrived) is fetched again by the
    worker's store, so every teacher is scored, with the undisturbed scores."""
    assert main(["zoo", "push", demo_zoo, f"{s3_bucket}/zoo", "--quiet"]) == 0
    endpoint, broken = s3_breaking_weights
    target = _targets(demo_zoo)[0]
    res = run_scan(ScanSettings(zoo=f"{s3_bucket}/zoo", targets=[target], out=str(tmp_path / "run"),
                                workers=2, progress=False, s3_endpoint=endpoint))
    assert res.errors == 0, res.ranking[["teacher_id", "error"]].to_string()
    assert len(broken) == 8   # every teacher's first download was cut off
    name = Path(target).name
    _close(_scores(res.ranking), {k: v for k, v in reference.items() if k[0] == name})


def test_done_pairs_needs_every_requested_metric():
    from sctd_ray.assess.results import done_pairs

    rows = [{"target": "t", "teacher_id": "a", "status": "ok", "sctd": 1.0, "sctd_fused": 0.5},
            {"target": "t", "teacher_id": "b", "status": "ok", "sctd": 1.0},   # older file
            {"target": "t", "teacher_id": "c", "status": "error", "error": "corrupt"}]
    assert done_pairs(rows, ("sctd",)) == {("t", "a"), ("t", "b")}   # an error row is tried again
    assert done_pairs(rows, ("sctd", "sctd_fused")) == {("t", "a")}



def test_the_ranking_does_not_depend_on_the_order_rows_arrive_in():
    """Rows reach the driver in completion order; equal scores (copies of one teacher) are
    ranked by teacher id, so a resumed scan ranks as a fresh one."""
    import random

    from sctd_ray.assess.results import ranking_table

    rows = [{"target": t, "teacher_id": i, "status": "ok", "error": "", "sctd": s}
            for t in ("x", "y") for i, s in (("b", 1.0), ("a", 1.0), ("c", 2.0), ("d", 0.5))]
    rows.append({"target": "x", "teacher_id": "e", "status": "error", "error": "corrupt", "sctd": None})
    ref = ranking_table(rows, "sctd", ("sctd",))
    assert list(ref[ref.target == "x"]["teacher_id"]) == ["c", "a", "b", "d", "e"]
    for seed in range(5):
        random.Random(seed).shuffle(rows)
        pd.testing.assert_frame_equal(ranking_table(rows, "sctd", ("sctd",)), ref)


def test_resume_with_more_metrics_scores_the_missing_ones(demo_zoo, reference, ray_local, tmp_path):
    target = _targets(demo_zoo)[0]
    out = str(tmp_path / "run")
    run_scan(ScanSettings(zoo=demo_zoo, targets=[target], out=out, metrics=("sctd",), rank_by="sctd",
                          progress=False))
    res = run_scan(ScanSettings(zoo=demo_zoo, targets=[target], out=out, resume=True, progress=False))
    assert res.errors == 0 and res.ranking[list(NAMES)].notna().all().all()
    _close(_scores(res.ranking), {k: v for k, v in reference.items() if k[0] == Path(target).name})


def test_resume_scores_again_what_changed_since(demo_zoo, reference, ray_local, tmp_path):
    """--resume trusts a finished pair only if it was scored from the same images and labels
    (the target's fingerprint) and the same weights (the teacher's sha256): a different target
    under the same folder name, or a teacher retrained in place, is scored again, and a teacher
    gone from the zoo leaves the ranking (its file stays)."""
    from safetensors.torch import load_file, save_file

    t1, t2 = _targets(demo_zoo)
    ids = ["dg-all-resnet", "fm-all-resnet"]
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo, ignore=shutil.ignore_patterns("manifest.parquet"))
    out = tmp_path / "run"

    def scan(target, teachers=ids):
        logs = []
        res = run_scan(ScanSettings(zoo=str(zoo), targets=[target], out=str(out), teachers=teachers,
                                    resume=True, progress=False), log=logs.append)
        return res, "\n".join(logs)

    scan(t1)
    other = tmp_path / "elsewhere" / Path(t1).name      # dg-high5's images, named fm-mix5
    shutil.copytree(t2, other)
    res, logs = scan(str(other))
    assert "2 earlier result(s) are scored again" in logs
    _close(_scores(res.ranking), {("fm-mix5", tid): v for (tn, tid), v in reference.items()
                                  if tn == "dg-high5" and tid in ids})
    run = json.loads((out / "run.json").read_text())
    assert run["targets"]["fm-mix5"]["uri"] == str(other)

    files = {f: f.read_bytes() for f in (out / "results").rglob("*.json")}
    weights = zoo / "teachers" / ids[0] / "model.safetensors"
    tensors = load_file(weights)
    head = [k for k in tensors if k.endswith("fc.weight")][0]
    tensors[head] = tensors[head] * 2.0      # "retrained": same id and architecture, new weights
    save_file(tensors, weights)
    res, logs = scan(str(other))
    assert "1 earlier result(s) are scored again" in logs
    assert [f.stem for f in files if f.read_bytes() != files[f]] == [ids[0]]
    before, after = _scores(res.ranking), {("fm-mix5", tid): v for (tn, tid), v in reference.items()
                                          if tn == "dg-high5" and tid in ids}
    _close({k: v for k, v in before.items() if k[1] == ids[1]}, {k: v for k, v in after.items() if k[1] == ids[1]})
    assert not np.allclose(before[("fm-mix5", ids[0])], after[("fm-mix5", ids[0])])

    shutil.rmtree(zoo / "teachers" / ids[1])
    res, logs = scan(str(other), teachers=[ids[0]])
    assert list(res.ranking["teacher_id"]) == [ids[0]]
    assert f"1 teacher(s) with earlier results are not in {zoo}" in logs
    assert (out / "results" / "fm-mix5" / f"{ids[1]}.json").exists()
    assert "nothing left to score" in _printed(res)


def _printed(res):
    from sctd_ray.assess.scan import print_ranking

    lines = []
    print_ranking(res, log=lines.append)
    return "\n".join(lines)


def test_a_scan_sees_the_zoo_as_it_is_not_as_last_indexed(demo_zoo, ray_local, tmp_path):
    """Teachers retrained in place, added or removed after `sctd zoo index`: the scan reads
    them again from the zoo (one listing with modification times) instead of trusting the
    old manifest.parquet, says so, and a resume scores the retrained one again."""
    import hashlib

    from safetensors.torch import load_file, save_file

    t1 = _targets(demo_zoo)[0]
    ids = ["dg-all-resnet", "fm-all-resnet"]
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)                  # with its manifest.parquet
    out = tmp_path / "run"

    def scan(teachers):
        logs = []
        res = run_scan(ScanSettings(zoo=str(zoo), targets=[t1], out=str(out), teachers=teachers,
                                    resume=True, progress=False), log=logs.append)
        return res, "\n".join(logs)

    first, logs = scan(ids)
    assert "older than the zoo" not in logs
    weights = zoo / "teachers" / ids[0] / "model.safetensors"
    tensors = load_file(weights)
    head = [k for k in tensors if k.endswith("fc.weight")][0]
    tensors[head] = tensors[head] * 2.0             # retrained in place
    save_file(tensors, weights)
    shutil.copytree(zoo / "teachers" / ids[1], zoo / "teachers" / "added")
    shutil.rmtree(zoo / "teachers" / ids[1])
    res, logs = scan([ids[0], "added"])
    assert "manifest.parquet is older than the zoo: 2 teacher(s) changed or added since" in logs
    assert "1 listed but gone, left out (fm-all-resnet)" in logs
    assert "1 earlier result(s) are scored again" in logs
    ranking = res.ranking.set_index("teacher_id")
    assert sorted(ranking.index) == sorted([ids[0], "added"]) and set(ranking["status"]) == {"ok"}
    assert not np.allclose(_scores(res.ranking)[("fm-mix5", ids[0])], _scores(first.ranking)[("fm-mix5", ids[0])])
    row = json.loads((out / "results" / "fm-mix5" / f"{ids[0]}.json").read_text())
    assert row["teacher_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_resume_scores_again_an_edited_config_and_retries_errors(demo_zoo, ray_local, tmp_path):
    """config.json sets a teacher's preprocessing, labels and model arguments: a result records
    its sha256 too, and a resume scores the pair again when it changed. An error row is tried
    again (the teacher fixed since, or the failure gone)."""
    t1 = _targets(demo_zoo)[0]
    ids = ["dg-all-resnet", "fm-all-resnet"]
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)                  # with its manifest.parquet
    out = tmp_path / "run"
    weights = zoo / "teachers" / ids[1] / "model.safetensors"
    good, then = weights.read_bytes(), (zoo / "manifest.parquet").stat().st_mtime - 100

    def put(data):           # as a backup restore would: the file's time older than the manifest
        weights.write_bytes(data)
        os.utime(weights, (then, then))

    put(good[:-8] + b"\0" * 8)     # not the manifest's weights: refused, an error row

    def scan():
        logs = []
        res = run_scan(ScanSettings(zoo=str(zoo), targets=[t1], out=str(out), teachers=ids,
                                    resume=True, progress=False), log=logs.append)
        return res.ranking.set_index("teacher_id"), "\n".join(logs)

    first, _ = scan()
    assert first.loc[ids[1], "status"] == "error" and "sctd zoo index" in first.loc[ids[1], "error"]
    assert first.loc[ids[0], "status"] == "ok"
    put(good)                                        # the right file back
    config = zoo / "teachers" / ids[0] / "config.json"
    cfg = json.loads(config.read_text())
    cfg["pretrained_cfg"]["mean"], cfg["pretrained_cfg"]["std"] = [0.9], [0.1]
    config.write_text(json.dumps(cfg))               # another preprocessing, same weights
    second, logs = scan()
    assert "1 earlier result(s) are scored again" in logs and "1 earlier error row(s) are tried again" in logs, logs
    assert set(second["status"]) == {"ok"}
    assert second.loc[ids[0], "sctd_fused"] != pytest.approx(first.loc[ids[0], "sctd_fused"], rel=1e-6)
    assert main(["zoo", "index", str(zoo)]) == 0     # the manifest catches up: nothing to redo
    third, logs = scan()
    assert "scored again" not in logs and "tried again" not in logs
    assert third["sctd_fused"].to_dict() == second["sctd_fused"].to_dict()


def test_resume_with_another_target_keeps_the_earlier_ones(demo_zoo, ray_local, tmp_path, monkeypatch):
    """A second target added with --resume: run.json names both, as the ranking does, by
    absolute path though given relative (`sctd distill` and `sctd report` run from elsewhere)."""
    t1, t2 = _targets(demo_zoo)
    out = str(tmp_path / "run")
    monkeypatch.chdir(Path(t2).parent)
    for t in (t1, "./dg-high5"):
        res = run_scan(ScanSettings(zoo=demo_zoo, targets=[t], out=out, teachers=["fm-all-resnet"],
                                    resume=True, progress=False))
    run = json.loads(Path(out, "run.json").read_text())
    assert sorted(run["targets"]) == sorted(res.ranking["target"].unique()) == ["dg-high5", "fm-mix5"]
    assert run["targets"]["fm-mix5"]["uri"] == t1 and run["targets"]["dg-high5"]["uri"] == t2


def test_fewer_cpu_workers_than_cpus_run_more_threads_each(demo_zoo, ray_local, tmp_path):
    """One CPU worker on a machine of c CPUs holds all c of them, and its torch runs c threads
    (Ray's OMP_NUM_THREADS), instead of one thread and c - 1 idle cores."""
    cpus = int(ray_local.cluster_resources()["CPU"])
    run_scan(ScanSettings(zoo=demo_zoo, targets=[_targets(demo_zoo)[0]], out=str(tmp_path / "run"),
                          teachers=["fm-all-resnet"], workers=1, progress=False))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["resources"] == {"num_cpus": cpus}
    assert [w["threads"] for w in run["workers"]] == [cpus]


def test_two_targets_equal_two_scans(demo_zoo, reference, ray_local, tmp_path):
    t1, t2 = _targets(demo_zoo)
    both = run_scan(ScanSettings(zoo=demo_zoo, targets=[t1, t2], out=str(tmp_path / "both"), progress=False))
    one = run_scan(ScanSettings(zoo=demo_zoo, targets=[t1], out=str(tmp_path / "one"), progress=False))
    two = run_scan(ScanSettings(zoo=demo_zoo, targets=[t2], out=str(tmp_path / "two"), progress=False))
    _close(_scores(both.ranking), {**_scores(one.ranking), **_scores(two.ranking)})
    _close(_scores(both.ranking), reference)


def _bigger_zoo(demo_zoo, dst, copies=4):
    """The demo teachers under several ids: a zoo long enough to disturb mid-scan."""
    shutil.copytree(demo_zoo, dst, ignore=shutil.ignore_patterns("manifest.parquet"))
    teachers = Path(dst) / "teachers"
    for p in sorted(teachers.iterdir()):
        for k in range(1, copies):
            shutil.copytree(p, teachers / f"{p.name}-copy{k}")
    return str(dst)


def test_killed_worker_is_restarted_and_results_equal(demo_zoo, ray_local, tmp_path):
    import ray

    zoo = _bigger_zoo(demo_zoo, tmp_path / "zoo")
    target = _targets(demo_zoo)[0]
    clean = run_scan(ScanSettings(zoo=zoo, targets=[target], out=str(tmp_path / "clean"), progress=False))
    out = tmp_path / "disturbed"
    killed, scan_done = [], threading.Event()

    def killer():   # until the scan ends, however slow a loaded machine makes it
        while not scan_done.is_set() and not killed:
            if len(list((out / "results").rglob("*.json"))) >= 3:
                names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["name"].startswith("sctd-shard-")]
                if names:
                    pid = int(ray.get(ray.get_actor(names[0]).ping.remote()).rsplit(":", 1)[1])
                    os.kill(pid, signal.SIGKILL)  # the worker process dies mid-shard
                    killed.append(pid)
            time.sleep(0.05)
    th = threading.Thread(target=killer)
    th.start()
    try:
        res = run_scan(ScanSettings(zoo=zoo, targets=[target], out=str(out), workers=2, progress=False))
    finally:
        scan_done.set()
        th.join()
    assert killed, "no worker was killed: the scan ended too soon"
    assert res.errors == 0
    _close(_scores(res.ranking), _scores(clean.ranking))


def test_a_lost_worker_whose_replacement_never_starts_leaves_its_teachers_to_the_others(
        demo_zoo, ray_local, tmp_path, monkeypatch):
    """A node dies and no new one comes (capacity gone): the other worker scores the lost one's
    teachers; the scan neither waits forever nor counts a death against a teacher."""
    import ray

    from sctd_ray.assess import scan as scan_mod

    class ReplacementThatNeverStarts(scan_mod.ShardActor):
        """A replacement (``...-r1``) waits in its constructor as one does for a GPU node that
        never comes (a class local to the test: Ray's workers cannot import this module)."""

        def __init__(self, *args):
            import time

            import ray

            if "-r" in (ray.get_runtime_context().get_actor_name() or ""):
                time.sleep(3600)
            super().__init__(*args)

    monkeypatch.setattr(scan_mod, "ShardActor", ReplacementThatNeverStarts)
    zoo = _bigger_zoo(demo_zoo, tmp_path / "zoo", copies=8)
    out = tmp_path / "run"
    killed, said, outcome = [], [], {}

    def scan():
        try:
            outcome["res"] = run_scan(ScanSettings(zoo=zoo, targets=[_targets(demo_zoo)[0]], out=str(out),
                                                   workers=2, progress=False), log=said.append)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e
    th = threading.Thread(target=scan, daemon=True)
    th.start()
    deadline = time.time() + 300
    while th.is_alive() and not killed and time.time() < deadline:
        if len(list((out / "results").rglob("*.json"))) >= 2:
            names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                           if a["name"].startswith("sctd-shard-"))
            if names:
                pid = int(ray.get(ray.get_actor(names[0]).ping.remote()).rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    th.join(timeout=300)
    assert killed, "no worker was killed: the scan ended too soon"
    assert not th.is_alive(), f"the scan waited for a replacement that never started: {said[-3:]}"
    assert "error" not in outcome, outcome
    res = outcome["res"]
    teachers = len(list((Path(zoo) / "teachers").iterdir()))
    assert res.errors == 0 and len(res.ranking) == len(set(res.ranking["teacher_id"])) == teachers
    assert any("lost" in line and "the other workers take its teachers" in line for line in said), said


def test_workers_that_cannot_start_give_error_rows_with_the_reason(demo_zoo, ray_local, tmp_path, monkeypatch):
    """A worker constructor that always fails (a broken image, a bug): the scan ends, every
    teacher an error row naming the exception, not Ray's "creation task" header; no retry loop."""
    from sctd_ray.assess import scan as scan_mod

    class Broken(scan_mod.ShardActor):
        def __init__(self, *args):
            raise RuntimeError("planted: no worker starts")

    monkeypatch.setattr(scan_mod, "ShardActor", Broken)
    res = run_scan(ScanSettings(zoo=demo_zoo, targets=[_targets(demo_zoo)[0]], out=str(tmp_path / "run"),
                                workers=2, progress=False), log=lambda line: None)
    assert res.errors == len(res.ranking) == 8
    assert res.ranking["error"].str.contains("raised RuntimeError: planted: no worker starts").all()


def test_interrupted_driver_resumes_without_rescoring(demo_zoo, tmp_path):
    zoo = _bigger_zoo(demo_zoo, tmp_path / "zoo")
    target = _targets(demo_zoo)[0]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sctd_ray.cli", "assess", "--zoo", zoo, "--target", target,
           "--out", str(out), "--workers", "1", "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((out / "results").rglob("*.json"))) < 4:
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and its local Ray die at once
    p.wait()
    before = {f: f.read_bytes() for f in (out / "results").rglob("*.json")}
    assert 4 <= len(before) < 32
    p2 = subprocess.run(cmd[:-1] + ["--resume", "--quiet"], capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stderr
    assert "WARNING" not in p2.stderr   # --quiet: no progress bar, and no warnings from Ray
    after = {f: f.read_bytes() for f in (out / "results").rglob("*.json")}
    assert len(after) == 32
    assert all(after[f] == data for f, data in before.items())  # finished pairs never rescored
    resumed = pd.read_parquet(out / "ranking.parquet")
    fresh = run_scan(ScanSettings(zoo=zoo, targets=[target], out=str(tmp_path / "fresh"), progress=False))
    _close(_scores(resumed), _scores(fresh.ranking))
    assert list(resumed.sort_values(["rank"])["teacher_id"]) == list(fresh.ranking.sort_values(["rank"])["teacher_id"])



def test_the_driver_and_the_cli_never_import_torch(demo_zoo, tmp_path):
    """torch (~2 s to import on 2 cores) loads only where teachers run: in the actors. The
    ``sctd`` command's start, ``sctd zoo list`` and a whole scan's driver go without it."""
    code = f"""
import sys
from sctd_ray.cli import build_parser, main
build_parser()
assert main(["zoo", "list", {demo_zoo!r}]) == 0
rc = main(["assess", "--zoo", {demo_zoo!r}, "--target", {_targets(demo_zoo)[0]!r},
           "--out", {str(tmp_path / "run")!r}, "--workers", "1", "--quiet"])
print("rc", rc, "torch" in sys.modules, "timm" in sys.modules)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "rc 0 False False"
    ranking = pd.read_parquet(tmp_path / "run" / "ranking.parquet")
    assert len(ranking) == 8 and set(ranking["status"]) == {"ok"}



def test_reading_a_target_starts_no_actors(demo_zoo, ray_local):
    """Ray 2.60's default Parquet reader starts a pool of footer-reading actors for every read
    (~2.3 s per target on 2 cores, 32 actors here); a scan reads its targets with tasks only."""
    import ray._private.state as ray_state   # the GCS actor table (the state API needs a dashboard)

    from sctd_ray.data.ray_data import materialize_target

    target = _targets(demo_zoo)[0]
    materialize_target(target)                # Ray Data's own actors start on its first use
    before = set(ray_state.actors())
    again = materialize_target(target)
    started = [a["ActorClassName"] for k, a in ray_state.actors().items() if k not in before]
    assert again.num_rows > 0 and started == []


def test_a_materialised_target_waits_for_its_blocks(demo_zoo, ray_local):
    """Ray Data's ``to_numpy_refs()`` gives refs of tasks (block -> array) that each need a CPU;
    the shard actors created next take every CPU and would wait for them forever (a scan hung
    in ~1 of 8 runs). The reader returns only when every block is computed."""
    import ray

    from sctd_ray.data.ray_data import materialize_target

    mat = materialize_target(_targets(demo_zoo)[0])
    ready, pending = ray.wait(mat.block_refs, num_returns=len(mat.block_refs), timeout=0, fetch_local=False)
    assert len(ready) == len(mat.block_refs) and not pending


def _photo_folder(root, n=300, grey=270, seed=0):
    """An ImageFolder target as photographs come: of several sizes, the first ``grey`` of them
    grey (more than one decode batch of 256), the rest in colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = [(24, 32), (32, 24), (150, 200), (25, 25)][i % 4]
        im = Image.fromarray(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), np.uint8)).resize((w, h))
        path = root / "train" / ("a" if i < n // 2 else "b") / f"{i:03d}.jpg"   # read in this order
        path.parent.mkdir(parents=True, exist_ok=True)
        (im.convert("L") if i < grey else im).save(path, quality=90)
    return str(root)


def test_ray_data_decodes_a_target_as_load_target_does(ray_local, tmp_path):
    """The scan's Ray Data reader and the in-process reader give the same images: one bounded
    square size, RGB although the first image is grey (a second pass over the grey blocks)."""
    from sctd_ray.data.ray_data import materialize_target, probe_target, target_blocks

    uri = _photo_folder(tmp_path / "photos")
    task = load_target(uri, splits=("train",), max_side=20)
    mat = materialize_target(uri, probe=probe_target(uri, max_side=20))
    blocks, labels = target_blocks(mat)
    scanned = np.concatenate(blocks)
    assert scanned.shape == task.splits["train"].images.shape == (300, 20, 20, 3)
    key = lambda images, ids: sorted((int(c), im.tobytes()) for im, c in zip(images, ids))  # noqa: E731
    assert key(scanned, labels) == key(task.splits["train"].images, task.splits["train"].labels)
    assert mat.fingerprint == task.fingerprints["train"]   # the same images and labels, one hash



def test_a_thumbnail_sorted_first_that_shrinks_a_split_is_named(ray_local, tmp_path):
    """The first image fixes the size a split is decoded to: a thumbnail sorted before a folder
    of larger images shrinks them all, which the scan says (naming it), not silently."""
    from PIL import Image

    from sctd_ray.data.ray_data import materialize_target, probe_target

    root = tmp_path / "t"
    for i in range(6):
        path = root / "train" / "ab"[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 48), 20 * i).save(path)
    assert materialize_target(str(root)).note == ""
    Image.new("L", (8, 8)).save(root / "train" / "a" / "0-thumb.png")
    note = materialize_target(str(root)).note
    assert "decoded at 8x8 px" in note and "train/a/0-thumb.png" in note and "6 of 7 images" in note
    assert materialize_target(str(root), probe=probe_target(str(root), max_side=8)).note == ""   # the cap's


@pytest.mark.parametrize("folder", ["what?", "q?x=1", "tab\tname"])
def test_a_parquet_target_in_a_folder_with_an_odd_name_is_read(ray_local, tmp_path, folder):
    """Ray Data's read_parquet takes a '?' in a path for a URL query ("no files found", then
    a KeyError traceback from the scan) and drops a tab from it (FileNotFoundError)."""
    from sctd_ray.data.ray_data import materialize_target, target_blocks
    from sctd_ray.data.targets import write_target

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 12, 12, 1), dtype=np.uint8)
    uri = str(tmp_path / folder)
    write_target(open_store(uri), {"train": images}, {"train": ["a", "b", "c"] * 2})
    mat = materialize_target(uri)
    _, labels = target_blocks(mat)
    assert mat.name == folder and mat.class_names == ["a", "b", "c"] and mat.num_rows == 6
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]

def test_the_decode_size_grows_with_the_largest_teacher_input():
    from sctd_ray.assess.scan import decode_max_side
    from sctd_ray.data.images import DECODE_MAX_SIDE

    sizes = [[3, 224, 224], [1, 28, 28], None]
    assert decode_max_side(pd.DataFrame({"input_size": sizes})) == DECODE_MAX_SIDE
    assert decode_max_side(pd.DataFrame({"input_size": sizes + [[3, 600, 600]]})) == 600


def test_bad_teachers_become_error_rows(demo_zoo, ray_local, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo, ignore=shutil.ignore_patterns("manifest.parquet"))
    teachers = zoo / "teachers"
    good = sorted(p.name for p in teachers.iterdir())
    shutil.copytree(teachers / good[0], teachers / "corrupt")
    w = teachers / "corrupt" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:4000])
    shutil.copytree(teachers / good[0], teachers / "mismatch")
    cfg = json.loads((teachers / "mismatch" / "config.json").read_text())
    cfg["num_classes"] += 2
    cfg["label_names"] += ["x", "y"]
    (teachers / "mismatch" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(teachers / good[1], teachers / "noconfig")
    (teachers / "noconfig" / "config.json").unlink()
    # a manifest that still lists the corrupt teacher as fine: the worker must catch it
    assert main(["zoo", "index", str(zoo)]) == 0
    w.write_bytes(b"\0" * 64)
    code = main(["assess", "--zoo", str(zoo), "--target", _targets(demo_zoo)[0],
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 1  # finished, with error rows
    df = pd.read_parquet(tmp_path / "run" / "ranking.parquet")
    err = df[df.status == "error"].set_index("teacher_id")["error"]
    assert set(err.index) == {"corrupt", "mismatch", "noconfig"}
    assert "corrupt" in err["corrupt"] and "shape mismatch" in err["mismatch"] and "config.json is missing" in err["noconfig"]
    assert (df[df.status == "ok"]["teacher_id"].nunique()) == len(good)
    assert df[df.status == "ok"][list(NAMES)].notna().all().all()
    printed = capsys.readouterr().out
    assert "error  corrupt" in printed


def test_unreachable_s3_and_bad_credentials_fail_fast(demo_zoo, s3, s3_bucket, tmp_path):
    target = _targets(demo_zoo)[0]
    env = {**os.environ, **s3.env()}
    cases = [
        (["--zoo", "s3://zoo/x", "--s3-endpoint", "http://127.0.0.1:1"], env, "cannot reach"),
        (["--zoo", f"{s3_bucket}/zoo"], {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "credentials"),
    ]
    for extra, e, needle in cases:
        p = subprocess.run([sys.executable, "-m", "sctd_ray.cli", "assess", *extra, "--target", target,
                            "--out", str(tmp_path / "run"), "--quiet"],
                           capture_output=True, text=True, env=e, timeout=120)
        assert p.returncode == 2, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0].lower(), p.stderr
        assert "not-the-secret" not in p.stderr


def test_an_unreachable_cluster_is_one_line(demo_zoo, tmp_path):
    """--address or RAY_ADDRESS where nothing listens, or where a web server listens instead of
    a Ray head: one line and exit 2 within seconds (Ray alone retries the first for minutes,
    the second for ~12 minutes, deaf to SIGTERM); a malformed address, or the dashboard's
    http:// address that `ray job submit` takes, likewise."""
    import http.server
    import socket
    import threading

    with socket.socket() as sock:          # a loopback port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    web_port = web.server_address[1]
    argv = [sys.executable, "-m", "sctd_ray.cli", "assess", "--zoo", demo_zoo, "--target",
            _targets(demo_zoo)[0], "--out", str(tmp_path / "run"), "--quiet"]
    cases = [(["--address", f"127.0.0.1:{port}"], {}, "cannot reach the Ray cluster"),
             (["--address", f"ray://127.0.0.1:{port}"], {}, "the Ray Client (ray://) is not supported"),
             ([], {"RAY_ADDRESS": f"127.0.0.1:{port}"}, "cannot reach the Ray cluster"),
             (["--address", "head-node"], {}, "expected HOST:PORT"),
             (["--address", f"127.0.0.1:{web_port}"], {}, "answers, but not as a Ray cluster"),
             ([], {"RAY_ADDRESS": "http://127.0.0.1:8265"}, "RAY_ADDRESS 'http://127.0.0.1:8265' is a dashboard address")]
    try:
        for extra, env, needle in cases:
            p = subprocess.run(argv + extra, capture_output=True, text=True,
                               env={**os.environ, **env}, timeout=120)
            assert p.returncode == 2, p.stderr
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and needle in lines[0], p.stderr
    finally:
        web.shutdown()
    assert not (tmp_path / "run" / "ranking.parquet").exists()


def test_no_address_starts_the_embedded_ray_not_a_running_cluster(monkeypatch):
    """Without --address or RAY_ADDRESS, sctd starts its own local Ray: `ray.init()` alone
    would join a cluster that `ray start` left running on this machine, with that cluster's
    environment and credentials."""
    import ray

    from sctd_ray.assess import scan

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    scan.ensure_ray(None)
    assert calls and calls[0]["address"] == "local"


def test_sigterm_while_ray_starts_is_an_interruption_not_a_silent_exit(monkeypatch):
    """`ray.init` installs its own SIGTERM handler (sys.exit(15)) while it starts: a `kill` or
    `ray job stop` in those seconds ended sctd with status 15 and no word."""
    import os
    import signal
    import sys
    import time

    import ray

    from sctd_ray.assess import scan

    def init_interrupted_by_sigterm(**kw):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))   # what Ray does
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    saved = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init_interrupted_by_sigterm)
    monkeypatch.setattr(scan, "_shutdown_quietly", lambda ray: None)
    try:
        with pytest.raises(KeyboardInterrupt):     # cli.main: "interrupted ...", exit 130
            scan.ensure_ray(None)
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_existing_run_needs_resume(demo_zoo, ray_local, tmp_path):
    t = _targets(demo_zoo)[0]
    run_scan(ScanSettings(zoo=demo_zoo, targets=[t], out=str(tmp_path / "r"), progress=False,
                          teachers=["fm-all-resnet"]))
    with pytest.raises(SctdError, match="--resume"):
        run_scan(ScanSettings(zoo=demo_zoo, targets=[t], out=str(tmp_path / "r"), progress=False))


@pytest.mark.parametrize("flag,value,match", [("--batch-size", "0", "--batch-size must be at least 1"),
                                              ("--workers", "0", "--workers must be at least 1"),
                                              ("--metrics", "sctd,foo", "unknown metric"),
                                              ("--rank-by", "leep", "is not among --metrics")])
def test_bad_settings_are_one_line_before_anything_runs(demo_zoo, tmp_path, capsys, flag, value, match):
    argv = ["assess", "--zoo", demo_zoo, "--target", _targets(demo_zoo)[0], "--out", str(tmp_path / "run"),
            flag, value] + (["--metrics", "sctd"] if flag == "--rank-by" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "run").exists()


def test_a_bad_target_is_one_line_before_ray_starts(demo_zoo, tmp_path, capsys, monkeypatch):
    """What can be checked without Ray (the target exists, is a target, has the split, its
    first image decodes) fails in one line before Ray starts (it takes 5-10 s to start)."""
    import sctd_ray.assess.scan as scan

    monkeypatch.setattr(scan, "ensure_ray", lambda *a: pytest.fail("Ray started before the target was checked"))
    not_parquet = tmp_path / "not-parquet"
    not_parquet.mkdir()
    (not_parquet / "train.parquet").write_bytes(b"garbage")
    no_train = tmp_path / "no-train"
    no_train.mkdir()
    shutil.copy(Path(_targets(demo_zoo)[0]) / "test.parquet", no_train)
    bad_first = tmp_path / "bad-first"
    shutil.copytree(_targets(demo_zoo)[0], bad_first)
    df = pd.read_parquet(bad_first / "train.parquet")
    df.loc[0, "image"] = b"not an image"
    df.to_parquet(bad_first / "train.parquet")
    no_label = tmp_path / "no-label"
    shutil.copytree(_targets(demo_zoo)[0], no_label)
    df = pd.read_parquet(no_label / "train.parquet")
    df["label"] = df["label"].astype(object)
    df.loc[3, "label"] = None       # not a class called "None"
    df.to_parquet(no_label / "train.parquet")
    cases = [(tmp_path / "nowhere", "not a target task"), (not_parquet, "not a Parquet file"),
             (no_train, "missing split 'train'"), (bad_first, "row 0"),
             (no_label, "1 row(s) without a label; the first is row 3")]
    for target, needle in cases:
        argv = ["assess", "--zoo", demo_zoo, "--target", str(target), "--out", str(tmp_path / "run"), "--quiet"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert main(["assess", "--zoo", demo_zoo, "--target", _targets(demo_zoo)[0], "--target",
                 str(tmp_path / "x" / Path(_targets(demo_zoo)[0]).name), "--out", str(tmp_path / "run")]) == 2
    assert "two targets share a name" in capsys.readouterr().err


def test_bad_target_data_is_one_line_from_the_ray_data_pass(demo_zoo, ray_local, tmp_path, capsys):
    """Read and decoded by Ray Data: a corrupt image, a file that is not Parquet and missing
    columns each end the scan with one line naming them (no Ray task traceback)."""
    target = tmp_path / "bad"
    shutil.copytree(_targets(demo_zoo)[0], target)
    df = pd.read_parquet(target / "train.parquet")
    df.loc[5, "image"] = b"not a png"
    df.loc[7, "image"] = b"nor this"
    df.to_parquet(target / "train.parquet")
    argv = ["assess", "--zoo", demo_zoo, "--target", str(target), "--out", str(tmp_path / "run"), "--quiet"]
    for expected in ("2 undecodable image(s) in", "not a Parquet file", "missing column(s) ['image']"):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1] and "Traceback" not in "\n".join(err), err
        if expected.startswith("2 undecodable"):   # the first one's row, not a Python repr
            assert "split 'train' row 5: not an image format" in err[-1] and "BytesIO" not in err[-1]
            (target / "train.parquet").write_bytes(b"garbage")
        elif expected == "not a Parquet file":
            df[["label"]].to_parquet(target / "train.parquet")


def test_a_blank_label_is_found_in_the_ray_data_pass(demo_zoo, ray_local, tmp_path, capsys):
    """A blank label in a split written without statistics (nothing for the probe to read in
    its footer) is caught as the split is decoded: one line naming its row, not a class " "."""
    target = tmp_path / "fm-mix5"
    shutil.copytree(_targets(demo_zoo)[0], target)
    df = pd.read_parquet(target / "train.parquet")
    df.loc[4, "label"] = "  "
    df.to_parquet(target / "train.parquet", write_statistics=False)
    assert main(["assess", "--zoo", demo_zoo, "--target", str(target), "--out", str(tmp_path / "run"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "train.parquet: 1 row(s) without a label; the first is row 4" in err[-1], err


def test_students_are_not_scored_on_their_own_target(demo_zoo, ray_local, tmp_path):
    """A student written back by `sctd distill` has seen its target's labels: it is left out of
    that target's ranking, found by the target's name or, under another name, by the train
    split's fingerprint in its card."""
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo, ignore=shutil.ignore_patterns("manifest.parquet"))
    fm_mix5 = load_target(_targets(demo_zoo)[0])
    cards = {"student-fm-mix5": {"target": "fm-mix5"},
             "student-renamed": {"target": "my-copy-of-fm", "target_fingerprints": fm_mix5.fingerprints},
             # exported by this run's own distillation before an interrupt: in no ranking of it
             "student-of-this-run": {"target": "elsewhere", "search": str(tmp_path / "r" / "distill" / "x")}}
    for sid, card in cards.items():
        student = zoo / "teachers" / sid
        shutil.copytree(zoo / "teachers" / "fm-all-resnet", student)
        cfg = json.loads((student / "config.json").read_text())
        cfg["source_task"] = {"distilled": {**card, "teacher_id": "fm-all-resnet"}}
        (student / "config.json").write_text(json.dumps(cfg))
    said = []
    res = run_scan(ScanSettings(zoo=str(zoo), targets=_targets(demo_zoo), out=str(tmp_path / "r"),
                                progress=False, teachers=["fm-all-resnet", *cards]), log=said.append)
    assert any("2 student(s) distilled for fm-mix5 left out of its ranking" in line and
               "student-fm-mix5, student-renamed" in line for line in said), said   # not silently
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["targets"]["fm-mix5"]["fingerprint"] == fm_mix5.fingerprints["train"]   # one fingerprint
    assert run["targets"]["fm-mix5"]["students_left_out"] == ["student-fm-mix5", "student-renamed"]
    assert run["targets"]["dg-high5"]["students_left_out"] == []
    from sctd_ray.report import collect_report_data
    from sctd_ray.report.render import render_html

    page = render_html(collect_report_data(str(tmp_path / "r"), bridges=False))
    assert "Left out of this ranking: 2 students distilled on this target" in page   # the report says so too
    pairs = set(zip(res.ranking["target"], res.ranking["teacher_id"]))
    assert not {("fm-mix5", "student-fm-mix5"), ("fm-mix5", "student-renamed")} & pairs   # seen its labels
    assert {("dg-high5", "student-fm-mix5"), ("dg-high5", "student-renamed"), ("fm-mix5", "fm-all-resnet")} <= pairs
    assert "student-of-this-run" not in set(res.ranking["teacher_id"])
    assert any("1 student(s) exported by this run's own distillation are not scored" in line for line in said)


@pytest.mark.parametrize("flag", ["--teachers", "--metrics"])
def test_a_name_list_option_is_stripped_and_an_empty_one_refused(flag, tmp_path, capsys, monkeypatch):
    """`--teachers "a, b"` means a and b (was ' b', "not in the zoo"); `--teachers ,` is one line
    and exit 2 before any work (was: every teacher scored; `--metrics ,` blamed --rank-by)."""
    from sctd_ray import cli

    assert cli._id_list(flag, " a, b,,a ") == ("a", "b")
    monkeypatch.setattr("sctd_ray.assess.scan.run_scan", lambda s, **kw: pytest.fail("scan started"))
    assert main(["assess", "--zoo", str(tmp_path), "--target", str(tmp_path), "--out",
                 str(tmp_path / "r"), flag, " , "]) == 2
    assert f"{flag} names nothing" in capsys.readouterr().err


def test_a_left_out_student_is_named_once():
    """A student of this run distilled on the scan's only target is named once (as distilled on
    it), not again as this run's export; one left out of only some targets is named twice."""
    from sctd_ray.assess.scan import _left_out_lines

    lines = _left_out_lines({"dg-high5": ["s1"]}, {"s1"}, ["dg-high5"])
    assert len(lines) == 1 and "distilled for dg-high5" in lines[0]
    lines = _left_out_lines({"dg-high5": ["s1"]}, {"s1", "s2"}, ["dg-high5", "fm-mix5"])
    assert "2 student(s) exported by this run's own distillation" in lines[1] and "s1, s2" in lines[1]
    assert _left_out_lines({}, set(), ["dg-high5"]) == []


def test_an_out_folder_that_cannot_be_written_is_one_line_before_ray(demo_zoo, tmp_path, monkeypatch):
    """A run folder under a file (or read-only, or in a bucket the keys may not write): one line
    before Ray starts, not an error per teacher after every teacher was scored."""
    from sctd_ray.assess import scan

    (tmp_path / "afile").write_text("not a folder")
    started = []
    monkeypatch.setattr(scan, "ensure_ray", lambda *a, **k: started.append(1) or pytest.fail("Ray started"))
    with pytest.raises(SctdError, match="Not a directory|not a folder"):
        scan.run_scan(scan.ScanSettings(zoo=demo_zoo, targets=[_targets(demo_zoo)[0]],
                                        out=str(tmp_path / "afile" / "run")))
    assert not started
