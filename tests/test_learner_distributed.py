"""2 processes (gloo) learn the mask 1 process learns over the same global batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_learner import _cfg, _learner, tiny  # noqa: F401  (tiny is a fixture)

from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.data import digits_dataset
from freezeasguard.engine.model.tokenizer import caption_words

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _ddp_worker(rank, world, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    ds = digits_dataset(16, classes=(1, 2, 7))
    tiny = build_components("tiny", extra_words=caption_words(ds.captions), seed=0), ds
    learner = _learner(tiny, _cfg(None, *DDP_OVERRIDES))
    learner.fit()
    if rank == 0:
        torch.save({"logits": learner.logits.detach(), "frozen": sorted(learner.export_mask().frozen_set),
                    "history": learner.history}, result_path)
    dist.destroy_process_group()


# SGD on the logits: Adam's first steps move every logit by about +-lr, leaving near-ties that
# summation-order noise could reorder; SGD keeps the logits as far apart as their gradients.
DDP_OVERRIDES = ("steps=6", "bootstrap_steps=2", "mask.optimizer=sgd", "mask.lr=1", "mask.every=3")


def test_two_processes_learn_the_mask_one_process_learns(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    one = _learner(tiny, _cfg(None, *DDP_OVERRIDES))
    one.fit()
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["frozen"] == sorted(one.export_mask().frozen_set)
    # Same samples and noise; the all-reduced gradients differ from one process's only by fp32
    # summation order (~1e-7 relative), which six steps of AdamW (per-element normalised, so small
    # second moments amplify it) and SGD on the logits carry to a few 1e-6 of the logits (7e-6 seen).
    torch.testing.assert_close(ddp["logits"], one.logits.detach(), rtol=1e-3, atol=2e-5)
    for a, b in zip(ddp["history"], one.history):
        assert a["L_illegal"] == pytest.approx(b["L_illegal"], rel=1e-4)
    spread = one.logits.detach() - one.logits.detach().median()
    assert spread.abs().max() > 1e-3  # the mask steps did move the logits apart
