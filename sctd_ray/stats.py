"""Streaming, mergeable per-teacher statistics -> the SPEC 2-3 scores (torchmetrics style).

``TeacherStats.update`` folds one batch of teacher outputs into sufficient statistics held on
the batch's device (no host sync per batch), ``merge`` combines statistics of disjoint parts
of the target set, ``to_state``/``from_state`` ship them between processes, and ``compute``
hands them to the formulas of ``metrics`` (the same ones the in-memory scores use).
"""

from __future__ import annotations

import concurrent.futures as _futures
import threading
from typing import NamedTuple

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from . import metrics as _m
from . import scores_extra as _scores_extra
from .errors import ScoreInputError
from .ot import _unit_rows, cost_from_prototypes

_BLAS = ThreadpoolController()
_BATCH_BYTES = 1 << 28   # one chunk of batched class factorisations: 256 MB of Grams or rows
_SEMANTIC = ("num_classes", "metrics", "tau_a", "temperature", "transrate_eps")  # must match to merge


class TeacherStats:
    """Sufficient statistics of one teacher on one target set (SPEC 3).

    ``update(features, logits, labels)`` takes one batch (tensors, possibly on CUDA); the
    teacher prediction is ``softmax(logits / tau_a)``. Only what the requested ``metrics`` need
    is kept (K teacher classes, C target classes, D feature dims, N samples). Accumulators are
    float64 whatever ``dtype`` is (they are small, and LogME, the H-score and TransRate's
    ``eps = 1e-4`` amplify round-off in their small directions); ``dtype`` sets the softmax
    and the per-sample rows (the N-sized parts), stored as 4-byte float32 or 8-byte float64:

    ========================  =========================================  ======================
    statistic                 size                                       kept for
    ========================  =========================================  ======================
    class counts              C (int64)                                  always
    soft joint P^T Y          K x C                                      sctd_cost, leep
    argmax x label counts     K x C (int64)                              nce
    class feature sums        C x D                                      sctd*, logme, hscore,
                                                                         transrate
    mean + centred scatter    D + D x D (batched Welford; Chan to merge)  logme, hscore (with
                              while fewer than D samples: their raw      transrate: derived)
                              rows N x D (+ N labels) instead
    per-sample P, or P W_unit N x min(K, D) (+ N int64 labels); P when  sctd, sctd_fused, leep
                              leep is requested (it needs P)
    per-sample features       N x D, the very rows of the transrate       sctd_fused
                              buffer when transrate is requested
    transrate buffer          raw features, <= ``transrate_buffer`` rows transrate
                              (default max(C D, 2^23 / D): the rows
                              outweigh the scatters, or 2^23 numbers),
                              + labels; then folded into per-class
                              scatters C x D x D (+ C x D sums)
    ========================  =========================================  ======================

    ``sctd`` needs ``A = P M`` with M known only at the end; since ``M = 1 - W_unit mu_unit^T``
    and rows of P sum to 1, ``A = 1 - (P W_unit) mu_unit^T``, so N x min(K, D) numbers suffice.
    ``sctd_fused`` needs leave-one-out prototypes ``S_c - phi_i``, so it keeps each sample's
    feature row and ``h_i = P W_unit`` (as that, or as the row of P, from which ``P W_unit`` is
    one product at the end); its costs are built at the end on the stats' device.
    TransRate's per-class terms keep raw features while they are fewer than the per-class
    scatters would be (few-shot targets never fold), so its memory is about
    min(N D, max(2 C D^2, 2^23)) numbers. When transrate is requested the global scatter is not
    accumulated per batch: ``S = sum_k Z_k^T Z_k`` is built at ``compute`` from the same class
    statistics (``_scatter_and_class_rates``), which saves one N x D^2 product.

    (Accumulated in float32, the scatter's round-off, ~1e-6 of its largest eigenvalue, passes for
    real directions when D >= N and turns LogME into NaN; float64 costs one ``B x D x D``
    float64 product per batch, or the class Grams at the end with transrate.)

    Bad labels and NaN/inf are detected without syncing: labels outside [0, C) are counted (and
    clamped), non-finite inputs make the statistics non-finite; ``compute`` raises
    ``ScoreInputError`` for either, and for an empty class.
    """

    def __init__(self, num_classes: int, weight, metrics=_m.NAMES, device=None,
                 dtype: torch.dtype = torch.float64, tau_a: float = 1.0, temperature: float = 0.1,
                 transrate_eps: float = _m.TRANSRATE_EPS, transrate_buffer: int | None = None):
        self.metrics = tuple(metrics)
        unknown = [m for m in self.metrics if m not in _m.NAMES]
        if unknown or not self.metrics:
            raise ScoreInputError(f"unknown metric(s) {unknown or self.metrics}; expected some of "
                                  f"{_m.NAMES}")
        if dtype not in (torch.float32, torch.float64):
            raise ScoreInputError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
        if int(num_classes) < 1:
            raise ScoreInputError(f"num_classes must be >= 1; got {num_classes}")
        w = weight.detach() if isinstance(weight, torch.Tensor) else torch.as_tensor(np.asarray(weight))
        if w.ndim != 2 or not bool(torch.isfinite(w).all()):
            raise ScoreInputError(f"weight must be a finite (K, D) matrix; got shape {tuple(w.shape)}")
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.tau_a = float(tau_a)
        self.temperature = float(temperature)
        self.transrate_eps = float(transrate_eps)
        self.device = torch.device(device) if device is not None else None
        self.weight = w.to(device=self.device, dtype=dtype) if self.device else w.to(dtype)
        k, d = self.weight.shape
        # fold once the raw rows outweigh the per-class scatters, but never below 2^23 numbers
        self.transrate_buffer = (int(transrate_buffer) if transrate_buffer
                                 else max(self.num_classes * d, (1 << 23) // max(d, 1)))

        want = set(self.metrics)
        self._probs = bool(want & _m.PROB_SCORES)
        self._feats = bool(want & _m.FEATURE_SCORES)
        self._joint = bool(want & {"sctd_cost", "leep"})
        self._nce = "nce" in want
        self._scatter = bool(want & {"logme", "hscore", "transrate"})
        self._transrate = "transrate" in want
        # with transrate the global scatter comes from its class statistics at compute time
        self._welford = self._scatter and not self._transrate
        self._fused = "sctd_fused" in want
        # one per-sample row buffer serves sctd, sctd_fused (both need P W_unit) and leep (P)
        if "leep" in want or (want & {"sctd", "sctd_fused"} and k <= d):
            self._rows_kind = "probs"
        elif want & {"sctd", "sctd_fused"}:
            self._rows_kind = "h"
        else:
            self._rows_kind = None
        self.n = 0
        self._ready = False

    # ------------------------------------------------------------------ state

    def _init_state(self, device: torch.device) -> None:
        self.device = device
        self.weight = self.weight.to(device)
        k, d = self.weight.shape
        c, dt = self.num_classes, self.dtype
        z = lambda *s, t=dt: torch.zeros(*s, dtype=t, device=device)  # noqa: E731
        self._counts = z(c, t=torch.int64)
        self._bad = z((), t=torch.int64)
        self._prob_sum = z((), t=torch.float64)   # non-finite iff some probability is (NaN/inf check)
        self._ones = torch.ones(0, dtype=torch.int64, device=device)
        acc = torch.float64          # accumulators are small: always float64
        self._joint_t = z(k, c, t=acc) if self._joint else None
        self._nce_t = z(k, c, t=torch.int64) if self._nce else None
        self._sums = z(c, d, t=acc) if self._feats else None
        self._mean = z(d, t=acc) if self._welford else None
        self._scat = z(d, d, t=acc) if self._welford else None
        self._w_unit = _unit_rows(self.weight) if self._rows_kind is not None else None
        self._rows: list[torch.Tensor] = []        # per-sample P or P W_unit
        self._rows_y: list[torch.Tensor] = []
        self._tr_x: list[torch.Tensor] = []        # transrate buffer of raw features
        self._tr_y: list[torch.Tensor] = []
        self._tr_rows = 0
        self._tr_counts = self._tr_sums = self._tr_scat = None   # folded part (class-centred)
        self._fx: list[torch.Tensor] = []          # sctd_fused: per-sample features
        # without transrate, below D samples: the raw rows instead of the Welford moments
        self._few_x: list[torch.Tensor] | None = [] if self._welford else None
        self._few_y: list[torch.Tensor] | None = [] if self._welford else None
        self._ready = True

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, features, logits, labels) -> "TeacherStats":
        """Fold one batch in: features (B, D), logits (B, K), labels (B,) (SPEC 3)."""
        y = labels.detach() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        if y.ndim != 1:
            raise ScoreInputError(f"labels must have shape (B,); got {tuple(y.shape)}")
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise ScoreInputError(f"labels must be integers; got dtype {y.dtype}")
        b = y.shape[0]
        k, d = self.weight.shape
        if self._probs:
            _check_batch("logits", logits, (b, k))
        if self._feats:
            _check_batch("features", features, (b, d))
        if b == 0:
            return self
        if not self._ready:
            ref = features if isinstance(features, torch.Tensor) else logits
            self._init_state(self.device or (ref.device if isinstance(ref, torch.Tensor)
                                             else torch.device("cpu")))
        dev, dt, c = self.device, self.dtype, self.num_classes
        y = y.to(dev, non_blocking=dev.type == "cuda").long()
        lo, hi = torch.aminmax(y) if dev.type == "cpu" else (None, None)   # no sync on CUDA
        if lo is None or int(lo) < 0 or int(hi) >= c:
            self._bad += ((y < 0) | (y >= c)).sum()
        y = y.clamp(0, c - 1)
        ones = self._ones if self._ones.shape[0] == b else torch.ones(b, dtype=torch.int64, device=dev)
        self._ones = ones
        self._counts.index_add_(0, y, ones)

        if self._probs:
            z = _tensor(logits, dev, dt)
            p = torch.softmax(z if self.tau_a == 1.0 else z / self.tau_a, dim=1)
            if self._joint:     # the soft joint holds every probability: also the NaN/inf check
                self._joint_t.index_add_(1, y, p.T.double())
            else:
                self._prob_sum += p.sum()
            if self._nce:
                self._nce_t.view(-1).index_add_(0, p.argmax(1) * c + y, ones)
            if self._rows_kind is not None:
                self._rows.append(p if self._rows_kind == "probs" else p @ self._w_unit)
                self._rows_y.append(y)

        if self._feats:
            x = _tensor(features, dev, dt)
            x64 = x.double()
            self._sums.index_add_(0, y, x64)
            few = self._welford and self._few_x is not None and self.n + b < d
            if self._welford and not few:   # batched Welford: S += (x - m_old)^T (x - m_new), exact
                self._fold_few()
                xa = x64 - self._mean
                self._mean.add_(xa.sum(0), alpha=1.0 / (self.n + b))
                self._scat.addmm_(xa.T, x64 - self._mean)
            if self._transrate or self._fused or few:
                aliased = isinstance(features, torch.Tensor) and x.data_ptr() == features.data_ptr()
                x = x.clone() if aliased else x         # the caller may reuse its buffer
            if self._transrate:
                self._tr_x.append(x)
                self._tr_y.append(y)
                self._tr_rows += b
            if self._fused:
                self._fx.append(x)                      # the same tensor: no extra memory
            if few:
                self._few_x.append(x)
                self._few_y.append(y)
        self.n += b
        if self._transrate and self._tr_rows > self.transrate_buffer:
            self._fold()
        return self

    def _fold_few(self) -> None:
        """From D samples on, the raw rows kept for the few-shot route become the Welford mean
        and scatter (one N x D^2 product, what the per-batch updates would have cost)."""
        if self._few_x is None:
            return
        if self._few_x:
            mean, scat = _moments(torch.cat(self._few_x))
            self._mean.copy_(mean)
            self._scat.copy_(scat)
        self._few_x = self._few_y = None

    def _welford_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and centred scatter of the features seen, without changing the statistics."""
        if self._few_x:
            return _moments(torch.cat(self._few_x))
        return self._mean, self._scat

    def _fold(self) -> None:
        """Move the transrate buffer into per-class centred scatters (one sync; rare)."""
        if not self._tr_x:
            return
        x, y = torch.cat(self._tr_x).double(), torch.cat(self._tr_y)
        self._tr_x, self._tr_y, self._tr_rows = [], [], 0
        c, d = self.num_classes, x.shape[1]
        cnt = torch.bincount(y, minlength=c)
        sums = torch.zeros(c, d, dtype=x.dtype, device=x.device).index_add_(0, y, x)
        mean = sums / cnt.clamp_min(1)[:, None].to(x.dtype)
        xc = x - mean[y]
        scat = torch.zeros(c, d, d, dtype=x.dtype, device=x.device)
        order = torch.argsort(y)
        xc = xc[order]
        start = 0
        for cls, nc in enumerate(cnt.tolist()):
            if nc:
                blk = xc[start:start + nc]
                scat[cls] = blk.T @ blk
                start += nc
        self._merge_folded(cnt, sums, scat)

    def _merge_folded(self, cnt, sums, scat) -> None:
        if self._tr_scat is None:
            self._tr_counts, self._tr_sums, self._tr_scat = cnt.clone(), sums.clone(), scat.clone()
            return
        na, nb = self._tr_counts.to(sums.dtype), cnt.to(sums.dtype)
        delta = sums / nb.clamp_min(1)[:, None] - self._tr_sums / na.clamp_min(1)[:, None]
        factor = na * nb / (na + nb).clamp_min(1)
        self._tr_scat += scat + factor[:, None, None] * delta[:, :, None] * delta[:, None, :]
        self._tr_sums += sums
        self._tr_counts += cnt

    # ------------------------------------------------------------------ merge

    @torch.no_grad()
    def merge(self, other: "TeacherStats") -> "TeacherStats":
        """Add the statistics of ``other`` (a disjoint part of the target set); returns self."""
        self._check_compatible(other)
        if other.n == 0:
            return self
        if not self._ready:
            self._init_state(self.device or other.device)
        dev = self.device
        mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
        self._counts += mv(other._counts)
        self._bad += mv(other._bad)
        self._prob_sum += mv(other._prob_sum)
        if self._joint:
            self._joint_t += mv(other._joint_t)
        if self._nce:
            self._nce_t += mv(other._nce_t)
        if self._feats:
            self._sums += mv(other._sums)
        if self._welford and self._few_x is not None and other._few_x is not None \
                and self.n + other.n < self.weight.shape[1]:       # still few: raw rows
            self._few_x += [mv(t) for t in other._few_x]
            self._few_y += [mv(t) for t in other._few_y]
        elif self._welford:
            self._fold_few()
            o_mean, o_scat = other._welford_moments()
            if self.n == 0:
                self._mean.copy_(mv(o_mean))
                self._scat.copy_(mv(o_scat))
            else:
                delta = mv(o_mean) - self._mean
                tot = self.n + other.n
                self._scat.add_(mv(o_scat)).addr_(delta, delta, alpha=self.n * other.n / tot)
                self._mean.add_(delta, alpha=other.n / tot)
        self._rows += [mv(t) for t in other._rows]
        self._rows_y += [mv(t) for t in other._rows_y]
        if self._fused:
            self._fx += [mv(t) for t in other._fx]
        if self._transrate:
            self._tr_x += [mv(t) for t in other._tr_x]
            self._tr_y += [mv(t) for t in other._tr_y]
            self._tr_rows += other._tr_rows
            if other._tr_scat is not None:
                self._merge_folded(mv(other._tr_counts), mv(other._tr_sums), mv(other._tr_scat))
        self.n += other.n
        if self._transrate and self._tr_rows > self.transrate_buffer:
            self._fold()
        return self

    def _check_compatible(self, other: "TeacherStats") -> None:
        if not isinstance(other, TeacherStats):
            raise TypeError(f"can only merge TeacherStats; got {type(other).__name__}")
        mine = [getattr(self, a) for a in _SEMANTIC] + [tuple(self.weight.shape), self.dtype]
        theirs = [getattr(other, a) for a in _SEMANTIC] + [tuple(other.weight.shape), other.dtype]
        if mine != theirs:
            diff = [a for a, x, y in zip(_SEMANTIC + ("weight shape", "dtype"), mine, theirs) if x != y]
            raise ScoreInputError(f"cannot merge statistics with different {', '.join(diff)}")
        if not torch.equal(self.weight.cpu(), other.weight.cpu()):
            raise ScoreInputError("cannot merge statistics of different teachers (weights differ)")

    # ------------------------------------------------------------------ compute

    def compute(self) -> dict[str, float]:
        """The requested scores, {name: float}, equal to ``metrics`` on the concatenated data."""
        # (the largest matrix decomposed is N x N when N < D: metrics.row_gram_route)
        if self.device is not None and self.device.type != "cpu" or min(self.n, self.weight.shape[1]) > 1024:
            return self._compute()
        # Small host linear algebra runs on one BLAS thread: right after a forward pass torch's
        # OpenMP threads are still spinning, and a multi-threaded OpenBLAS call competing with
        # them took ~18 ms instead of 0.5 ms for a 64 x 64 eigendecomposition on 2 cores.
        with _BLAS.limit(limits=1, user_api="blas"):
            return self._compute()

    def _compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ScoreInputError("no samples were seen: call update() with at least one batch")
        bad = int(self._bad)
        if bad:
            raise ScoreInputError(f"labels must lie in [0, {self.num_classes}); {bad} labels "
                                  f"outside that range were seen")
        counts = self._counts.cpu().numpy()
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            shown = ", ".join(map(str, empty[:10])) + (" ..." if empty.size > 10 else "")
            raise ScoreInputError(f"every one of the {self.num_classes} target classes needs at "
                                  f"least one sample; classes without samples: {shown}")
        # every feature row is in the class sums, every probability in their running sum
        few = self._few_x is not None      # then mean and scatter are unused zeros
        for t in (self._prob_sum, self._joint_t, self._sums, None if few else self._mean,
                  None if few else self._scat, self._tr_sums, self._tr_scat):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ScoreInputError("features and logits must be finite; the statistics contain "
                                      "NaN or inf")
        n = self.n
        if self._scatter and n < 2:
            raise ScoreInputError(f"feature scores need at least 2 samples; got {n}")
        # small statistics go to the host in float64; per-sample ones stay on the device
        host = lambda t: t.double().cpu().numpy()  # noqa: E731
        counts = counts.astype(np.float64)
        dev = self.device if self.device is not None and self.device.type != "cpu" else None
        sums = host(self._sums) if self._sums is not None else None
        cost = None
        if set(self.metrics) & _m.WEIGHT_SCORES:
            cost = cost_from_prototypes(host(self.weight), sums, counts)
        rows = torch.cat(self._rows).double() if self._rows else None
        row_y = torch.cat(self._rows_y) if self._rows else None
        on_dev = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        here = lambda t: t if dev is not None else t.numpy()  # noqa: E731  (host: numpy LAPACK)
        tr_x = torch.cat(self._tr_x) if self._tr_x else None
        same = len(self._fx) == len(self._tr_x) and all(a is b for a, b in zip(self._fx, self._tr_x))
        mean = scat = class_rates = rg = None
        few_shot = _m.row_gram_route(n, self.weight.shape[1])      # then no D x D matrix
        if self._transrate and self._tr_scat is None and few_shot:
            mean, rg, class_rates = self._row_grams(counts, tr_x, torch.cat(self._tr_y))
        elif self._transrate:
            mean, scat, class_rates = self._scatter_and_class_rates(counts, tr_x)
        elif self._welford and self._few_x is not None and few_shot:
            mean, rg, _ = self._row_grams(counts, torch.cat(self._few_x), torch.cat(self._few_y))
        elif self._welford:
            mean, scat = self._welford_moments()

        def score(name: str) -> float:
            if name == "sctd":   # A = P M, or 1 - (P W_unit) mu_unit^T (class docstring)
                if self._rows_kind == "probs":
                    a = rows @ on_dev(cost)
                else:
                    a = 1.0 - rows @ _unit_rows(on_dev(sums)).T
                v = (_m.sctd_from_costs(a, row_y, self.temperature) if dev is not None else
                     _m.sctd_from_costs(a.numpy(), row_y.numpy(), self.temperature))
            elif name == "sctd_cost":
                v = _m.sctd_cost_from_joint(host(self._joint_t), cost, n)
            elif name == "sctd_fused":
                fx = tr_x if same and tr_x is not None else torch.cat(self._fx)
                h = (_scores_extra.h_rows(rows, self._w_unit.double(), self.num_classes)
                     if self._rows_kind == "probs"
                     else (rows, None))
                v = _scores_extra.fused_from_rows(h[0], fx, row_y, self._sums, h[1])
            elif name == "leep":
                cond = on_dev(_m.leep_conditional(host(self._joint_t)))
                eyz = (rows @ cond).gather(1, row_y[:, None])[:, 0]
                v = _m.leep_from_expected(eyz.cpu().numpy())
            elif name == "nce":
                v = _m.nce_from_counts(self._nce_t.cpu().numpy())
            elif name == "logme" and rg is not None:
                v = _m.logme_from_row_gram(here(rg.raw), here(rg.labels), counts, n, self.weight.shape[1])
            elif name == "logme":   # on a GPU the D x D work stays there (metrics docstrings)
                if dev is not None:
                    m64 = mean.double()
                    gram = scat.double() + n * torch.outer(m64, m64)
                else:
                    mean_h = host(mean)
                    gram = host(scat) + n * np.outer(mean_h, mean_h)
                v = _m.logme_from_gram(gram, sums, counts, n)
            elif name == "hscore" and rg is not None:
                v = _m.hscore_from_row_gram(here(rg.centred), here(rg.labels), counts)
            elif name == "hscore":
                v = _m.hscore_from_scatter(scat if dev is not None else host(scat), sums, counts, n)
            else:   # TransRate: R(Z) from the global scatter (or Z Z^T), minus the mean class rate
                total = 0.5 * _m.logdet_identity_plus(scat if rg is None else rg.centred,
                                                      1.0 / (n * self.transrate_eps))
                v = total - float(np.mean(class_rates))
            return v

        jobs = {}
        if _parallel_finalise(dev or torch.device("cpu")):
            ready = torch.cuda.current_stream(dev).record_event() if dev is not None else None
            jobs = {name: _lanes().submit(_on_side_stream, dev, ready, score, name)
                    for name in self.metrics if name in _LANE_SCORES}
        out = {}
        try:
            for name in self.metrics:
                out[name] = _m._finite(name, jobs[name].result() if name in jobs else score(name))
        finally:
            _futures.wait(jobs.values())
        return out

    def _row_grams(self, counts: np.ndarray, x: torch.Tensor, y: torch.Tensor):
        """The few-shot route (``metrics.row_gram_route``: fewer samples than features, TransRate's
        rows all still raw): the N x N Gram of the globally centred rows, sorted by class, gives
        TransRate's total and, from its diagonal blocks, the class rates; H-score decomposes it,
        LogME the raw rows' Gram ``F F^T = Z Z^T + a 1^T + 1 a^T + |mu|^2`` (``a = Z mu``). No
        D x D matrix is formed (a 2048-wide teacher on 500 images: 500 x 500 decompositions).
        The rows ``x`` and labels ``y`` are TransRate's buffer, or the few-shot rows kept instead
        of the Welford moments when TransRate is not requested (then no class rates)."""
        eps = self.transrate_eps
        mean, z, y_sorted = self._sorted_centred(x, y)
        rates = None
        if z.device.type == "cpu":
            centred = _m.symmetrise_lower(_m.gram_lower(z.T))          # syrk: Z Z^T
            rates, start = [], 0
            for nk in counts.astype(int).tolist() if self._transrate else ():
                block = centred[start:start + nk, start:start + nk]     # Z_k Z_k^T
                rates.append(0.5 * _m.logdet_identity_plus(block, 1.0 / (nk * eps)))
                start += nk
        else:   # one sync per chunk of classes instead of one per class (the rows' Grams again)
            centred = z @ z.T
            rates = _class_rates_from_rows(z, counts, eps) if self._transrate else None
        a = z @ mean.double()
        raw = centred + a[:, None] + a[None, :] + mean.double() @ mean.double()
        return mean, _RowGrams(centred, raw, y_sorted), rates

    def _sorted_centred(self, x: torch.Tensor, y: torch.Tensor):
        """The global feature mean, the rows x in float64 sorted by class (stable) and centred by
        it (one N x D copy), and their labels in that order."""
        mean = self._sums.sum(0) / self.n
        order = torch.argsort(y, stable=True)
        z = x.double()[order]
        z -= mean
        return mean, z, y[order]

    def _scatter_and_class_rates(self, counts: np.ndarray, tr_x: torch.Tensor | None):
        """Global mean and centred scatter (D, D) and TransRate's class coding rates
        ``R(Z_k) = 1/2 logdet(I + Z_k^T Z_k / (n_k eps))``, Z centred by the global mean.

        ``S = sum_k Z_k^T Z_k``, so the class Grams give the scatter: from the folded class
        scatters (``scat_k + n_k (m_k - mu)(m_k - mu)^T``), or from the raw buffered rows, where
        a class takes its D x D Gram (which is its share of S) when that is cheaper than the
        Gram of the smaller side plus its share of one ``Z^T Z`` product. Off the CPU the class
        rates come from batched factorisations (``_batched_class_rates``)."""
        eps, d = self.transrate_eps, self.weight.shape[1]
        batched = _batched_class_rates(self._sums.device)
        rates = []
        if self._tr_scat is None:                   # raw features only (few-shot targets)
            mean, z, _ = self._sorted_centred(tr_x, torch.cat(self._tr_y))
            if batched:
                return mean, z.T @ z, _class_rates_from_rows(z, counts, eps)
            scat = torch.zeros(d, d, dtype=torch.float64, device=z.device).T   # syrk order
            rest = []                               # row ranges whose part of S is still missing
            start = 0
            for nk in counts.astype(int).tolist():
                zk = z[start:start + nk]
                # syrk multiply-adds: a D x D Gram n_k D^2 (+ a Cholesky D^3 / 3), the small side
                # n_k^2 D (+ n_k^3 / 3), plus the n_k D^2 of its share of S, still to be done
                if d ** 3 / 3 < nk * nk * d + nk ** 3 / 3:
                    gram = _m.gram_lower(zk)
                    scat += gram
                else:
                    gram = _m.gram_lower(zk.T if nk < d else zk)
                    rest.append(zk)
                rates.append(0.5 * _m.logdet_identity_plus(gram, 1.0 / (nk * eps)))
                start += nk
            if rest:
                scat += _m.gram_lower(z if len(rest) == len(rates) else torch.cat(rest))
            return mean, _m.symmetrise_lower(scat), rates
        self._fold()                                # the rest of the buffer, then per-class D x D
        mean = self._sums.sum(0) / self.n
        tr_scat, tr_sums, cnt = self._tr_scat, self._tr_sums, self._tr_counts.double()
        offset = tr_sums / cnt[:, None] - mean                                  # (C, D)
        if batched:   # the class Grams, a chunk of classes at a time, factorised together
            step = max(1, _BATCH_BYTES // (8 * d * d))
            for k in range(0, self.num_classes, step):
                c = slice(k, k + step)
                grams = tr_scat[c] + cnt[c, None, None] * offset[c, :, None] * offset[c, None, :]
                rates.extend(0.5 * _m.logdet_identity_plus_batched(grams, 1.0 / (cnt[c] * eps)))
            return mean, tr_scat.sum(0) + (offset.T * cnt) @ offset, rates
        scat = torch.zeros(d, d, dtype=torch.float64, device=tr_scat.device)
        for k in range(self.num_classes):
            gram = tr_scat[k] + cnt[k] * torch.outer(offset[k], offset[k])
            scat += gram
            rates.append(0.5 * _m.logdet_identity_plus(gram, 1.0 / (float(cnt[k]) * eps)))
        return mean, scat, rates

    # ------------------------------------------------------------------ shipping

    def to_state(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild (config and statistics) as numpy arrays."""
        st = {"num_classes": np.asarray(self.num_classes), "metrics": np.asarray(self.metrics),
              "tau_a": np.asarray(self.tau_a), "temperature": np.asarray(self.temperature),
              "transrate_eps": np.asarray(self.transrate_eps),
              "transrate_buffer": np.asarray(self.transrate_buffer),
              "dtype": np.asarray(str(self.dtype).removeprefix("torch.")),
              "weight": self.weight.cpu().numpy(), "n": np.asarray(self.n, dtype=np.int64)}
        if self.n == 0:
            return st
        np_ = lambda t: t.cpu().numpy()  # noqa: E731
        st["counts"], st["bad_labels"] = np_(self._counts), np_(self._bad)
        st["prob_sum"] = np_(self._prob_sum)
        few = self._few_x is not None           # the few-shot rows stand for mean and scatter
        for key, t in (("joint", self._joint_t), ("nce_counts", self._nce_t), ("sums", self._sums),
                       ("mean", None if few else self._mean), ("scatter", None if few else self._scat),
                       ("tr_counts", self._tr_counts),
                       ("tr_sums", self._tr_sums), ("tr_scatter", self._tr_scat)):
            if t is not None:
                st[key] = np_(t)
        if self._rows:
            st["rows"], st["row_labels"] = np_(torch.cat(self._rows)), np_(torch.cat(self._rows_y))
        if self._tr_x:
            st["tr_x"], st["tr_y"] = np_(torch.cat(self._tr_x)), np_(torch.cat(self._tr_y))
        if self._fx:
            st["fused_x"] = np_(torch.cat(self._fx))
        if few:
            st["few_x"], st["few_y"] = np_(torch.cat(self._few_x)), np_(torch.cat(self._few_y))
        return st

    @classmethod
    def from_state(cls, state: dict, device=None) -> "TeacherStats":
        """Rebuild statistics shipped with ``to_state`` (on ``device``, default CPU)."""
        try:
            dtype = {"float32": torch.float32, "float64": torch.float64}[str(state["dtype"])]
            self = cls(int(state["num_classes"]), np.asarray(state["weight"]),
                       metrics=tuple(str(m) for m in np.atleast_1d(state["metrics"])),
                       device=device, dtype=dtype, tau_a=float(state["tau_a"]),
                       temperature=float(state["temperature"]),
                       transrate_eps=float(state["transrate_eps"]),
                       transrate_buffer=int(state["transrate_buffer"]))
            n = int(state["n"])
        except KeyError as e:
            raise ScoreInputError(f"not a TeacherStats state: missing {e}") from None
        if n == 0:
            return self
        self._init_state(torch.device(device) if device is not None else torch.device("cpu"))
        t = lambda key: torch.as_tensor(np.asarray(state[key])).to(self.device)  # noqa: E731
        self._counts, self._bad = t("counts").long(), t("bad_labels").long()
        if "prob_sum" in state:
            self._prob_sum = t("prob_sum").double()
        for key, attr in (("joint", "_joint_t"), ("nce_counts", "_nce_t"), ("sums", "_sums"),
                          ("mean", "_mean"), ("scatter", "_scat"), ("tr_counts", "_tr_counts"),
                          ("tr_sums", "_tr_sums"), ("tr_scatter", "_tr_scat")):
            if key in state:
                setattr(self, attr, t(key))
        if "rows" in state:
            self._rows, self._rows_y = [t("rows")], [t("row_labels").long()]
        if "tr_x" in state:
            self._tr_x, self._tr_y = [t("tr_x")], [t("tr_y").long()]
            self._tr_rows = int(self._tr_x[0].shape[0])
        if "fused_x" in state:
            self._fx = [t("fused_x")]
        if self._welford:   # without its rows, a state holds the Welford moments
            self._few_x, self._few_y = ([t("few_x")], [t("few_y").long()]) if "few_x" in state \
                else (None, None)
        self.n = n
        return self


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and centred scatter ``(x - m)^T (x - m)`` of rows x, in float64."""
    x64 = x.double()
    mean = x64.mean(0)
    xc = x64 - mean
    return mean, xc.T @ xc


class _RowGrams(NamedTuple):
    """N x N Grams of a target's rows, sorted by class (``TeacherStats._row_grams``)."""
    centred: torch.Tensor    # Z Z^T, Z the globally centred features
    raw: torch.Tensor        # F F^T
    labels: torch.Tensor     # each row's class (sorted)


PARALLEL_FINALISE = False   # off until measured on a GPU (docs/benchmarks.md, "Pending device checks")
_LANE_SCORES = ("logme", "hscore", "transrate")   # the D x D factorisations, independent
_LANE_STATE = threading.local()
_LANE_POOL: list = []


def _parallel_finalise(device: torch.device) -> bool:
    """Whether ``compute`` runs LogME, H-score and TransRate's total at the same time, each on
    its own CUDA stream from its own thread (their factorisations leave a GPU mostly idle: a
    float64 eigendecomposition of a 2048 x 2048 Gram takes ~57 ms on an H200); the other scores
    run meanwhile in the calling thread."""
    return PARALLEL_FINALISE and device.type == "cuda"


def _lanes() -> _futures.ThreadPoolExecutor:
    if not _LANE_POOL:
        _LANE_POOL.append(_futures.ThreadPoolExecutor(len(_LANE_SCORES), "sctd-finalise"))
    return _LANE_POOL[0]


def _on_side_stream(device, ready, fn, *args):
    """``fn(*args)`` on this thread's own stream of ``device``, after ``ready`` (an event recorded
    on the caller's stream once the statistics were complete); without a device, just run."""
    if device is None:
        return fn(*args)
    streams = _LANE_STATE.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    stream = streams[device]
    stream.wait_event(ready)
    with torch.cuda.stream(stream):
        return fn(*args)


def _batched_class_rates(device: torch.device) -> bool:
    """Whether TransRate's class rates come from batched factorisations: off the CPU, where one
    small factorisation per class costs two host syncs and a dozen kernel launches (C = 100
    classes: ~28 ms on an H200, docs/benchmarks.md). The CPU keeps its per-class LAPACK route
    (syrk, potrf): 1.8x faster there at 2,000 x 256 (``bench/linalg_bench.py``)."""
    return device.type != "cpu"


def _class_rates_from_rows(z: torch.Tensor, counts: np.ndarray, eps: float) -> list[float]:
    """SPEC 3 TransRate's class rates ``1/2 logdet(I + Z_k^T Z_k / (n_k eps))`` from the centred
    rows z (N, D) sorted by class, by batched factorisations with one host sync per chunk.

    A class uses the Gram of its smaller side (``Z_k Z_k^T`` when n_k < D: the same determinant).
    Classes, largest first, are cut into chunks of one side whose rows are padded with zeros to
    the chunk's largest class, wasting at most as many rows as the chunk holds and staying under
    ``_BATCH_BYTES``: zero rows add nothing to either Gram, and their diagonal entries of
    ``I + G`` are 1. Each class's rows are scaled by ``(n_k eps)^-1/2`` as they are copied."""
    n_k = counts.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(n_k)[:-1]])
    order = np.argsort(-n_k, kind="stable")
    d = z.shape[1]
    rates = np.empty(len(n_k))
    i = 0
    while i < len(order):
        top = int(n_k[order[i]])
        few_rows = top < d                          # then the n_k x n_k Gram, else D x D
        j, rows = i + 1, top
        while j < len(order) and (int(n_k[order[j]]) < d) == few_rows:
            g, nxt = j - i + 1, int(n_k[order[j]])
            if g * top > 2 * (rows + nxt) or g * top * d * 8 > _BATCH_BYTES:
                break
            rows += nxt
            j += 1
        ks = order[i:j]
        padded = z.new_zeros((len(ks), top, d))
        for slot, k in enumerate(ks.tolist()):
            torch.mul(z[starts[k]:starts[k] + n_k[k]], float((n_k[k] * eps) ** -0.5),
                      out=padded[slot, :n_k[k]])
        grams = padded @ padded.mT if few_rows else padded.mT @ padded
        del padded
        rates[ks] = 0.5 * _m.logdet_identity_plus_batched(grams)
        i = j
    return rates.tolist()


def _check_batch(name: str, x, shape: tuple[int, int]) -> None:
    if x is None:
        raise ScoreInputError(f"{name} is required by the requested metrics: expected shape {shape}")
    if tuple(x.shape) != shape:
        raise ScoreInputError(f"{name} must have shape {shape} (batch size, then "
                              f"{'K teacher classes' if name == 'logits' else 'D feature dims'}); "
                              f"got {tuple(x.shape)}")


def _tensor(x, device, dtype) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")
