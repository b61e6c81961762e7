"""`sctd assess` in a fresh process, as a user runs it, for the benchmarks that time it
(assess_overhead, scan_bench, scan_scale), optionally from another checkout of sctd-ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_assess(zoo: str, target: str, out: str, *extra: str, checkout: Path | None = None) -> tuple[float, dict]:
    """(wall seconds, run.json) of ``sctd assess --zoo ZOO --target TARGET --out OUT --quiet
    EXTRA...``, from ``checkout`` (default: this one) put on the path and made the working
    directory, which ``python -m`` searches first. OUT may be a folder or an s3:// uri."""
    checkout = Path(checkout).resolve() if checkout else REPO
    env = dict(os.environ, PYTHONPATH=str(checkout))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "sctd_ray.cli", "assess", "--zoo", zoo, "--target", target,
                        "--out", str(out), "--quiet", *extra], cwd=checkout, env=env,
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"sctd assess failed in {checkout}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    from sctd_ray.zoo.store import open_store

    return seconds, json.loads(open_store(str(out)).read_bytes("run.json"))
