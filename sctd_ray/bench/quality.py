"""``sctd bench quality``: how well each score ranks a zoo for target tasks (SPEC 6).

For every (teacher, target) pair two ground truths (``groundtruth.py``, cached), the scores of
SPEC 2-3 computed in-process by the scan's engine (``collect_stats`` + ``finalise`` on the
target's train split: the numbers a scan produces) plus the improved ``sctd_*`` variants of
``scores_extra`` and a random baseline; per metric and target the weighted Kendall tau
(``scipy.stats.weightedtau``) of scores vs ground truth and the top-1 regret in accuracy
points; means over the targets whose ground-truth spread is at least 2 points, with a
bootstrap confidence interval over targets.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

MIN_SPREAD = 2.0          # accuracy points; SPEC 6
RANDOM_PERMUTATIONS = 1000
BOOTSTRAP = 2000
MIN_TEACHERS = 4          # fewer teachers with a ground truth: no tau for that target


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- measures

def _tied(scores) -> np.ndarray:
    """Scores rounded to 12 significant digits: values that differ only by floating-point noise
    (H-score saturates at C-1 when features outnumber samples: 3.9999999999999982 vs
    4.000000000000002) are ties, not a ranking."""
    return np.array([float(f"{v:.12g}") for v in np.asarray(scores, float)])


def weighted_tau(scores, truth) -> float:
    """SPEC 6: ``scipy.stats.weightedtau(scores, truth)`` (hyperbolic weights, both rankings)."""
    from scipy.stats import weightedtau

    s, t = _tied(scores), np.asarray(truth, float)
    if len(s) < 2 or np.ptp(t) == 0:
        return float("nan")
    if np.ptp(s) == 0:
        return 0.0
    return float(weightedtau(s, t).statistic)


def top1_regret(scores, truth) -> float:
    """Best ground truth minus the ground truth of the top-scored teacher, in points (truth is
    an accuracy in [0, 1]); teachers tied for the top score count by their mean ground truth."""
    s, t = _tied(scores), np.asarray(truth, float)
    top = s == np.max(s)
    return float(100.0 * (t.max() - t[top].mean()))


def random_tau(truth, n: int = RANDOM_PERMUTATIONS, seed: int = 0) -> float:
    """Random baseline: mean weighted tau of ``n`` random score permutations against ``truth``."""
    rng = np.random.default_rng(seed)
    t = np.asarray(truth, float)
    return float(np.mean([weighted_tau(rng.permutation(len(t)).astype(float), t) for _ in range(n)]))


def random_regret(truth) -> float:
    """Expected top-1 regret of a uniformly random pick, exactly: max - mean, in points."""
    t = np.asarray(truth, float)
    return float(100.0 * (t.max() - t.mean()))


MIN_CI_TARGETS = 3   # below this a bootstrap over targets says nothing ([a, a] from 1 target)


def bootstrap_ci(values, n: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over targets (resampling targets); NaN for fewer
    than ``MIN_CI_TARGETS`` targets."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if len(v) < MIN_CI_TARGETS:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(1)
    a = (1 - level) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def spread(truth: dict[str, float]) -> float:
    """max - min of a target's ground truth over teachers, in points."""
    v = list(truth.values())
    return float(100.0 * (max(v) - min(v))) if v else float("nan")


# --------------------------------------------------------------------------- scoring

def score_pair(teacher, target, metrics=None) -> dict[str, float]:
    """Every score of one teacher on one target's train split: SPEC 2-3 scores through the
    scan's statistics (``assess.engine``, ``sctd_fused`` included) and the other
    ``scores_extra`` variants."""
    import torch

    from .. import scores_extra
    from ..assess.engine import TeacherRunner, batches_from_arrays, collect_stats, finalise
    from ..metrics import NAMES
    from . import groundtruth as gtm

    names = tuple(metrics or NAMES)
    split = target.task.splits["train"]
    runner = TeacherRunner(teacher.get(), "cpu")
    tb = batches_from_arrays(target.name, split.images, split.labels, target.task.num_classes)
    out = finalise(teacher.teacher_id, collect_stats(runner, tb, names, torch.float64))
    extra = tuple(n for n in scores_extra.EXTRA_NAMES if n not in out)   # sctd_cal (ablation)
    if extra:
        feats, logits = gtm.teacher_outputs(teacher, target, "train")
        weight = runner.weight.double().numpy()
        out.update(scores_extra.compute_extra(feats, logits, split.labels, weight,
                                              target.task.num_classes, names=extra))
    return out


def score_zoo(teachers, targets, log=_log) -> dict[str, dict[str, dict[str, float]]]:
    """{metric: {target: {teacher: score}}}; a teacher that cannot be scored is left out."""
    from ..errors import SctdError

    t0 = time.time()
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for tg in targets:
        for t in teachers:
            try:
                vals = score_pair(t, tg)
            except SctdError as e:
                log(f"  cannot score {t.teacher_id} on {tg.name}: {e}")
                continue
            for m, v in vals.items():
                scores.setdefault(m, {}).setdefault(tg.name, {})[t.teacher_id] = float(v)
    log(f"scored {len(teachers)} teachers x {len(targets)} targets in {time.time() - t0:.1f}s")
    return scores


# --------------------------------------------------------------------------- evaluation

def _pairs(score: dict[str, float], truth: dict[str, float]):
    ids = sorted(set(score) & set(truth))
    return [score[i] for i in ids], [truth[i] for i in ids]


def evaluate(scores: dict, truths: dict[str, dict[str, dict[str, float]]], n_random: int | None = None,
             min_spread: float = MIN_SPREAD) -> dict:
    """The benchmark result (schema of issue 6; ``tau_w`` vs ``distill``, ``tau_w_probe`` vs
    ``probe``). ``truths = {"distill": {target: {teacher: acc}}, "probe": {...}}``; targets
    whose spread of a ground truth is under ``min_spread`` points (or with fewer than
    ``MIN_TEACHERS`` teachers having it) are left out of that ground truth's means."""
    kinds = {"distill": "tau_w", "probe": "tau_w_probe"}
    n_random = n_random or RANDOM_PERMUTATIONS
    targets = sorted({tg for kind in truths.values() for tg in kind} | {tg for m in scores.values() for tg in m})
    spreads = {tg: {k: (spread(truths.get(k, {}).get(tg, {}))
                        if len(truths.get(k, {}).get(tg, {})) >= MIN_TEACHERS else None) for k in kinds}
               for tg in targets}
    used = {k: [tg for tg in targets if spreads[tg][k] is not None and spreads[tg][k] >= min_spread]
            for k in kinds}
    names = list(scores) + ["random"]
    res = {}
    for name in names:
        per = {}
        for tg in targets:
            row = {}
            for kind, col in kinds.items():
                truth = truths.get(kind, {}).get(tg, {})
                if spreads[tg][kind] is None:
                    row[col] = None
                    if kind == "distill":
                        row["regret"] = None
                    else:
                        row["regret_probe"] = None
                    continue
                if name == "random":
                    t = list(truth.values())
                    tau, reg = random_tau(t, n_random), random_regret(t)
                else:
                    s, t = _pairs(scores[name].get(tg, {}), truth)
                    tau, reg = (weighted_tau(s, t), top1_regret(s, t)) if len(s) >= 2 else (None, None)
                row[col] = tau
                row["regret" if kind == "distill" else "regret_probe"] = reg
            per[tg] = row
        entry = {"per_target": per}
        for kind, col in kinds.items():
            reg_col = "regret" if kind == "distill" else "regret_probe"
            taus = [per[tg][col] for tg in used[kind] if per[tg][col] is not None and math.isfinite(per[tg][col])]
            regs = [per[tg][reg_col] for tg in used[kind] if per[tg][reg_col] is not None]
            entry[f"{col}_mean"] = float(np.mean(taus)) if taus else None
            entry[f"{col}_ci"] = list(bootstrap_ci(taus)) if len(taus) >= MIN_CI_TARGETS else None
            entry[f"{reg_col}_mean"] = float(np.mean(regs)) if regs else None
        res[name] = entry
    return {"metrics": res, "targets": targets, "used_targets": used,
            "spread": {tg: spreads[tg] for tg in targets}, "min_spread": min_spread}


def leave_one_target_out(result: dict, col: str = "tau_w_probe") -> dict[str, dict[str, float]]:
    """Robustness: for each held-out target, the mean ``col`` of every metric over the others
    (targets used in the means only)."""
    kind = "probe" if col == "tau_w_probe" else "distill"
    used = result["used_targets"][kind]
    out = {}
    for held in used:
        rest = [tg for tg in used if tg != held]
        out[held] = {m: float(np.nanmean([e["per_target"][tg][col] for tg in rest])) if rest else None
                     for m, e in result["metrics"].items()}
    return out


def _or(v, default):
    return default if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _fmt(v, nd=2, w=6):
    return f"{'-':>{w}}" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:>{w}.{nd}f}"


def format_table(result: dict, teachers: int, distill_pairs: dict | None = None, ce: dict | None = None) -> str:
    """The printed report: spreads, then per metric the per-target tau and the means."""
    lines = []
    tgs = result["targets"]
    lines.append(f"{teachers} teachers, {len(tgs)} targets; spread = max - min ground truth (points); "
                 f"targets with spread < {result['min_spread']:g} are left out of the means")
    lines.append(f"{'target':16s} {'distill':>8s} {'probe':>7s}  pairs(distill)" + ("  ce" if ce else ""))
    for tg in tgs:
        sp = result["spread"][tg]
        flag = "".join(f" [{k}: no signal]" for k in ("distill", "probe")
                       if sp[k] is not None and sp[k] < result["min_spread"])
        n = (distill_pairs or {}).get(tg, 0)
        extra = f"  {100 * ce[tg]:.1f}" if ce and tg in ce else ""
        lines.append(f"{tg:16s} {_fmt(sp['distill'], 1, 8)} {_fmt(sp['probe'], 1, 7)}  {n:>5d}{extra}{flag}")
    for kind, col, reg in (("distill", "tau_w", "regret"), ("probe", "tau_w_probe", "regret_probe")):
        used = result["used_targets"][kind]
        lines.append("")
        lines.append(f"weighted Kendall tau vs the {kind} ground truth ({len(used)} targets in the mean)")
        if not used:
            have = [tg for tg in tgs if result["spread"][tg][kind] is not None]
            lines.append("  (no target has this ground truth with enough spread)" if have else
                         f"  (not computed, or fewer than {MIN_TEACHERS} teachers with a result per target)")
            continue
        head = f"{'metric':18s}" + "".join(f"{tg[:10]:>11s}" for tg in used) + \
            f"{'mean':>8s} {'95% CI':>15s} {'regret':>7s}"
        lines.append(head)
        # best mean first; a mean of exactly 0.0 (a score constant over the zoo) is a number, not missing
        order = sorted(result["metrics"], key=lambda m: -_or(result["metrics"][m][f"{col}_mean"], -9))
        for m in order:
            e = result["metrics"][m]
            ci = e[f"{col}_ci"]
            cis = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
            lines.append(f"{m:18s}" + "".join(_fmt(e["per_target"][tg][col], 2, 11) for tg in used)
                         + f"{_fmt(e[f'{col}_mean'], 3, 8)} {cis:>15s} {_fmt(e[f'{reg}_mean'], 2, 7)}")
    return "\n".join(lines)


def to_json(result: dict, teachers: int, extra: dict | None = None) -> dict:
    """The issue-6 JSON schema (plus CIs, probe regrets and the used targets)."""
    out = {"metrics": {}, "targets": result["targets"], "teachers": teachers,
           "spread": result["spread"], "used_targets": result["used_targets"],
           "min_spread": result["min_spread"]}
    for m, e in result["metrics"].items():
        out["metrics"][m] = {
            "tau_w_mean": e["tau_w_mean"], "tau_w_probe_mean": e["tau_w_probe_mean"],
            "regret_mean": e["regret_mean"], "regret_probe_mean": e["regret_probe_mean"],
            "tau_w_ci": e["tau_w_ci"], "tau_w_probe_ci": e["tau_w_probe_ci"],
            "per_target": {tg: {"tau_w": r["tau_w"], "tau_w_probe": r["tau_w_probe"],
                                "regret": r["regret"], "regret_probe": r["regret_probe"]}
                           for tg, r in e["per_target"].items()}}
    out.update(extra or {})
    return out


# --------------------------------------------------------------------------- command

def add_bench_quality_args(p) -> None:
    """Arguments of ``sctd bench quality``."""
    p.add_argument("--zoo", default=None, help="zoo folder or s3:// uri (default: the demo bench zoo "
                   "under $SCTD_HOME/bench-zoo, built if missing)")
    p.add_argument("--targets", nargs="*", default=None,
                   help="target task folders (default: the zoo's targets/*)")
    p.add_argument("--out", default=None, help="cache + results folder (default: $SCTD_HOME/bench-quality)")
    p.add_argument("--recipe", default="default",
                   help="distillation recipe: 'default', a JSON object of Recipe settings "
                        "('{\"epochs\": 20}', as for sctd distill) or a file holding one")
    p.add_argument("--seeds", type=int, default=1, help="distillation seeds per pair (default 1)")
    p.add_argument("--teachers-per-target", type=int, default=None,
                   help="distill at most this many teachers per target (a seeded, score-independent subset)")
    p.add_argument("--distill-max-seconds", type=float, default=None,
                   help="stop starting new students after this many seconds (0: use cached results only)")
    p.add_argument("--gt", choices=("both", "probe", "distill"), default="both",
                   help="which ground truths to compute (default both)")
    p.add_argument("--no-ce", action="store_true", help="skip the ce (no teacher) baseline students")
    p.add_argument("--teachers", default=None, help="comma-separated teacher ids (default: all)")
    p.add_argument("--json", default=None, help="also write the result as JSON to this path")
    p.add_argument("--s3-endpoint", default=None)


def _recipe(spec: str):
    """``--recipe``: 'default', a JSON object of Recipe settings (as ``sctd distill --recipe``
    takes it), or the path of a file holding one. One line (SctdError) for anything else."""
    from ..distill.recipe import Recipe
    from ..errors import SctdError

    if spec in (None, "", "default"):
        return Recipe()
    text = spec
    if not spec.lstrip().startswith("{"):
        try:
            with open(spec) as f:
                text = f.read()
        except OSError as e:
            raise SctdError(f"--recipe {spec}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            text = ""
    try:
        settings = json.loads(text)
    except (json.JSONDecodeError, ValueError) as e:
        raise SctdError(f"--recipe {spec}: not a JSON object of Recipe settings ({e})") from None
    if not isinstance(settings, dict):
        raise SctdError(f"--recipe {spec}: not a JSON object of Recipe settings")
    return Recipe.from_dict(settings)


def run_quality(zoo: str, target_uris: list[str] | None, out: str, recipe="default", seeds: int = 1,
                teachers_per_target: int | None = None, distill_max_seconds: float | None = None,
                gt: str = "both", with_ce: bool = True, teachers: list[str] | None = None,
                s3_endpoint: str | None = None, log=_log) -> tuple[dict, str]:
    """Compute (or read from the cache in ``out``) the ground truths, score the zoo, evaluate.
    Returns (JSON-ready result, printed table)."""
    from ..errors import SctdError
    from . import groundtruth as gtm   # torch: imported when the benchmark runs, not with the CLI

    refs = gtm.zoo_teachers(zoo, teachers, s3_endpoint=s3_endpoint)
    uris = target_uris or gtm.zoo_target_uris(zoo, s3_endpoint=s3_endpoint)
    if not uris:
        raise SctdError(f"no targets: {zoo} has no targets/ folder; pass --targets")
    tgs = [gtm.load_target_ref(u, s3_endpoint=s3_endpoint) for u in uris]
    names = [t.name for t in tgs]
    if len(set(names)) != len(names):
        raise SctdError(f"target names must be distinct (folder names): {names}")
    log(f"{len(refs)} teachers, {len(tgs)} targets: {', '.join(names)}")
    cache = gtm.GTCache(out)
    rec = _recipe(recipe) if not hasattr(recipe, "to_dict") else recipe
    truths, ce = {}, {}
    if gt in ("both", "probe"):
        truths["probe"] = gtm.compute_probe(refs, tgs, cache, log=log)
    if gt in ("both", "distill"):
        truths["distill"], ce = gtm.compute_distill(
            refs, tgs, cache, rec, seeds=tuple(range(seeds)), teachers_per_target=teachers_per_target,
            max_seconds=distill_max_seconds, with_ce=with_ce, log=log)
    scores = score_zoo(refs, tgs, log=log)
    result = evaluate(scores, truths)
    pairs = {tg: len(truths.get("distill", {}).get(tg, {})) for tg in names}
    table = format_table(result, len(refs), pairs, ce)
    extra = {"distill_pairs": pairs, "ce": ce, "seeds": seeds, "recipe": rec.to_dict(),
             "recipe_code": gtm.recipe_code_version(), "ground_truth": truths, "scores": scores,
             "loto_probe": leave_one_target_out(result, "tau_w_probe"),
             "loto_distill": leave_one_target_out(result, "tau_w")}
    return to_json(result, len(refs), extra), table


def cmd_bench_quality(args) -> int:
    """``sctd bench quality``: print the table; ``--json PATH`` also writes it."""
    import os
    from pathlib import Path

    from ..errors import SctdError

    if args.seeds < 1:
        raise SctdError(f"--seeds must be at least 1, not {args.seeds}")
    if args.teachers_per_target is not None and args.teachers_per_target < 1:
        raise SctdError(f"--teachers-per-target must be at least 1, not {args.teachers_per_target}")
    if args.distill_max_seconds is not None and args.distill_max_seconds < 0:
        raise SctdError(f"--distill-max-seconds must be 0 or more, not {args.distill_max_seconds:g}")
    if args.json:   # its folder before the benchmark's minutes, not after them
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SctdError(f"--json {args.json}: cannot create its folder ({e.strerror or e})") from None
        if not os.access(Path(args.json).parent, os.W_OK):
            raise SctdError(f"--json {args.json}: its folder is not writable")
    recipe = _recipe(args.recipe)   # a bad recipe before the benchmark's minutes
    home = Path(os.environ.get("SCTD_HOME", Path.home() / ".cache" / "sctd-ray"))
    zoo = args.zoo
    if zoo is None:
        from ..zoo.demo import build_demo

        zoo = str(home / "bench-zoo")
        build_demo(zoo, preset="bench")
    out = args.out or str(home / "bench-quality")
    teachers = [t for t in (args.teachers or "").split(",") if t] or None
    result, table = run_quality(zoo, args.targets, out, recipe, args.seeds, args.teachers_per_target,
                                args.distill_max_seconds, args.gt, not args.no_ce, teachers,
                                getattr(args, "s3_endpoint", None))
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, sort_keys=False)
        print(f"wrote {args.json}")
    return 0
