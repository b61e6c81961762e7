"""The shard worker without Ray: finalising one teacher overlaps the next one's forward when
asked to (the default on a GPU), with the same rows as one call at a time (issue 3/4)."""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sctd_ray.assess import worker as worker_mod
from sctd_ray.assess.worker import ShardWorker, TargetData
from sctd_ray.data.targets import load_target
from sctd_ray.errors import TeacherError
from sctd_ray.metrics import NAMES
from sctd_ray.zoo.store import open_store


def _target(zoo: str, name: str = "fm-mix5") -> TargetData:
    task = load_target(str(Path(zoo) / "targets" / name), splits=("train",))
    split = task.splits["train"]
    return TargetData(task.name, list(task.class_names), split.images, split.labels)


def _teachers(zoo: str) -> list[str]:
    return sorted(p.name for p in (Path(zoo) / "teachers").iterdir())[:3]


def _worker(zoo, tmp_path, overlap: bool) -> ShardWorker:
    return ShardWorker(open_store(zoo), open_store(str(tmp_path / ("o" if overlap else "s"))),
                       [_target(zoo)], NAMES, batch_size=128, device="cpu", overlap=overlap)


def _scores(rows):
    return {r["teacher_id"]: tuple(r[m] for m in NAMES) for r in rows}


def test_two_concurrent_calls_give_the_rows_of_one_call_at_a_time(demo_zoo, tmp_path):
    tids = _teachers(demo_zoo)
    seq = _worker(demo_zoo, tmp_path, overlap=False)
    ref = _scores([r for t in tids for r in seq.score(t)])
    par = _worker(demo_zoo, tmp_path, overlap=True)
    with ThreadPoolExecutor(2) as pool:   # the scan's actor runs two calls at once
        futs = [pool.submit(par.score, t, None, None, [(u, None) for u in tids[i + 1:i + 2]])
                for i, t in enumerate(tids)]
        rows = [r for f in futs for r in f.result()]
    assert {r["status"] for r in rows} == {"ok"}
    got = _scores(rows)
    assert got.keys() == ref.keys()
    for t in ref:
        np.testing.assert_allclose(got[t], ref[t], rtol=1e-12, err_msg=t)


@pytest.mark.parametrize("overlap", [True, False])
def test_next_teacher_runs_while_the_last_one_finalises_only_with_overlap(demo_zoo, tmp_path,
                                                                         monkeypatch, overlap):
    """With overlap, teacher B's forward starts while A is still being finalised; without it,
    B waits for A's whole call (the device lock covers finalising)."""
    a, b = _teachers(demo_zoo)[:2]
    a_collecting, b_collecting = threading.Event(), threading.Event()
    seen = {}
    real_collect, real_finalise = worker_mod.collect_stats, worker_mod.finalise

    def collect(runner, *args, **kw):
        tid = runner.teacher.config.teacher_id
        (a_collecting if tid == a else b_collecting).set()
        return real_collect(runner, *args, **kw)

    def finalise(tid, stats):
        if tid == a:   # waits for B's forward; without overlap it cannot start, and this gives up
            seen[a] = b_collecting.wait(timeout=30 if overlap else 1)
        return real_finalise(tid, stats)

    monkeypatch.setattr(worker_mod, "collect_stats", collect)
    monkeypatch.setattr(worker_mod, "finalise", finalise)
    w = _worker(demo_zoo, tmp_path, overlap=overlap)
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(w.score, a, None, None, [(b, None)])
        assert a_collecting.wait(timeout=60)   # A holds the device lock before B is submitted
        fb = pool.submit(w.score, b)
        rows = fa.result() + fb.result()
    assert seen[a] is overlap
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_a_teacher_that_cannot_be_finalised_is_an_error_row_with_overlap(demo_zoo, tmp_path,
                                                                        monkeypatch):
    a, b = _teachers(demo_zoo)[:2]
    real_finalise = worker_mod.finalise

    def finalise(tid, stats):
        if tid == a:
            raise TeacherError(tid, "cannot score: planted")
        return real_finalise(tid, stats)

    monkeypatch.setattr(worker_mod, "finalise", finalise)
    w = _worker(demo_zoo, tmp_path, overlap=True)
    with ThreadPoolExecutor(2) as pool:
        rows = pool.submit(w.score, a).result() + pool.submit(w.score, b).result()
    assert [(r["teacher_id"], r["status"]) for r in rows] == [(a, "error"), (b, "ok")]
    assert rows[0]["error"] == "cannot score: planted" and rows[0]["architecture"]


class _Cycle:
    """Wraps a loader: each model it returns is kept alive by a reference cycle."""

    def __init__(self, store):
        from sctd_ray.zoo.loading import load_teacher

        self.load, self.store, self.models = load_teacher, store, []

    def __call__(self, tid, sha, reuse=None):
        teacher = self.load(self.store, tid, reuse=reuse)
        object.__setattr__(teacher.model, "_cycle", [teacher.model])
        self.models.append(weakref.ref(teacher.model))
        return teacher


def _watched_worker(demo_zoo, tmp_path, monkeypatch, cycle: bool, **kw):
    """A worker whose full garbage collections are recorded (the list returned), loading
    teachers that a reference cycle keeps alive when ``cycle``."""
    import gc

    calls = []
    real = gc.collect
    monkeypatch.setattr(worker_mod.gc, "collect", lambda *a: calls.append(a) or real(*a))
    store = open_store(demo_zoo)
    loader = _Cycle(store) if cycle else None
    w = ShardWorker(store, open_store(str(tmp_path / "o")), [_target(demo_zoo)], ("leep",),
                    device="cpu", loader=loader, **kw)
    return calls, loader, w


@pytest.mark.parametrize("cycle", [False, True])
def test_a_scored_teacher_is_freed_with_a_full_collection_only_when_a_cycle_needs_it(
        demo_zoo, tmp_path, monkeypatch, cycle):
    """A full garbage collection holds the GIL for ~0.2 s (starving the thread that feeds the
    GPU): the worker runs one only when a reference cycle keeps the model it just used."""
    import gc

    calls, loader, w = _watched_worker(demo_zoo, tmp_path, monkeypatch, cycle, reuse_models=False)
    gc.disable()   # no automatic collection may free the model instead
    try:
        rows = w.score(_teachers(demo_zoo)[0])
    finally:
        gc.enable()
    assert rows[0]["status"] == "ok"
    assert bool(calls) is cycle
    if cycle:
        assert loader.models[0]() is None   # the cycle was collected before the call returned
    assert set(w.usage()["phase_seconds"]) == {"load", "wait_for_teacher", "forward_and_stats",
                                               "finalise", "free_memory"}


def test_a_batch_that_does_not_fit_is_halved_for_that_teacher(demo_zoo, tmp_path, monkeypatch):
    """Out of device memory: the teacher's statistics restart at half the batch (the default
    is large on a GPU), its scores are the same, and the next teacher starts at full size."""
    import torch

    a, b = _teachers(demo_zoo)[:2]
    ref = _worker(demo_zoo, tmp_path / "ref", overlap=False)
    expected = _scores(ref.score(a) + ref.score(b))
    sizes, failures = [], [2]
    real_collect, real_batches = worker_mod.collect_stats, ShardWorker._batches

    def batches(self, t, bs=None, pre=None):
        sizes.append(bs or self.batch_size)
        return real_batches(self, t, bs, pre)

    def collect(runner, *args, **kw):
        if runner.teacher.config.teacher_id == a and failures[0]:
            failures[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        return real_collect(runner, *args, **kw)

    monkeypatch.setattr(ShardWorker, "_batches", batches)
    monkeypatch.setattr(worker_mod, "collect_stats", collect)
    w = _worker(demo_zoo, tmp_path, overlap=False)
    got = _scores(w.score(a) + w.score(b))
    assert sizes == [128, 64, 32, 128] and w.usage()["smaller_batches"] == 2
    for t in expected:
        np.testing.assert_allclose(got[t], expected[t], rtol=1e-9, err_msg=t)


def test_a_teacher_that_never_fits_is_an_error_row(demo_zoo, tmp_path, monkeypatch):
    import torch

    def collect(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (planted)")

    monkeypatch.setattr(worker_mod, "collect_stats", collect)
    w = ShardWorker(open_store(demo_zoo), open_store(str(tmp_path / "o")), [_target(demo_zoo)],
                    ("leep",), batch_size=4, device="cpu")
    row = w.score(_teachers(demo_zoo)[0])[0]
    assert row["status"] == "error" and row["error"].startswith("forward failed: OutOfMemoryError")
    assert w.usage()["smaller_batches"] == 2          # 4 -> 2 -> 1, then it gives up


def test_a_forward_that_raises_a_type_error_is_that_teachers_error_row(demo_zoo, tmp_path):
    """A model_args value timm takes at construction but the forward cannot use (a string
    drop_rate raises TypeError, not RuntimeError): the teacher's error row with the reason, not
    an exception out of ``score`` (which the scan could only report as Ray's call header)."""
    import json
    import shutil

    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo, ignore=shutil.ignore_patterns("manifest.parquet"))
    tid = "fm-tops-effnet"
    cfg_path = zoo / "teachers" / tid / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_args"]["drop_rate"] = "x"
    cfg_path.write_text(json.dumps(cfg))
    w = ShardWorker(open_store(str(zoo)), open_store(str(tmp_path / "o")), [_target(str(zoo))],
                    ("leep",), batch_size=64, device="cpu")
    row = w.score(tid)[0]
    assert row["status"] == "error" and row["error"].startswith("forward failed: TypeError"), row


def test_the_default_batch_follows_the_device(demo_zoo, tmp_path):
    w = ShardWorker(None, open_store(str(tmp_path / "o")), [_target(demo_zoo)], device="cpu")
    assert w.batch_size == 256 and w.usage()["batch_size"] == 256


def test_target_is_resized_once_per_input_geometry_with_the_same_scores(demo_zoo, tmp_path):
    """Teachers of one input size and channel count share one resized copy of the target (the
    8 demo teachers have 3 geometries); scores equal resizing every batch for every teacher,
    and a cache budget the copy does not fit falls back to that."""
    from sctd_ray.zoo.loading import load_teacher

    teachers = sorted(p.name for p in (Path(demo_zoo) / "teachers").iterdir())
    geometries = {load_teacher(open_store(demo_zoo), t).preprocessing.geometry for t in teachers}
    assert len(geometries) == 3

    def run(cache_mb, sub):
        w = ShardWorker(open_store(demo_zoo), open_store(str(tmp_path / sub)), [_target(demo_zoo)], NAMES,
                        batch_size=16, device="cpu", resized_cache_mb=cache_mb)
        rows = [r for t in teachers for r in w.score(t)]
        assert [r["status"] for r in rows] == ["ok"] * len(teachers)
        return _scores(rows), w.usage()["resized_targets"]

    cached, builds = run(512, "c")
    per_batch, none = run(0, "p")
    assert builds == len(geometries) and none == 0
    for t in teachers:
        np.testing.assert_array_equal(cached[t], per_batch[t], err_msg=t)



def test_row_blocks_read_as_one_tensor_with_views_inside_a_block():
    import torch

    from sctd_ray.assess.worker import RowBlocks

    parts = [np.arange(n * 6, dtype=np.uint8).reshape(n, 2, 3) + 10 * i for i, n in enumerate((5, 0, 3, 7))]
    whole = np.concatenate(parts)
    rb = RowBlocks([torch.from_numpy(p) for p in parts])
    assert len(rb) == 15 and rb.device == torch.device("cpu")
    for a in range(16):
        for b in range(a, 17):
            np.testing.assert_array_equal(rb[a:b].numpy(), whole[a:b], err_msg=f"{a}:{b}")
    inside = rb[6:8]                      # rows 1-2 of the third block: no copy
    assert inside.data_ptr() == rb.blocks[1][1:3].data_ptr()
    with pytest.raises(IndexError):
        rb[0:10:2]
    joined = worker_mod._joined(parts)    # one tensor, filled block by block (GPU targets)
    np.testing.assert_array_equal(joined.numpy(), whole)


def test_a_target_in_read_only_blocks_is_batched_from_them_without_a_copy(demo_zoo, tmp_path):
    """A scan hands each worker the object store's read-only blocks: the worker batches
    straight from them (no private concatenated copy per worker, no warning about read-only
    arrays), and the rows equal those of the target as one array, whatever the block sizes."""
    import warnings

    whole = _target(demo_zoo)
    n = len(whole.labels)
    cuts = [0, 7, n // 2, n // 2 + 1, n]   # blocks of 7, ~n/2, 1 and the rest rows
    blocks = [whole.images[a:b].copy() for a, b in zip(cuts, cuts[1:])]
    for b in blocks:
        b.flags.writeable = False
    split = TargetData(whole.name, whole.class_names, blocks, whole.labels)
    teachers = _teachers(demo_zoo)

    def run(target, sub, cache_mb):
        w = ShardWorker(open_store(demo_zoo), open_store(str(tmp_path / sub)), [target], NAMES,
                        batch_size=64, device="cpu", resized_cache_mb=cache_mb)
        return w, _scores([r for t in teachers for r in w.score(t)])

    ref = run(whole, "whole", 512)[1]
    for cache_mb in (512, 0):             # resized once per geometry, or per batch from the blocks
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            w, got = run(split, f"blocks{cache_mb}", cache_mb)
        held = w._device_data[whole.name][0].blocks
        assert [h.data_ptr() for h in held] == [b.ctypes.data for b in blocks]
        for t in teachers:
            np.testing.assert_allclose(got[t], ref[t], rtol=1e-12, err_msg=t)


def _body_pairs(zoo: str):
    """Demo teachers by body key: same architecture and model arguments, other weights (and,
    for the EfficientNets, another head size)."""
    from sctd_ray.zoo.loading import body_key, read_config

    keys = {}
    for t in sorted(p.name for p in (Path(zoo) / "teachers").iterdir()):
        keys.setdefault(body_key(read_config(open_store(zoo), t)), []).append(t)
    return [ts for ts in keys.values() if len(ts) > 1]


def test_a_scored_teachers_model_serves_the_next_teacher_of_its_architecture(demo_zoo, tmp_path):
    """The next teacher of the same architecture and model arguments gets the last one's model
    (head resized when its class count differs) with its own weights copied in: the rows equal
    building every model afresh; a teacher of another architecture builds its own."""
    pairs = _body_pairs(demo_zoo)
    assert sorted(map(len, pairs)) == [2, 2]   # two ResNets (10 classes), two EfficientNets (10, 5)
    order = [pairs[0][0], pairs[0][1], "fm-inv-all-vit", pairs[1][0], pairs[1][1], pairs[1][0]]

    def run(reuse, sub):
        w = ShardWorker(open_store(demo_zoo), open_store(str(tmp_path / sub)), [_target(demo_zoo)], NAMES,
                        batch_size=64, device="cpu", reuse_models=reuse)
        rows = [w.score(t)[0] for t in order]
        assert [r["status"] for r in rows] == ["ok"] * len(order)
        return [tuple(r[m] for m in NAMES) for r in rows], w.usage()["models_reused"]

    reused, n = run(True, "r")
    fresh, none = run(False, "f")
    assert n == 3 and none == 0
    np.testing.assert_array_equal(np.array(reused), np.array(fresh))


@pytest.mark.parametrize("cycle", [False, True])
def test_a_parked_model_the_next_teacher_cannot_use_is_freed(demo_zoo, tmp_path, monkeypatch, cycle):
    """The parked model goes when the next teacher has another architecture, with a full
    collection only when a reference cycle keeps it."""
    import gc

    calls, _, w = _watched_worker(demo_zoo, tmp_path, monkeypatch, cycle)
    gc.disable()
    try:
        first = w.score("dg-all-resnet")
        assert not calls                      # parked, not freed
        first_model = w._parked[1]
        ref = weakref.ref(first_model)
        del first_model
        second = w.score("fm-inv-all-vit")    # another architecture: builds its own
    finally:
        gc.enable()
    assert first[0]["status"] == second[0]["status"] == "ok"
    assert bool(calls) is cycle and ref() is None and w.usage()["models_reused"] == 0


def test_a_teacher_whose_weights_fail_after_a_reused_model_is_an_error_row(demo_zoo, tmp_path):
    """Corrupt weights for a teacher that would reuse the parked model: an error row; the next
    teacher of that architecture still scores as it does alone."""
    import shutil

    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo, zoo)
    a, b = _body_pairs(demo_zoo)[0]
    shutil.copytree(zoo / "teachers" / b, zoo / "teachers" / "broken")
    data = (zoo / "teachers" / "broken" / "model.safetensors").read_bytes()
    (zoo / "teachers" / "broken" / "model.safetensors").write_bytes(data[: len(data) // 2])
    w = ShardWorker(open_store(str(zoo)), open_store(str(tmp_path / "o")), [_target(demo_zoo)], NAMES,
                    batch_size=64, device="cpu")
    rows = [w.score(t)[0] for t in (a, "broken", b)]
    alone = ShardWorker(open_store(str(zoo)), open_store(str(tmp_path / "p")), [_target(demo_zoo)], NAMES,
                        batch_size=64, device="cpu").score(b)[0]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"] and "corrupt" in rows[1]["error"]
    assert [rows[2][m] for m in NAMES] == [alone[m] for m in NAMES]
