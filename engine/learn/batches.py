"""The samples of every mask-learning step, and the coefficients that weigh their losses.

Each global batch holds ``illegal_per_batch`` illegal samples and fills the rest from the innocent
domains; the four coefficient rows turn the per-sample losses into the simulated user's loss
``L_illegal + L_innocent``, the publisher's data objective ``-L_illegal + lambda L_innocent`` and
the two logged means (innocent samples weighted by ``innocent_weights``). Indices and random draws
come from ``(seed, step)`` for the whole global batch, and a process takes every N-th sample of it,
so N processes see exactly the samples one process sees.
"""
from __future__ import annotations

from typing import Sequence

import torch

from freezeasguard.engine.errors import MaskLearnError
from freezeasguard.engine.learn.config import MaskLearnConfig
from freezeasguard.engine.train.batches import GlobalBatches, step_generator
from freezeasguard.engine.train.distributed import DistInfo


class DomainBatches:
    """The pools of illegal and innocent sample indices of a dataset, refused when the config names
    a domain the data lacks or a pool is smaller than its share of a batch."""

    def __init__(self, domains: Sequence[str | None], cfg: MaskLearnConfig):
        self.cfg = cfg
        present = sorted({d for d in domains if d is not None})
        unknown = [d for d in [*cfg.illegal, *cfg.innocent] if d not in present]
        if unknown:
            raise MaskLearnError(f"unknown domain(s) {unknown}; the data has {present}")
        if not cfg.illegal or not cfg.innocent:
            raise MaskLearnError("name at least one illegal and one innocent domain")
        weights = dict(zip(cfg.innocent, cfg.innocent_weights or [1.0] * len(cfg.innocent)))
        ill = [i for i, d in enumerate(domains) if d in cfg.illegal]
        inn = [i for i, d in enumerate(domains) if d in weights]
        b_ill = cfg.illegal_per_batch
        b_inn = cfg.user.batch_size - b_ill
        for what, pool, b in (("illegal", ill, b_ill), ("innocent", inn, b_inn)):
            if len(pool) < b:
                raise MaskLearnError(f"{len(pool)} {what} sample(s), fewer than the {b} each batch needs")
        self.pool_ill = torch.tensor(ill, dtype=torch.long)
        self.pool_inn = torch.tensor(inn, dtype=torch.long)
        self.weight_inn = torch.tensor([weights[domains[i]] for i in inn], dtype=torch.float64)
        self.batches_ill = GlobalBatches(len(ill), b_ill, cfg.seed)
        self.batches_inn = GlobalBatches(len(inn), b_inn, cfg.seed + 1)

    def step_inputs(self, step: int, task, dist: DistInfo, device: torch.device):
        """This process's share of the global batch of ``step``: indices, the task's random draws,
        and the coefficient rows (user loss, publisher loss, L_illegal, L_innocent) on ``device``."""
        cfg = self.cfg
        ii = self.batches_ill(step)
        ni = self.batches_inn(step)
        idx = torch.cat([self.pool_ill[ii], self.pool_inn[ni]])
        b_ill, b = len(ii), len(idx)
        w = self.weight_inn[ni]
        ill = torch.zeros(b, dtype=torch.float64)
        ill[:b_ill] = 1.0 / b_ill
        inn = torch.zeros(b, dtype=torch.float64)
        inn[b_ill:] = w / w.sum()
        draws = task.draw(step_generator(cfg.seed, step, salt=1), b)
        mine = slice(dist.rank, None, dist.world)
        coefs = torch.stack([ill + inn, -ill + cfg.mask.innocent_weight * inn, ill, inn])[:, mine]
        return idx[mine], tuple(d[mine] for d in draws), coefs.float().to(device)
