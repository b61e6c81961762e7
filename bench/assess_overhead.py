"""The fixed cost of `sctd assess`: a small scan (the demo zoo's 8 teachers on its 50-image
fm-mix5 target, where scoring itself takes well under a second) timed end to end as a user
runs it, in a fresh process, split into the parts run.json records.

    python bench/assess_overhead.py --zoo DEMO_ZOO [--repeats 3] [--baseline OTHER_CHECKOUT]

With --baseline, the same command from another checkout of sctd-ray (e.g. a `git worktree`
of an older commit) runs alternately with this one, so both are measured in one run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from assess_cli import REPO, run_assess


def one_run(checkout: Path, zoo: str, target: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="assess-overhead-")) / "run"
    wall, run = run_assess(zoo, target, str(out), checkout=checkout)
    t = run["timings"]
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"wall": wall, "data": t["data_seconds"], "scan": t["scan_seconds"],
            "driver_other": t["total_seconds"] - t["data_seconds"] - t["scan_seconds"],
            "outside_run_scan": wall - t["total_seconds"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="a built small demo zoo (sctd zoo build-demo DIR)")
    ap.add_argument("--target", default=None, help="default: ZOO/targets/fm-mix5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="another sctd-ray checkout to compare with")
    args = ap.parse_args()
    target = args.target or str(Path(args.zoo) / "targets" / "fm-mix5")
    checkouts = {"this": REPO}
    if args.baseline:
        checkouts = {"baseline": Path(args.baseline).resolve(), **checkouts}
    runs: dict[str, list[dict]] = {k: [] for k in checkouts}
    for i in range(args.repeats):
        for name, path in checkouts.items():
            r = one_run(path, args.zoo, target)
            runs[name].append(r)
            print(f"run {i + 1} {name:8s} " + "  ".join(f"{k} {v:5.2f}" for k, v in r.items()), flush=True)
    print()
    print(f"{'median seconds':16s} " + " ".join(f"{k:>16s}" for k in runs["this"][0]))
    for name, rs in runs.items():
        print(f"{name:16s} " + " ".join(f"{statistics.median(r[k] for r in rs):16.2f}" for k in rs[0]))
    if args.baseline:
        b, t = (statistics.median(r["wall"] for r in runs[k]) for k in ("baseline", "this"))
        print(f"end to end: this / baseline = {t / b:.3f}")


if __name__ == "__main__":
    main()
