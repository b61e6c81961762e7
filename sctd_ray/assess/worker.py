"""The shard worker: owns a shard of the zoo on one device and scores each of its teachers on
every target. Plain Python (the scan wraps it in a Ray actor; a GPU benchmark runs it bare).

Per teacher: take its prefetched weights (the next teachers are fetched and built in a
background thread while the current one runs), forward every target batch once (the target
resized to the teacher's input geometry once per geometry, not once per teacher), update the
statistics, finalise the scores, and write one result file per (teacher, target).
At most ``1 + prefetch`` teachers are resident at a time.

On a GPU, finalising (SPEC 3's D x D factorisations and per-sample likelihoods: 131 ms for a
D = 2048 teacher on an H200, much of it latency-bound) overlaps the next teacher's forward:
``score`` may be called from two threads (the scan's actor runs two calls at once); the device
work (forward + statistics) is serialised by a lock, and each call finalises outside it, on a
side CUDA stream, holding only its teacher's statistics (the model is freed first). So at most two
teachers' statistics are alive. On the CPU the whole call holds the lock: both phases compete
for the same cores, so they run one after the other.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FatalScanError, SctdError, StoreAuthError, StoreUnreachable, TeacherError
from ..metrics import NAMES
from .engine import TargetBatches, TeacherRunner, collect_stats, finalise
from .results import write_result


@dataclass
class TargetData:
    """A decoded target split on the worker: uint8 images (N, H, W, C), as one array or as the
    blocks that hold its rows in order (a scan's: Ray object-store blocks, never copied), and
    int64 labels (N,)."""

    name: str
    class_names: list[str]
    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    fingerprint: str = ""   # ``targets.target_fingerprint``, written into each result row

    @property
    def blocks(self) -> list[np.ndarray]:
        return [self.images] if isinstance(self.images, np.ndarray) else list(self.images)


class RowBlocks:
    """Row blocks (tensors of equal trailing shape) read as one tensor of their rows in order:
    ``len``, ``device`` and slices. A slice inside one block is a view of it; one that spans
    blocks is a copy of just its rows. Lets every worker batch a target straight from the
    object store's shared blocks instead of keeping its own concatenated copy."""

    def __init__(self, blocks: list[torch.Tensor]):
        self.blocks = [b for b in blocks if len(b)]
        self.starts = np.cumsum([0] + [len(b) for b in self.blocks])
        self.device = self.blocks[0].device if self.blocks else torch.device("cpu")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise IndexError("RowBlocks takes contiguous slices only")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            block, first = self.blocks[i], int(self.starts[i])
            part = block[start - first:stop - first]
            parts.append(part)
            start, i = start + len(part), i + 1
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else self.blocks[0][:0]


# images per forward when the scan names none: on a GPU large batches keep it fed (fewer kernel
# launches per image: docs/benchmarks.md, "GPU"); a batch that does not fit is halved (``_collect``)
DEFAULT_BATCH_SIZE = {"cpu": 256, "cuda": 1024}
# memory for targets resized to the teachers' input geometries (``ShardWorker._resized_target``)
RESIZED_CACHE_MB = 512


class ShardWorker:
    """Scores teachers on targets; see the module docstring."""

    def __init__(self, zoo_store, out_store, targets, metrics=NAMES, batch_size: int | None = None,
                 device: str | None = None, prefetch: int = 1, device_cache_mb: float = 1024,
                 cache=None, loader=None, overlap: bool | None = None,
                 resized_cache_mb: float = RESIZED_CACHE_MB, reuse_models: bool | None = None):
        from ..zoo.loading import load_teacher

        self.zoo, self.out = zoo_store, out_store
        self.metrics = tuple(metrics)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE.get(self.device.type, 256)
        self.smaller_batches = 0   # times a teacher's batch was halved to fit the device memory
        self.prefetch = max(0, int(prefetch))
        self.cache = cache
        # loader(teacher id, sha256, reuse) -> LoadedTeacher; ``reuse`` hands over a parked model
        self.loader = loader or (lambda tid, sha, reuse: load_teacher(self.zoo, tid, cache=self.cache,
                                                                      sha256=sha, reuse=reuse))
        # the last scored teacher's model, parked for the next teacher of its architecture
        # (``_park``, ``_take_parked``): a build is the Python-heavy part of loading a teacher.
        # Default: on a CPU only, until the CUDA route (copies ordered by stream events) has run
        # on a GPU (bench/gpu_check.py compares it with fresh models; docs/benchmarks.md)
        self.reuse_models = self.device.type == "cpu" if reuse_models is None else bool(reuse_models)
        self._parked: tuple | None = None      # (body key, model, CUDA event after its last use)
        self._parked_lock = threading.Lock()
        self.models_reused = 0
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.targets = [self._resolve(t) for t in targets]
        self._device_data = self._place(device_cache_mb)
        # each target resized once per teacher input geometry, not once per teacher (``_resized_target``)
        self.resized_cache_mb = float(resized_cache_mb)
        self._resized: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.resized_builds = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending: dict[str, Future] = {}
        self._device_lock = threading.Lock()
        # finalise outside the device lock (module docstring); default: on a GPU only
        self.overlap = self.device.type == "cuda" if overlap is None else bool(overlap)
        self._final_streams = threading.local()
        self.scored = 0
        # where a worker's wall time goes (reported by ``usage``; docs/benchmarks.md): building
        # teachers (in the prefetch thread), waiting for one, launching forward + statistics,
        # finalising (which first waits for the device to finish the forward)
        self.phase_seconds = dict.fromkeys(("load", "wait_for_teacher", "forward_and_stats",
                                            "finalise", "free_memory"), 0.0)
        self._phase_lock = threading.Lock()

    # ---------------------------------------------------------------- targets
    @staticmethod
    def _resolve(t) -> TargetData:
        if isinstance(t, TargetData):
            return t
        from ..data.ray_data import target_blocks  # a MaterializedTarget held in Ray's object store

        blocks, labels = target_blocks(t)
        return TargetData(t.name, list(t.class_names), blocks, labels, t.fingerprint)

    def _place(self, device_cache_mb: float):
        """Keep targets on the device between teachers when they fit the memory limit. Else on
        the host: on a CPU the blocks as they are (a scan's lie in the object store, shared
        with the node's other workers: no copy), for a GPU one pinned copy, so that batches
        reach the device without a sync."""
        total = sum(sum(b.nbytes for b in t.blocks) + t.labels.nbytes for t in self.targets)
        if self.device.type == "cpu":
            return {t.name: (RowBlocks([_tensor(b) for b in t.blocks]), torch.from_numpy(t.labels))
                    for t in self.targets}
        if total > device_cache_mb * 2**20:
            return {t.name: (_joined(t.blocks, pin_memory=True), torch.from_numpy(t.labels).pin_memory())
                    for t in self.targets}
        return {t.name: (_joined(t.blocks, device=self.device), torch.from_numpy(t.labels).to(self.device))
                for t in self.targets}

    def _batches(self, t: TargetData, bs: int | None = None, pre=None) -> TargetBatches:
        """The target's batches for one teacher: already resized to its input geometry (``pre``,
        its Preprocessing) when that resized copy fits the cache, else the decoded images."""
        x, y = self._device_data[t.name]
        x = self._resized_target(t, x, pre) if pre is not None else x
        bs = bs or self.batch_size

        def it():
            for i in range(0, len(y), bs):
                yield x[i:i + bs], y[i:i + bs]
        return TargetBatches(t.name, len(t.class_names), it)

    def _resized_target(self, t: TargetData, x: torch.Tensor, pre) -> torch.Tensor:
        """The whole target resized to ``pre``'s input size and channel count (float in [0, 1],
        channels_last), built once per geometry and kept while the cache's budget allows (least
        recently used first out). Teachers share geometries (most zoos have a handful of input
        sizes), so this saves every other teacher of a geometry its per-batch resize; each image
        is resized on its own, so the values are those of the per-batch path. Targets that live
        on the host while the teacher runs on a GPU are resized there per batch (cheap)."""
        if x.device != self.device:
            return x
        c, h, w = pre.input_size
        nbytes = len(x) * c * h * w * 4
        if nbytes > self.resized_cache_mb * 2**20:
            return x
        key = (t.name, pre.geometry)
        if key in self._resized:
            self._resized.move_to_end(key)
            return self._resized[key]
        while self._resized and sum(v.nbytes for v in self._resized.values()) + nbytes > self.resized_cache_mb * 2**20:
            self._resized.popitem(last=False)
        step = max(1, self.batch_size)
        try:
            with torch.inference_mode():
                out = torch.empty((len(x), c, h, w), dtype=torch.float32, device=self.device,
                                  memory_format=torch.channels_last)
                for i in range(0, len(x), step):
                    out[i:i + step] = pre.resize(x[i:i + step])
        except torch.OutOfMemoryError:   # no room on the device: resize per batch instead
            return x
        self._resized[key] = out
        self.resized_builds += 1
        return out

    # ---------------------------------------------------------------- teachers
    def _timed(self, phase: str, t0: float) -> None:
        with self._phase_lock:
            self.phase_seconds[phase] += time.perf_counter() - t0

    def _fetch(self, tid: str, sha: str | None):
        t0 = time.perf_counter()
        try:
            return self._load(tid, sha)
        finally:
            self._timed("load", t0)

    def _load(self, tid: str, sha: str | None):
        reuse = self._take_parked if self.reuse_models else None
        try:
            if self.device.type != "cuda":
                return self.loader(tid, sha, reuse)
            # weights reach the GPU on a side stream, off the hot loop: copied into a parked
            # model (after its last use: ``_take_parked``) or with a new model
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                teacher = self.loader(tid, sha, reuse)
                teacher.model.to(self.device, non_blocking=True).to(memory_format=torch.channels_last)
            teacher.ready = stream.record_event()
            return teacher
        except (StoreUnreachable, StoreAuthError) as e:
            return FatalScanError(str(e))
        except SctdError as e:
            return e if isinstance(e, TeacherError) else TeacherError(tid, str(e))
        except Exception as e:  # an unloadable teacher must never crash the shard
            return TeacherError(tid, f"cannot load: {type(e).__name__}: {e}")

    def _park(self, loaded) -> None:
        """Keep a scored teacher's model for the next teacher of the same architecture and
        model arguments (at most one parked model; the one before goes)."""
        from ..zoo.loading import body_key

        event = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
        with self._parked_lock:
            self._parked = (body_key(loaded.config), loaded.model, event)

    def _take_parked(self, key):
        """The parked model when its body key is ``key`` (a loader copies the next teacher's
        weights into it, on a CUDA stream that first waits for the model's last use), else None;
        either way nothing stays parked."""
        with self._parked_lock:
            parked, self._parked = self._parked, None
        if parked is None:
            return None
        if parked[0] != key:
            ref = weakref.ref(parked[1])
            del parked
            if ref() is not None:   # a reference cycle keeps it (see ``score``)
                gc.collect()
            return None
        _, model, event = parked
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        with self._parked_lock:
            self.models_reused += 1
        return model

    def _prefetch(self, upcoming: list[tuple[str, str | None]]) -> None:
        for tid, sha in upcoming[: self.prefetch]:
            if tid not in self._pending:
                self._pending[tid] = self._pool.submit(self._fetch, tid, sha)

    def score(self, teacher_id: str, sha256: str | None = None, targets: list[str] | None = None,
              upcoming: list[tuple[str, str | None]] = ()) -> list[dict]:
        """Score one teacher on the named targets (default all); write and return the rows.
        Safe to call from two threads at once (module docstring)."""
        t0 = time.perf_counter()
        wanted = [t for t in self.targets if targets is None or t.name in targets]
        with self._device_lock:
            fut = self._pending.pop(teacher_id, None) or self._pool.submit(self._fetch, teacher_id, sha256)
            self._prefetch([u for u in upcoming if u[0] != teacher_id])  # queued behind this one
            tw = time.perf_counter()
            loaded = fut.result()
            self._timed("wait_for_teacher", tw)
            if isinstance(loaded, FatalScanError):
                raise loaded
            arch = None if isinstance(loaded, TeacherError) else loaded.config.architecture
            config_sha = getattr(loaded, "config_sha256", None)
            tc = time.perf_counter()
            collected, rows = self._collect(teacher_id, loaded, wanted, t0)
            self._timed("forward_and_stats", tc)
            tm = time.perf_counter()
            model = weakref.ref(loaded.model) if hasattr(loaded, "model") else None
            parked = self.reuse_models and bool(collected)   # scored: its model may serve again
            if parked:
                self._park(loaded)
            del loaded, fut   # the future holds the teacher too
            if not parked and model is not None and model() is not None:
                # a reference cycle keeps the model (reference counting frees every timm model
                # tried): collect it before the next one arrives. Not always: a full
                # collection holds the GIL ~0.2 s, which starves the thread feeding the GPU
                gc.collect()
            self._timed("free_memory", tm)
            if not self.overlap:
                rows = rows or self._finalise(teacher_id, arch, collected, t0)
        if self.overlap:
            rows = rows or self._finalise(teacher_id, arch, collected, t0)
        for r in rows:   # what the scores were computed from: a resumed scan checks them
            r["teacher_sha256"] = sha256
            r["teacher_config_sha256"] = config_sha
            write_result(self.out, r)
        self.scored += 1
        return rows

    def _collect(self, teacher_id: str, loaded, wanted: list[TargetData], t0: float):
        """Forward + statistics for every wanted target: ``([(target, start, stats, done)],
        [])``, or ``([], error rows)``. ``done`` is a CUDA event after the last update."""
        if isinstance(loaded, TeacherError):
            return [], [self._row(t, teacher_id, None, "error", loaded.reason, {}, t0) for t in wanted]
        arch = loaded.config.architecture
        try:
            if getattr(loaded, "ready", None) is not None:
                torch.cuda.current_stream(self.device).wait_event(loaded.ready)
            runner = TeacherRunner(loaded, self.device)
            dtype = torch.float32 if runner.cuda else torch.float64
            out, bs = [], self.batch_size
            for t in wanted:
                ts = time.perf_counter()
                stats, bs = self._stats_that_fit(runner, t, dtype, bs)
                done = torch.cuda.current_stream(self.device).record_event() if runner.cuda else None
                out.append((t, ts, stats, done))
            return out, []
        except TeacherError as e:
            return [], [self._row(t, teacher_id, arch, "error", e.reason, {}, t0) for t in wanted]
        except Exception as e:  # e.g. a forward that fails on this input, or on a model_args
            # value timm accepted at construction (a TypeError): this teacher's error row
            msg = f"forward failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return [], [self._row(t, teacher_id, arch, "error", msg, {}, t0) for t in wanted]

    def _stats_that_fit(self, runner, t: TargetData, dtype, bs: int):
        """``collect_stats`` at batch ``bs``, halved (down to 1) each time the device runs out of
        memory; the statistics restart, and the teacher's other targets keep the smaller batch.
        Returns (statistics, the batch that fit)."""
        while True:
            try:
                return collect_stats(runner, self._batches(t, bs, runner.teacher.preprocessing),
                                     self.metrics, dtype), bs
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
            # out of the except block: the failed attempt's tensors are free to go back
            bs //= 2
            self.smaller_batches += 1
            if runner.cuda:
                torch.cuda.empty_cache()

    def _finalise(self, teacher_id: str, arch: str, collected: list, t0: float) -> list[dict]:
        """Scores from the collected statistics, one row per target (all of them error rows if
        one fails, as a forward failure does). With overlap on a GPU, on this thread's own side
        stream, after the statistics' last update (its event)."""
        rows, tf = [], time.perf_counter()
        try:
            for t, ts, stats, done in collected:
                if done is not None and self.overlap:
                    stream = self._side_stream()
                    stream.wait_event(done)
                    with torch.cuda.stream(stream):
                        scores = finalise(teacher_id, stats)
                    stream.synchronize()   # nothing of it still reads the statistics' memory
                else:
                    scores = finalise(teacher_id, stats)
                rows.append(self._row(t, teacher_id, arch, "ok", "", scores, ts))
            return rows
        except TeacherError as e:
            return [self._row(c[0], teacher_id, arch, "error", e.reason, {}, t0) for c in collected]
        finally:
            collected.clear()   # the statistics go now, not when the caller's frame does
            self._timed("finalise", tf)

    def _side_stream(self) -> torch.cuda.Stream:
        stream = getattr(self._final_streams, "stream", None)
        if stream is None:
            stream = self._final_streams.stream = torch.cuda.Stream(self.device)
        return stream

    def _row(self, t: TargetData, tid: str, arch: str | None, status: str, error: str, scores: dict,
             t0: float) -> dict:
        row = {"target": t.name, "teacher_id": tid, "architecture": arch,
               "status": status, "error": error, "samples": int(len(t.labels)),
               "seconds": round(time.perf_counter() - t0, 4), "worker": self.name,
               "finished_at": time.time(), "target_fingerprint": t.fingerprint}
        row.update({m: (float(scores[m]) if m in scores else None) for m in self.metrics})
        return row

    def ping(self) -> str:
        return self.name

    def usage(self) -> dict:
        """Peak resident memory of this worker process, teachers scored by it, and the seconds
        spent in each phase (summed over threads: overlapped phases can add up to more than
        the wall time)."""
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        with self._phase_lock:
            phases = {k: round(v, 3) for k, v in self.phase_seconds.items()}
        return {"worker": self.name, "peak_rss_mb": round(peak_kb / 1024, 1), "teachers": self.scored,
                "device": str(self.device), "threads": torch.get_num_threads(),
                "batch_size": self.batch_size,
                "smaller_batches": self.smaller_batches, "resized_targets": self.resized_builds,
                "models_reused": self.models_reused,
                "phase_seconds": phases}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tensor(block: np.ndarray) -> torch.Tensor:
    """A tensor sharing the block's memory; object-store blocks are read-only, and nothing here
    writes to target images (preprocessing makes new tensors), so torch's warning about
    non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(block)


def _joined(blocks: list[np.ndarray], **where) -> torch.Tensor:
    """The blocks' rows in one new tensor (``device=...`` or ``pin_memory=True``), copied block
    by block: no host-side concatenation first."""
    n = sum(len(b) for b in blocks)
    out = torch.empty((n, *blocks[0].shape[1:]), dtype=_tensor(blocks[0]).dtype, **where)
    start = 0
    for b in blocks:
        out[start:start + len(b)].copy_(_tensor(b))
        start += len(b)
    return out
