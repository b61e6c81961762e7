"""``sctd assess``: the distributed zoo scan on Ray (ARCHITECTURE: data flow of a scan).

manifest -> shard plan -> one ShardWorker actor (``ShardActor``) per GPU (or CPU slot) -> every target read and
decoded once by Ray Data, materialised, shared by all actors -> per (teacher, target) result
files -> ranking.parquet + run.json.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import pandas as pd

from ..errors import FatalScanError, SctdError, StoreAuthError, StoreUnreachable, ZooError
from ..score_names import DEFAULT_RANK_BY, NAMES
from .plan import estimate_seconds, plan_shards
from .results import (RANKING_FILE, RUN_FILE, RunResults, done_pairs, format_ranking, ranking_table,
                      read_results, write_table)

IN_FLIGHT_PER_WORKER = 2
MAX_WORKER_DEATHS_PER_TEACHER = 2
REPLACEMENT_WAIT_S = 900.0   # no worker scoring and none of the replacements started: give up


@dataclass
class ScanSettings:
    zoo: str
    targets: list[str]
    out: str
    workers: int | None = None
    batch_size: int | None = None   # None: the worker's default for its device (worker.py)
    metrics: tuple[str, ...] = NAMES
    rank_by: str = DEFAULT_RANK_BY
    resume: bool = False
    address: str | None = None
    s3_endpoint: str | None = None
    split: str = "train"
    prefetch: int = 1
    device_cache_mb: float = 1024
    progress: bool = True
    teachers: list[str] | None = None  # restrict to these ids


@dataclass
class ScanResult:
    ranking: pd.DataFrame
    run: dict = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return int((self.ranking["status"] != "ok").sum())


CLUSTER_CONNECT_TIMEOUT = 5.0   # seconds to open a TCP connection, then an HTTP/2 (gRPC) one


def check_cluster_reachable(address: str, source: str = "--address") -> None:
    """One clear line unless a Ray head answers at a cluster address (``host:port`` of the head's
    GCS). The Ray Client (``ray://``) is refused: Ray Data's ``materialize`` fails through it
    (``'Worker' object has no attribute 'core_worker'``, Ray 2.60). Without this, Ray retries an address where nothing listens
    for minutes, and one where something else listens (a web server) for ~12 minutes, deaf to
    SIGTERM. ``auto`` and ``local`` are left to Ray; ``source`` names where the address came from."""
    import socket

    scheme, _, rest = address.rpartition("://")
    rest = rest.rstrip("/")
    if address in ("auto", "local") or not rest:
        return
    if scheme in ("http", "https"):
        raise SctdError(f"{source} {address!r} is a dashboard address (for `ray job submit`; give "
                        "it to that as RAY_API_SERVER_ADDRESS); sctd joins a cluster at the head's "
                        "GCS, HOST:6379")
    if scheme == "ray":
        raise SctdError(f"{source} {address!r}: the Ray Client (ray://) is not supported (Ray Data "
                        "cannot run through it); give the head's GCS address, HOST:6379, from a "
                        "machine on the cluster's network, or submit a job (`ray job submit`, "
                        "docs/cluster.md)")
    host, _, port = rest.rpartition(":")
    if scheme not in ("", "ray") or not host or not port.isdigit():
        raise SctdError(f"{source} {address!r}: expected HOST:PORT (the head node's GCS, e.g. "
                        "10.0.0.5:6379), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CLUSTER_CONNECT_TIMEOUT).close()
    except OSError as e:
        raise SctdError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); check "
                        f"{source}, and that the cluster is up (`ray status`)") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return   # a TLS cluster's handshake needs its certificates: left to Ray
    import grpc

    channel = grpc.insecure_channel(rest)
    try:   # the GCS is a gRPC server: an HTTP/2 connection must open
        grpc.channel_ready_future(channel).result(timeout=CLUSTER_CONNECT_TIMEOUT)
    except grpc.FutureTimeoutError:
        raise SctdError(f"{address} answers, but not as a Ray cluster (no gRPC handshake within "
                        f"{CLUSTER_CONNECT_TIMEOUT:.0f} s); check {source}: the head node's GCS "
                        "port is 6379 by default") from None
    finally:
        channel.close()


def stop_like_ctrl_c(signum, frame):
    """SIGTERM (``kill``, ``ray job stop``) handled as Ctrl-C: whatever handles SIGINT now (Ray
    Tune's graceful stop during a distillation, else KeyboardInterrupt) stops the command, which
    keeps what it wrote and exits 130."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:   # SIGINT ignored (a background process): stop all the same
        raise KeyboardInterrupt


def _shutdown_quietly(ray) -> None:
    try:
        ray.shutdown()
    except Exception:
        pass


def ensure_ray(address: str | None = None):
    """Join ``address``/$RAY_ADDRESS, or start the embedded local Ray: never a cluster that
    merely happens to run on this machine (``ray.init()`` alone would join one)."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    kwargs = {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_cluster_reachable(address, source)
    try:
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:
            ray.init(address="local", **kwargs)
    except ConnectionError as e:
        raise SctdError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}; "
                        f"check {source} (the head node's GCS port, 6379 by default) and, for a "
                        "cluster with token auth, RAY_AUTH_MODE=token and its token "
                        "(RAY_AUTH_TOKEN or `ray get-auth-token`)") from None
    except SystemExit:
        # SIGTERM while ray.init runs: its own handlers stop the processes it started and
        # call sys.exit, which would end sctd with status 15 (or 1) and no word
        _shutdown_quietly(ray)
        raise KeyboardInterrupt from None
    if threading.current_thread() is threading.main_thread():
        # ray.init leaves SIGTERM to Ray's core, which dumps a stack and aborts (exit 134)
        signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray 2.60's default Parquet reader (DataSourceV2) reads file footers on a pool of actors
    # that it starts for every read: ~2.3 s per target split on 2 cores, even for 50 images.
    # The task-based reader gives the same rows as fast (10,000 224 px JPEGs too). A user's
    # RAY_DATA_USE_DATASOURCE_V2 still wins (docs/benchmarks.md, "Fixed cost of a small scan").
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ctx.use_datasource_v2 = False
    for name in ("ray.data", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Failed to fetch metrics for N trial(s)" on a resumed distillation: trials interrupted
    # before their first report have none; sctd reads each trial's results itself (distill/search.py)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # "Progress bars disabled. To enable, ...": a warning about what sctd asked for on purpose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return ray


def _workers(ray, requested: int | None, teachers: int) -> tuple[int, dict]:
    """How many shard workers (``requested``, else one per GPU, else one per CPU slot; never
    more than the teachers to score) and what each asks Ray for: a GPU worker 1 GPU and 1 CPU,
    a CPU worker its share of the CPUs (``_cpus_per_worker``)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    n = max(1, min(requested or gpus or int(res.get("CPU", 1)), teachers or 1))
    if gpus:
        return n, {"num_gpus": 1, "num_cpus": 1}
    return n, {"num_cpus": _cpus_per_worker(ray, n)}


def _cpus_per_worker(ray, n_workers: int) -> int:
    """CPU slots for each of ``n_workers`` CPU workers: the most that all of them can hold at
    once on the nodes alive now (a node of c CPUs holds c // k workers of k), at least 1. Ray
    gives an actor ``OMP_NUM_THREADS`` = its CPUs, so torch runs that many threads: fewer
    workers than CPUs (8 teachers on 16 cores, or ``--workers 1``) use every core instead of
    one each."""
    cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    k = max(1, sum(cpus) // n_workers)
    while k > 1 and sum(c // k for c in cpus) < n_workers:
        k -= 1
    return k


def _check_settings(s: ScanSettings) -> None:
    """User errors in the settings, before anything starts."""
    unknown = sorted(set(s.metrics) - set(NAMES))
    if unknown:
        raise SctdError(f"unknown metric(s) {unknown}; choose from {', '.join(NAMES)}")
    if s.rank_by not in s.metrics:
        raise SctdError(f"--rank-by {s.rank_by!r} is not among --metrics {','.join(s.metrics)}")
    if s.batch_size is not None and s.batch_size < 1:
        raise SctdError(f"--batch-size must be at least 1; got {s.batch_size}")
    if s.workers is not None and s.workers < 1:
        raise SctdError(f"--workers must be at least 1 (or left out: one per GPU or CPU slot); "
                        f"got {s.workers}")
    if s.prefetch < 0 or s.device_cache_mb < 0:
        raise SctdError(f"prefetch and device_cache_mb must be >= 0; got {s.prefetch}, "
                        f"{s.device_cache_mb}")


WRITE_CHECK = ".sctd-write-check"


def check_writable(out) -> None:
    """Write and delete one small file in the run folder, so a folder that cannot be written (read
    only, under a file, a bucket the keys may not write) is one error before Ray starts, not one
    per teacher after the scoring."""
    out.write_bytes(WRITE_CHECK, b"")
    out.delete(WRITE_CHECK)


def _left_out_lines(students: dict[str, list[str]], mine: set[str], targets: list[str]) -> list[str]:
    """The lines naming the students a scan does not score: per target, those distilled on it;
    then this run's own exported students, except those already named for every target."""
    def names(ids):
        ids = sorted(ids)
        return f"{', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}"

    lines = [f"scan: {len(ids)} student(s) distilled for {name} left out of its ranking (trained on "
             f"its labels): {names(ids)}" for name, ids in students.items()]
    rest = {i for i in mine if any(i not in students.get(t, ()) for t in targets)}
    if rest:
        lines.append(f"scan: {len(rest)} student(s) exported by this run's own distillation are not "
                     f"scored on its targets (an uninterrupted scan ranked without them): {names(rest)}")
    return lines


def run_scan(s: ScanSettings, log=print, on_start=None) -> ScanResult:
    """Run (or resume) a scan; see the module docstring. Returns the ranking. ``on_start(out)``
    runs once the inputs are checked, before Ray starts (``sctd scan`` records its plan there)."""
    from ..zoo.manifest import current_manifest
    from ..zoo.store import open_store

    _check_settings(s)
    t_start = time.time()
    out = open_store(s.out, s3_endpoint=s.s3_endpoint)
    results = RunResults(out)
    previous = results.previous
    if previous and not s.resume:
        raise SctdError(f"{s.out} already holds {len(previous)} results: pass --resume to continue "
                        "that scan, or choose another --out")
    zoo = open_store(s.zoo, s3_endpoint=s.s3_endpoint)
    manifest = all_teachers = current_manifest(zoo, log)
    if s.teachers:
        missing = sorted(set(s.teachers) - set(manifest["id"]))
        if missing:
            raise ZooError(f"teacher(s) not in the zoo: {missing}")
        manifest = manifest[manifest["id"].isin(s.teachers)]
    from ..data.ray_data import materialize_target, probe_target
    from ..data.targets import target_name

    names = [target_name(u) for u in s.targets]
    if len(set(names)) != len(names):
        raise SctdError(f"two targets share a name: {names}")
    max_side = decode_max_side(manifest)
    probes = [probe_target(u, s.split, s3_endpoint=s.s3_endpoint, max_side=max_side)  # before Ray
              for u in s.targets]
    check_writable(out)   # the last check before Ray: the inputs' errors leave no folder behind
    if on_start is not None:
        on_start(out)
    ray = ensure_ray(s.address)

    t_data = time.time()
    targets = [materialize_target(p.uri, s.split, s3_endpoint=s.s3_endpoint, probe=p) for p in probes]
    data_seconds = time.time() - t_data
    for t in targets:
        if t.note:
            log(t.note)

    # a pair is done when its row was scored from this target and these weights: a target
    # remade under the same name, or a teacher retrained in place, is scored again
    fingerprints = {t.name: t.fingerprint for t in targets}
    shas = {r["id"]: (r["sha256"] or None) for _, r in all_teachers.iterrows()}
    config_shas = {r["id"]: (r["config_sha256"] or None) for _, r in all_teachers.iterrows()}
    here = [r for r in previous if r["target"] in fingerprints and r["teacher_id"] in shas]
    stale = [r for r in here if r.get("status") == "ok" and not _current(r, fingerprints, shas, config_shas)]
    retried = [r for r in here if r.get("status") != "ok"]      # done_pairs: never done
    done = done_pairs([r for r in previous if r["target"] not in fingerprints
                       or _current(r, fingerprints, shas, config_shas)], s.metrics)
    if stale:
        log(f"resume: {len(stale)} earlier result(s) are scored again: their target's images or "
            "labels, or their teacher's weights or config.json, differ from this scan's (or "
            "predate these checks)")
    if retried:
        log(f"resume: {len(retried)} earlier error row(s) are tried again")
    todo: dict[str, list[str]] = {}
    students = {}   # target -> its own students, left out of its ranking
    # a resumed scan: the students its own distillation exported (for its first targets) must
    # not join the rankings of its later targets, which an uninterrupted scan ranked without them
    mine = {r["id"] for _, r in manifest.iterrows() if _exported_by(r, out.uri)}
    for _, r in manifest.iterrows():
        # a student exported for a target has seen its labels: not scored on it (by its name, or
        # by its train images and labels under another name)
        own = [t.name for t in targets if _distilled_on(r, t)]
        for name in own:
            students.setdefault(name, []).append(r["id"])
        if r["id"] in mine:
            continue
        missing_targets = [t.name for t in targets if (t.name, r["id"]) not in done and t.name not in own]
        if not missing_targets:
            continue
        if r["status"] != "ok":  # the manifest already knows it is broken
            _error_rows(results, r["id"], missing_targets, r["error"], fingerprints, shas[r["id"]],
                        r["architecture"])
            continue
        todo[r["id"]] = missing_targets
    for line in _left_out_lines(students, mine, [t.name for t in targets]):
        log(line)
    rows_by_id = {r["id"]: r for _, r in manifest.iterrows()}
    samples = sum(t.num_rows for t in targets)
    costs = {tid: estimate_seconds(rows_by_id[tid]["params"], rows_by_id[tid]["input_size"],
                                   rows_by_id[tid]["bytes"], samples) for tid in todo}
    n_workers, resources = _workers(ray, s.workers, len(todo))
    shards = plan_shards(costs, n_workers)
    log(f"scan: {len(manifest)} teachers x {len(targets)} target(s) ({samples} samples); "
        f"{len(todo)} teachers to score on {n_workers} worker(s)"
        + (f"; {len(done)} pairs already done" if done else ""))

    t_scan = time.time()
    fatal, usage = None, []
    if todo:
        fatal, usage = _dispatch(ray, s, zoo, results, targets, shards, todo, rows_by_id, resources, samples,
                                 log)
        on_cpu = [u["worker"] for u in usage if resources.get("num_gpus") and u.get("device") == "cpu"]
        if on_cpu:
            log(f"scan: {len(on_cpu)} of {len(usage)} GPU worker(s) scored on the CPU, much more slowly: "
                f"torch saw no CUDA device on their node (its driver, or a CPU-only torch?): {', '.join(on_cpu)}")
    scan_seconds = time.time() - t_scan

    # every pair's row reached the driver; after a fatal error, workers may have written rows
    # whose calls never returned: then the folder is read back
    rows = results.rows() if fatal is None else read_results(out)
    gone = sorted({r["teacher_id"] for r in rows} - set(shas))
    if gone:   # a resume against a zoo that no longer holds them: their files stay, unranked
        log(f"resume: {len(gone)} teacher(s) with earlier results are not in {zoo.uri}; left out "
            f"of the ranking: {', '.join(gone[:5])}" + (" ..." if len(gone) > 5 else ""))
        rows = [r for r in rows if r["teacher_id"] in shas]
    ranking = ranking_table(rows, s.rank_by, s.metrics)
    write_table(out, RANKING_FILE, ranking)
    ranked = set(ranking["target"])
    earlier = {name: info for name, info in _previous_run(out).get("targets", {}).items()
               if name in ranked and name not in fingerprints}   # scanned before, not this time
    run = {
        "zoo": zoo.uri, "targets": {**earlier, **{t.name: {"uri": t.uri, "classes": t.class_names,
                                                           "samples": t.num_rows, "fingerprint": t.fingerprint,
                                                           "students_left_out": sorted(students.get(t.name, []))}
                                                  for t in targets}},
        "settings": {"workers": n_workers, "batch_size": s.batch_size, "metrics": list(s.metrics),
                     "rank_by": s.rank_by, "split": s.split, "prefetch": s.prefetch, "resources": resources,
                     "decode_max_side": max_side},
        "versions": _versions(),
        "timings": {"data_seconds": round(data_seconds, 3), "scan_seconds": round(scan_seconds, 3),
                    "total_seconds": round(time.time() - t_start, 3),
                    "teachers_scored": len(todo), "pairs": int(len(ranking)),
                    "samples_per_second": round(len(todo) * samples / scan_seconds, 1) if todo and scan_seconds else None},
        "workers": usage,
        "errors": int((ranking["status"] != "ok").sum()),
        "complete": fatal is None,
    }
    out.write_bytes(RUN_FILE, json.dumps(run, indent=2, default=str).encode())
    if fatal is not None:
        raise fatal
    return ScanResult(ranking, run)


def _previous_run(out) -> dict:
    """The run.json an earlier scan of this folder wrote ({} if none, or unreadable)."""
    try:
        run = json.loads(out.read_bytes(RUN_FILE))
    except (SctdError, ValueError, UnicodeDecodeError):
        return {}
    return run if isinstance(run, dict) else {}


def decode_max_side(manifest) -> int:
    """The largest side a target image is decoded to: ``images.DECODE_MAX_SIDE``, or the
    largest input side of a teacher in the scan when that is larger."""
    from ..data.images import DECODE_MAX_SIDE

    sides = [int(v) for size in manifest["input_size"] if size is not None and len(size) == 3 for v in size[1:]]
    return max([DECODE_MAX_SIDE, *sides])


def _distilled_card(row) -> dict:
    """``source_task.distilled`` of a zoo entry: what `sctd distill` wrote into the config of a
    student it exported (the target, its splits' fingerprints, the search folder); {} if none."""
    try:
        task = json.loads(row.get("source_task") or "{}")
    except (TypeError, ValueError):
        return {}
    own = task.get("distilled") if isinstance(task, dict) else None
    return own if isinstance(own, dict) else {}


def _distilled_on(row, target) -> bool:
    """Whether a zoo entry is a student distilled on ``target``: by its name, or by a split's
    fingerprint (the same images and labels under another name)."""
    own = _distilled_card(row)
    prints = own.get("target_fingerprints")
    return own.get("target") == target.name or (
        isinstance(prints, dict) and bool(target.fingerprint) and target.fingerprint in prints.values())


def _exported_by(row, run_uri: str) -> bool:
    """Whether a zoo entry is a student exported by the distillation of the run ``run_uri``
    (its search folder lies in the run folder)."""
    search = _distilled_card(row).get("search")
    return isinstance(search, str) and search.startswith(run_uri.rstrip("/") + "/")


def _versions() -> dict:
    """Package versions for run.json, from their metadata (importing timm here would cost the
    driver ~2 s for a version string)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None
    return {"sctd_ray": v("sctd-ray"), "ray": v("ray"), "torch": v("torch"), "timm": v("timm"),
            "python": sys.version.split()[0]}


class ShardActor:
    """The scan's Ray actor: a ``worker.ShardWorker`` built in the actor's own process, so that
    the driver never imports the worker, and torch with it (~2 s of every ``sctd`` start)."""

    def __init__(self, *args):
        from .worker import ShardWorker

        self.worker = ShardWorker(*args)

    def score(self, *args):
        return self.worker.score(*args)

    def usage(self) -> dict:
        return self.worker.usage()

    def ping(self) -> str:
        return self.worker.ping()


def _dispatch(ray, s, zoo, results, targets, shards, todo, rows_by_id, resources, samples, log=print):
    """Feed each actor its shard (two calls in flight, so it can prefetch), steal work for idle
    actors from the longest remaining shard, and replace an actor that dies: its teachers go
    back to the front of its queue (a teacher that kills workers twice becomes an error row).
    A replacement gets no calls until it runs (it may wait for a new node, or for one that never
    comes): meanwhile the other actors may take all of its queue. A replacement that dies
    before it runs is not replaced again; teachers no actor is left to score become error rows.

    Restarts are done here rather than with Ray's ``max_restarts``, so that a new actor gets
    fresh arguments (Ray warns that restarting an actor whose arguments live in the object
    store can fail once they go out of scope)."""
    import uuid

    from tqdm import tqdm

    scan_id = uuid.uuid4().hex[:8]
    # two calls run at once: one finalises while the next one's forward runs (worker docstring)
    Actor = ray.remote(**resources, max_restarts=0, max_task_retries=0,
                       max_concurrency=IN_FLIGHT_PER_WORKER)(ShardActor)
    generation = [0] * len(shards)
    pings = {}   # (actor index, generation) -> ref of its first call: done once the actor runs

    def start(i):
        name = f"sctd-shard-{scan_id}-{i}" + (f"-r{generation[i]}" if generation[i] else "")
        actor = Actor.options(name=name).remote(zoo, results.store, targets, s.metrics, s.batch_size, None,
                                                s.prefetch, s.device_cache_mb)
        pings[(i, generation[i])] = actor.ping.remote()
        return actor

    started: set[tuple[int, int]] = set()   # (actor index, generation) whose ping answered

    def ran(i, gen) -> bool:
        """Whether that actor ever started: one placed on a node that died before Ray noticed
        (a replacement, scheduled onto the same dead node) never ran its teachers. Asked for
        every queue at each steal, so an answer once seen is kept."""
        if (i, gen) in started:
            return True
        ready, _ = ray.wait([pings[(i, gen)]], timeout=0)
        try:
            if ready and ray.get(ready[0]) is not None:
                started.add((i, gen))
                return True
        except Exception:
            pass
        return False

    actors = [start(i) for i in range(len(shards))]
    queues = [list(sh) for sh in shards]
    inflight: dict = {}  # ref -> (actor index, actor generation, teacher id)
    busy = [0] * len(actors)
    deaths: dict[str, int] = {}
    starting: dict = {}   # ping ref -> (index, generation) of a replacement actor not yet running
    gone: set[int] = set()   # actors whose replacement died before it ran: not replaced again
    why: dict[int, str] = {}   # actor index -> how its last actor died

    def fill_all():
        for j in range(len(actors)):
            while busy[j] < IN_FLIGHT_PER_WORKER and submit(j):
                pass

    fingerprints = {t.name: t.fingerprint for t in targets}

    def sha(tid):
        return rows_by_id[tid]["sha256"] or None

    def stalled(i) -> bool:
        """A replacement actor that has not run yet, or none at all (``gone``): no calls for it."""
        return i in gone or (generation[i] > 0 and not ran(i, generation[i]))

    def submit(i):
        if stalled(i):
            return False
        if not queues[i]:  # steal from the tail of the longest queue (all of a stalled actor's)
            ks = [k for k in range(len(queues)) if len(queues[k]) > 1 or (queues[k] and stalled(k))]
            if not ks:
                return False
            queues[i].append(queues[max(ks, key=lambda k: len(queues[k]))].pop())
        tid = queues[i].pop(0)
        upcoming = [(u, sha(u)) for u in queues[i][:s.prefetch]]
        ref = actors[i].score.remote(tid, sha(tid), todo[tid], upcoming)
        inflight[ref] = (i, generation[i], tid)
        busy[i] += 1
        return True

    for i in range(len(actors)):
        for _ in range(IN_FLIGHT_PER_WORKER):
            submit(i)
    bar = tqdm(total=len(todo), unit="teacher", desc="scan", disable=not s.progress,
               file=sys.stderr, dynamic_ncols=True)
    t0, n_done, fatal = time.time(), 0, None
    try:
        while inflight or (starting and any(queues)):
            ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1,
                                timeout=None if inflight else REPLACEMENT_WAIT_S)
            if not ready:   # nothing is scoring, and no replacement started (its node never came)
                for i, _gen in starting.values():
                    gone.add(i)
                    why[i] = f"its replacement did not start within {REPLACEMENT_WAIT_S:.0f} s"
                starting.clear()
                continue
            ref = ready[0]
            if ref in starting:   # a replacement runs now, or died before it ran
                i, gen = starting.pop(ref)
                if gen != generation[i]:   # that replacement ran, took calls and died since: the
                    continue               # newer one's ping is in `starting` itself
                if ran(i, gen):
                    log(f"scan: worker {i}'s replacement runs")
                    fill_all()
                else:
                    gone.add(i)
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - why it died, for the error rows
                        why[i] = death_reason(e)
                    log(f"scan: worker {i}'s replacement died before it ran; the other workers "
                              "take its teachers")
                    fill_all()
                continue
            i, gen, tid = inflight.pop(ref)
            if gen == generation[i]:
                busy[i] -= 1
            try:
                for row in ray.get(ref):   # already written by the worker
                    results.add(row)
            except ray.exceptions.RayTaskError as e:
                cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
                if isinstance(cause, (FatalScanError, StoreUnreachable, StoreAuthError)):
                    fatal = SctdError(str(getattr(e, "cause", cause) or cause).splitlines()[0])
                    break
                # the exception the worker raised, not Ray's "ray::ShardActor.score() (pid=...)" header
                raised = getattr(e, "cause", None)
                why_failed = (f"{type(raised).__name__}: {str(raised).splitlines()[0][:300]}"
                              if raised is not None and str(raised) else death_reason(e))
                _error_rows(results, tid, todo[tid], f"worker failed: {why_failed}",
                            fingerprints, sha(tid))
            except ray.exceptions.RayActorError as e:
                if ran(i, gen) or getattr(e, "actor_init_failed", False):
                    deaths[tid] = deaths.get(tid, 0) + 1
                why[i] = death_reason(e)
                if gen == generation[i] and i not in gone:  # the first news of this death: replace it
                    generation[i] += 1
                    busy[i] = 0
                    ray.kill(actors[i], no_restart=True)
                    actors[i] = start(i)
                    starting[pings[(i, generation[i])]] = (i, generation[i])
                    log(f"scan: worker {i} lost ({why[i]}); a replacement is "
                              "starting (on a node with room), the other workers take its teachers meanwhile")
                    fill_all()   # its queue is open to the others now (idle ones included)
                if deaths.get(tid, 0) >= MAX_WORKER_DEATHS_PER_TEACHER:
                    _error_rows(results, tid, todo[tid], f"worker died {deaths[tid]} times while scoring it: "
                                f"{why[i]}", fingerprints, sha(tid))
                else:
                    queues[i].insert(0, tid)
                    fill_all()
                    continue
            n_done += 1
            bar.update(1)
            elapsed = time.time() - t0
            bar.set_postfix_str(f"{n_done * samples / max(elapsed, 1e-9):.0f} samples/s", refresh=False)
            while busy[i] < IN_FLIGHT_PER_WORKER and submit(i):
                pass
    except BaseException:   # Ctrl-C / `ray job stop`: its SIGKILL follows in 3 s, no time for usage
        _kill_all(ray, actors)
        bar.close()
        raise
    bar.close()
    left = [tid for q in queues for tid in q] if fatal is None else []
    if left:   # every actor that could score them died, and no replacement ran
        log(f"scan: no worker left to score {len(left)} teacher(s): error rows (rerun with --resume)")
        for tid in left:
            _error_rows(results, tid, todo[tid], "no worker left to score it (the workers died and their "
                        f"replacements did not start): {'; '.join(sorted(set(why.values())))}",
                        fingerprints, sha(tid))
    # one wait for all: an actor that never started (waiting for a GPU node) has no usage
    refs = [a.usage.remote() for i, a in enumerate(actors) if ran(i, generation[i])]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10) if refs else ([], [])
    usage = []
    for ref in ready:
        try:
            usage.append(ray.get(ref))
        except Exception:  # a dead worker has no usage to report
            pass
    _kill_all(ray, actors)
    return fatal, usage


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def death_reason(e: BaseException) -> str:
    """One line on why a worker actor died: for an error in its constructor, the exception that
    Ray's message ends with (``RuntimeError: ...``), not its "died because of an error raised in
    its creation task, ray::..." header; otherwise the message's first line."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    raised = [ln for ln in lines[1:] if _EXCEPTION_LINE.match(ln)]
    return (f"its constructor raised {raised[-1]}" if "creation task" in lines[0] and raised
            else lines[0])[:200]


def _kill_all(ray, actors) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass


def _error_rows(results, tid, target_names, msg, fingerprints: dict, sha256: str | None,
                architecture: str | None = None):
    """The driver's own error rows (a broken manifest entry, a failed or twice-dead worker),
    stamped like a worker's with what they concern."""
    for tn in target_names:
        results.write({"target": tn, "teacher_id": tid, "architecture": architecture, "status": "error",
                       "error": msg, "samples": 0, "seconds": 0.0, "worker": "driver",
                       "finished_at": time.time(), "target_fingerprint": fingerprints.get(tn, ""),
                       "teacher_sha256": sha256})


def _current(row: dict, fingerprints: dict, shas: dict, config_shas: dict) -> bool:
    """A result row scored from this very target (its fingerprint), these very weights (the
    manifest's sha256) and this very config.json (its preprocessing, labels and model
    arguments; checked when the manifest records its sha256). Rows without the stamps (written
    before 0.1 recorded them) are not."""
    config_sha = config_shas.get(row["teacher_id"])
    return ("target_fingerprint" in row and row["target_fingerprint"] == fingerprints.get(row["target"])
            and "teacher_sha256" in row and (row["teacher_sha256"] or None) == shas.get(row["teacher_id"])
            and (config_sha is None or row.get("teacher_config_sha256") == config_sha))


def print_ranking(result: ScanResult, log=print) -> None:
    log(format_ranking(result.ranking))
    t = result.run.get("timings", {})
    if not t.get("teachers_scored"):
        log(f"nothing left to score: every pair was in the run already; {result.errors} error rows")
        return
    log(f"scored {t.get('teachers_scored')} teachers in {t.get('scan_seconds')}s "
        f"({t.get('samples_per_second')} samples/s); {result.errors} error rows")
