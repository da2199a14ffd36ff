"""Step-indexed randomness: what step ``s`` draws depends only on ``(seed, s)``.

Everything random in a step (which images, noise, timesteps, flips, VAE posterior samples) comes
from generators seeded by ``(seed, step)``, drawn for the *global* batch and then sliced per
process and micro-batch. So N steps + resume + N steps equals 2N steps bit for bit, and N
processes see exactly the samples one process sees at the same global batch.
"""
from __future__ import annotations

import torch
from torch.utils.data.distributed import DistributedSampler

from freezeasguard.engine.errors import TrainingError


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, salt)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**63 - 1))
    return g


class GlobalBatches:
    """Indices of the global batch of every step, from torch's DistributedSampler.

    Each epoch is a seeded permutation (``DistributedSampler(num_replicas=1)``, ``set_epoch``);
    step ``s`` takes positions ``[s*B, (s+1)*B)`` of the epoch's order (incomplete tail batches
    are dropped). Process ``r`` of ``W`` takes every W-th sample of the global batch starting at
    ``r``, which is what ``DistributedSampler(num_replicas=W, rank=r)`` hands that process.
    """

    def __init__(self, n: int, batch: int, seed: int):
        if n < batch:
            raise TrainingError(f"dataset has {n} samples, fewer than the global batch {batch}")
        self.n, self.batch = n, batch
        self.per_epoch = n // batch
        self.sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed,
                                          drop_last=True)
        self._epoch, self._order = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order, self._epoch = torch.tensor(list(iter(self.sampler))), epoch
        return self._order[k * self.batch:(k + 1) * self.batch]
