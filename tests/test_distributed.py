"""2 processes on gloo == 1 process over the same global batch."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import tiny_config, tiny_digits

pytestmark = pytest.mark.distributed


def _worker(rank, world, port, out_dir, result_path, extra=()):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from helpers import record_grads

    from freezeasguard.engine.train.trainer import Trainer

    tr = Trainer(tiny_config(out_dir, "train.steps=3", *extra), dataset=tiny_digits())
    grads = record_grads(tr)
    tr.fit()
    if rank == 0:
        torch.save({"grads": grads, "loss": [s.loss for s in tr.history]}, result_path)
    dist.destroy_process_group()


@pytest.mark.parametrize("extra", [(), ("freeze.mode=engine", "freeze.ratio=0.5", "train.grad_accum=2")],
                         ids=["full", "engine-accum"])
def test_ddp_two_processes_equal_one(tmp_path, extra):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "ddp"), str(tmp_path / "ddp.pt"), extra), nprocs=2, join=True)
    from helpers import record_grads

    from freezeasguard.engine.train.trainer import Trainer

    single = Trainer(tiny_config(tmp_path / "one", "train.steps=3", *extra), dataset=tiny_digits())
    grads = record_grads(single)
    single.fit()
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["loss"] == pytest.approx([s.loss for s in single.history], rel=1e-5)
    # Same samples and noise at every step: the all-reduced gradients equal one process's up to
    # fp32 summation order (the weights then follow, step by step).
    for a, b in zip(ddp["grads"], grads):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6, msg=n)
    assert not (tmp_path / "ddp" / "log.jsonl").read_text() == ""  # rank 0 logged
