"""bench/gpu_check.py is what a lent GPU runs, with minutes of device time per session: its code
paths must work before a device is started. ``--smoke`` runs them on the CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_check_and_prints_the_goals(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(
        [sys.executable, "gpu_check.py", "--smoke", "--only", "sinkhorn,engine,shard_loop",
         "--variants", "no_reuse,parallel_finalise,cuda_graphs", "--json", str(out)],
        cwd=ROOT / "bench", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for check in ("sinkhorn", "engine", "shard_loop"):
        assert "error" not in res[check], res[check]
    engine = res["engine"]
    for part in ("by_score_ms", "parallel_finalise", "few_shot"):
        assert not isinstance(engine[part], str), engine[part]       # a string is an error
    assert set(engine["by_score_ms"]) >= {"sctd_fused", "logme", "transrate", "transrate_per_class"}
    loop = res["shard_loop"]
    assert set(loop["variants"]) == {"no_reuse", "parallel_finalise", "cuda_graphs"}
    for name, v in loop["variants"].items():                      # the same scores
        assert v["scores_vs_default_max_rel_diff"] < 1e-6, name
    assert loop["fresh_models_vs_loop_max_rel_diff"] < 1e-6       # reused models score as fresh ones
    goals = [line for line in proc.stdout.splitlines() if line.startswith("GOAL ")]
    assert any("engine / forward" in g for g in goals) and any("Sinkhorn" in g for g in goals)
