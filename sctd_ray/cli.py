"""``sctd``: the command-line entry point (demo, zoo, assess, distill, scan, report, bench).

Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import SctdError
from .score_names import DEFAULT_RANK_BY


def default_home() -> Path:
    """Where the embedded default keeps its demo zoo and runs: $SCTD_HOME or ~/.cache/sctd-ray."""
    return Path(os.environ.get("SCTD_HOME", Path.home() / ".cache" / "sctd-ray"))


def _store(uri, args):
    from .zoo.store import open_store

    return open_store(uri, s3_endpoint=getattr(args, "s3_endpoint", None))


# ---------------------------------------------------------------- zoo
def cmd_zoo_index(args) -> int:
    from .zoo.manifest import build_manifest, write_manifest

    store = _store(args.zoo, args)
    df = build_manifest(store)
    write_manifest(store, df)
    bad = df[df.status != "ok"]
    print(f"indexed {len(df)} teachers -> {store.join('manifest.parquet')}"
          + (f" ({len(bad)} with errors)" if len(bad) else ""))
    for _, r in bad.iterrows():
        print(f"  error  {r['id']}: {r['error']}")
    return 0


def cmd_zoo_list(args) -> int:
    import pandas as pd

    from .zoo.manifest import current_manifest

    df = current_manifest(_store(args.zoo, args), log=lambda line: print(line, file=sys.stderr))
    if args.format == "json":
        print(df.drop(columns=["source_task"]).to_json(orient="records", indent=1))
        return 0
    cols = ["id", "architecture", "num_classes", "num_features", "input_size", "params", "bytes", "status"]
    view = df[cols].copy()
    view["input_size"] = view["input_size"].map(lambda v: "x".join(str(int(i)) for i in v) if v is not None else "")
    for col in ("num_classes", "num_features", "params", "bytes"):   # a broken teacher's are unknown:
        view[col] = view[col].map(lambda v: "" if pd.isna(v) else str(int(v)))   # blank, not NaN/10.0
    view["architecture"] = view["architecture"].fillna("")
    print(view.to_string(index=False))
    print(f"{len(df)} teachers")
    return 0


def cmd_zoo_verify(args) -> int:
    from .zoo.verify import verify_zoo

    rows = verify_zoo(_store(args.zoo, args), log=lambda line: print(line, file=sys.stderr))
    bad = [r for r in rows if r["status"] != "ok"]
    for r in rows:
        print(f"{'ok   ' if r['status'] == 'ok' else 'ERROR'}  {r['id']}" + (f": {r['error']}" if r["error"] else ""))
    print(f"{len(rows) - len(bad)} ok, {len(bad)} bad")
    return 1 if bad else 0


def cmd_zoo_copy(args) -> int:
    from .zoo.sync import sync

    res = sync(args.src, args.dst, s3_endpoint=args.s3_endpoint, progress=not args.quiet,
               log=lambda line: print(line, file=sys.stderr))
    print(f"copied {res.copied} files ({res.bytes / 1e6:.1f} MB), skipped {res.skipped} unchanged")
    return 0


def cmd_zoo_build_demo(args) -> int:
    from .zoo.demo import build_demo

    info = build_demo(args.out, preset=args.preset, seed=args.seed, s3_endpoint=args.s3_endpoint)
    print(f"demo zoo ({args.preset}): {len(info['teachers'])} teachers at {info['zoo']} "
          f"({len(info['built'])} trained now, {info['seconds']:.0f}s)")
    for t in info["targets"]:
        print(f"  target {t}")
    return 0


# ---------------------------------------------------------------- assess
def _id_list(flag: str, value: str | None) -> tuple[str, ...] | None:
    """A comma-separated option's names, stripped (None when the option was not given)."""
    if value is None:
        return None
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not names:
        raise SctdError(f"{flag} names nothing: give comma-separated names (got {value!r})")
    return names


def _scan_settings(args):
    from .assess.scan import ScanSettings
    from .score_names import NAMES

    metrics = _id_list("--metrics", args.metrics) or NAMES
    return ScanSettings(zoo=args.zoo, targets=list(args.target), out=args.out, workers=args.workers,
                        batch_size=args.batch_size, metrics=metrics, rank_by=args.rank_by,
                        resume=args.resume, address=args.address, s3_endpoint=args.s3_endpoint,
                        split=args.split, progress=not args.quiet,
                        teachers=_id_list("--teachers", args.teachers))


def cmd_assess(args) -> int:
    from .assess.scan import print_ranking, run_scan

    result = run_scan(_scan_settings(args))
    print_ranking(result)
    print(f"results: {args.out.rstrip('/')}/ranking.parquet")
    return 1 if result.errors else 0


# ---------------------------------------------------------------- distill, scan
def cmd_distill(args) -> int:
    from .distill.search import cmd_distill as run

    return run(args)


def cmd_scan(args) -> int:
    """assess + distill (top-k teachers, within --budget) + report: the whole pipeline."""
    from .assess.scan import print_ranking, run_scan
    from .data.targets import check_split_labels, load_target
    from .distill.search import (SCAN_SEARCH_OPTIONS, check_search_args, recipe_from_args,
                                 run_distill_for_scan, scan_plan, write_scan_plan)
    from .report import write_report

    # the scan's distillation plan: a --resume continues with the one the scan started with
    # (RUN/scan.json); only the options typed now change it (the parser's defaults are None)
    given = {k: getattr(args, k) for k in SCAN_SEARCH_OPTIONS if getattr(args, k) is not None}
    recipe = recipe_from_args(args)
    if recipe:
        given["recipe"] = recipe
    plan = scan_plan(args.out, given, args.resume, s3_endpoint=args.s3_endpoint)
    check_search_args(plan["budget"], plan["top_k"], plan["samples"], plan["student"], plan["seed"])  # before the assess step
    for target in args.target:   # the distillation's splits, labels and images, before Ray starts
        check_split_labels(target, s3_endpoint=args.s3_endpoint)
        # a bad val/test image: now, not after the other targets' searches (the scan's own pass
        # decodes the train split)
        load_target(target, splits=("val", "test"), s3_endpoint=args.s3_endpoint)
    result = run_scan(_scan_settings(args),
                      on_start=lambda out: write_scan_plan(out, plan))  # once the inputs are checked
    print_ranking(result)
    summaries = run_distill_for_scan(args.out, budget=plan["budget"], top_k=plan["top_k"],
                                     samples=plan["samples"], student=plan["student"], seed=plan["seed"],
                                     resume=args.resume, export=plan["export"], given=tuple(given),
                                     address=args.address, s3_endpoint=args.s3_endpoint,
                                     progress=not args.quiet, recipe=plan["recipe"])
    report = write_report(args.out, s3_endpoint=args.s3_endpoint)
    print(f"ranking: {args.out.rstrip('/')}/ranking.parquet")
    for name, summ in summaries.items():
        best = summ.get("best") or {}
        if best.get("student_uri"):
            print(f"student for {name}: {best['student_uri']}")
    print(f"report:  {report}")
    if result.errors:   # the scan's exit status is the distillation's: say it here, even with --quiet
        print(f"sctd: {result.errors} error row(s) in the ranking (teachers that could not be scored); "
              "the report lists them", file=sys.stderr)
    if not all((s or {}).get("complete") for s in summaries.values()):
        print("sctd: interrupted in the distillation; results written so far are kept: rerun "
              "with --resume", file=sys.stderr)
        return 130
    return 0 if all((s or {}).get("best") for s in summaries.values()) else 1


# ---------------------------------------------------------------- demo
# the demo's target: 5 digit classes, 10 shots; the zoo holds one related digit teacher among
# Fashion-MNIST ones, so the scan has something to find (docs/distill.md: ce 90.4 -> 96)
DEMO_TARGET = "dg-high5"


def cmd_demo(args) -> int:
    """The main job on the embedded default: build (or reuse) the demo zoo, then `sctd scan`
    on its ``DEMO_TARGET`` with local Ray and a small budget."""
    from .zoo.demo import build_demo

    home = Path(args.home) if args.home else default_home()
    info = build_demo(str(home / "demo-zoo"), preset="small", seed=0)
    print(f"demo zoo: {info['zoo']} ({len(info['teachers'])} demo teachers, {len(info['built'])} trained now)")
    run = home / "runs" / "demo"
    target = next((t for t in info["targets"] if t.rstrip("/").endswith("/" + DEMO_TARGET)),
                  info["targets"][0])
    argv = ["scan", "--zoo", info["zoo"], "--target", target, "--out", str(run),
            "--budget", str(args.budget), "--top-k", "2", "--samples", "1"]
    if (run / "results").exists():
        argv.append("--resume")
    if args.quiet:
        argv.append("--quiet")
    return main(argv)


# ---------------------------------------------------------------- parser
def add_assess_args(a) -> None:
    a.add_argument("--zoo", required=True, help="zoo: local folder or s3://bucket/prefix")
    a.add_argument("--target", required=True, action="append",
                   help="target task folder (local or s3://); repeat for several targets")
    a.add_argument("--out", required=True, help="run folder (local or s3://) for results")
    a.add_argument("--workers", type=int, default=None,
                   help="shard workers (default: one per GPU, else one per CPU; fewer CPU workers than CPUs run several threads each)")
    a.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: 256 on a CPU, 1024 on a GPU; a batch "
                        "that does not fit the GPU is halved for that teacher)")
    a.add_argument("--metrics", default=None,
                   help="comma-separated scores to compute (default: all: sctd,sctd_cost,sctd_fused,leep,nce,logme,hscore,transrate)")
    a.add_argument("--rank-by", default=DEFAULT_RANK_BY,
                   help=f"score that ranks the teachers (default {DEFAULT_RANK_BY}, the best on the quality "
                        "benchmark; sctd is SPEC 2's original)")
    a.add_argument("--split", default="train", help="target split to score on (default train)")
    a.add_argument("--teachers", default=None, help="only these teacher ids (comma-separated)")
    a.add_argument("--resume", action="store_true", help="continue an interrupted scan in --out")
    a.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sctd", description="Selective cross-task distillation on Ray: "
                                "scan a model zoo for the teachers most related to a target task.")
    p.add_argument("--version", action="version", version=f"sctd-ray {__import__('sctd_ray').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def s3(sp):
        sp.add_argument("--s3-endpoint", default=None,
                        help="S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3 or AWS's)")
        return sp

    d = sub.add_parser("demo", help="run the whole pipeline on the demo zoo (local Ray, local folder)")
    d.add_argument("--home", default=None, help="working folder (default: $SCTD_HOME or ~/.cache/sctd-ray)")
    d.add_argument("--budget", default="120", help="distillation budget (default 120 s)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    a = s3(sub.add_parser("assess", help="score every teacher of a zoo against target task(s) on Ray"))
    add_assess_args(a)
    a.set_defaults(func=cmd_assess)

    from .distill.search import add_distill_args, add_recipe_args

    ds = sub.add_parser("distill", help="distill the top teachers of a run into a student (Ray Tune, budgeted)")
    add_distill_args(ds)
    ds.set_defaults(func=cmd_distill)

    sc = s3(sub.add_parser("scan", help="assess + distill + report: the whole pipeline"))
    add_assess_args(sc)
    # defaults None: a --resume tells what was typed from what the scan started with (RUN/scan.json)
    sc.add_argument("--top-k", type=int, default=None, help="distill from the k best-ranked teachers (default 3)")
    sc.add_argument("--budget", default=None, help="distillation budget: seconds, or 10m, 1h (default 600; "
                    "with several targets shared out in turn: what one search leaves goes to the next)")
    sc.add_argument("--samples", type=int, default=None, help="hyper-parameter samples per teacher (default 3)")
    sc.add_argument("--student", default=None, help="timm architecture of the student (default test_resnet)")
    sc.add_argument("--seed", type=int, default=None, help="seed of the draws and the trials (default 0)")
    sc.add_argument("--export", dest="export", action="store_true", default=None,
                    help="write the best student to the zoo (default; a --resume keeps the scan's choice, "
                         "and a finished search's student is written again only with --export)")
    sc.add_argument("--no-export", dest="export", action="store_false", default=None,
                    help="do not write the best student to the zoo (default: it is written)")
    add_recipe_args(sc)
    sc.set_defaults(func=cmd_scan)

    from .bench.quality import add_bench_quality_args, cmd_bench_quality

    b = sub.add_parser("bench", help="benchmarks")
    bs = b.add_subparsers(dest="bench_cmd", required=True)
    bq = bs.add_parser("quality", help="rank quality of every score vs the distill/probe ground truths (SPEC 6)")
    add_bench_quality_args(bq)
    bq.set_defaults(func=cmd_bench_quality)

    from .report import add_report_args, cmd_report

    r = sub.add_parser("report", help="write the run's self-contained HTML report (RUN/report.html)")
    add_report_args(r)
    r.set_defaults(func=cmd_report)

    z = sub.add_parser("zoo", help="manage a model zoo (local folder or s3://bucket/prefix)")
    zs = z.add_subparsers(dest="zoo_command", required=True)
    zi = s3(zs.add_parser("index", help="write manifest.parquet (reads configs and safetensors headers only)"))
    zi.add_argument("zoo")
    zi.set_defaults(func=cmd_zoo_index)
    zl = s3(zs.add_parser("list", help="list the zoo's teachers"))
    zl.add_argument("zoo")
    zl.add_argument("--format", choices=["table", "json"], default="table")
    zl.set_defaults(func=cmd_zoo_list)
    zv = s3(zs.add_parser("verify", help="check every teacher's hash and loadability (exit 1 if any is bad)"))
    zv.add_argument("zoo")
    zv.set_defaults(func=cmd_zoo_verify)
    for name, helptext in (("push", "copy a local zoo to S3"), ("pull", "copy a zoo from S3 to a local folder")):
        zc = s3(zs.add_parser(name, help=helptext + " (skips unchanged files)"))
        zc.add_argument("src")
        zc.add_argument("dst")
        zc.add_argument("--quiet", action="store_true")
        zc.set_defaults(func=cmd_zoo_copy)
    zb = s3(zs.add_parser("build-demo", help="train the demo teachers and write the demo targets"))
    zb.add_argument("out")
    zb.add_argument("--preset", choices=["small", "bench"], default="small")
    zb.add_argument("--seed", type=int, default=0)
    zb.set_defaults(func=cmd_zoo_build_demo)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (`kill`, `ray job stop`) stops like Ctrl-C from the start: exit 130 with a
        # word, not a silent death while torch and Ray load (ensure_ray refines it later)
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args) or 0)
    except SctdError as e:
        print(f"sctd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sctd: interrupted; results written so far are kept", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``sctd`` command: ``main``, then Ray shut down and the process ended without the
    interpreter's teardown, which with torch and timm loaded costs ~1.3 s on a 2-core machine
    after the results are already written (docs/benchmarks.md, "Fixed cost of a small scan")."""
    try:
        code = main()
    except BrokenPipeError:
        # the reader went away (`sctd zoo list | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"sctd: error: no space left on device{f' for {e.filename}' if e.filename else ''}; "
              "results written so far are kept", file=sys.stderr)
        code = 2
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            try:
                ray.shutdown()
            except KeyboardInterrupt:   # a second Ctrl-C (or SIGTERM) while Ray stops: the
                code = 130              # results are written; end as interrupted, not a traceback
                print("sctd: interrupted while Ray shut down; results written so far are kept",
                      file=sys.stderr)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:   # None: started with the stream closed (`>&-`)
                stream.flush()
        except BrokenPipeError:
            code = code or 128 + signal.SIGPIPE
        except OSError as e:        # stdout on a full disk (`> /dev/full`)
            if stream is sys.stdout and sys.stderr is not None:
                print(f"sctd: error: cannot write the output: {e.strerror}", file=sys.stderr)
            code = code or 2
    os._exit(code)


if __name__ == "__main__":
    entry()
