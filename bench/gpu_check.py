"""GPU checks, without Ray (the engine and the shard worker run bare), in one run:

1. engine throughput vs pure forward for a resnet50 teacher at 224 in bf16  (goal >= 90%);
   with it, each score's update and finalise times (TransRate's class terms batched and one at
   a time), the engine with stats.PARALLEL_FINALISE, a 512-image few-shot target by the N x N
   and the D x D routes, and torch.profiler tables of the statistics' update and finalise
2. shared-kernel Sinkhorn, B=16384, K=1000, C=200, 100 iterations, float32  (goal < 100 ms)
3. the shard worker's loop (prefetch + forward + stats) over >= 20 resnet50-sized teachers held
   in host memory as safetensors bytes, two calls in flight as in the scan: the teachers' pure
   forward time over the loop's wall time, a lower bound on the GPU's busy fraction (goal >= 85%),
   and engine throughput in the scan vs pure forward throughput             (goal >= 90%);
   the overlapped loop's scores must equal the one-call-at-a-time loop's
4. (if the distillation module is present) an OT-distillation step vs a ce step on the GPU

    PYTHONPATH=. python bench/gpu_check.py [--quick] [--json OUT.json]
    PYTHONPATH=. python bench/gpu_check.py --smoke     # same code paths on the CPU, tiny sizes:
                                                       # run it before spending device time
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from engine_bench import synthetic_teacher, time_teacher  # noqa: E402

from sctd_ray import ot  # noqa: E402

DEVICE = "cuda"   # --smoke switches every check to the CPU at tiny sizes


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check_engine(samples: int, repeats: int, device: str = "cuda", arch: str = "resnet50",
                 size: int = 224) -> dict:
    teacher = synthetic_teacher(arch, 1000, size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (samples, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(samples) % 100
    out = {"samples": samples, **_timed_engine(teacher, images, labels, 100, device, repeats)}
    out.update(forward_img_s=samples / out["forward_s"], engine_img_s=samples / out["engine_s"])
    try:  # after the timings, which a failure here must not lose
        out["by_score_ms"] = score_breakdown(teacher, images, labels, 100, device, 512)
    except Exception as e:
        out["by_score_ms"] = f"error: {type(e).__name__}: {e}"
    out["parallel_finalise"] = _engine_parallel_finalise(teacher, images, labels, device, repeats)
    few = min(512, samples)
    out["few_shot"] = _engine_few_shot(teacher, images[:few], np.arange(few) % 10, device, repeats)
    try:
        out["update_profile"], out["finalise_profile"] = profile_stats(teacher, images, labels, 100,
                                                                       device, 512)
    except Exception as e:
        out["finalise_profile"] = f"error: {type(e).__name__}: {e}"
    return out


def _timed_engine(teacher, images, labels, num_classes, device, repeats) -> dict:
    """engine_bench's timing of one teacher (batch 512) as a dict."""
    f, e, upd, fin = time_teacher(teacher, images, labels, num_classes, device, 512, repeats)
    return {"forward_s": f, "engine_s": e, "engine_vs_forward": f / e, "update_s": upd,
            "finalise_s": fin}


def profile_stats(teacher, images, labels, num_classes, device, batch_size) -> tuple[str, str]:
    """torch.profiler's top operators (by device time on a GPU) of the statistics' updates over
    the whole target (teacher outputs computed beforehand) and of one finalise with all the
    scores: where the rest of the engine's gap lies."""
    from torch.profiler import ProfilerActivity, profile

    from sctd_ray.stats import TeacherStats

    runner, dtype, outs = _teacher_outputs(teacher, images, labels, device, batch_size)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.cuda else [])
    key = "self_cuda_time_total" if runner.cuda else "self_cpu_time_total"

    def updated():
        stats = TeacherStats(num_classes, runner.weight.to(dtype), device=runner.device, dtype=dtype)
        for feats, logits, yb in outs:
            stats.update(feats, logits, yb)
        return stats

    updated().compute()     # warm-up: kernels, the allocator, cuSOLVER's workspaces
    _sync()
    with profile(activities=acts) as prof_update:
        stats = updated()
        _sync()
    with profile(activities=acts) as prof_finalise:
        stats.compute()
        _sync()
    return tuple(p.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=48)
                 for p in (prof_update, prof_finalise))


def _engine_few_shot(teacher, images, labels, device, repeats) -> dict | str:
    """A few-shot target (512 images, 10 classes: fewer than resnet50's 2048 features): the
    engine with LogME, H-score and TransRate from the N x N Gram of the samples (the default)
    and from the D x D one (``metrics.row_gram_route`` off), in one run."""
    from sctd_ray import metrics

    out = {}
    default = metrics.row_gram_route
    try:
        for label, route in (("row_gram", default), ("feature_gram", lambda n, d: False)):
            metrics.row_gram_route = route
            out[label] = _timed_engine(teacher, images, labels, 10, device, repeats)
        return out
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"
    finally:
        metrics.row_gram_route = default


def _engine_parallel_finalise(teacher, images, labels, device, repeats) -> dict | str:
    """The same engine timing with ``stats.PARALLEL_FINALISE`` (LogME, H-score and TransRate's
    total on side streams at once), to compare with the default in the same run."""
    from sctd_ray import stats as stats_mod

    try:
        stats_mod.PARALLEL_FINALISE = True
        return _timed_engine(teacher, images, labels, 100, device, repeats)
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"
    finally:
        stats_mod.PARALLEL_FINALISE = False


def _teacher_outputs(teacher, images, labels, device, batch_size):
    """The teacher's runner, the statistics' dtype and its (features, logits, labels) batches over
    the whole target, computed once and kept on the device."""
    from sctd_ray.assess.engine import TeacherRunner

    runner = TeacherRunner(teacher, device)
    dtype = torch.float32 if runner.cuda else torch.float64
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    y = torch.from_numpy(labels).to(device)
    outs = [(*runner.forward(x[i:i + batch_size]), y[i:i + batch_size])
            for i in range(0, len(y), batch_size)]
    return runner, dtype, outs


def score_breakdown(teacher, images, labels, num_classes, device, batch_size) -> dict:
    """Each score alone: its update (over the whole target) and finalise times in ms, on the
    teacher's outputs computed once and kept on the device, so the next step knows where the
    engine's time goes."""
    from sctd_ray.metrics import NAMES
    from sctd_ray.stats import TeacherStats

    runner, dtype, outs = _teacher_outputs(teacher, images, labels, device, batch_size)
    sync = torch.cuda.synchronize if runner.cuda else (lambda: None)
    from sctd_ray import stats as stats_mod

    batched = stats_mod._batched_class_rates
    # TransRate again with its class rates one factorisation at a time (the route before
    # session 9), to compare with the batched one in the same run
    runs = [(name, name, batched) for name in NAMES]
    runs.append(("transrate_per_class", "transrate", lambda device: False))
    res = {}
    try:
        for label, name, route in runs:
            stats_mod._batched_class_rates = route
            best = None
            for _ in range(2):   # the first pass warms up kernels and the allocator
                stats = TeacherStats(num_classes, runner.weight.to(dtype), metrics=(name,),
                                     device=runner.device, dtype=dtype)
                sync()
                t0 = time.perf_counter()
                for feats, logits, yb in outs:
                    stats.update(feats, logits, yb)
                sync()
                t1 = time.perf_counter()
                stats.compute()
                sync()
                t2 = time.perf_counter()
                if best is None or t2 - t0 < best[0] + best[1]:
                    best = (t1 - t0, t2 - t1)
            res[label] = {"update_ms": 1000 * best[0], "finalise_ms": 1000 * best[1]}
    finally:
        stats_mod._batched_class_rates = batched
    return res


def check_sinkhorn(repeats: int, B: int = 16384, K: int = 1000, C: int = 200) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    p = torch.softmax(torch.randn(B, K, device=DEVICE, generator=g) * 3, 1)
    q = torch.softmax(torch.randn(B, C, device=DEVICE, generator=g) * 3, 1)
    M = torch.rand(K, C, device=DEVICE, generator=g) * 2
    ot.sinkhorn(p, q, M, eps=0.1, max_iter=100, tol=0.0)
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = ot.sinkhorn(p, q, M, eps=0.1, max_iter=100, tol=0.0)
        _sync()
        times.append(time.perf_counter() - t0)
    r64 = ot.sinkhorn(p[:256].double(), q[:256].double(), M.double(), eps=0.1, max_iter=100, tol=0.0)
    rel = ((r.cost[:256].double() - r64.cost).abs() / r64.cost.abs()).max().item()
    return {"B": B, "K": K, "C": C, "iterations": 100, "best_ms": 1000 * min(times),
            "median_ms": 1000 * float(np.median(times)), "max_rel_diff_vs_float64": rel}


class UtilSampler(threading.Thread):
    """Samples nvidia-smi's GPU utilisation (pynvml) every 20 ms, when available."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop = [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.nvml = pynvml
        except Exception:
            self.nvml = None

    def run(self):
        while self.nvml and not self.stop.is_set():
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.h).gpu)
            time.sleep(0.02)


class GraphedForward:
    """``TeacherRunner.forward`` with the teacher's body (features, then pre-logits, in bf16
    autocast) captured as a CUDA graph per (model, input shape) and replayed: one launch per batch
    instead of hundreds, so the thread feeding the GPU no longer falls behind it while other
    threads hold the GIL (building the next teacher, finalising the last one). An experiment for
    the ``cuda_graphs`` shard-loop variant, not (yet) the product's path.

    A graph reads the model's parameters where they were at capture: it stays valid while the
    model lives and keeps its storage, which a reused model does (``zoo.loading._reload`` copies
    the next teacher's weights in place; the head, resized there, runs outside the graph). Each
    graph holds a weak reference to its model and is dropped when the model is gone. A target's
    full batches share one graph per model, its last batch gets another; a CPU runner runs
    eagerly. The output is copied before it is handed on: the next replay overwrites it."""

    def __init__(self, eager):
        self.eager = eager
        self.graphs = {}
        self.captures = 0
        self.replays = 0
        self.stream = None

    def _capture(self, runner, x):
        import weakref

        if self.stream is None:   # warm-up and capture on one stream (its cuBLAS handle)
            self.stream = torch.cuda.Stream(runner.device)
        static_in = torch.empty_like(x, memory_format=runner.memory_format)
        static_in.copy_(x)
        side = self.stream
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):
            for _ in range(2):   # cudnn autotuning, cuBLAS handles of this stream, the allocator
                runner.pre_logits(static_in, autocast_cache=False)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            static_out = runner.pre_logits(static_in, autocast_cache=False)   # recorded, not run
        torch.cuda.current_stream(runner.device).wait_stream(side)
        graph.replay()                                    # this batch
        self.captures += 1
        model = runner.model
        key = (id(model), tuple(x.shape), x.dtype)
        self.graphs[key] = entry = (weakref.ref(model, lambda _, k=key: self.graphs.pop(k, None)),
                                    graph, static_in, static_out)
        return entry

    @torch.inference_mode()
    def __call__(self, runner, images):
        if not runner.cuda:
            return self.eager(runner, images)
        x = runner.prepare(images)
        key = (id(runner.model), tuple(x.shape), x.dtype)
        entry = self.graphs.get(key)
        if entry is None or entry[0]() is not runner.model:
            entry = self._capture(runner, x)
        else:
            entry[2].copy_(x)
            entry[1].replay()
            self.replays += 1
        feats = entry[3].to(torch.float32, copy=True)
        return feats, runner.logits(feats)


def check_shard_loop(n_teachers: int, samples: int, arch: str = "resnet50", size: int = 224,
                     variants: tuple[str, ...] = ()) -> dict:
    import timm
    from safetensors.torch import save

    from sctd_ray import stats as stats_mod
    from sctd_ray.assess.engine import TeacherRunner, collect_stats, finalise
    from sctd_ray.assess.worker import ShardWorker, TargetData
    from sctd_ray.metrics import NAMES
    from sctd_ray.zoo.loading import teacher_from_files
    from sctd_ray.zoo.store import open_store
    from sctd_ray.zoo.teacher import TeacherConfig

    rng = np.random.default_rng(0)
    target = TargetData("synthetic", [f"c{i}" for i in range(50)],
                        rng.integers(0, 256, (samples, 64, 64, 3), dtype=np.uint8),
                        (np.arange(samples) % 50).astype(np.int64))
    blobs, cfgs = {}, {}
    for i in range(n_teachers):  # host-memory zoo: safetensors bytes, as fetched from a store
        k = int(rng.integers(100, 1001))
        tid = f"{arch}-{i:02d}"
        m = timm.create_model(arch, num_classes=k)
        blobs[tid] = save({n: t.contiguous() for n, t in m.state_dict().items()})
        cfgs[tid] = TeacherConfig(tid, arch, k, [f"k{j}" for j in range(k)],
                                  {"input_size": [3, size, size], "mean": [0.485, 0.456, 0.406],
                                   "std": [0.229, 0.224, 0.225]})
    ids = sorted(blobs)
    out = open_store(tempfile.mkdtemp())
    worker = ShardWorker(None, out, [target], NAMES, device=DEVICE, prefetch=1,   # default batch
                         loader=lambda tid, sha, reuse: teacher_from_files(cfgs[tid], blobs[tid], reuse))
    worker.reuse_models = True   # not yet the default on a GPU: this check is what would make it one
    worker.score(ids[0], None, upcoming=[(ids[1], None)])  # warm-up: cudnn autotune, allocator
    _sync()

    def loop():
        """As the scan's actor runs it: two calls in flight (one finalises while the next one's
        forward runs), each naming the teacher after it for prefetch."""
        sampler = UtilSampler()
        sampler.start()
        worker.phase_seconds = dict.fromkeys(worker.phase_seconds, 0.0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(worker.score, tid, None, None, [(u, None) for u in ids[i + 1:i + 2]])
                    for i, tid in enumerate(ids)]
            rows = [f.result()[0] for f in futs]
        _sync()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        bad = [r for r in rows if r["status"] != "ok"]
        assert not bad, bad[0]
        last_scores.clear()
        last_scores.update({r["teacher_id"]: np.array([r[m] for m in NAMES]) for r in rows})
        return wall, (float(np.mean(sampler.samples)) if sampler.samples else None), \
            {k: round(v, 3) for k, v in worker.phase_seconds.items()}

    last_scores = {}
    worker.overlap = True      # the default on a GPU; the smoke run exercises it on the CPU
    wall, util, phases = loop()
    overlapped = dict(last_scores)   # finalising on the side stream must not change a value
    found = {}
    options = {"no_prefetch": lambda: setattr(worker, "prefetch", 0),
               "cheap_metrics_only": lambda: setattr(worker, "metrics", ("sctd_cost", "leep", "nce")),
               "gil_switch_0.1ms": lambda: sys.setswitchinterval(1e-4),
               "no_reuse": lambda: setattr(worker, "reuse_models", False),   # build every model
               "parallel_finalise": lambda: setattr(stats_mod, "PARALLEL_FINALISE", True),
               "cuda_graphs": lambda: setattr(TeacherRunner, "forward", lambda r, images: graphed(r, images)),
               **{f"batch_{n}": (lambda n=n: setattr(worker, "batch_size", n)) for n in (256, 512, 1024)}}
    eager_forward = TeacherRunner.forward
    graphed = GraphedForward(eager_forward)
    for name in variants:   # what the gap between the loop and pure forward is made of
        saved = worker.prefetch, worker.metrics, worker.batch_size, worker.reuse_models, sys.getswitchinterval()
        options[name]()
        try:
            try:
                w_, u_, p_ = loop()
            except Exception as e:   # one variant failing must not lose the others' numbers
                found[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                continue
            found[name] = {"wall_s": w_, "nvml_util_mean": u_, "phase_seconds": p_}
            if worker.metrics == NAMES:   # the same scores as the default loop, to bf16 noise
                found[name]["scores_vs_default_max_rel_diff"] = max(
                    float(np.max(np.abs(last_scores[t] - overlapped[t]) /
                                 np.maximum(np.abs(overlapped[t]), 1e-12))) for t in ids)
            if name == "cuda_graphs":
                found[name].update(captures=graphed.captures, replays=graphed.replays)
        finally:
            worker.prefetch, worker.metrics, worker.batch_size, worker.reuse_models = saved[:4]
            sys.setswitchinterval(saved[4])
            stats_mod.PARALLEL_FINALISE = False
            TeacherRunner.forward = eager_forward
    worker.overlap = False
    wall_seq, util_seq, phases_seq = loop()
    rel = max(float(np.max(np.abs(overlapped[t] - last_scores[t]) /
                            np.maximum(np.abs(last_scores[t]), 1e-12))) for t in ids)
    worker.overlap = True
    # the least the GPU must do for these teachers: their forward alone (already on the GPU,
    # data resident), and forward + statistics + finalise one teacher after another
    fwd = full = 0.0
    fresh_rel = 0.0   # a fresh model per teacher vs the loop's reused ones (weights copied in)
    for tid in ids[:5]:
        runner = TeacherRunner(teacher_from_files(cfgs[tid], blobs[tid]), DEVICE)
        tb = worker._batches(target)
        _sync()
        t1 = time.perf_counter()
        with torch.inference_mode():
            for xb, _ in tb.batches():
                runner.forward(xb)
        _sync()
        t2 = time.perf_counter()
        fresh = finalise(tid, collect_stats(runner, tb, NAMES, torch.float32))
        _sync()
        ref = np.array([fresh[m] for m in NAMES])
        fresh_rel = max(fresh_rel, float(np.max(np.abs(overlapped[tid] - ref) / np.maximum(np.abs(ref), 1e-12))))
        fwd += t2 - t1
        full += time.perf_counter() - t2
        del runner
    fwd, full = fwd * n_teachers / min(5, n_teachers), full * n_teachers / min(5, n_teachers)
    extra = {"variants": {k: {**v, "forward_vs_wall": fwd / v["wall_s"]} if "wall_s" in v else v
                          for k, v in found.items()}} \
        if found else {}
    return {**extra, "teachers": n_teachers, "samples": samples, "wall_s": wall,
            "batch_size": worker.batch_size, "overlap_vs_sequential_max_rel_diff": rel,
            "fresh_models_vs_loop_max_rel_diff": fresh_rel, "models_reused": worker.models_reused,
            "forward_only_s": fwd, "forward_vs_wall": fwd / wall,
            "engine_sequential_s": full, "teachers_per_s": n_teachers / wall,
            "nvml_util_mean": util, "phase_seconds": phases,
            "no_overlap": {"wall_s": wall_seq, "forward_vs_wall": fwd / wall_seq,
                           "nvml_util_mean": util_seq, "phase_seconds": phases_seq}}


def check_distill_step(steps: int = 50, B: int = 256, image: int = 112) -> dict:
    """One training step of a student: CE alone vs CE + OT distillation (SPEC 4) as training runs
    it (cost prepared once, the recipe's fixed Sinkhorn iterations, tol=0), with the teacher's
    probabilities precomputed, same student and batch; then with an online teacher. Also checks
    that a real training step (views, student, teacher, loss, backward) never synchronises."""
    import timm

    from sctd_ray.distill.losses import ot_distill_loss
    from sctd_ray.distill.recipe import Recipe
    from sctd_ray.ot import prepare_cost

    torch.manual_seed(0)
    C, K = 10, 1000
    iters = Recipe().sinkhorn_iters
    cl = torch.channels_last
    student = timm.create_model("resnet18", num_classes=C).to(DEVICE, memory_format=cl)
    teacher = timm.create_model("resnet50", num_classes=K).to(DEVICE, memory_format=cl).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x = torch.randn(B, 3, image, image, device=DEVICE).contiguous(memory_format=cl)
    y = torch.arange(B, device=DEVICE) % C
    cost = prepare_cost(torch.rand(K, C, device=DEVICE) * 2, 0.1)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        p_t = torch.softmax(teacher(x).float() / 2.0, 1)

    def step(mode):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = student(x).float()
        loss = torch.nn.functional.cross_entropy(logits, y)
        if mode != "ce":
            pt = p_t
            if mode == "online":
                with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
                    pt = torch.softmax(teacher(x).float() / 2.0, 1)
            loss = loss + 1.0 * ot_distill_loss(logits, pt, cost, tau=2.0, eps=0.1,
                                                max_iter=iters, tol=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {}
    # the second ce/ot pass is the one kept; ot_eager: the solve without its CUDA graph
    for mode in ("ce", "ot", "ot_eager", "online", "ce", "ot", "ot_eager"):
        ot.CUDA_GRAPHS = mode != "ot_eager"
        for _ in range(5):
            step(mode)
        _sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(mode)
        _sync()
        out[f"{mode}_ms"] = 1000 * (time.perf_counter() - t0) / steps
    ot.CUDA_GRAPHS = True
    out["ot_eager_vs_ce"] = out["ot_eager_ms"] / out["ce_ms"]
    out["ot_vs_ce"] = out["ot_ms"] / out["ce_ms"]
    out["online_teacher_vs_ce"] = out["online_ms"] / out["ce_ms"]
    out.update(student="resnet18", teacher="resnet50", batch=B, image=image, K=K, C=C,
               sinkhorn_iters=iters)
    try:  # after the timings, which a failure here must not lose
        out["train_step_syncs"] = _train_step_syncs(DEVICE)
    except Exception as e:
        out["train_step_syncs"] = f"error: {type(e).__name__}: {e}"
    return out


def _train_step_syncs(device: str = "cuda") -> str:
    """A training step of the product's own code (distill.train) under CUDA's sync debug mode:
    'none' when nothing in views, student, teacher, loss or backward synchronises."""
    from sctd_ray.distill import train as train_mod
    from sctd_ray.distill.recipe import Recipe
    from sctd_ray.distill.views import make_views, to_device
    from sctd_ray.ot import prepare_cost
    from sctd_ray.data.preprocess import Preprocessing
    from sctd_ray.zoo.loading import LoadedTeacher
    from sctd_ray.zoo.teacher import TeacherConfig
    from sctd_ray.assess.engine import TeacherRunner
    from sctd_ray.data.targets import TargetSplit, TargetTask
    import timm

    rng = np.random.default_rng(0)
    split = TargetSplit(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10)
    target = TargetTask("syn", "/none", [f"c{i}" for i in range(10)], {"train": split})
    pcfg = {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3}
    teacher = LoadedTeacher(TeacherConfig("t", "resnet18", 100, [f"k{i}" for i in range(100)], pcfg),
                            timm.create_model("resnet18", num_classes=100).eval(),
                            Preprocessing.from_pretrained_cfg(pcfg))
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    runner = TeacherRunner(teacher, dev)
    model, _, pre = train_mod.build_student(target, "resnet18", None, 0)
    model.to(dev).train()
    recipe = Recipe(batch_size=64)
    cost = prepare_cost(train_mod.teacher_cost(runner, target), 0.1)
    x, yl = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    gen = torch.Generator().manual_seed(0)

    def step():
        v = make_views(to_device(x, dev), yl, recipe, gen)
        loss = train_mod._loss("ot", model(pre(v.x)), v, runner, cost, None, 2.0, 1.0, 0.1,
                               0.1, recipe.sinkhorn_iters)
        loss.backward()

    step()   # the first step captures the solver's CUDA graph, which synchronises once
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
        return "none"
    except RuntimeError as e:
        return f"synchronises: {str(e).splitlines()[0]}"
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")


def goal_lines(res: dict) -> list[str]:
    """One line per issue goal (docs/benchmarks.md, "GPU"), from what this run measured, so the
    verdict survives a truncated log: each value, its goal and whether it is met."""
    def get(*path):
        v = res
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        return v if isinstance(v, (int, float)) else None

    sk = res.get("sinkhorn") or {}
    rows = [(f"Sinkhorn B={sk.get('B')} K={sk.get('K')} C={sk.get('C')}, ms", get("sinkhorn", "best_ms"), "<", 100.0),
            ("engine / forward throughput", get("engine", "engine_vs_forward"), ">=", 0.90),
            ("  with parallel_finalise", get("engine", "parallel_finalise", "engine_vs_forward"), ">=", 0.90),
            ("shard loop GPU busy (NVML mean, %)", get("shard_loop", "nvml_util_mean"), ">=", 85.0)]
    for name in sorted((res.get("shard_loop") or {}).get("variants") or {}):
        rows.append((f"  variant {name}", get("shard_loop", "variants", name, "nvml_util_mean"), ">=", 85.0))
    rows.append(("OT step / ce step", get("distill_step", "ot_vs_ce"), "<=", 1.15))
    out = []
    for label, value, op, goal in rows:
        if value is None:
            continue
        met = value < goal if op == "<" else value >= goal if op == ">=" else value <= goal
        out.append(f"GOAL {label}: {value:.3f} (goal {op} {goal:g}): {'met' if met else 'NOT met'}")
    return out


def main():
    global DEVICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="every check on the CPU at tiny sizes (the code paths, not the speed)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="comma-separated subset: sinkhorn,engine,shard_loop,distill_step")
    ap.add_argument("--teachers", type=int, default=20)
    ap.add_argument("--variants", default="",
                    help="comma-separated shard_loop variants: no_prefetch, cheap_metrics_only, parallel_finalise, cuda_graphs, "
                         "gil_switch_0.1ms, no_reuse, batch_256, batch_512, batch_1024 (the default batch "
                         "is the worker's for the device: 1024 on a GPU)")
    args = ap.parse_args()
    variants = tuple(v for v in args.variants.split(",") if v)
    if args.smoke:
        DEVICE = "cpu"
        res = {"gpu": None, "torch": torch.__version__, "smoke": True}
        steps = [("sinkhorn", lambda: check_sinkhorn(2, 64, 100, 20)),
                 ("engine", lambda: check_engine(256, 1, "cpu", "resnet18", 32)),
                 ("shard_loop", lambda: check_shard_loop(2, 64, "resnet18", 32, variants=variants)),
                 ("distill_step", lambda: check_distill_step(2, 8, 32))]
    else:
        assert torch.cuda.is_available(), "no CUDA device"
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        steps = [("sinkhorn", lambda: check_sinkhorn(10)),
                 ("engine", lambda: check_engine(4096 if args.quick else 16384, 3)),
                 ("shard_loop", lambda: check_shard_loop(args.teachers, 2048 if args.quick else 8192,
                                                     variants=variants)),
                 ("distill_step", check_distill_step)]
    print(json.dumps(res), flush=True)
    if args.only:
        steps = [st for st in steps if st[0] in args.only.split(",")]
    for name, fn in steps:
        t0 = time.time()
        try:
            res[name] = fn()
        except Exception as e:  # keep the other checks' numbers
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"== {name} ({time.time() - t0:.1f}s): {json.dumps(res[name])}", flush=True)
        if args.json:  # after every check, so a cut-off run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    for line in goal_lines(res):
        print(line, flush=True)


if __name__ == "__main__":
    main()
