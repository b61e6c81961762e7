"""`sctd distill`: the budgeted Ray Tune search (SPEC 5) on the small demo zoo, real Ray.

The run folder is what a scan writes (ranking.parquet + run.json), scored in-process by the
assessment engine over three teachers to keep the test short. Trials use a short recipe.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file

from sctd_ray.assess.engine import assess_teacher, batches_from_arrays
from sctd_ray.assess.results import RANKING_FILE, RUN_FILE, ranking_table, write_table
from sctd_ray.data.preprocess import Preprocessing
from sctd_ray.data.targets import load_target
from sctd_ray.distill.search import main, run_distill_for_scan
from sctd_ray.zoo.loading import load_teacher
from sctd_ray.zoo.manifest import read_manifest
from sctd_ray.zoo.store import open_store

pytestmark = pytest.mark.integration

TARGET = "fm-mix5"
TEACHERS = ("fm-all-resnet", "fm-misc-byob", "dg-all-resnet")
FAST = {"epochs": 4, "steps_per_epoch": 8, "batch_size": 32, "warmup_steps": 4}
COLUMNS = {"trial_id", "teacher_id", "method", "lam", "tau", "eps", "lr", "epochs", "val_acc",
           "test_acc", "seconds", "status", "val_curve"}
CARD_FIELDS = {"teacher_id", "teacher_scores", "val_acc", "test_acc", "ce_baseline", "budget_s",
               "used_s", "target", "class_names", "method", "hp"}


@pytest.fixture(scope="session")
def demo_zoo_dir(demo_zoo, tmp_path_factory) -> str:
    """A private copy of the session's small demo zoo: these tests export students into it."""
    dst = tmp_path_factory.mktemp("distill") / "zoo"
    shutil.copytree(demo_zoo, dst)
    return str(dst)


@pytest.fixture(scope="module")
def run_dir(demo_zoo_dir, tmp_path_factory) -> str:
    """An assessed run for fm-mix5 over TEACHERS, in the files `sctd assess` writes."""
    zoo = open_store(demo_zoo_dir)
    uri = str(Path(demo_zoo_dir) / "targets" / TARGET)
    task = load_target(uri, splits=("train",))
    tb = batches_from_arrays(task.name, task.splits["train"].images, task.splits["train"].labels,
                             task.num_classes)
    rows = []
    for tid in TEACHERS:
        scores = assess_teacher(load_teacher(zoo, tid), tb, device="cpu")[task.name]
        rows.append({"target": task.name, "teacher_id": tid, "architecture": "?", "status": "ok",
                     "error": "", **scores, "samples": 50, "seconds": 0.0, "worker": "test"})
    run = open_store(str(tmp_path_factory.mktemp("run") / "run"))
    write_table(run, RANKING_FILE, ranking_table(rows))
    run.write_bytes(RUN_FILE, json.dumps({"zoo": zoo.uri, "targets": {
        task.name: {"uri": uri, "classes": task.class_names, "samples": 50}}}).encode())
    return run.uri


def _copy_run(run_dir, dst: Path) -> str:
    shutil.copytree(run_dir, dst)
    return str(dst)


def _ranked(run):
    df = pd.read_parquet(Path(run) / RANKING_FILE)
    return list(df.sort_values("rank")["teacher_id"])


def test_search_exports_the_best_student_within_budget(run_dir, demo_zoo_dir, ray_local, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    out = tmp_path / "out"
    rc = main(["--run", run, "--target", TARGET, "--out", str(out), "--top-k", "2", "--samples", "2",
               "--budget", "60", "--recipe", json.dumps(FAST), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = pd.read_parquet(out / "results.parquet")
    assert COLUMNS <= set(res.columns)
    assert len(res) == 6 and set(res["method"]) == {"ce", "ot"}
    assert set(res["teacher_id"].dropna()) == set(_ranked(run)[:2])
    assert set(res["status"]) <= {"ok", "stopped", "not_run"}
    for _, r in res[res.status == "ok"].iterrows():
        assert r["epochs"] == FAST["epochs"] and len(r["val_curve"]) == FAST["epochs"]
        assert max(r["val_curve"]) == pytest.approx(r["val_acc"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["target"] == TARGET
    assert summary["budget_s"] == 60 and 0 < summary["used_s"] <= 1.1 * 60
    best = res[res.trial_id == summary["best_trial_id"]].iloc[0]
    assert best["val_acc"] == res["val_acc"].max()
    assert summary["ce_baseline"]["method"] == "ce"
    assert "best student" in printed and "ce baseline" in printed and "exported student" in printed

    # the exported student: timm layout, strict safetensors, the target's label names
    sid = summary["export"]["teacher_id"]
    folder = Path(demo_zoo_dir) / "teachers" / sid
    cfg = json.loads((folder / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"],
                              **cfg["model_args"])
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    task = load_target(str(Path(demo_zoo_dir) / "targets" / TARGET))
    assert cfg["label_names"] == task.class_names == cfg["pretrained_cfg"]["label_names"]
    card = json.loads((folder / "card.json").read_text())
    assert CARD_FIELDS <= set(card)
    assert card["target_fingerprints"] == task.fingerprints == cfg["source_task"]["distilled"][
        "target_fingerprints"]   # how a scan knows the student's images under any target name
    assert set(task.fingerprints) == {"train", "val", "test"}
    assert card["teacher_id"] == (None if pd.isna(best["teacher_id"]) else best["teacher_id"])
    assert card["val_acc"] == pytest.approx(best["val_acc"]) and card["budget_s"] == 60
    assert card["ce_baseline"]["trial_id"] == summary["ce_baseline"]["trial_id"]
    if card["teacher_id"]:
        assert "sctd" in card["teacher_scores"] and card["teacher_scores"]["rank"] >= 1
    # ... and it is the best-validation checkpoint: its test accuracy is the recorded one
    pre = Preprocessing.from_pretrained_cfg(cfg["pretrained_cfg"])
    with torch.no_grad():
        pred = model.eval()(pre(torch.from_numpy(task.splits["test"].images))).argmax(1).numpy()
    assert np.mean(pred == task.splits["test"].labels) == pytest.approx(card["test_acc"])
    assert sid in set(read_manifest(open_store(demo_zoo_dir))["id"])

    # the same --out again needs --resume
    rc = main(["--run", run, "--target", TARGET, "--out", str(out), "--budget", "60", "--quiet"])
    assert rc == 2 and "--resume" in capsys.readouterr().err

    # looking at the finished search again writes nothing into the zoo (a student deleted since
    # stays gone; was written back by a plain --resume, also after --no-export); --export does
    capsys.readouterr()
    assert main(["--run", run, "--target", TARGET, "--out", str(out), "--resume", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"student exported earlier: {summary['export']['uri']} (not written again" in printed
    assert "  exported student:" not in printed   # (said so although nothing was written)
    shutil.rmtree(folder)
    assert main(["--run", run, "--target", TARGET, "--out", str(out), "--resume", "--quiet"]) == 0
    assert not folder.exists() and json.loads((out / "summary.json").read_text())["export"] is None
    assert main(["--run", run, "--target", TARGET, "--out", str(out), "--resume", "--export", "--quiet"]) == 0
    assert (folder / "model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["export"]["teacher_id"] == sid


def test_budget_stops_long_trials(run_dir, ray_local, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    out = tmp_path / "out"
    main(["--run", run, "--target", TARGET, "--out", str(out), "--top-k", "1", "--samples", "1",
          "--budget", "25", "--no-export", "--quiet",
          "--recipe", json.dumps({**FAST, "epochs": 400})])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_budget"] and summary["complete"]
    assert summary["used_s"] <= 1.1 * 25
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 2 and set(res["status"]) <= {"stopped", "not_run"}
    assert not (Path(out) / "card.json").exists() and summary["export"] is None
    # each checkpoint holds its epoch as reported (read back when Tune never recorded the report)
    for ck in (out / "tune").glob("*/checkpoint_*"):
        saved = json.loads((ck / "metrics.json").read_text())
        assert saved["last"]["epoch"] == int(ck.name.split("_")[1]) + 1 == len(saved["curve"])


def test_an_export_that_fails_keeps_the_time_spent(run_dir, ray_local, tmp_path, capsys, monkeypatch):
    """The zoo refusing the student (a full disk, a bucket the keys may not write): one line, and
    search.json keeps the time the trials took (it said 0 s used, so --resume had the whole
    budget again) and that the search is not complete (a --resume exports then)."""
    from sctd_ray.distill import search
    from sctd_ray.errors import SctdError

    def refused(*a, **k):
        raise SctdError("zoo refused the student")

    monkeypatch.setattr(search, "_export", refused)
    run, out = _copy_run(run_dir, tmp_path / "run"), tmp_path / "out"
    rc = main(["--run", run, "--target", TARGET, "--out", str(out), "--top-k", "1", "--samples", "1",
               "--budget", "60", "--quiet", "--recipe", json.dumps({**FAST, "epochs": 1})])
    assert rc == 2 and "zoo refused the student" in capsys.readouterr().err
    saved = json.loads((out / "search.json").read_text())
    assert saved["used_s"] > 1 and not saved["complete"]


def _finished(out: Path) -> int:
    n = 0
    for f in (out / "tune").glob("*/result.json"):
        if '"finished": true' in f.read_text():
            n += 1
    return n


def test_interrupted_search_resumes_without_rerunning_finished_trials(run_dir, ray_local, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    out = Path(run) / "distill"
    cmd = [sys.executable, "-m", "sctd_ray.distill.search", "--run", run, "--target", TARGET,
           "--top-k", "2", "--samples", "2", "--budget", "240", "--no-export", "--quiet",
           "--recipe", json.dumps({**FAST, "epochs": 6})]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 200
    while time.time() < deadline and _finished(out) < 2 and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment and the driver stops
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout + stderr
    assert "INTERRUPTED" in stdout
    before = pd.read_parquet(out / "results.parquet").set_index("trial_id")
    first = json.loads((out / "summary.json").read_text())
    assert not first["complete"] and first["export"] is None
    done = before[before.status == "ok"]
    assert len(done) >= 2 and (before.status == "interrupted").any()

    # resumed with a budget already spent: the search ends there (not "interrupted" again,
    # which would send the user round the same --resume for ever), with the trials it has
    spent = _copy_run(run, tmp_path / "spent")
    short = run_distill_for_scan(spent, budget=first["used_s"] / 2, top_k=2, samples=2, resume=True,
                                 export=False, progress=False, log=lambda *_: None)[TARGET]
    assert short["complete"] and short["stopped_by_budget"]
    ended = pd.read_parquet(Path(spent) / "distill" / "results.parquet").set_index("trial_id")
    assert not (ended.status == "interrupted").any() and set(ended.index) == set(before.index)
    assert (ended.loc[done.index, "status"] == "ok").all()

    summaries = run_distill_for_scan(run, budget=240, top_k=2, samples=2, resume=True, export=False,
                                     progress=False, log=lambda *_: None)
    summary = summaries[TARGET]
    assert summary["complete"] and summary["resumed"]
    after = pd.read_parquet(out / "results.parquet").set_index("trial_id")
    assert set(after.index) == set(before.index) and not (after.status == "interrupted").any()
    for tid, row in done.iterrows():  # finished trials are kept as they were, not trained again
        for col in ("val_acc", "test_acc", "seconds", "epochs", "resumed_epoch"):
            assert after.loc[tid, col] == row[col], (tid, col)
        assert list(after.loc[tid, "val_curve"]) == list(row["val_curve"])
    # trials cut mid-way continue from their last checkpoint: Ctrl-C may catch a trial between
    # recording a result and registering its checkpoint, so at most one reported epoch is redone
    cut = before[(before.status == "interrupted") & (before.epochs > 0)]
    for tid, row in cut.iterrows():
        if after.loc[tid, "epochs"] > row["epochs"]:  # trained again after the resume
            assert after.loc[tid, "resumed_epoch"] >= row["epochs"] - 1, tid
    assert summary["used_s"] > first["used_s"] and summary["used_s"] <= 1.1 * 240

    # resumed once more, finished: nothing is charged to the budget, its budget and how it ended
    # stay what they were (summary.json, the report), and other settings given now are said not
    # to apply (the trials were planned with the search's own)
    capsys.readouterr()
    again = run_distill_for_scan(run, budget=500, top_k=3, samples=2, resume=True, export=False,
                                 progress=False, log=lambda *_: None)[TARGET]
    assert again["complete"] and again["used_s"] == pytest.approx(summary["used_s"], abs=0.05)
    assert (again["budget_s"], again["stopped_by_budget"]) == (summary["budget_s"], summary["stopped_by_budget"])
    assert ("the search is complete, with its own settings (top_k 2, budget 240.0); top_k 3, budget 500.0 "
            "not applied") in capsys.readouterr().err
    # on the command line only what the user typed counts: the defaults are not "given"
    from sctd_ray.cli import build_parser
    from sctd_ray.distill.search import settings_from_args

    args = build_parser().parse_args(["distill", "--run", run, "--target", TARGET, "--resume"])
    assert settings_from_args(args).given == ()
    args = build_parser().parse_args(["distill", "--run", run, "--target", TARGET, "--top-k", "2"])
    settings = settings_from_args(args)
    assert settings.given == ("top_k",) and (settings.top_k, settings.samples, settings.budget) == (2, 3, 600.0)


def test_a_crashing_trial_is_reported_and_the_search_goes_on(run_dir, demo_zoo_dir, ray_local, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo_dir, zoo)
    shutil.copytree(zoo / "teachers" / "fm-all-resnet", zoo / "teachers" / "broken")
    weights = zoo / "teachers" / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: loading fails inside the trial
    run = _copy_run(run_dir, tmp_path / "run")
    out = tmp_path / "out"
    rc = main(["--run", run, "--target", TARGET, "--out", str(out), "--zoo", str(zoo),
               "--teacher", "broken", "--teacher", "fm-all-resnet", "--samples", "1", "--budget", "60",
               "--no-export", "--recipe", json.dumps({**FAST, "epochs": 2})])
    assert rc == 0
    failed = [ln for ln in capsys.readouterr().out.splitlines() if "failed:" in ln]
    assert len(failed) == 1 and "broken" in failed[0] and "the search goes on" in failed[0], failed
    res = pd.read_parquet(out / "results.parquet").set_index("teacher_id", drop=False)
    assert res.loc["broken", "status"] == "error" and "broken" in res.loc["broken", "error"]
    assert res.loc["fm-all-resnet", "status"] == "ok"
    assert (res["method"] == "ce").sum() == 1 and set(res[res.method == "ce"]["status"]) == {"ok"}
    assert json.loads((out / "summary.json").read_text())["trials_by_status"]["error"] == 1


def test_kd_across_label_spaces_is_refused_before_any_trial(run_dir, tmp_path, capsys):
    rc = main(["--run", run_dir, "--target", TARGET, "--out", str(tmp_path / "out"), "--method", "kd",
               "--top-k", "1", "--budget", "30", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "kd needs the teacher's label names" in err and "--method ot" in err
    assert not (tmp_path / "out" / "tune").exists()


def test_a_ranked_teacher_gone_from_the_zoo_is_one_line_before_any_trial(run_dir, demo_zoo_dir,
                                                                           tmp_path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(demo_zoo_dir, zoo)
    top = _ranked(run_dir)[0]
    shutil.rmtree(zoo / "teachers" / top)            # removed since the scan ranked it
    rc = main(["--run", run_dir, "--target", TARGET, "--zoo", str(zoo), "--out", str(tmp_path / "out"),
               "--top-k", "2", "--budget", "30", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not in the zoo" in err[0] and top in err[0]
    assert not (tmp_path / "out" / "tune").exists()


def test_a_zoo_on_an_s3_endpoint_that_never_answers_is_one_line_before_ray(run_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """The ranking names the teachers, so nothing else reads the zoo before the trials do:
    without the check each trial failed on its own after Ray and Tune had started."""
    import socket

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        rc = main(["--run", run_dir, "--target", TARGET, "--zoo", "s3://zoo-b/zoo",
                   "--s3-endpoint", f"http://127.0.0.1:{silent.getsockname()[1]}",
                   "--out", str(tmp_path / "out"), "--top-k", "1", "--budget", "30", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "did not answer (2 tries of 5 s)" in err[0]
    assert not (tmp_path / "out" / "tune").exists()


@pytest.mark.parametrize("damage,needle", [
    ({"ranking.parquet": b"PAR1 not really"}, "ranking.parquet: not a readable Parquet file"),
    ({"ranking.parquet": None}, "ranking.parquet lacks column(s) ['target', 'teacher_id', 'status', 'rank']"),
    ({"run.json": b"{}"}, "run.json does not name its zoo"),
    ({"run.json": b"[1, 2]"}, "run.json is not the run.json `sctd assess` writes"),
])
def test_a_damaged_run_folder_is_one_line_before_any_trial(run_dir, tmp_path, capsys, damage, needle):
    run = Path(_copy_run(run_dir, tmp_path / "run"))
    for name, data in damage.items():
        if data is None:
            pd.DataFrame({"x": [1]}).to_parquet(run / name)
        else:
            (run / name).write_bytes(data)
    rc = main(["--run", str(run), "--target", TARGET, "--out", str(tmp_path / "out"), "--budget", "30", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_zoo_in_a_bucket_that_does_not_exist_is_named_so(run_dir, s3_env, tmp_path, capsys):
    rc = main(["--run", run_dir, "--target", TARGET, "--zoo", "s3://no-such-bucket-sctd/zoo",
               "--out", str(tmp_path / "out"), "--top-k", "1", "--budget", "30", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no-such-bucket-sctd" in err[0], err
    assert "not in the zoo" not in err[0] and "bucket" in err[0]


def test_a_run_or_out_in_a_bucket_that_does_not_exist_is_named_so(run_dir, s3_env, tmp_path, capsys):
    """Was "s3://.../run.json not found: --run must be the output of `sctd assess`"."""
    for args in (["--run", "s3://no-such-bucket-sctd/run"],
                 ["--run", run_dir, "--out", "s3://no-such-bucket-sctd/out"]):
        rc = main([*args, "--target", TARGET, "--top-k", "1", "--budget", "30", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "bucket not found: s3://no-such-bucket-sctd" in err[0], err


def test_a_teacher_changed_since_it_was_ranked_is_warned_about(run_dir, demo_zoo_dir, tmp_path, capsys,
                                                               monkeypatch):
    import hashlib

    from sctd_ray.assess import scan

    run = Path(_copy_run(run_dir, tmp_path / "run"))
    ranking = pd.read_parquet(run / RANKING_FILE)
    weights = {t: hashlib.sha256((Path(demo_zoo_dir) / "teachers" / t / "model.safetensors").read_bytes()).hexdigest()
               for t in ranking["teacher_id"]}
    ranking["teacher_sha256"] = ranking["teacher_id"].map(weights)
    top, second = _ranked(run_dir)[:2]
    ranking.loc[ranking["teacher_id"] == top, "teacher_sha256"] = "0" * 64   # ranked other weights
    ranking.to_parquet(run / RANKING_FILE)
    monkeypatch.setattr(scan, "ensure_ray", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    main(["--run", str(run), "--target", TARGET, "--zoo", demo_zoo_dir, "--out", str(tmp_path / "out"),
          "--top-k", "2", "--budget", "30", "--quiet"])
    err = capsys.readouterr().err
    assert f"warning: teacher {top!r}: its weights changed since the run ranked it" in err
    assert second not in err


def test_a_plain_resume_keeps_the_searchs_own_plan_and_budget(run_dir, tmp_path, capsys, monkeypatch):
    """A --resume keeps what the search was planned with: its budget unless --budget is given
    (was the default 600 s for an interrupted search resumed without one), and its method and
    recipe, which a note names as not applied (a --method kd was refused against the search's
    own ot teachers, and --epochs was dropped without a word)."""
    from sctd_ray.assess import scan
    from sctd_ray.cli import build_parser
    from sctd_ray.distill.recipe import Recipe
    from sctd_ray.distill.search import _export_now, _search_budget, parse_budget, settings_from_args

    def budget(*argv, previous):
        s = settings_from_args(build_parser().parse_args(
            ["distill", "--run", run_dir, "--target", TARGET, "--resume", *argv]))
        return _search_budget(s, previous, parse_budget(s.budget))

    cut = {"budget_s": 150.0, "complete": False}
    assert budget(previous=cut) == 150 and budget("--budget", "5m", previous=cut) == 300

    def export(*argv, previous, finished=False):   # a --no-export search stays so on a plain --resume
        s = settings_from_args(build_parser().parse_args(
            ["distill", "--run", run_dir, "--target", TARGET, "--resume", *argv]))
        return _export_now(s, previous, finished)

    kept_out = {**cut, "settings": {"export": False}}
    assert not export(previous=kept_out) and export("--export", previous=kept_out)
    assert export(previous={**cut, "settings": {}}) and not export("--no-export", previous=None)
    assert not export(previous=kept_out, finished=True) and export("--export", previous=kept_out, finished=True)
    assert budget("--budget", "5m", previous={**cut, "complete": True}) == 150
    assert budget("--budget", "5m", previous=None) == 300

    out = tmp_path / "out"
    out.mkdir()
    settings = {"method": "ot", "samples": 1, "top_k": 1, "seed": 0, "student": "test_resnet",
                "recipe": {**Recipe().to_dict(), "epochs": 3}}
    (out / "search.json").write_text(json.dumps({**cut, "target": TARGET, "teachers": _ranked(run_dir)[:1],
                                                 "used_s": 22.0, "settings": settings}))
    monkeypatch.setattr(scan, "ensure_ray", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc = main(["--run", run_dir, "--target", TARGET, "--out", str(out), "--resume", "--method", "kd",
               "--epochs", "5", "--teacher", "x", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 130 and "kd needs" not in err, err    # got as far as Ray: nothing refused
    assert ("--resume continues the search with its own settings (method ot, recipe {'epochs': 3}, "
            f"teachers {_ranked(run_dir)[:1]}); method kd, recipe {{'epochs': 5}}, teachers ['x'] not applied") in err


@pytest.mark.parametrize("flags, line", [
    (["--samples", "0"], "--samples must be at least 1; got 0"),          # was checked after Ray started
    (["--seed", "-1"], "--seed must be a non-negative integer; got -1"),  # was a numpy traceback
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be a positive number; got 0.0"),  # was 0.1 CPU
    (["--epochs", "0"], "recipe needs epochs >= 1"),                       # was ignored: 12 epochs
])
def test_a_bad_search_setting_is_one_line_before_ray(run_dir, tmp_path, capsys, monkeypatch, flags, line):
    from sctd_ray.assess import scan

    monkeypatch.setattr(scan, "ensure_ray", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc = main(["--run", run_dir, "--target", TARGET, "--out", str(tmp_path / "out"), *flags,
               "--budget", "30", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"sctd: error: {line}"), err
    assert not (tmp_path / "out").exists()


def test_a_target_other_than_the_one_ranked_is_warned_about(run_dir, demo_zoo_dir, tmp_path, capsys,
                                                            monkeypatch):
    """--target may be a uri: another folder under the ranked target's name (or the folder
    changed since the scan) got the run's top-k without a word."""
    from sctd_ray.assess import scan

    run = Path(_copy_run(run_dir, tmp_path / "run"))
    info = json.loads((run / RUN_FILE).read_text())
    ranked = info["targets"][TARGET]
    ranked["fingerprint"] = load_target(ranked["uri"], splits=("train",)).fingerprints["train"]
    (run / RUN_FILE).write_text(json.dumps(info))
    other = tmp_path / "other" / TARGET                 # another task under the same name
    shutil.copytree(Path(demo_zoo_dir) / "targets" / "dg-high5", other)
    monkeypatch.setattr(scan, "ensure_ray", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    for target, warned in ((TARGET, False), (ranked["uri"], False), (str(other), True)):
        main(["--run", str(run), "--target", target, "--out", str(tmp_path / "out"), "--top-k", "1",
              "--budget", "30", "--quiet"])
        err = capsys.readouterr().err
        assert ("images or labels are not those the run ranked the teachers on" in err) == warned, err


@pytest.mark.parametrize("text", ['[1]', '"x"', '{}', '{"target": "%s"}' % TARGET,
                                  '{"target": "%s", "teachers": []}' % TARGET])
def test_a_damaged_search_json_is_one_line(run_dir, tmp_path, capsys, text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "search.json").write_text(text)
    rc = main(["--run", run_dir, "--target", TARGET, "--out", str(out), "--resume", "--budget", "30", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "search.json is not the search.json `sctd distill` writes" in err[0], err


def test_ce_with_teachers_named_says_they_are_not_used(run_dir, tmp_path, capsys, monkeypatch):
    from sctd_ray.assess import scan

    monkeypatch.setattr(scan, "ensure_ray", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc = main(["--run", run_dir, "--target", TARGET, "--out", str(tmp_path / "out"), "--method", "ce",
               "--teacher", "fm-all-resnet", "--budget", "30", "--quiet"])
    assert rc == 130    # got as far as Ray
    assert "--method ce trains the ce baseline only; --teacher fm-all-resnet not used" in capsys.readouterr().err


def test_a_run_folder_that_is_not_a_run_is_named(tmp_path, capsys):
    rc = main(["--run", str(tmp_path / "typo"), "--target", TARGET, "--out", str(tmp_path / "out"),
               "--budget", "30", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "typo/run.json not found" in err and "sctd assess" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_student_architecture_is_one_line_before_any_trial(run_dir, tmp_path, capsys):
    rc = main(["--run", run_dir, "--target", TARGET, "--out", str(tmp_path / "out"),
               "--student", "resnet", "--budget", "30", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'resnet' is not a timm architecture" in err[0]
    assert "resnet18" in err[0]                       # names close ones
    assert not (tmp_path / "out").exists()


def test_a_target_without_a_val_split_is_one_line_before_any_trial(demo_zoo_dir, tmp_path, capsys):
    target = tmp_path / "noval"
    shutil.copytree(Path(demo_zoo_dir) / "targets" / TARGET, target)
    (target / "val.parquet").unlink()
    rc = main(["--run", str(tmp_path / "none"), "--zoo", demo_zoo_dir, "--teacher", "fm-all-resnet",
               "--target", str(target), "--out", str(tmp_path / "out"), "--budget", "30", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing split 'val'" in err[0]
    assert not (tmp_path / "out").exists()


def test_search_with_its_output_on_s3_resumes_from_there(run_dir, ray_local, s3_bucket, capsys,
                                                         monkeypatch):
    from ray.tune.execution import class_cache

    # Tune as shipped: the driver's S3 keys copied into every trial actor's runtime env
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE",
                        set(class_cache.ENV_VARS_TO_PROPAGATE) | {"AWS_SECRET_ACCESS_KEY"})
    out = f"{s3_bucket}/runs/distill"
    argv = ["--run", run_dir, "--target", TARGET, "--out", out, "--top-k", "1", "--samples", "1",
            "--budget", "90", "--no-export", "--quiet", "--recipe", json.dumps({**FAST, "epochs": 2})]
    assert main(argv) == 0, capsys.readouterr()
    # the trials read S3 with their own environment: the keys are in no trial's runtime env,
    # which Ray logs and shows to every holder of the cluster's token
    trial_env = class_cache._ActorClassCache().get(type("Trial", (), {}))._default_options["runtime_env"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(trial_env)
    store = open_store(out)
    assert store.exists("results.parquet") and store.exists("summary.json") and store.exists("search.json")
    assert 0 < json.loads(store.read_bytes("search.json"))["max_interval_s"] < 90   # for a resume's stopper
    assert any(k.endswith("/checkpoint_000001/state.pt") for k in store.list("tune/"))  # Tune stored on S3
    first = pd.read_parquet(io.BytesIO(store.read_bytes("results.parquet")))
    assert main(argv + ["--resume"]) == 0  # a resubmitted job: the finished search is read back
    summary = json.loads(store.read_bytes("summary.json"))
    assert summary["complete"] and summary["resumed"] and summary["used_s"] <= 1.1 * 90
    again = pd.read_parquet(io.BytesIO(store.read_bytes("results.parquet")))
    pd.testing.assert_frame_equal(first, again)


def test_a_standalone_distill_finds_its_targets_search_folder(tmp_path):
    """Without --out, `sctd distill --target T` uses RUN/distill/T where a scan of several targets
    put T's search, or where RUN/distill holds another target's (was RUN/distill: a --resume
    started a new search there, or refused with "holds the search of target ...")."""
    from sctd_ray.distill.search import _default_out

    run = open_store(str(tmp_path / "run"))
    assert _default_out(run, "a") == run.join("distill")                       # nothing there yet
    run.write_bytes("distill/b/search.json", b'{"target": "b"}')
    assert _default_out(run, "b") == run.join("distill/b")                     # the scan's folder
    run.write_bytes("distill/search.json", b'{"target": "a"}')
    assert _default_out(run, "a") == run.join("distill")
    assert _default_out(run, "c") == run.join("distill/c")                     # another target's root


def test_a_target_added_on_resume_keeps_the_first_targets_search_where_it_is(tmp_path, monkeypatch):
    """A one-target scan distills into RUN/distill; a `--resume` that adds a target must continue
    (not redo) that search there and give only the new target RUN/distill/<target>."""
    from types import SimpleNamespace

    from sctd_ray.distill import search

    run = tmp_path / "run"
    (run / "distill").mkdir(parents=True)
    (run / RUN_FILE).write_text(json.dumps({"zoo": "z", "targets": {"a": {}, "b": {}}}))
    (run / "distill" / "search.json").write_text(json.dumps({"target": "a", "complete": True}))
    dests = {}

    def fake(settings, log=print):
        dests[settings.target] = settings.out
        return SimpleNamespace(summary={"target": settings.target, "complete": True}, complete=True)

    monkeypatch.setattr(search, "run_distill", fake)
    monkeypatch.setattr(search, "format_summary", lambda summary: "")
    run_distill_for_scan(str(run), budget=60, resume=True, log=lambda line: None)
    assert dests == {"a": str(run / "distill"), "b": str(run / "distill" / "b")}


def test_an_interrupted_searchs_summary_says_it_is_not_over():
    from sctd_ray.distill.search import format_summary

    summary = {"target": "t", "complete": False, "best": None, "ce_baseline": None, "budget_s": 40.0, "trials": 1,
               "used_s": 12.0, "teachers": [{"teacher_id": "a", "rank": 1, "trials": 1, "val_acc": None,
                                             "test_acc": None}]}
    text = format_summary(summary)
    assert "no student exported yet: the search was interrupted (--resume continues it)" in text
    assert "teacher a (rank 1): 1 trials, no finished trial yet" in text and "no result" not in text
    # a search whose budget ran out before Tune started has no trial at all: no empty "()"
    text = format_summary({**summary, "complete": True, "trials": 0, "trials_by_status": {}, "teachers": []})
    assert text.startswith("distill t: 0 trials in 12s of a 40s budget"), text


def test_a_plain_scan_resume_keeps_the_scans_own_plan(demo_zoo, tmp_path, monkeypatch):
    """`sctd scan ... --no-export --budget 120 --top-k 1` interrupted, then `sctd scan --resume`
    with only --zoo/--target/--out: the distillation continues with the scan's own plan (was the
    parser's defaults: 600 s split between the targets, top-k 3, and the students exported into
    a zoo the scan was told to leave alone); options typed with the --resume change it."""
    from types import SimpleNamespace

    from sctd_ray import cli
    from sctd_ray.assess import scan
    from sctd_ray.distill import search

    calls = []

    def fake_scan(settings, log=print, on_start=None):
        if on_start is not None:   # (the plan is written once the inputs are checked)
            on_start(open_store(settings.out))
        return SimpleNamespace(errors=0)

    def fake_distill(run, **kw):
        calls.append(kw)
        return {"t": {"complete": True, "best": {"trial_id": "000-ce"}}}

    monkeypatch.setattr(scan, "run_scan", fake_scan)
    monkeypatch.setattr(scan, "print_ranking", lambda result: None)
    monkeypatch.setattr(search, "run_distill_for_scan", fake_distill)
    monkeypatch.setattr("sctd_ray.report.write_report", lambda *a, **k: "report.html")
    target = str(Path(demo_zoo) / "targets" / TARGET)
    argv = ["scan", "--zoo", demo_zoo, "--target", target, "--out", str(tmp_path / "run"), "--quiet"]
    assert cli.main([*argv, "--no-export", "--budget", "120", "--top-k", "1", "--epochs", "2"]) == 0
    assert cli.main([*argv, "--resume"]) == 0
    first, plain = calls
    for kw in (first, plain):
        assert (kw["export"], search.parse_budget(kw["budget"]), kw["top_k"], kw["samples"]) == (False, 120.0, 1, 3)
        assert kw["recipe"] == {"epochs": 2}
    assert set(first["given"]) == {"export", "budget", "top_k", "recipe"} and plain["given"] == ()
    # typed now: applied (and remembered for the next --resume)
    assert cli.main([*argv, "--resume", "--export", "--budget", "300"]) == 0
    assert cli.main([*argv, "--resume"]) == 0
    typed, after = calls[2:]
    assert (typed["export"], typed["budget"], typed["top_k"]) == (True, 300.0, 1)
    assert set(typed["given"]) == {"export", "budget"}
    assert (after["export"], after["budget"], after["given"]) == (True, 300.0, ())


@pytest.mark.parametrize("used, budgets", [
    ([10, 40, 40], [30, 40, 40]),      # the first ends early: the others share its 20 s
    ([30, 30, 30], [30, 30, 30]),      # each spends its share: an equal split, as before
    ([95, 1, 1], [30, 1, 1]),          # the budget is spent: the later searches end at once
])
def test_a_scans_targets_share_what_the_searches_before_them_left(tmp_path, monkeypatch, used, budgets):
    from types import SimpleNamespace

    from sctd_ray.distill import search

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"targets": {"a": {}, "b": {}, "c": {}}}))
    seen = []

    def fake_run_distill(settings, log=print):
        seen.append(settings.budget)
        summary = {"used_s": used[len(seen) - 1], "complete": True}
        return SimpleNamespace(summary=summary, complete=True)

    monkeypatch.setattr(search, "run_distill", fake_run_distill)
    monkeypatch.setattr(search, "format_summary", lambda summary: "")
    out = run_distill_for_scan(str(run), budget=90, log=lambda line: None)
    assert list(out) == ["a", "b", "c"] and seen == pytest.approx(budgets)


def test_an_epoch_checkpointed_but_never_recorded_by_tune_is_read_back(tmp_path, monkeypatch):
    """A trial checkpoints an epoch before its report reaches the driver; a search its budget
    stops in between recorded no result for it (its result.json empty): the trial counted as
    `not_run` and a short search ended with no student although every trial had trained an
    epoch. The epoch is read back from the checkpoint's metrics.json."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from sctd_ray.distill import search
    from sctd_ray.distill.train import BEST_FILE, METRICS_FILE, STUDENT_FILE

    def trial(name, last_result):
        folder = tmp_path / "tune" / name
        for epoch in (1, 2):
            ck = folder / f"checkpoint_{epoch - 1:06d}"
            ck.mkdir(parents=True)
            last = {"epoch": epoch, "val_acc": 0.5 + epoch / 10, "test_acc": 0.4, "finished": False}
            (ck / METRICS_FILE).write_text(json.dumps({"last": last, "curve": [0.6, 0.7][:epoch]}))
            (ck / STUDENT_FILE).write_text("{}")
            (ck / BEST_FILE).write_bytes(b"")
        # the next epoch's checkpoint, cut off by the stop while copied: no student files yet
        ck = folder / "checkpoint_000002"
        ck.mkdir()
        (ck / METRICS_FILE).write_text(json.dumps({"last": {**last, "epoch": 3}, "curve": [0.6, 0.7, 0.8]}))
        plan = {"trial_id": name, "teacher_id": "t", "method": "ot", "sample": 0,
                "hp": {"lam": 100.0, "tau": 1.0, "eps": 0.1, "lr": 0.003}}
        return SimpleNamespace(trial_id=name, config={"trial": plan}, status="TERMINATED",
                               last_result=last_result, checkpoint=None, path=str(folder),
                               storage=SimpleNamespace(storage_filesystem=pafs.LocalFileSystem()))

    class Analysis:
        def __init__(self, *args, **kwargs):
            self.trials = [trial("000-lost", {"trial_id": "x"}),
                           trial("001-done", {"epoch": 2, "val_acc": 0.9, "finished": True})]
            self.trial_dataframes = {}

    monkeypatch.setattr("ray.tune.ExperimentAnalysis", Analysis)
    trials, interrupted = search._collect(str(tmp_path / "tune"), None)
    lost, done = trials
    assert not interrupted and lost["curve"] == [0.6, 0.7]
    assert lost["checkpoint"].path.endswith("000-lost/checkpoint_000001")
    assert done["result"]["val_acc"] == 0.9 and done["checkpoint"] is None   # Tune's own record
    rows = search._results_table(trials, pd.DataFrame(columns=["teacher_id", "rank"]))
    assert list(rows["status"]) == ["stopped", "ok"] and list(rows["epochs"]) == [2, 2]
    assert rows["val_acc"].tolist() == pytest.approx([0.7, 0.9])
