"""The Ray Tune layer of the search (SPEC 5): the trainable that trains one student, and the
driver-side pieces that keep a search inside its budget and quiet.

- ``distill_trial``: a function trainable. It receives only uris and ids, loads the target and
  teacher itself, resumes from ``tune.get_checkpoint()``, reports and checkpoints every epoch
  (so Tune can stop it within one epoch).
- ``BudgetStopper``: ends the search once the time left can no longer absorb stopping it.
- ``Progress``: our own progress lines; measures report intervals for the stopper and saves
  the budget used so far.
- ``ProtectedASHA``: ASHA on validation accuracy that never prunes a trial marked
  ``protected`` (each source's default draw), so every teacher and the baseline get one full
  run before random draws compete.

The classes live at module level so that Tune's experiment state pickles them by reference:
a resumed search gets the new driver's deadline through ``LIVE``, keyed by experiment path.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from ray import tune
from ray.tune import Callback, Stopper
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ..errors import SctdError

FORCE_STOP_S = 10.0     # Tune kills a trial that has not stopped 10 s after being asked
END_RESERVE_S = 3.0     # Tune teardown, results and export after the trials stopped
PROGRESS_EVERY_S = 5.0
SAVE_EVERY_S = 10.0

# Driver-side state of running searches, keyed by experiment path: deadline, report intervals,
# best trial so far, the log function, and callables for the budget used and saving it.
LIVE: dict[str, dict] = {}

_TARGETS: dict = {}


def _target(uri: str, s3_endpoint: str | None):
    """The target, decoded once per worker process (actors are reused between trials)."""
    from ..data.targets import load_target

    key = (uri, s3_endpoint)
    if key not in _TARGETS:
        _TARGETS.clear()
        _TARGETS[key] = load_target(uri, s3_endpoint=s3_endpoint)
    return _TARGETS[key]


def distill_trial(config: dict) -> None:
    """Tune function trainable: one student (SPEC 4) for ``config["trial"]``."""
    import torch

    from ..zoo.loading import load_teacher
    from ..zoo.store import open_store
    from .recipe import Recipe
    from .train import train_student

    p = config["trial"]
    torch.set_num_threads(max(1, int(p["threads"])))
    work = tempfile.mkdtemp(prefix="sctd-trial-")
    try:
        target = _target(p["target_uri"], p["s3_endpoint"])
        teacher = None
        if p["method"] != "ce":
            teacher = load_teacher(open_store(p["zoo"], s3_endpoint=p["s3_endpoint"]), p["teacher_id"])
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                shutil.copytree(d, work, dirs_exist_ok=True)

        def report(epoch: int, metrics: dict) -> None:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(work))

        train_student(target, teacher, p["method"], p["hp"], Recipe.from_dict(p["recipe"]),
                      seed=p["seed"], report=report, checkpoint_dir=work, student=p["student"],
                      student_args=p.get("student_args"))
    except SctdError as e:  # re-raised as a plain error: Tune ships it to the driver by pickle
        raise RuntimeError(f"{type(e).__name__}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


class BudgetStopper(Stopper):
    """Stops the whole search when ``now + drain + END_RESERVE_S`` reaches the deadline. Trials
    stop at their next report, so the drain is the longest report interval seen so far (start-up
    included), at most FORCE_STOP_S, after which Tune kills a trial."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        live = LIVE.get(self.key)
        if live is None:
            return False
        drain = min(live["max_interval"] or FORCE_STOP_S, FORCE_STOP_S)
        if time.time() + drain + END_RESERVE_S >= live["deadline"]:
            live["budget_hit"] = True
            return True
        return False


def error_reason(trial) -> str:
    """The last line of a failed trial's error (Tune's error file, else its message)."""
    msg = None
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and os.path.exists(path):
            with open(path) as f:
                msg = f.read()
    except OSError:
        pass
    msg = msg or getattr(trial, "error_msg", None) or "trial failed"
    lines = [ln for ln in str(msg).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "trial failed")[:500]


class Progress(Callback):
    """A progress line every few seconds and one per trial that stops early or fails."""

    def __init__(self, key: str):
        self.key = key

    def _live(self):
        return LIVE.get(self.key)

    def on_trial_start(self, iteration, trials, trial, **info):
        live = self._live()
        if live is not None:
            live["trial_start"][trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        live = self._live()
        if live is None:
            return
        now = time.time()
        last = live["last_report"].get(trial.trial_id, live["trial_start"].get(trial.trial_id))
        if last is not None:
            live["max_interval"] = max(live["max_interval"], now - last)
        live["last_report"][trial.trial_id] = now
        if result.get("val_acc") is not None and result["val_acc"] > live["best"][0]:
            live["best"] = (result["val_acc"], trial.config["trial"]["trial_id"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        live, r = self._live(), trial.last_result or {}
        if live is not None and live["progress"] and r.get("val_acc") is not None and not r.get("finished"):
            p = trial.config["trial"]
            live["log"](f"  trial {p['trial_id']} stopped at epoch {r.get('epoch')}: val {r['val_acc']:.3f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        live = self._live()
        if live is not None:
            p = trial.config["trial"]
            live["log"](f"  trial {p['trial_id']} ({p['method']}) failed: {error_reason(trial)[:200]}; "
                        "the search goes on")

    def on_step_end(self, iteration, trials, **info):
        live = self._live()
        if live is None:
            return
        now = time.time()
        if now - live["last_save"] > SAVE_EVERY_S:
            live["last_save"] = now
            live["save"]()
        if live["progress"] and now - live["last_line"] >= PROGRESS_EVERY_S:
            live["last_line"] = now
            counts: dict[str, int] = {}
            for t in trials:
                counts[t.status] = counts.get(t.status, 0) + 1
            done = counts.get("TERMINATED", 0) + counts.get("ERROR", 0)
            val, best = live["best"]
            live["log"](f"distill [{live['used']():4.0f}s/{live['budget']:.0f}s] trials: {done} done, "
                        f"{counts.get('RUNNING', 0)} running, {counts.get('PENDING', 0)} pending"
                        + (f" | best val {val:.3f} ({best})" if best else ""))


class ProtectedASHA(ASHAScheduler):
    """ASHA (time_attr = training iteration = epoch) that lets ``protected`` trials finish."""

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and trial.config["trial"].get("protected") \
                and not result.get("finished"):
            return TrialScheduler.CONTINUE
        return decision


def scheduler(epochs: int) -> ProtectedASHA:
    return ProtectedASHA(time_attr="training_iteration", max_t=epochs,
                         grace_period=max(1, epochs // 4), reduction_factor=3)


class quiet_tune:
    """Tune's own console output off (our progress lines replace it)."""

    def __enter__(self):
        self.env = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        self.levels = {n: logging.getLogger(n).level for n in ("ray.tune", "ray.train", "ray.air")}
        for n in self.levels:
            logging.getLogger(n).setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc):
        if self.env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = self.env
        for n, lvl in self.levels.items():
            logging.getLogger(n).setLevel(lvl)
        return False
