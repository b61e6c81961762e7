"""Distillation benchmarks (SPEC 4 recipe, SPEC 6 `distill` ground truth). Results and the exact
commands are recorded in docs/distill.md.

    python bench/distill_bench.py quality --zoo ZOO [--run RUN] [--targets a,b] [--seeds 0,1] [--rank-by sctd_fused]
    python bench/distill_bench.py cost --zoo ZOO [--target fm-mix5] [--teacher fm-all-resnet]

quality: for every target of the zoo (ZOO/targets/*), test accuracy of students trained with the
fixed recipe by OT distillation from the top-ranked teacher, from a random teacher (drawn
among the others, seeded), from the lowest-ranked teacher, and by ce, each over the seeds;
prints per-target accuracies and the mean differences. The ranking is the run's
ranking.parquet when given (and it has the target), else computed here by the assessment
engine (``--rank-by``, default ``sctd_fused`` like the scan).

cost: one training step of the same student on the same batch of views: ce, OT with the
teacher's probabilities precomputed (isolates the loss), and OT with the online teacher
forward; medians of interleaved repetitions, printed as ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, if not installed

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _targets(zoo: str, names: list[str] | None) -> list[str]:
    root = Path(zoo) / "targets"
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if names:
        missing = sorted(set(names) - set(found))
        if missing:
            raise SystemExit(f"targets not in {root}: {missing}")
        return names
    if not found:
        raise SystemExit(f"no targets in {root}")
    return found


def _ranking(zoo: str, target: str, run: str | None, rank_by: str = "sctd_fused") -> list[str]:
    """Teacher ids of the zoo, best first by the ``rank_by`` score."""
    import pandas as pd

    if run:
        df = pd.read_parquet(Path(run) / "ranking.parquet")
        df = df[(df["target"] == target) & (df["status"] == "ok")]
        if len(df):
            return list(df.sort_values("rank")["teacher_id"])
    from sctd_ray.assess.engine import assess_teacher, batches_from_arrays
    from sctd_ray.data.targets import load_target
    from sctd_ray.zoo.loading import load_teacher
    from sctd_ray.zoo.manifest import read_manifest
    from sctd_ray.zoo.store import open_store

    store = open_store(zoo)
    task = load_target(str(Path(zoo) / "targets" / target), splits=("train",))
    tb = batches_from_arrays(task.name, task.splits["train"].images, task.splits["train"].labels,
                             task.num_classes)
    ids = [r["id"] for _, r in read_manifest(store).iterrows() if r["status"] == "ok"]
    scores = {t: assess_teacher(load_teacher(store, t), tb, metrics=(rank_by,), device="cpu")[task.name][rank_by]
              for t in ids}
    return sorted(ids, key=lambda t: -scores[t])


def _job(args) -> dict:
    """One student: (zoo, target, teacher or None, seed, recipe dict, hp[, student_args, tag])
    -> accuracies."""
    zoo, target, teacher_id, seed, recipe, hp, *rest = args
    student_args = rest[0] if rest else None
    torch.set_num_threads(1)
    from sctd_ray.data.targets import load_target
    from sctd_ray.distill.recipe import Recipe
    from sctd_ray.distill.train import train_student
    from sctd_ray.zoo.loading import load_teacher
    from sctd_ray.zoo.store import open_store

    task = load_target(str(Path(zoo) / "targets" / target))
    teacher = load_teacher(open_store(zoo), teacher_id) if teacher_id else None
    t0 = time.time()
    res = train_student(task, teacher, "ot" if teacher_id else "ce", hp, Recipe.from_dict(recipe),
                        seed=seed, device="cpu", student_args=student_args)
    return {"target": target, "teacher": teacher_id, "seed": seed, "test_acc": res.test_acc,
            "val_acc": res.val_acc, "seconds": time.time() - t0, "tag": rest[1] if len(rest) > 1 else None}


def _roles(zoo: str, target: str, run: str | None, random_seed: int, rank_by: str = "sctd_fused") -> dict:
    """Teacher of each role: top and lowest by ``rank_by``, random drawn among the others (seeded)."""
    ranked = _ranking(zoo, target, run, rank_by)
    others = ranked[1:-1]
    rng = np.random.default_rng(zlib.crc32(f"{random_seed}:{target}".encode()))
    rand = others[int(rng.integers(len(others)))] if others else ranked[-1]
    return {"top": ranked[0], "random": rand, "lowest": ranked[-1], "ce": None}


def sweep(a) -> None:
    """Recipe variants (a JSON list of {name, recipe, hp, student_args, roles, seeds}) x targets;
    one JSON line per student appended to --out as soon as it is done (how docs/distill.md's
    recipe table was measured)."""
    from sctd_ray.distill.recipe import DEFAULT_HP, Recipe

    variants = json.loads(Path(a.variants).read_text())
    targets = _targets(a.zoo, a.targets.split(",") if a.targets else None)
    roles = {t: _roles(a.zoo, t, a.run, a.random_seed, a.rank_by) for t in targets}
    plan = []
    for v in variants:
        recipe = Recipe.from_dict(v.get("recipe", {})).to_dict()
        hp = {**DEFAULT_HP, **v.get("hp", {})}
        for seed in v.get("seeds", [0, 1]):
            for t in targets:
                for role in v.get("roles", ["ce", "top"]):
                    plan.append((a.zoo, t, roles[t][role], seed, recipe, hp, v.get("student_args"),
                                 f"{v['name']}|{role}"))
    print(f"sweep: {len(variants)} variants, {len(plan)} students on {a.workers} workers", flush=True)
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool, open(a.out, "a") as f:
        for r in pool.map(_job, plan):
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"  {r['tag']:24s} {r['target']:12s} seed {r['seed']}: test {r['test_acc']:.3f} "
                  f"({r['seconds']:.0f}s)", flush=True)


def quality(a) -> None:
    from sctd_ray.distill.recipe import DEFAULT_HP, Recipe

    recipe = Recipe.from_dict(json.loads(a.recipe) if a.recipe else {}).to_dict()
    hp = {**DEFAULT_HP, **(json.loads(a.hp) if a.hp else {})}
    seeds = [int(s) for s in a.seeds.split(",")]
    targets = _targets(a.zoo, a.targets.split(",") if a.targets else None)
    plan, roles = [], {}
    for t in targets:
        roles[t] = _roles(a.zoo, t, a.run, a.random_seed, a.rank_by)
        for tid in roles[t].values():
            for s in seeds:
                plan.append((a.zoo, t, tid, s, recipe, hp))
    print(f"quality: {len(targets)} targets x 4 students x {len(seeds)} seeds = {len(plan)} runs "
          f"on {a.workers} worker(s); recipe {json.dumps(recipe)}; hp {hp}", flush=True)
    t0 = time.time()
    rows = []
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(_job, plan):
            rows.append(r)
            print(f"  {r['target']:14s} {str(r['teacher']):20s} seed {r['seed']}: test {r['test_acc']:.3f} "
                  f"({r['seconds']:.0f}s)", flush=True)
    acc = {}
    for t in targets:
        for role, tid in roles[t].items():
            vals = [r["test_acc"] for r in rows if r["target"] == t and r["teacher"] == tid]
            acc[(t, role)] = 100 * float(np.mean(vals))
    print(f"\ntest accuracy (%), mean over seeds {seeds}; teachers: top / random / lowest by {a.rank_by}")
    print(f"{'target':14s} {'ce':>6s} {'top':>6s} {'random':>7s} {'lowest':>7s}   top-ce  top-rand  top-low   teachers")
    diffs = {"top-ce": [], "top-random": [], "top-lowest": []}
    for t in targets:
        ce, top, rnd, low = (acc[(t, k)] for k in ("ce", "top", "random", "lowest"))
        diffs["top-ce"].append(top - ce)
        diffs["top-random"].append(top - rnd)
        diffs["top-lowest"].append(top - low)
        r = roles[t]
        print(f"{t:14s} {ce:6.1f} {top:6.1f} {rnd:7.1f} {low:7.1f}   {top - ce:+6.1f}  {top - rnd:+7.1f}  "
              f"{top - low:+7.1f}   {r['top']}, {r['random']}, {r['lowest']}")
    print("mean differences (points): " + ", ".join(f"{k} {np.mean(v):+.2f}" for k, v in diffs.items())
          + f"   [{time.time() - t0:.0f}s]")
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "roles": roles, "recipe": recipe, "hp": hp,
                                           "seeds": seeds}, indent=1))


def cost(a) -> None:
    import torch.nn.functional as F

    from sctd_ray.assess.engine import TeacherRunner
    from sctd_ray.data.targets import load_target
    from sctd_ray.distill.losses import ot_distill_loss
    from sctd_ray.distill.recipe import DEFAULT_HP, DEFAULT_STUDENT, Recipe
    from sctd_ray.distill.train import build_student, teacher_cost
    from sctd_ray.distill.views import make_views
    from sctd_ray.ot import prepare_cost
    from sctd_ray.zoo.loading import load_teacher
    from sctd_ray.zoo.store import open_store

    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    task = load_target(str(Path(a.zoo) / "targets" / a.target))
    teacher = load_teacher(open_store(a.zoo), a.teacher)
    runner = TeacherRunner(teacher, device)
    hp = DEFAULT_HP
    m = prepare_cost(teacher_cost(runner, task), hp["eps"], device=device)  # as training does
    model, _, pre = build_student(task, a.student, None, seed=0)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recipe = Recipe(batch_size=a.batch)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(a.batch) % len(task.splits["train"])
    v = make_views(torch.from_numpy(task.splits["train"].images)[idx].to(device),
                   torch.from_numpy(task.splits["train"].labels)[idx], recipe, gen)
    with torch.inference_mode():
        _, t_logits = runner.forward(v.x)
    p_pre = torch.softmax(t_logits.clone() / hp["tau"], 1)
    lab = v.labelled

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(kind):
        logits = model(pre(v.x))
        loss = F.cross_entropy(logits[lab], v.labels[lab], label_smoothing=0.1) if kind != "ce" else \
            F.cross_entropy(logits, v.labels, label_smoothing=0.1)
        if kind == "ot":
            loss = loss + hp["lam"] * ot_distill_loss(logits, p_pre, m, hp["tau"], hp["eps"],
                                                      max_iter=recipe.sinkhorn_iters, tol=0.0)
        elif kind == "ot+teacher":
            _, tl = runner.forward(v.x)
            p = torch.softmax(tl.clone() / hp["tau"], 1)
            loss = loss + hp["lam"] * ot_distill_loss(logits, p, m, hp["tau"], hp["eps"],
                                                      max_iter=recipe.sinkhorn_iters, tol=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    kinds = ("ce", "ot", "ot+teacher")
    times = {k: [] for k in kinds}
    for k in kinds:  # warm-up
        for _ in range(3):
            step(k)
    for _ in range(a.repeat):  # interleaved, so a change of machine load hits every kind alike
        for k in kinds:
            sync()
            t = time.perf_counter()
            for _ in range(a.steps):
                step(k)
            sync()
            times[k].append((time.perf_counter() - t) / a.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"cost: student {a.student or DEFAULT_STUDENT}, teacher {a.teacher}, target {a.target}, batch {a.batch}, "
          f"{dev}; median of {a.repeat} x {a.steps} steps")
    for k in kinds:
        print(f"  {k:11s} {1000 * med[k]:7.2f} ms/step   ratio to ce {med[k] / med['ce']:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality", help="test accuracy: top / random / lowest teacher vs ce")
    q.add_argument("--zoo", required=True)
    q.add_argument("--run", default=None, help="a scan run folder whose ranking.parquet to use")
    q.add_argument("--targets", default=None, help="comma-separated target names (default: all)")
    q.add_argument("--seeds", default="0,1")
    q.add_argument("--recipe", default=None, help="recipe overrides (JSON)")
    q.add_argument("--hp", default=None, help="hyper-parameter overrides (JSON)")
    q.add_argument("--random-seed", type=int, default=0, help="seed of the random-teacher draw")
    q.add_argument("--rank-by", default="sctd_fused", help="score that ranks the teachers (default: the scan's)")
    q.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    q.add_argument("--out", default=None, help="write all runs as JSON here")
    q.set_defaults(func=quality)
    w = sub.add_parser("sweep", help="recipe variants x targets, one JSON line per student")
    w.add_argument("--zoo", required=True)
    w.add_argument("--variants", required=True, help="JSON file: a list of variants")
    w.add_argument("--run", default=None)
    w.add_argument("--targets", default=None)
    w.add_argument("--random-seed", type=int, default=0)
    w.add_argument("--rank-by", default="sctd_fused")
    w.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    w.add_argument("--out", required=True)
    w.set_defaults(func=sweep)
    c = sub.add_parser("cost", help="ms per training step: ce vs OT (loss only) vs OT + online teacher")
    c.add_argument("--zoo", required=True)
    c.add_argument("--target", default="fm-mix5")
    c.add_argument("--teacher", default="fm-all-resnet")
    c.add_argument("--student", default=None)
    c.add_argument("--batch", type=int, default=64)
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--repeat", type=int, default=15)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.set_defaults(func=cost)
    a = p.parse_args(argv)
    if a.cmd == "cost" and a.student is None:
        from sctd_ray.distill.recipe import DEFAULT_STUDENT

        a.student = DEFAULT_STUDENT
    a.func(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
