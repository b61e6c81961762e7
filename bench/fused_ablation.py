"""Ablation of ``sctd_fused`` (docs/method.md, "Limits"): each transport route alone vs the
fitted mixture, as mean weighted Kendall tau against the ground truths that ``sctd bench
quality --json`` wrote (their ``ground_truth`` field), on the same zoo.

    python bench/fused_ablation.py --zoo ZOO --quality quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, if not installed

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.special import softmax  # noqa: E402
from scipy.stats import weightedtau  # noqa: E402

from sctd_ray import scores_extra as se  # noqa: E402
from sctd_ray.bench import groundtruth as gtm  # noqa: E402

ROUTES = {"A_loo": ("A",), "F_loo": ("F",), "sctd_fused": ("A", "F")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--quality", required=True, help="JSON written by `sctd bench quality --json`")
    a = ap.parse_args()
    torch.set_num_threads(1)
    gt = json.loads(Path(a.quality).read_text())["ground_truth"]
    refs = gtm.zoo_teachers(a.zoo)
    scores = {r: {} for r in ROUTES}
    for tg in (gtm.load_target_ref(u) for u in gtm.zoo_target_uris(a.zoo)):
        split = tg.task.splits["train"]
        for t in refs:
            feats, logits = gtm.teacher_outputs(t, tg, "train")
            w = t.get().model.get_classifier().weight.detach().double().numpy()
            terms = se.cost_terms(feats, softmax(logits, 1), split.labels, w, tg.task.num_classes)
            for r, names in ROUTES.items():
                scores[r].setdefault(tg.name, {})[t.teacher_id] = se.calibrated_loglik(
                    [terms[n] for n in names], split.labels)[0]
    for kind in ("distill", "probe"):
        for r in ROUTES:
            taus = {}
            for tg, truth in gt.get(kind, {}).items():
                ids = sorted(i for i in truth if i in scores[r].get(tg, {}))
                taus[tg] = weightedtau([scores[r][tg][i] for i in ids], [truth[i] for i in ids])[0]
            if taus:
                print(f"{kind:8s} {r:11s} mean tau_w {np.mean(list(taus.values())):.3f}   "
                      + " ".join(f"{k} {v:.2f}" for k, v in taus.items()))


if __name__ == "__main__":
    main()
