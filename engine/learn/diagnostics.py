"""How a mask-learning run stands: whether the soft mask has become the hard mask it exports,
and how its losses moved. Both go into the learned manifest's provenance and the reports."""
from __future__ import annotations

import math
from typing import Any

from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.learn.learner import MaskLearner


def convergence(learner: MaskLearner, mask: FreezeMask | None = None) -> dict[str, Any]:
    """How far the soft mask is from the hard one that is exported.

    The export is a top-k over the logits; it means something only where the soft mask has
    split into m near 1 and m near 0. Returned (shares count parameters):

    * ``agreement``: share of the exported frozen parameters whose soft m > 1/2;
    * ``decisive``: share of all parameters whose m < 0.1 or m > 0.9 (near binary);
    * ``margin``: lowest frozen minus highest unfrozen logit, in units of T (tiny: the export
      ranks noise; negative where the greedy parameter fill skipped a tensor that did not
      fit; None when nothing or everything is frozen);
    * ``spread``: the logits' max - min in units of T;
    * ``converged``: agreement >= 0.9 and decisive >= 0.9. (At a budget of 1/2 every m starts
      at 1/2, so agreement alone is met by any logits just above their start.)
    """
    mask = mask if mask is not None else learner.export_mask()
    t = learner.cfg.mask.temperature
    sc = learner.scores()
    sizes = dict(zip(mask.names, mask.numels))
    frozen = [n for n in sc if n in mask.frozen_set]
    free = [n for n in sc if n not in mask.frozen_set]
    m = {n: 0.5 * (1.0 + math.tanh(v / (2.0 * t))) for n, v in sc.items()}  # sigmoid, no overflow
    fp = sum(sizes[n] for n in frozen)
    agreement = sum(sizes[n] for n in frozen if m[n] > 0.5) / fp if fp else 1.0
    decisive = sum(sizes[n] for n in sc if not 0.1 <= m[n] <= 0.9) / sum(sizes.values())
    margin = (min(sc[n] for n in frozen) - max(sc[n] for n in free)) / t if frozen and free else None
    vals = list(sc.values())
    return {"agreement": agreement, "decisive": decisive, "margin": margin,
            "spread": (max(vals) - min(vals)) / t, "converged": agreement >= 0.9 and decisive >= 0.9,
            **learner.mask_stats()}


def loss_summary(learner: MaskLearner, window: int = 10) -> dict[str, Any]:
    """Mean losses over the first and last ``window`` steps (at most a quarter of the run each)."""
    h = learner.history
    w = max(1, min(window, len(h) // 4))

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else None

    return {"steps": learner.step, "user_steps": learner.user_steps,
            "first": {k: mean(h[:w], k) for k in ("L_illegal", "L_innocent")},
            "last": {k: mean(h[-w:], k) for k in ("L_illegal", "L_innocent")},
            "window": w, **learner.mask_stats()}
