"""2 processes on gloo == 1 process over the same global batch."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.train.trainer import Trainer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


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
    # Same samples and noise: at the first step (same weights) the all-reduced gradients equal one
    # process's up to fp32 summation order. Later steps are compared by their losses only: AdamW's
    # first step turns a rounding-level difference of a near-zero gradient into an O(lr) change of
    # that weight (its update is lr * sign(g)), so later gradients differ by more than rounding.
    for n in ddp["grads"][0]:
        torch.testing.assert_close(ddp["grads"][0][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
    assert len(ddp["grads"]) == len(grads) == 3
    assert not (tmp_path / "ddp" / "log.jsonl").read_text() == ""  # rank 0 logged
    # The last step's checkpoint: written by rank 0 between barriers every rank reached.
    assert (tmp_path / "ddp" / "checkpoints" / "step-000003" / "state.json").is_file()


def test_every_process_pins_its_gpu_before_the_process_group(monkeypatch):
    """NCCL communicators land on the current device: set_device(LOCAL_RANK) must come first."""
    import torch.distributed as dist

    from freezeasguard.engine.train import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = distributed.init_distributed("cuda")
    assert calls == [("set_device", 1), ("init", "nccl", {"device_id": torch.device("cuda", 1)})]
    assert (info.rank, info.world, info.local_rank) == (1, 2, 1)
    calls.clear()
    distributed.init_distributed("cpu")
    assert calls == [("init", "gloo", {})]


def test_checkpoints_are_written_between_barriers(tmp_path, monkeypatch):
    from freezeasguard.engine.train import checkpoint, distributed

    events = []
    monkeypatch.setattr(distributed.DistInfo, "barrier", lambda self: events.append("barrier"))
    monkeypatch.setattr(distributed.DistInfo, "all_ok", lambda self, ok, device="cpu": events.append(("agree", ok)) or ok)
    write = checkpoint.write_checkpoint
    monkeypatch.setattr(checkpoint, "write_checkpoint", lambda *a, **k: events.append("write") or write(*a, **k))
    tr = Trainer(tiny_config(tmp_path, "train.steps=1"), dataset=tiny_digits())
    tr.fit()
    assert events == ["barrier", "write", ("agree", True)]
    # a failed write is agreed on (every process stops), and its error reaches the caller
    events.clear()
    monkeypatch.setattr(checkpoint, "write_checkpoint", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint()
    assert events == ["barrier", ("agree", False)]
