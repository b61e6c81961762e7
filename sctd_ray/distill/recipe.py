"""The training recipe of SPEC 4 ("function matching", Beyer et al., CVPR 2022): what is
fixed for a whole search (steps, batch, optimiser, augmentation strengths; ``Recipe``) and the
hyper-parameters a search varies (lam, tau, eps, lr; ``DEFAULT_HP``). The views themselves are
made in ``views.py``. docs/distill.md records how the defaults were chosen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import SctdError

METHODS = ("ot", "kd", "ce")
DEFAULT_HP = {"lam": 100.0, "tau": 1.0, "eps": 0.1, "lr": 3e-3}
DEFAULT_STUDENT = "test_resnet"   # a small timm CNN that trains fast on a CPU


@dataclass(frozen=True)
class Recipe:
    """Fixed training settings (SPEC 4). An epoch is ``steps_per_epoch`` steps; validation
    accuracy is measured after every epoch, so it is also the report interval of a trial."""

    epochs: int = 12
    steps_per_epoch: int = 50
    batch_size: int = 64
    warmup_steps: int = 30
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    # augmentation, per view (shapes relative to the image side)
    crop_scale: tuple[float, float] = (0.6, 1.0)    # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    translate: float = 0.05                         # extra shift, fraction of the side
    rotate: float = 5.0                             # degrees, uniform in [-rotate, rotate]
    warp: float = 0.0                               # smooth random displacement, fraction of the side
    hflip: bool = False                             # only where the domain allows it
    mix_frac: float = 0.5                           # share of each batch that is mixed pairwise
    # what the ce baseline does with mixed views: "labels" (mixup targets) or "none" (no mixing)
    ce_mix: str = "labels"
    sinkhorn_iters: int = 20                        # per step; at eps >= 0.1 the gradient is within 2%
    # the student's input side at most: the target's decoded size, down to this (timm's usual
    # 224); photos are decoded at up to 512 px. On a CPU a 224 px step costs ~3 s (64: ~0.2 s)
    student_max_side: int = 224

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Recipe":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SctdError(f"unknown recipe setting(s) {unknown}; known: {', '.join(sorted(names))}")
        defaults = cls()
        for k, v in d.items():   # JSON from --recipe: the type of each default, before any use
            d[k] = _typed(k, v, getattr(defaults, k))
        r = cls(**d)
        r.validate()
        return r

    def validate(self) -> None:
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 2:
            raise SctdError(f"recipe needs epochs >= 1, steps_per_epoch >= 1, batch_size >= 2; got "
                            f"{self.epochs}, {self.steps_per_epoch}, {self.batch_size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise SctdError(f"crop_scale must satisfy 0 < low <= high <= 1; got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise SctdError(f"crop_ratio must satisfy 0 < low <= high; got {self.crop_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise SctdError(f"label_smoothing must lie in [0, 1); got {self.label_smoothing}")
        for k in ("warmup_steps", "weight_decay", "translate", "rotate", "warp"):
            if getattr(self, k) < 0:
                raise SctdError(f"{k} must not be negative; got {getattr(self, k)}")
        if not 0 <= self.mix_frac < 1:
            raise SctdError(f"mix_frac must lie in [0, 1); got {self.mix_frac}")
        if self.sinkhorn_iters < 1:
            raise SctdError(f"sinkhorn_iters must be at least 1; got {self.sinkhorn_iters}")
        if self.student_max_side < 8:
            raise SctdError(f"student_max_side must be at least 8; got {self.student_max_side}")
        if self.ce_mix not in ("labels", "none"):
            raise SctdError(f"ce_mix must be 'labels' or 'none'; got {self.ce_mix!r}")


def _typed(name: str, value, default):
    """``value`` as the type of the recipe's ``default`` (an int, a float, a bool, a string or a
    (low, high) pair); SctdError naming the setting otherwise."""
    def number(v, kind):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or kind is int and v != int(v):
            raise SctdError(f"recipe setting {name} must be {'an integer' if kind is int else 'a number'}; "
                            f"got {v!r}")
        return kind(v)

    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise SctdError(f"recipe setting {name} must be a pair [low, high]; got {value!r}")
        return tuple(number(v, float) for v in value)
    if isinstance(default, bool) or isinstance(default, str):
        if type(value) is not type(default):
            kind = "true or false" if isinstance(default, bool) else "a string"
            raise SctdError(f"recipe setting {name} must be {kind}; got {value!r}")
        return value
    return number(value, type(default))


def check_student(architecture: str) -> None:
    """SctdError unless ``architecture`` is a timm model name (naming close ones)."""
    import timm

    if not timm.is_model(architecture):
        name, known = architecture.lower(), timm.list_models()
        close = ([m for m in known if m.startswith(name)] or [m for m in known if name in m])[:5]
        raise SctdError(f"--student {architecture!r} is not a timm architecture"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""))


def check_hp(method: str, hp: dict) -> dict:
    """Complete ``hp`` with ``DEFAULT_HP`` and check the values a user can get wrong."""
    if method not in METHODS:
        raise SctdError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    unknown = sorted(set(hp) - set(DEFAULT_HP))
    if unknown:
        raise SctdError(f"unknown hyper-parameter(s) {unknown}; known: {', '.join(DEFAULT_HP)}")
    out = {**DEFAULT_HP, **{k: float(v) for k, v in hp.items()}}
    for k, v in out.items():
        if not (math.isfinite(v) and (v > 0 or (k == "lam" and v == 0))):
            raise SctdError(f"hyper-parameter {k} must be a positive number; got {v}")
    return out
