"""The names of the assessment scores (SPEC 3) and which inputs each needs.

Kept apart from ``metrics`` (which imports torch and scipy) so that the ``sctd`` command and a
scan's driver, which only name scores, start without importing torch (~2 s on a 2-core machine).
"""

NAMES = ("sctd", "sctd_cost", "sctd_fused", "leep", "nce", "logme", "hscore", "transrate")
# the score that ranks teachers unless --rank-by says otherwise: the best one on the quality
# benchmark against both ground truths (SPEC 2 and 6; docs/benchmarks.md "Score quality")
DEFAULT_RANK_BY = "sctd_fused"
PROB_SCORES = frozenset({"sctd", "sctd_cost", "sctd_fused", "leep", "nce"})   # need probs
FEATURE_SCORES = frozenset({"sctd", "sctd_cost", "sctd_fused", "logme", "hscore", "transrate"})
WEIGHT_SCORES = frozenset({"sctd", "sctd_cost", "sctd_fused"})             # need the teacher head
