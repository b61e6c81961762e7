"""``sctd distill``: selection under a fixed budget (SPEC 5) with Ray Tune.

For one target of an assessed run: the top-k teachers of its ranking (or the ones named), each
with ``samples`` hyper-parameter draws (lam, tau, eps, lr; the first draw is the recipe's
default), plus the ``ce`` baseline with as many draws of lr, one Tune trial each. Trials run
concurrently on fractional resources, report every epoch (a few seconds), checkpoint every
epoch, and are pruned by ASHA on validation accuracy, except each source's default draw, which
always runs to the end so every teacher and the baseline get one full run. The search stops
inside the budget (start-up, draining and export included). Trials receive only uris and ids
and load the target and teacher themselves.

Outputs in OUT: ``results.parquet`` (one row per trial), ``summary.json``, ``search.json``
(budget bookkeeping for ``--resume``) and ``tune/`` (the Tune experiment); the best student
by validation accuracy is exported to the zoo (``export.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import BucketNotFound, NotFound, SctdError
from .recipe import DEFAULT_HP, DEFAULT_STUDENT, METHODS, Recipe, check_student

# what Ray Tune copies from the driver's environment into every trial actor's runtime env
# (``ray.tune.execution.class_cache``): stored with each actor and shown to every token holder
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
SEARCH_FILE = "search.json"
EXPERIMENT = "tune"
# (low, high) of each hyper-parameter; all but tau drawn log-uniformly.
SEARCH_SPACE = {"lam": (10.0, 300.0), "tau": (0.5, 2.0), "eps": (0.05, 0.3), "lr": (1e-3, 1e-2)}
LOG_UNIFORM = {"lam", "eps", "lr"}
RESULT_COLUMNS = ["trial_id", "teacher_id", "method", "lam", "tau", "eps", "lr", "epochs",
                  "val_acc", "test_acc", "seconds", "status", "error", "best_epoch",
                  "best_val_loss", "resumed_epoch", "sample", "rank", "val_curve"]


# --------------------------------------------------------------------------- settings

def parse_budget(text) -> float:
    """Seconds from ``600``, ``90s``, ``10m``, ``1h``, ``1h30m``; SctdError otherwise."""
    s = str(text).strip().lower()
    try:
        value = float(s)
    except ValueError:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?", s)
        if not s or not parts or not any(parts.groups()):
            raise SctdError(f"bad budget {text!r}: give seconds (600) or a duration like 90s, 10m, 1h, 1h30m") from None
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        value = h * 3600 + m * 60 + sec
    if not math.isfinite(value) or value <= 0:
        raise SctdError(f"bad budget {text!r}: it must be a positive duration")
    return value


@dataclass
class DistillSettings:
    """What ``sctd distill`` does; see ``add_distill_args`` for the meaning of each field."""

    target: str
    run: str | None = None
    out: str | None = None
    zoo: str | None = None
    top_k: int = 3
    teachers: list[str] | None = None
    method: str = "ot"
    samples: int = 3
    budget: float = 600.0
    student: str = DEFAULT_STUDENT
    seed: int = 0
    resume: bool = False
    export: bool = True
    address: str | None = None
    s3_endpoint: str | None = None
    recipe: dict = field(default_factory=dict)
    cpus_per_trial: float = 1.0
    trials_per_gpu: int = 4
    progress: bool = True
    given: tuple | None = None   # the settings the user gave (a resume names those not applied); None: all


@dataclass
class DistillResult:
    results: pd.DataFrame
    summary: dict

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))


# --------------------------------------------------------------------------- planning

def _draw(name: str, rng: np.random.Generator) -> float:
    lo, hi = SEARCH_SPACE[name]
    v = math.exp(rng.uniform(math.log(lo), math.log(hi))) if name in LOG_UNIFORM else rng.uniform(lo, hi)
    return float(f"{v:.3g}")


def plan_trials(teachers: list[str], method: str, samples: int, seed: int) -> list[dict]:
    """One entry per trial, round by round (the baseline, then each teacher), so a tight
    budget still reaches every source. Draw 0 is DEFAULT_HP and is protected from pruning."""
    if samples < 1:
        raise SctdError(f"--samples must be at least 1; got {samples}")
    check_seed(seed)
    plans = []
    sources = [(None, "ce")] + ([(t, method) for t in teachers] if method != "ce" else [])
    for i in range(samples):
        for tid, m in sources:
            if i == 0:
                hp = dict(DEFAULT_HP)
            else:
                rng = np.random.default_rng([seed, i, *(tid or "ce").encode()])
                hp = {k: _draw(k, rng) for k in SEARCH_SPACE} if m != "ce" else \
                    {**DEFAULT_HP, "lr": _draw("lr", rng)}
            plans.append({"trial_id": f"{len(plans):03d}-{tid or 'ce'}", "teacher_id": tid,
                          "method": m, "hp": hp, "sample": i, "protected": i == 0})
    return plans


# --------------------------------------------------------------------------- Tune plumbing

def _storage(out_store, s3_endpoint):
    """(storage_path, storage_filesystem) for Tune's experiment under OUT."""
    uri = out_store.uri
    if not uri.startswith("s3://"):
        return uri, None
    import pyarrow.fs

    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"endpoint_override": endpoint} if endpoint else {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return uri[len("s3://"):], pyarrow.fs.S3FileSystem(**kwargs)


def _resources(ray, s: DistillSettings) -> tuple[dict, int]:
    """Per-trial resources: a GPU share where there are GPUs (several small students per
    GPU), else CPU slots; and the torch threads a trial may use."""
    res = ray.cluster_resources()
    if res.get("GPU", 0) >= 1:
        return {"cpu": 1, "gpu": 1.0 / max(1, s.trials_per_gpu)}, 1
    cpu = float(s.cpus_per_trial)
    return {"cpu": cpu}, max(1, int(cpu))


# --------------------------------------------------------------------------- inputs

def check_search_args(budget, top_k: int, samples: int, student: str, seed: int = 0) -> float:
    """User errors in a search's settings, before anything runs (``sctd scan`` checks them
    before its assess step); returns the budget in seconds."""
    seconds = parse_budget(budget)
    if top_k < 1:
        raise SctdError(f"--top-k must be at least 1; got {top_k}")
    if samples < 1:
        raise SctdError(f"--samples must be at least 1; got {samples}")
    check_seed(seed)
    check_student(student)
    return seconds


def check_seed(seed: int) -> None:
    """numpy and torch seed with non-negative integers only (a negative one was a traceback)."""
    if seed < 0:
        raise SctdError(f"--seed must be a non-negative integer; got {seed}")


def _read_json(store, key):
    try:
        return json.loads(store.read_bytes(key))
    except BucketNotFound:   # not "run.json not found": the bucket is (a typo in --run, --out)
        raise
    except NotFound:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SctdError(f"{store.join(key)} is not valid JSON: {e}") from None


def _read_search(out) -> dict | None:
    """OUT/search.json (None: no search there yet); one line when it is not what a search
    writes (a damaged or foreign file was a traceback on --resume)."""
    previous = _read_json(out, SEARCH_FILE)
    if previous is None:
        return None
    if not (isinstance(previous, dict) and isinstance(previous.get("target"), str)
            and isinstance(previous.get("teachers"), list) and isinstance(previous.get("settings"), dict)):
        raise SctdError(f"{out.join(SEARCH_FILE)} is not the search.json `sctd distill` writes (a JSON "
                        "object with target, teachers and settings): choose another --out")
    return previous


def _resolve(s: DistillSettings):
    """(run store, run.json, zoo uri, target uri, target name, ranking rows of the target)."""
    from ..assess.results import RANKING_FILE, RUN_FILE, read_table
    from ..data.targets import target_name
    from ..zoo.store import open_store

    run_store = open_store(s.run, s3_endpoint=s.s3_endpoint) if s.run else None
    run = _read_json(run_store, RUN_FILE) if run_store else {}
    if run is not None and not isinstance(run, dict):
        raise SctdError(f"{run_store.join(RUN_FILE)} is not the run.json `sctd assess` writes "
                        "(a JSON object naming the zoo and the targets)")
    zoo = s.zoo or (run or {}).get("zoo")
    if not zoo:
        if run is None:
            raise SctdError(f"{run_store.join(RUN_FILE)} not found: --run must be the output of "
                            f"`sctd assess` (or pass --zoo and name the teachers with --teacher)")
        raise SctdError("no zoo: pass --zoo (the run's run.json does not name its zoo)")
    run = run or {}
    targets = run.get("targets") if isinstance(run.get("targets"), dict) else {}
    if s.target in targets:
        name, uri = s.target, targets[s.target].get("uri") or s.target
    else:
        uri, name = open_store(s.target, s3_endpoint=s.s3_endpoint).uri, target_name(s.target)
        if targets and name not in targets:
            raise SctdError(f"target {s.target!r} is not in the run {s.run} "
                            f"(it has: {', '.join(targets)})")
    ranking = pd.DataFrame()
    if run_store is not None:
        try:
            table = read_table(run_store, RANKING_FILE, columns=("target", "teacher_id", "status", "rank"))
        except NotFound:
            if not s.teachers:
                raise SctdError(f"{run_store.join(RANKING_FILE)} not found: run `sctd assess` first "
                                "or name the teachers with --teacher") from None
            table = pd.DataFrame(columns=["target", "teacher_id", "status", "rank"])
        ranking = table[table["target"].astype(str) == name]
        if ranking.empty and not s.teachers:
            raise SctdError(f"the run {s.run} has no ranking for target {name!r}")
    elif not s.teachers:
        raise SctdError("name the teachers with --teacher when there is no --run")
    return run_store, run, zoo, uri, name, ranking


def _choose_teachers(s: DistillSettings, ranking: pd.DataFrame) -> list[str]:
    from ..zoo.teacher import check_teacher_id

    if s.method == "ce":
        if s.teachers:   # the baseline only: say so rather than drop the teachers without a word
            print(f"sctd: note: --method ce trains the ce baseline only; --teacher {', '.join(s.teachers)} "
                  "not used", file=sys.stderr)
        return []
    if s.teachers:
        return [check_teacher_id(t) for t in dict.fromkeys(s.teachers)]
    if s.top_k < 1:
        raise SctdError(f"--top-k must be at least 1; got {s.top_k}")
    ok = ranking[ranking["status"] == "ok"].sort_values("rank")
    if ok.empty:
        raise SctdError("the ranking has no successfully scored teacher for this target")
    return [str(t) for t in ok["teacher_id"].head(s.top_k)]


def _check_in_zoo(zoo_store, teachers: list[str]) -> None:
    """Each teacher's config is in the zoo, read before Ray starts: a wrong --teacher, a
    teacher removed since the scan, or an unreachable zoo is one line here, not a failed
    trial per teacher. With no teacher (``--method ce``) the zoo is still reached once,
    since the student is written back to it."""
    from ..zoo.manifest import MANIFEST_FILE
    from ..zoo.teacher import TEACHERS_PREFIX, config_key

    if not teachers:
        zoo_store.exists(MANIFEST_FILE)
        return
    missing = [t for t in teachers if not zoo_store.exists(config_key(t))]
    if missing:
        if not zoo_store.list(f"{TEACHERS_PREFIX}/"):      # a wrong bucket or folder says so here
            raise SctdError(f"{zoo_store.uri} holds no teachers (expected teachers/<id>/config.json): "
                            "check --zoo or the run's zoo")
        raise SctdError(f"teacher(s) not in the zoo {zoo_store.uri}: {missing}")


def _default_out(run_store, name: str) -> str:
    """The search folder of target ``name`` in a run, where ``sctd scan`` puts it and the report
    looks: RUN/distill/<name> when it exists or RUN/distill holds another target's search (a run
    of several targets), else RUN/distill."""
    if run_store.exists(f"distill/{name}/{SEARCH_FILE}"):
        return run_store.join(f"distill/{name}")
    if _root_search_target(run_store) not in (None, name):
        return run_store.join(f"distill/{name}")
    return run_store.join("distill")


def _root_search_target(run_store) -> str | None:
    """The target of the search in RUN/distill itself (None: none there)."""
    root = _read_json(run_store, f"distill/{SEARCH_FILE}")
    return root.get("target") if isinstance(root, dict) else None


def _search_budget(s: DistillSettings, previous: dict | None, budget: float) -> float:
    """The budget of the search: a finished one keeps its own, and how it ended (summary.json,
    the report); a resumed unfinished one keeps its own unless --budget is given (a larger one
    lets it go on), so a plain --resume does not give it the default 600 s instead."""
    if previous and (previous.get("complete") or s.given is not None and "budget" not in s.given):
        return float(previous.get("budget_s", budget))
    return budget


def _export_now(s: DistillSettings, previous: dict | None, finished: bool) -> bool:
    """Whether this session writes the best student to the zoo: a new search as asked; a resumed
    one as it was planned (``--export``/``--no-export`` given with the --resume change that); a
    finished one only with an explicit ``--export`` (looking at its results writes nothing: not
    into a zoo its ``--no-export`` kept clean, nor a student deleted since)."""
    explicit = s.given is not None and "export" in s.given
    if finished:
        return s.export and explicit
    if previous and not explicit and s.given is not None:
        return bool(previous["settings"].get("export", True))
    return s.export


def _exported_before(zoo, out) -> dict | None:
    """A finished search's export, as its summary.json recorded it, while the student is still in
    the zoo (None otherwise: the summary does not name a student that is gone)."""
    done = _read_json(out, SUMMARY_FILE)
    export = done.get("export") if isinstance(done, dict) else None
    if not isinstance(export, dict) or not export.get("teacher_id"):
        return None
    from ..zoo.teacher import weights_key

    return export if zoo.exists(weights_key(export["teacher_id"])) else None


def _say_kept_settings(kept: dict, given: dict, finished: bool = False) -> None:
    """A resumed search keeps its own settings (its trials were planned with them; a finished
    one also its budget): say so when the command gave others, instead of ignoring them."""
    other = {k: v for k, v in given.items() if k in kept and kept[k] != v}
    if other:
        what = "the search is complete, with" if finished else "--resume continues the search with"
        print(f"sctd: note: {what} its own settings ("
              + ", ".join(f"{k} {kept[k]}" for k in other) + "); "
              + ", ".join(f"{k} {v}" for k, v in other.items())
              + " not applied (another --out starts a new search)", file=sys.stderr)


def _warn_if_changed_since_ranked(zoo_store, teachers: list[str], ranking: pd.DataFrame) -> None:
    """One warning line per teacher whose weights or config.json are not those the ranking
    scored (its rows' ``teacher_sha256``/``teacher_config_sha256``): its rank may not hold.
    Weights are hashed where that is cheap (a local zoo; an S3 object's sha256 metadata)."""
    import hashlib

    from ..zoo.manifest import weights_sha256
    from ..zoo.teacher import read_config_bytes, weights_key

    if ranking.empty or "teacher_sha256" not in ranking.columns:
        return
    for tid in teachers:
        rows = ranking[ranking["teacher_id"] == tid]
        if rows.empty:
            continue
        row = rows.iloc[0]
        now = {"teacher_sha256": weights_sha256(zoo_store, weights_key(tid)),
               "teacher_config_sha256": hashlib.sha256(read_config_bytes(zoo_store, tid)).hexdigest()}
        changed = [name for name, sha in (("weights", "teacher_sha256"), ("config.json", "teacher_config_sha256"))
                   if isinstance(row.get(sha), str) and row.get(sha) and now[sha] and now[sha] != row[sha]]
        if changed:
            print(f"sctd: warning: teacher {tid!r}: its {' and '.join(changed)} changed since the run "
                  "ranked it; its rank may not hold (`sctd assess --resume` scores it again)",
                  file=sys.stderr)


def _warn_if_target_changed_since_ranked(run: dict, name: str, target_uri: str, fingerprints: dict) -> None:
    """One warning line when the target's images or labels are not those the run ranked the
    teachers on (run.json's fingerprint of the split it scored): another folder under the same
    name, or the folder changed since the scan. The top-k are then another task's."""
    ranked = ((run.get("targets") or {}).get(name) or {}).get("fingerprint")
    split = (run.get("settings") or {}).get("split") or "train"
    if ranked and fingerprints.get(split) and fingerprints[split] != ranked:
        print(f"sctd: warning: target {name!r} ({target_uri}): its {split} split's images or labels are "
              "not those the run ranked the teachers on; the ranking may not hold (`sctd assess "
              "--resume` with this target scores it again)", file=sys.stderr)


def _scores(ranking: pd.DataFrame, teacher_id: str | None) -> dict:
    from ..assess.results import BASE_COLUMNS, TAIL_COLUMNS

    if teacher_id is None or ranking.empty:
        return {}
    rows = ranking[ranking["teacher_id"] == teacher_id]
    if rows.empty:
        return {}
    r = rows.iloc[0]
    out = {}
    for k, v in r.items():
        if k in BASE_COLUMNS or k in TAIL_COLUMNS and k != "rank" or k == "finished_at":
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and not pd.isna(v):
            out[k] = v.item() if hasattr(v, "item") else v
    return out


# --------------------------------------------------------------------------- the search

def run_distill(s: DistillSettings, log=print) -> DistillResult:
    """Run (or resume) the budgeted search for one target; see the module docstring."""
    t_start = time.time()
    from ray import tune

    from ..assess.scan import ensure_ray
    from ..zoo.store import open_store
    from . import trial as tr

    if s.method not in METHODS:
        raise SctdError(f"unknown --method {s.method!r}; expected one of {', '.join(METHODS)}")
    budget = parse_budget(s.budget)
    if not s.cpus_per_trial > 0:   # was taken as 0.1 of a CPU without a word
        raise SctdError(f"--cpus-per-trial must be a positive number; got {s.cpus_per_trial}")
    recipe = Recipe.from_dict(s.recipe)
    check_student(s.student)
    run_store, run, zoo_uri, target_uri, name, ranking = _resolve(s)
    out_uri = s.out or (_default_out(run_store, name) if run_store is not None else None)
    if not out_uri:
        raise SctdError("no output folder: pass --out (or --run, whose distill/ folder is the default)")
    out = open_store(out_uri, s3_endpoint=s.s3_endpoint)
    zoo = open_store(zoo_uri, s3_endpoint=s.s3_endpoint)

    previous = _read_search(out)
    if previous and not s.resume:
        raise SctdError(f"{out.uri} already holds a distillation search: pass --resume to continue "
                        "it, or choose another --out")
    if previous and previous.get("target") != name:
        raise SctdError(f"{out.uri} holds the search of target {previous.get('target')!r}, not {name!r}")
    used_before = float(previous.get("used_s", 0.0)) if previous else 0.0
    finished = bool(previous and previous.get("complete"))
    budget = _search_budget(s, previous, budget)
    teachers = previous["teachers"] if previous else _choose_teachers(s, ranking)
    # what the search is planned with: a resumed one keeps its own (a note names those not applied)
    planned = {"method": s.method, "samples": s.samples, "top_k": s.top_k, "seed": s.seed,
               "student": s.student, "recipe": recipe.to_dict(), "export": s.export}
    if previous:
        planned.update(previous["settings"])
        given = {"method": s.method, "samples": s.samples, "top_k": s.top_k, "seed": s.seed,
                 "student": s.student, "budget": s.budget}
        if s.recipe:   # --recipe/--epochs: the settings named there
            given["recipe"] = {k: recipe.to_dict()[k] for k in s.recipe}
        if s.teachers:
            given["teachers"] = list(dict.fromkeys(s.teachers))
        kept = {**planned, "budget": budget, "teachers": teachers,
                "recipe": {k: planned["recipe"].get(k) for k in s.recipe}}
        _say_kept_settings(kept, {k: v for k, v in given.items()
                                  if s.given is None or k in s.given or k in ("recipe", "teachers")}, finished)
        recipe = Recipe.from_dict(planned["recipe"])
    export_now = _export_now(s, previous, finished)
    planned["export"] = export_now if not finished else planned.get("export", True)
    _check_in_zoo(zoo, teachers)
    _warn_if_changed_since_ranked(zoo, teachers, ranking)
    classes, fingerprints = _check_target(target_uri, s.s3_endpoint)
    _warn_if_target_changed_since_ranked(run, name, target_uri, fingerprints)
    if planned["method"] == "kd":
        _check_kd(zoo, teachers, classes)
    plans = plan_trials(teachers, planned["method"], planned["samples"], planned["seed"])

    ray = ensure_ray(s.address)
    resources, threads = _resources(ray, s)
    storage_path, storage_fs = _storage(out, s.s3_endpoint)
    exp_path = f"{storage_path}/{EXPERIMENT}"  # local path, or bucket/key with storage_fs
    common = {"zoo": zoo.uri, "target_uri": target_uri, "s3_endpoint": s.s3_endpoint,
              "recipe": recipe.to_dict(), "seed": planned["seed"], "student": planned["student"],
              "threads": threads}
    search = {"target": name, "target_uri": target_uri, "run": run_store.uri if run_store else None,
              "zoo": zoo.uri, "teachers": teachers, "budget_s": budget, "used_s": used_before,
              "sessions": (previous or {}).get("sessions", 0) + 1, "complete": finished,
              "settings": ({**previous["settings"], "export": planned["export"]} if previous
                           else {**planned, "resources": resources})}

    def used() -> float:   # a finished search spends nothing more: looking at it is free
        return used_before + (0.0 if finished else time.time() - t_start)

    def save():   # with the longest report interval (start-up included) seen, for a resume's stopper
        out.write_bytes(SEARCH_FILE, json.dumps({**search, "used_s": round(used(), 3),
                                                 "max_interval_s": round(live["max_interval"], 3)},
                                                indent=2).encode())

    remaining = budget - used_before
    # a resume knows how long its trials take to report (restored trials report only after their
    # start-up): without it the stopper assumes FORCE_STOP_S and a short remaining budget trains nothing
    max_interval = float((previous or {}).get("max_interval_s") or 0.0)
    live = {"deadline": t_start + remaining, "max_interval": max_interval, "last_report": {}, "trial_start": {},
            "best": (-1.0, None), "log": log, "progress": s.progress, "last_line": 0.0,
            "last_save": time.time(), "save": save, "used": used, "budget": budget, "budget_hit": False}
    if finished:
        live["budget_hit"] = bool((_read_json(out, SUMMARY_FILE) or {}).get("stopped_by_budget"))
    key = exp_path
    tr.LIVE[key] = live
    save()
    keep_credentials_out_of_trials()
    trainable = tune.with_resources(tr.distill_trial, resources)
    restored = False
    try:
        if previous and _can_restore(tune, exp_path, storage_fs):
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=storage_fs)
            restored = True
            log(f"distill {name}: resuming the search in {out.uri} ({used_before:.0f}s of "
                f"{budget:.0f}s used before)")
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([{**p, **common} for p in plans])},
                tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=tr.scheduler(recipe.epochs),
                                            reuse_actors=True,
                                            time_budget_s=max(1.0, live["deadline"] - time.time()
                                                              - tr.END_RESERVE_S),
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(
                    name=EXPERIMENT, storage_path=storage_path, storage_filesystem=storage_fs, verbose=0,
                    stop=tr.BudgetStopper(key), callbacks=[tr.Progress(key)],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=0)))
            log(f"distill {name}: {len(plans)} trials ({len(teachers)} teacher(s) x {planned['samples']} draw(s) "
                f"+ ce baseline) on {resources}, budget {budget:.0f}s")
        spent = False
        if previous and previous.get("complete"):
            log(f"distill {name}: the search in {out.uri} is already complete")
        elif live["deadline"] - time.time() > tr.END_RESERVE_S + 1:
            with tr.quiet_tune():
                tuner.fit()
            # Tune's own time_budget_s is the backstop of BudgetStopper: either one ended it
            live["budget_hit"] |= time.time() >= live["deadline"] - tr.END_RESERVE_S - 0.5
        else:
            spent = True
            log(f"distill {name}: no budget left ({used():.0f}s of {budget:.0f}s used)")
    finally:
        tr.LIVE.pop(key, None)

    trials, interrupted = _collect(exp_path, storage_fs)
    if spent:   # the budget is gone: a trial that has not finished never will (not a resume point)
        interrupted, live["budget_hit"] = False, True
        for t in trials:
            if t["status"] not in ("TERMINATED", "ERROR"):
                t["status"] = "TERMINATED"
    results = _results_table(trials, ranking)
    from ..assess.results import write_table

    write_table(out, RESULTS_FILE, results)
    save()   # the time spent, before the export (one that fails left a resume '0s used before')
    best, ce = _pick(results), _pick(results[results["method"] == "ce"])
    export = _exported_before(zoo, out) if finished and not export_now else None
    if best is not None and export_now and not interrupted:
        export = _export(zoo, out, trials, best, ce, name, target_uri, fingerprints, ranking,
                         budget, used, search["settings"])
    search["complete"] = not interrupted
    save()
    summary = _summary(name, target_uri, out.uri, run_store, zoo, teachers, ranking, results, best, ce, budget,
                       used(), interrupted, live["budget_hit"], export, search["settings"], restored)
    # a finished search looked at again names the student it exported before, written by then
    summary["export_written"] = bool(export) and export_now
    if export and summary["best"]:
        summary["best"]["student_uri"] = export["uri"]
    out.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2, default=_jsonable).encode())
    return DistillResult(results, summary)


def keep_credentials_out_of_trials() -> None:
    """Stop Ray Tune from copying the driver's S3 keys into each trial actor's runtime env, where
    Ray logs them (runtime_env_agent.log) and `ray list actors --detail` shows them to anyone
    holding the cluster's token. Trials read S3 with their node's own credential chain, as the
    scan's workers do (the environment Ray started with, or the job's runtime env)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(CREDENTIAL_VARS)


def _trial_name(trial) -> str:
    return trial.config["trial"]["trial_id"]


def _can_restore(tune, exp_path, storage_fs) -> bool:
    try:
        return tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs)
    except Exception:  # a half-written experiment folder: start afresh
        return False


def _check_target(target_uri, s3_endpoint) -> tuple[list[str], dict[str, str]]:
    """Read the target's train, val and test splits once on the driver, so a missing split or a
    bad image is one error before any trial (every trial would fail on it); its class names and
    its splits' fingerprints (for the student's card: a scan of any of them leaves the student
    out of its ranking, under any target name)."""
    from ..data.targets import load_target

    task = load_target(target_uri, s3_endpoint=s3_endpoint)
    return task.class_names, dict(task.fingerprints)


def _check_kd(zoo, teachers, classes: list[str]) -> None:
    """kd needs equal label names: refuse before any trial starts (SPEC 4)."""
    from ..zoo.loading import read_config

    names = {t: read_config(zoo, t).label_names for t in teachers}
    other = [t for t in teachers if sorted(names[t]) != sorted(classes)]
    if other:
        t = other[0]
        same = [t for t in teachers if t not in other]
        hint = (f"; of these, {' '.join('--teacher ' + x for x in same)} would do" if same else "")
        raise SctdError(f"kd needs the teacher's label names to equal the target's class names: "
                        f"teacher {t!r} has {names[t]}, the target has {classes}"
                        + (f" ({len(other)} of {len(teachers)} teachers differ)" if len(other) > 1 else "")
                        + f"; use --method ot{hint}")


def _collect(exp_path, storage_fs):
    """Every trial of the experiment with its state, last result, curve and checkpoint;
    ``interrupted`` when some trial is neither finished nor failed (Ctrl-C: resume it)."""
    from ray.tune import ExperimentAnalysis

    from .trial import quiet_tune

    try:
        with quiet_tune():
            ea = ExperimentAnalysis(exp_path, storage_filesystem=storage_fs)
            frames = ea.trial_dataframes
    except ValueError:  # no experiment state: the budget ran out before Tune started
        return [], False
    trials = []
    interrupted = False
    for t in ea.trials:
        p = t.config["trial"]
        df = frames.get(t.trial_id)
        curve = [float(v) for v in df["epoch_val_acc"].dropna()] if df is not None and "epoch_val_acc" in df else []
        if t.status not in ("TERMINATED", "ERROR"):
            interrupted = True
        result, checkpoint = dict(t.last_result or {}), t.checkpoint
        if t.status == "TERMINATED" and not result.get("finished"):
            later = _checkpointed_epoch(t)
            if later is not None and later[0].get("epoch", 0) > (result.get("epoch") or 0):
                result, curve, checkpoint = later
        trials.append({"plan": p, "status": t.status, "result": result,
                       "error": _error_line(t), "curve": curve, "checkpoint": checkpoint})
    trials.sort(key=lambda x: x["plan"]["trial_id"])
    return trials, interrupted


def _checkpointed_epoch(trial):
    """(metrics, curve, checkpoint) of the last epoch a stopped trial checkpointed, or None. A
    trial checkpoints an epoch before its report reaches the driver, and a search stopped by its
    budget in between never records that report: the epoch is read back from the checkpoint
    (``train.METRICS_FILE``) instead of counting the trial as not run."""
    import pyarrow.fs as pafs
    from ray.tune import Checkpoint

    from .train import BEST_FILE, METRICS_FILE, STUDENT_FILE

    storage = getattr(trial, "storage", None)
    if storage is None:
        return None
    fs = storage.storage_filesystem
    try:
        found = fs.get_file_info(pafs.FileSelector(trial.path, allow_not_found=True))
    except OSError:
        return None
    folders = sorted(i.path for i in found if i.type == pafs.FileType.Directory
                     and i.base_name.startswith("checkpoint_"))
    for folder in reversed(folders):
        # a checkpoint still being copied when the trial was stopped may hold its small
        # metrics.json but not yet the student files an export reads: the one before it then
        try:
            if any(i.type != pafs.FileType.File for i in fs.get_file_info(
                    [f"{folder}/{STUDENT_FILE}", f"{folder}/{BEST_FILE}"])):
                continue
            with fs.open_input_stream(f"{folder}/{METRICS_FILE}") as f:
                saved = json.loads(f.read())
            return dict(saved["last"]), [float(v) for v in saved["curve"]], Checkpoint(folder, filesystem=fs)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _error_line(trial) -> str | None:
    from .trial import error_reason

    return error_reason(trial) if trial.status == "ERROR" else None


def _results_table(trials, ranking) -> pd.DataFrame:
    rows = []
    for t in trials:
        p, r = t["plan"], t["result"]
        hp = p["hp"]
        has_val = r.get("val_acc") is not None
        if t["status"] == "ERROR":
            status = "error"
        elif t["status"] != "TERMINATED":
            status = "interrupted"
        elif r.get("finished"):
            status = "ok"
        else:
            status = "stopped" if has_val else "not_run"
        teacher_rank = None
        if p["teacher_id"] and not ranking.empty:
            m = ranking[ranking["teacher_id"] == p["teacher_id"]]
            if len(m) and not pd.isna(m["rank"].iloc[0]):
                teacher_rank = int(m["rank"].iloc[0])
        ce = p["method"] == "ce"
        rows.append({
            "trial_id": p["trial_id"], "teacher_id": p["teacher_id"], "method": p["method"],
            "lam": np.nan if ce else hp["lam"], "tau": np.nan if ce else hp["tau"],
            "eps": hp["eps"] if p["method"] == "ot" else np.nan, "lr": hp["lr"],
            "epochs": int(r.get("epoch", 0) or 0),
            "val_acc": r.get("val_acc", np.nan) if has_val else np.nan,
            "test_acc": r.get("test_acc", np.nan) if has_val else np.nan,
            "seconds": float(r.get("seconds", 0.0) or 0.0), "status": status, "error": t["error"],
            "best_epoch": int(r.get("best_epoch", 0) or 0),
            "best_val_loss": r.get("best_val_loss", np.nan), "resumed_epoch": int(r.get("resumed_epoch", 0) or 0),
            "sample": p["sample"], "rank": teacher_rank, "val_curve": t["curve"]})
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    df["rank"] = df["rank"].astype("Int64")
    for c in ("lam", "tau", "eps", "lr", "val_acc", "test_acc", "best_val_loss"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def _pick(df: pd.DataFrame) -> dict | None:
    """Best trial by validation accuracy (ties: lower validation loss, then trial order)."""
    ok = df[df["status"].isin(["ok", "stopped"]) & df["val_acc"].notna()]
    if ok.empty:
        return None
    ok = ok.assign(_l=ok["best_val_loss"].fillna(np.inf))
    return ok.sort_values(["val_acc", "_l", "trial_id"], ascending=[False, True, True]).iloc[0] \
        .drop("_l").to_dict()


def _export(zoo, out, trials, best, ce, name, target_uri, fingerprints, ranking, budget, used, settings) -> dict:
    from .export import export_student, student_id
    from .train import BEST_FILE, STUDENT_FILE

    t = next(t for t in trials if t["plan"]["trial_id"] == best["trial_id"])
    if t["checkpoint"] is None:
        raise SctdError(f"the best trial {best['trial_id']} left no checkpoint to export")
    with t["checkpoint"].as_directory() as d:
        with open(os.path.join(d, STUDENT_FILE)) as f:
            config_json = f.read()
        with open(os.path.join(d, BEST_FILE), "rb") as f:
            weights = f.read()
    source = _str(best["teacher_id"]) or "ce"
    sid = student_id(name, source, out.uri)
    cfg = json.loads(config_json)
    card = {
        "target": name, "target_uri": target_uri, "target_fingerprints": fingerprints,
        "class_names": cfg.get("label_names"), "teacher_id": _str(best["teacher_id"]), "method": best["method"],
        "teacher_scores": _scores(ranking, _str(best["teacher_id"])),
        "hp": {k: _num(best[k]) for k in ("lam", "tau", "eps", "lr")},
        "trial_id": best["trial_id"], "val_acc": _num(best["val_acc"]), "test_acc": _num(best["test_acc"]),
        "best_epoch": int(best["best_epoch"]), "epochs": int(best["epochs"]),
        "ce_baseline": None if ce is None else {"trial_id": ce["trial_id"], "val_acc": _num(ce["val_acc"]),
                                                "test_acc": _num(ce["test_acc"])},
        "budget_s": budget, "used_s": round(used(), 3), "search": out.uri,
        "student": {"architecture": cfg.get("architecture"), "model_args": cfg.get("model_args")},
        "recipe": settings.get("recipe"),
    }
    uri = export_student(zoo, sid, config_json, weights, card)
    return {"teacher_id": sid, "uri": uri}


def _num(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _str(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if v is pd.NA:
        return None
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _summary(name, target_uri, out_uri, run_store, zoo, teachers, ranking, results, best, ce, budget, used_s,
             interrupted, budget_hit, export, settings, restored) -> dict:
    per_teacher = []
    for tid in teachers:
        rows = results[(results["teacher_id"] == tid)]
        b = _pick(rows)
        per_teacher.append({"teacher_id": tid, "rank": _scores(ranking, tid).get("rank"),
                            "scores": _scores(ranking, tid), "trials": int(len(rows)),
                            "best_trial_id": b["trial_id"] if b else None,
                            "val_acc": _num(b["val_acc"]) if b else None,
                            "test_acc": _num(b["test_acc"]) if b else None})

    def brief(row):
        if row is None:
            return None
        out = {k: _num(row[k]) for k in ("lam", "tau", "eps", "lr", "val_acc", "test_acc")}
        return {"trial_id": row["trial_id"], "teacher_id": _str(row["teacher_id"]), "method": row["method"],
                **out, "epochs": int(row["epochs"])}

    gain = None
    if best is not None and ce is not None and not pd.isna(best["test_acc"]) and not pd.isna(ce["test_acc"]):
        gain = round(100 * (float(best["test_acc"]) - float(ce["test_acc"])), 2)
    return {
        "target": name, "target_uri": target_uri, "run": run_store.uri if run_store else None, "zoo": zoo.uri,
        "out": out_uri, "complete": not interrupted, "resumed": restored, "budget_s": budget,
        "used_s": round(used_s, 3), "stopped_by_budget": bool(budget_hit),
        "best_trial_id": best["trial_id"] if best else None,
        "best_teacher": _str(best["teacher_id"]) if best else None,
        "best": brief(best), "ce_baseline": brief(ce), "gain_vs_ce_points": gain,
        "teacher_scores": _scores(ranking, _str(best["teacher_id"])) if best else {},
        "teachers": per_teacher, "trials": int(len(results)),
        "trials_by_status": {k: int(v) for k, v in results["status"].value_counts().items()},
        "export": export, "settings": settings,
    }


# --------------------------------------------------------------------------- CLI

def format_summary(summary: dict) -> str:
    """The printed summary: best teacher, student accuracy vs the ce baseline, budget used."""
    lines = []
    st = summary.get("trials_by_status", {})
    lines.append(f"distill {summary['target']}: {summary['trials']} trials"
                 + (" (" + ", ".join(f"{v} {k}" for k, v in sorted(st.items())) + ")" if st else "") + " in "
                 f"{summary['used_s']:.0f}s of a {summary['budget_s']:.0f}s budget"
                 + ("" if summary["complete"] else " -- INTERRUPTED: rerun with --resume"))
    b, ce = summary.get("best"), summary.get("ce_baseline")
    if b:
        src = b["teacher_id"] or "no teacher"
        hp = ", ".join(f"{k}={b[k]:g}" for k in ("lam", "tau", "eps", "lr") if b.get(k) is not None)
        lines.append(f"  best student: {src} ({b['method']}; {hp}) val {b['val_acc']:.3f} test {b['test_acc']:.3f}")
    elif summary.get("stopped_by_budget"):
        lines.append("  no trial produced a student: none finished an epoch within the budget; give a "
                     "larger --budget, or cheaper epochs with --recipe '{\"steps_per_epoch\": 20, "
                     "\"student_max_side\": 64}' (a smaller student input; docs/distill.md)")
    elif not summary.get("complete"):
        lines.append("  no student exported yet: the search was interrupted (--resume continues it)")
    else:
        lines.append("  no trial produced a student")
    if ce:
        gain = summary.get("gain_vs_ce_points")
        lines.append(f"  ce baseline:  val {ce['val_acc']:.3f} test {ce['test_acc']:.3f}"
                     + (f"  -> {gain:+.1f} points test accuracy" if gain is not None else ""))
    for t in summary.get("teachers", []):
        acc = (f"best val {t['val_acc']:.3f} test {t['test_acc']:.3f}" if t["val_acc"] is not None
               else "no result" if summary.get("complete", True) else "no finished trial yet")
        rank = f"rank {t['rank']}" if t.get("rank") is not None else "unranked"
        lines.append(f"  teacher {t['teacher_id']} ({rank}): {t['trials']} trials, {acc}")
    if summary.get("export") and summary.get("export_written", True):
        lines.append(f"  exported student: {summary['export']['uri']}")
    elif summary.get("export"):
        lines.append(f"  student exported earlier: {summary['export']['uri']} (not written again; "
                     "--export writes it again)")
    return "\n".join(lines)


def add_distill_args(p) -> None:
    """Options of ``sctd distill`` (SPEC 5)."""
    p.add_argument("--run", required=True, help="assessed run folder (local or s3://) with ranking.parquet")
    p.add_argument("--target", required=True, help="target name in the run (or the target's uri)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/distill, or RUN/distill/TARGET in a run whose distill/ holds another target's search, as sctd scan writes them)")
    p.add_argument("--zoo", default=None, help="zoo (default: the zoo recorded in RUN/run.json)")
    p.add_argument("--top-k", type=int, default=None, help="distill from the k best-ranked teachers (default 3)")
    p.add_argument("--teacher", action="append", default=None,
                   help="distill from this teacher id instead of the top-k (repeatable)")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="ot (default; across label spaces), kd (same label names only), ce (baseline only)")
    p.add_argument("--budget", default=None, help="wall-clock budget: seconds, or 90s, 10m, 1h (default 600)")
    p.add_argument("--samples", type=int, default=None,
                   help="hyper-parameter draws per teacher and for the ce baseline (default 3)")
    p.add_argument("--student", default=None,
                   help=f"timm architecture of the student (default {DEFAULT_STUDENT})")
    add_recipe_args(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the draws and the trials (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out (finished trials are kept)")
    p.add_argument("--export", dest="export", action="store_true", default=None,
                   help="write the best student to the zoo (default; a --resume keeps the search's "
                        "choice, and a finished search's student is written again only with --export)")
    p.add_argument("--no-export", dest="export", action="store_false", default=None,
                   help="do not write to the zoo")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPU share of one trial on CPU-only clusters (default 1)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3 or AWS's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def recipe_from_args(args) -> dict:
    """``--recipe JSON`` and ``--epochs`` as recipe overrides, checked (``Recipe.from_dict``)."""
    recipe = {}
    if getattr(args, "recipe", None):
        try:
            recipe = json.loads(args.recipe)
        except json.JSONDecodeError as e:
            raise SctdError(f"--recipe must be a JSON object: {e}") from None
        if not isinstance(recipe, dict):
            raise SctdError("--recipe must be a JSON object")
    if getattr(args, "epochs", None) is not None:
        recipe["epochs"] = args.epochs
    Recipe.from_dict(recipe)
    return recipe


def add_recipe_args(p) -> None:
    """``--epochs`` and ``--recipe`` (``sctd distill`` and ``sctd scan``)."""
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the recipe's)")
    p.add_argument("--recipe", default=None, metavar="JSON",
                   help="recipe overrides, e.g. '{\"student_max_side\": 64}' (docs/distill.md)")


def settings_from_args(args) -> DistillSettings:
    """The options typed on the command line; the others take DistillSettings' defaults (so a
    resume can tell the two apart)."""
    recipe = recipe_from_args(args)
    given = {k: getattr(args, k) for k in ("top_k", "method", "budget", "samples", "student", "seed", "export")
             if getattr(args, k, None) is not None}
    if "budget" in given:
        given["budget"] = parse_budget(given["budget"])
    return DistillSettings(target=args.target, run=args.run, out=args.out, zoo=args.zoo, **given,
                           given=tuple(given), teachers=args.teacher, resume=args.resume,
                           address=args.address, s3_endpoint=getattr(args, "s3_endpoint", None), recipe=recipe,
                           cpus_per_trial=args.cpus_per_trial, progress=not getattr(args, "quiet", False))


def cmd_distill(args) -> int:
    """``sctd distill``: 0 when the search finished with a student, 1 when no trial produced
    one, 130 when it was interrupted (rerun with --resume)."""
    res = run_distill(settings_from_args(args))
    print(format_summary(res.summary))
    if not res.complete:
        return 130
    return 0 if res.summary.get("best") else 1


SCAN_PLAN_FILE = "scan.json"
SCAN_DEFAULTS = {"top_k": 3, "budget": 600.0, "samples": 3, "student": DEFAULT_STUDENT, "seed": 0,
                 "export": True, "recipe": {}}
SCAN_SEARCH_OPTIONS = tuple(k for k in SCAN_DEFAULTS if k != "recipe")   # the command-line ones


def scan_plan(run: str, given: dict, resume: bool, s3_endpoint: str | None = None) -> dict:
    """The distillation plan of ``sctd scan`` (top_k, budget in seconds, samples, student, seed,
    export, recipe overrides): a new scan's is the options given over the defaults; a --resume's
    is the plan the scan started with (RUN/scan.json) with only the options given now over it, so
    a plain --resume neither takes the default 600 s budget nor exports from a --no-export scan."""
    from ..zoo.store import open_store

    saved = {}
    if resume:
        store = open_store(run, s3_endpoint=s3_endpoint)
        saved = _read_json(store, SCAN_PLAN_FILE) or {}
        if not isinstance(saved, dict):
            raise SctdError(f"{store.join(SCAN_PLAN_FILE)} is not the scan.json `sctd scan` writes "
                            "(a JSON object): choose another --out")
        saved = {k: saved[k] for k in SCAN_DEFAULTS if k in saved}
    plan = {**SCAN_DEFAULTS, **saved, **given}
    plan["recipe"] = {**(saved.get("recipe") or {}), **(given.get("recipe") or {})}
    plan["budget"] = parse_budget(plan["budget"])
    return plan


def write_scan_plan(run_store, plan: dict) -> None:
    run_store.write_bytes(SCAN_PLAN_FILE, json.dumps(plan, indent=2).encode())


def run_distill_for_scan(run: str, targets: list[str] | None = None, budget: float | str = 600,
                         top_k: int = 3, samples: int = 3, student: str = DEFAULT_STUDENT,
                         seed: int = 0, resume: bool = False, export: bool = True, zoo: str | None = None,
                         address: str | None = None, s3_endpoint: str | None = None,
                         progress: bool = True, recipe: dict | None = None, log=print,
                         given: tuple | None = None) -> dict[str, dict]:
    """The distillation step of ``sctd scan``: every target of the assessed run (or those
    named), ``budget`` split between them in turn, each an equal share of what the searches
    before it left. One target writes to RUN/distill, several
    to RUN/distill/<target>. ``given``: the options typed on the command line (a resumed search
    keeps its own budget and export unless they are among them; None: all). Returns {target
    name: summary}."""
    from ..assess.results import RUN_FILE
    from ..zoo.store import open_store

    run_store = open_store(run, s3_endpoint=s3_endpoint)
    info = _read_json(run_store, RUN_FILE) or {}
    names = list(targets or (info.get("targets") or {}))
    if not names:
        raise SctdError(f"{run_store.join(RUN_FILE)} names no targets; pass them explicitly")
    total, spent = parse_budget(budget), 0.0
    # a search already in RUN/distill (the run had one target then; --resume added others) stays
    # there: a new RUN/distill/<target> would redo it and hide the others from the report
    root = _root_search_target(run_store)
    out = {}
    for i, n in enumerate(names):
        # an equal share of what the searches before it left: one that ends early (every trial
        # done) hands its unspent seconds on instead of leaving them unused
        # (at least 1 s: when the targets before it spent it all, the search ends with what it has)
        each = max((total - spent) / (len(names) - i), 1.0)
        dest = run_store.join("distill") if len(names) == 1 or n == root else run_store.join(f"distill/{n}")
        res = run_distill(DistillSettings(target=n, run=run_store.uri, out=dest, zoo=zoo, top_k=top_k,
                                          samples=samples, budget=each, student=student, seed=seed,
                                          resume=resume, export=export, address=address,
                                          s3_endpoint=s3_endpoint, progress=progress,
                                          recipe=dict(recipe or {}), given=given), log=log)
        log(format_summary(res.summary))
        out[n] = res.summary
        spent += float(res.summary.get("used_s") or 0.0)
        if not res.complete:   # interrupted (Ctrl-C, SIGTERM): the other targets wait for --resume
            break
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m sctd_ray.distill.search ...``: the same as ``sctd distill ...``."""
    import sys

    from ..cli import main as sctd_main

    return sctd_main(["distill", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
