"""`sctd demo`: README's first command, end to end on the embedded default (local Ray, a
local folder zoo). The demo zoo of the test session is copied into the demo's home, so no
teacher is trained here (the build itself is tested in test_cli_zoo.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from sctd_ray.cli import DEMO_TARGET, main

pytestmark = pytest.mark.integration


def test_demo_runs_the_whole_pipeline(demo_zoo, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(demo_zoo, home / "demo-zoo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    p = subprocess.run([sys.executable, "-m", "sctd_ray.cli", "demo", "--home", str(home), "--budget", "60",
                        "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "trained now" in p.stdout and "0 trained now" in p.stdout   # the copied zoo was reused
    run = home / "runs" / "demo"
    ranking = pd.read_parquet(run / "ranking.parquet")
    assert set(ranking["target"]) == {DEMO_TARGET} and (ranking["status"] == "ok").all()
    summary = json.loads((run / "distill" / "summary.json").read_text())
    assert summary["used_s"] <= 1.1 * 60
    student = Path(summary["export"]["uri"])
    assert (student / "model.safetensors").is_file() and (student / "card.json").is_file()
    assert f"report:  {run / 'report.html'}" in p.stdout and (run / "report.html").stat().st_size > 10_000
    assert str(student) in p.stdout


@pytest.mark.parametrize("flag,value,match", [("--student", "nosuchnet", "not a timm architecture"),
                                              ("--top-k", "0", "--top-k must be at least 1"),
                                              ("--budget", "soon", "bad budget")])
def test_scan_checks_its_distillation_settings_before_assessing(demo_zoo, tmp_path, capsys, flag, value,
                                                                match):
    """A typo in a distillation flag must not cost a whole assess step first."""
    target = str(Path(demo_zoo) / "targets" / "fm-mix5")
    code = main(["scan", "--zoo", demo_zoo, "--target", target, "--out", str(tmp_path / "run"), "--quiet",
                 flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0]
    assert not (tmp_path / "run").exists()


def test_scan_no_export_reaches_the_distillation(demo_zoo, tmp_path, monkeypatch, capsys):
    """`sctd scan --no-export` distills without writing the student into the zoo."""
    from sctd_ray.assess import scan as scan_mod
    from sctd_ray.distill import search
    import sctd_ray.report as report

    seen = {}
    monkeypatch.setattr(scan_mod, "run_scan", lambda settings, **kw: SimpleNamespace(errors=0))
    monkeypatch.setattr(scan_mod, "print_ranking", lambda result: None)
    monkeypatch.setattr(search, "run_distill_for_scan",
                        lambda run, **kw: seen.update(kw) or {"t": {"complete": True, "best": {}}})
    monkeypatch.setattr(report, "write_report", lambda *a, **k: str(tmp_path / "report.html"))
    target = str(Path(demo_zoo) / "targets" / "fm-mix5")
    argv = ["scan", "--zoo", demo_zoo, "--target", target, "--out", str(tmp_path / "run"), "--quiet"]
    main(argv + ["--no-export"])
    assert seen["export"] is False
    main(argv)
    assert seen["export"] is True


def test_scan_with_broken_teachers_says_so_and_exits_as_its_distillation(demo_zoo, tmp_path, monkeypatch,
                                                                         capsys):
    """A scan that distilled a student exits 0 although some teachers are error rows (the
    distillation is its job); a line on stderr says how many, also under --quiet."""
    from sctd_ray.assess import scan as scan_mod
    from sctd_ray.distill import search
    import sctd_ray.report as report

    monkeypatch.setattr(scan_mod, "run_scan", lambda settings, **kw: SimpleNamespace(errors=3))
    monkeypatch.setattr(scan_mod, "print_ranking", lambda result: None)
    monkeypatch.setattr(search, "run_distill_for_scan",
                        lambda run, **kw: {"t": {"complete": True, "best": {"student_uri": "zoo/s"}}})
    monkeypatch.setattr(report, "write_report", lambda *a, **k: str(tmp_path / "report.html"))
    target = str(Path(demo_zoo) / "targets" / "fm-mix5")
    code = main(["scan", "--zoo", demo_zoo, "--target", target, "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and "3 error row(s) in the ranking" in err


def test_scan_finds_a_bad_test_image_of_a_later_target_before_any_work(demo_zoo, tmp_path, monkeypatch, capsys):
    """The distillation reads every split: an undecodable test image of the second target is
    one line before Ray starts, not an error after the first target's search."""
    from sctd_ray.assess import scan as scan_mod

    bad = tmp_path / "bad-test"
    shutil.copytree(Path(demo_zoo) / "targets" / "dg-high5", bad)
    df = pd.read_parquet(bad / "test.parquet")
    df.loc[7, "image"] = b"not an image"
    df.to_parquet(bad / "test.parquet")
    monkeypatch.setattr(scan_mod, "run_scan", lambda settings, **kw: pytest.fail("the scan started"))
    code = main(["scan", "--zoo", demo_zoo, "--target", str(Path(demo_zoo) / "targets" / "fm-mix5"),
                 "--target", str(bad), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "split 'test' row 7" in err[0], err
    assert not (tmp_path / "run").exists()
