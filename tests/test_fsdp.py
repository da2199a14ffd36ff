"""train.parallel=fsdp: FSDP2 composed with the freeze. 2 processes on gloo == 1 process over the
same global batch, for a UNet and a diffusion transformer, in fp32 and with bf16 frozen storage.

Tolerances. The runs use AdamW's eps=1e-3 instead of 1e-8: with a tiny eps AdamW's first update is
lr * g / (|g| + eps) ~ lr * sign(g), so an element whose gradient is at rounding level (its sign set
by fp32 summation order, which a batch split changes) moves by +-lr either way, as test_distributed
notes for DDP. With eps=1e-3 the update is Lipschitz in the gradient (|d update| <= lr |d g| / eps),
so fp32 reduction-order differences of the gradients (~1e-8 here) stay far below atol=1e-6 on the
weights after 3 steps, while a shard the optimizer failed to write would be off by its whole move
(~lr * |g| / eps per step, up to 3e-3; the test checks that the weights moved by far more than the
tolerance). Under bf16 autocast the batch split changes bf16 roundings (2^-8 relative per product:
DDP differs from one process by the same 1e-4 on the tiny UNet's norm biases), so bf16 runs compare
losses to rel 1e-3 and weights to atol 5e-4 (3 steps x lr x 2^-8 x |g| / eps for |g| up to ~4e-2);
their frozen tensors are still bit-identical (never written, and the proof checks exactly that).
"""
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_config, tiny_digits
from safetensors.torch import load_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from freezeasguard.engine.errors import ConfigError, TrainingError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import random_lock
from freezeasguard.engine.model.components import build_components, load_components
from freezeasguard.engine.optim.flat import FlatAdamW
from freezeasguard.engine.optim.groups import param_groups
from freezeasguard.engine.service.policy import Policy, extra_problems
from freezeasguard.engine.train.distributed import DistInfo
from freezeasguard.engine.train.fsdp import FullyShardedParallel, Parallel, ShardedFlatAdamW, parallel_for
from freezeasguard.engine.train.memplan import memory_plan
from freezeasguard.engine.train.trainer import Trainer

COMMON = ("train.steps=3", "freeze.mode=engine", "freeze.ratio=0.5", "train.eps=1e-3")
# name -> (image resolution, overrides)
SCENARIOS = {
    "unet-fp32": (16, ("train.grad_accum=2", "train.checkpoint_every=2")),
    "flux-fp32": (32, ("model.preset=flux-tiny", "train.gradient_checkpointing=true")),
    "unet-bf16": (16, ("train.mixed_precision=bf16",)),
    "flux-bf16": (32, ("model.preset=flux-tiny", "train.mixed_precision=bf16")),
}


def _trainer(out, name, *extra, **kw):
    res, over = SCENARIOS[name]
    return Trainer(tiny_config(out, *COMMON, *over, "train.parallel=fsdp", *extra),
                   dataset=tiny_digits(resolution=res), **kw)


def _record(tr):
    return {"loss": [s.loss for s in tr.history], "gn": [s.grad_norm for s in tr.history],
            "trainable": tr.trainable_state(),
            "frozen": list(tr.guard.frozen_names), "frozen_convs": tr.guard.frozen_convs,
            "dtypes": {n: p.dtype for n, p in tr.c.unet.named_parameters()}}


def _against_torch_adamw(world):
    """ShardedFlatAdamW and torch's AdamW on DTensors (the reference), 3 clipped steps of the same
    sharded model: dim 0 of 3, 1 and 7 rows over 2 processes gives padded and empty shards."""
    mesh = init_device_mesh("cpu", (world,))

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 1), nn.Linear(1, 7))
        m[0].bias.requires_grad_(False)  # a frozen tensor, sharded with the rest
        fully_shard(m[1], mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    ours, ref = model(), model()
    named = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = ShardedFlatAdamW(ours, named, **hp)
    ref_named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(param_groups(ref_named, 0.1), **{k: v for k, v in hp.items() if k != "weight_decay"})
    g = torch.Generator().manual_seed(dist.get_rank())
    norms = []
    for _ in range(3):
        x = torch.randn(4, 6, generator=g)
        for m in (ours, ref):
            m(x).square().sum().backward()
        norms.append((float(opt.clip_grad_norm_(0.5)), float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    a, b = ours.state_dict(), ref.state_dict()
    return norms, {k: (a[k].full_tensor(), b[k].full_tensor()) for k in b}


def _worker(rank, world, port, root, one_ckpt, lock_manifest):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")  # the trainer joins it (train.distributed.init_distributed)
    out = {"adamw": _against_torch_adamw(world)}
    for name in SCENARIOS:
        tr = _trainer(f"{root}/{name}", name)
        assert tr.parallel.sharded and isinstance(tr.optimizer, ShardedFlatAdamW)
        tr.fit()
        report = tr.verify_frozen()  # every process: the gathers are collectives
        tr.save_final()
        out[name] = {**_record(tr), "ok": report.ok, "summary": report.summary()}
        if name == "unet-fp32":
            # resume under FSDP from step 2 (gathered tensors, per-rank optimizer state): the same step 3
            again = _trainer(f"{root}/{name}-resumed", name)
            try:  # written by one process: its optimizer state is not per shard (refused before any change)
                again.resume(one_ckpt)
            except TrainingError as exc:
                out[name]["refused"] = str(exc)
            again.resume(f"{root}/{name}/checkpoints/step-000002")
            again.fit()
            out[name]["resumed"] = again.trainable_state()
    try:  # direction locks project whole matrices: refused under FSDP
        Trainer(tiny_config(f"{root}/locked", "freeze.mode=engine", f"freeze.manifest={lock_manifest}",
                            "train.parallel=fsdp"), components=build_components("tiny", seed=0), dataset=tiny_digits())
    except ConfigError as exc:
        out["locks"] = str(exc)
    if rank == 0:
        torch.save(out, f"{root}/fsdp.pt")
    dist.destroy_process_group()


def _close(a, b, bf16, msg):
    if bf16:
        torch.testing.assert_close(a, b, rtol=0, atol=5e-4, msg=msg)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=msg)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_two_processes_equal_one(tmp_path):
    # one process (train.parallel=fsdp there is the plain path: nothing to shard)
    one = {}
    for name in SCENARIOS:
        tr = _trainer(tmp_path / "one" / name, name)
        assert not tr.parallel.sharded
        start = {n: t.clone() for n, t in tr.trainable_state().items()}
        tr.fit()
        report = tr.verify_frozen()
        tr.save_final()
        one[name] = {**_record(tr), "ok": report.ok, "start": start}
    base = build_components("tiny", seed=0).unet
    mask = FreezeMask.random(base, 0.5, seed=0)
    lock = random_lock(base, 0.25, skip=frozenset(mask.frozen))
    Manifest.build(base, mask, provenance={"method": "random"}, lock=lock).save(tmp_path / "locked.json", lock=lock)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one_ckpt = str(tmp_path / "one" / "unet-fp32" / "checkpoints" / "step-000002")
    mp.spawn(_worker, args=(2, port, str(tmp_path / "fsdp"), one_ckpt, str(tmp_path / "locked.json")),
             nprocs=2, join=True)
    two = torch.load(tmp_path / "fsdp" / "fsdp.pt", weights_only=False)

    norms, tensors = two["adamw"]
    assert [a for a, _ in norms] == pytest.approx([b for _, b in norms], rel=1e-6) and min(norms)[1] > 0.5  # clipped
    for k, (a, b) in tensors.items():  # frozen 0.bias too: untouched by both
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)

    for name in SCENARIOS:
        a, b, bf16 = two[name], one[name], "bf16" in name
        assert a["ok"] and b["ok"] and "bit-identical" in a["summary"], a["summary"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3 if bf16 else 1e-5)
        # the clipping norm is the full gradient's (fp32 norms of ~1e5 elements agree to ~1e-5)
        assert a["gn"] == pytest.approx(b["gn"], rel=1e-3 if bf16 else 1e-4)
        assert a["trainable"].keys() == b["trainable"].keys() and a["frozen"] == b["frozen"]
        for n, t in b["trainable"].items():
            _close(a["trainable"][n], t, bf16, f"{name}: {n}")
        moved = max(float((t - b["start"][n]).abs().max()) for n, t in b["trainable"].items())
        assert moved > 4 * (5e-4 if bf16 else 1e-6), moved  # the tolerance tells trained from untrained
        if bf16:  # frozen tensors were sharded and all-gathered in bf16 (norms' stay fp32)
            assert a["dtypes"] == b["dtypes"] and torch.bfloat16 in a["dtypes"].values()
        if name.startswith("unet"):
            assert a["frozen_convs"] == b["frozen_convs"] > 0  # FrozenConv2d inside the FSDP units

        # the saved model: loads, frozen tensors bit-identical to one process's, trainable ones close
        fa, fb = tmp_path / "fsdp" / name / "final", tmp_path / "one" / name / "final"
        c = load_components(fa)
        sa = {k: v for k, v in c.unet.state_dict().items()}
        sb = load_file(fb / c.family.denoiser_dir / "diffusion_pytorch_model.safetensors")
        assert sa.keys() == sb.keys()
        for n in b["frozen"]:
            assert sa[n].dtype == sb[n].dtype and torch.equal(sa[n], sb[n]), n
        for n in b["trainable"]:
            _close(sa[n], sb[n], bf16, f"{name} final: {n}")
        cfg_a, cfg_b = (json.loads((f / c.family.denoiser_dir / "config.json").read_text()) for f in (fa, fb))
        assert cfg_a["_class_name"] == cfg_b["_class_name"] and not cfg_a["_class_name"].startswith("FSDP")
        assert json.loads((fa / "model_index.json").read_text()) == json.loads((fb / "model_index.json").read_text())
        va, vb = (json.loads((f / "verify.json").read_text()) for f in (fa, fb))  # digests: each run's own mask
        assert va["ok"] and (va["ok"], va["summary"]) == (vb["ok"], vb["summary"])

        # the checkpoint holds the gathered trainable tensors, and each process's optimizer state
        step = tmp_path / "fsdp" / name / "checkpoints" / "step-000003"
        ck = load_file(step / "trainable.safetensors")
        assert ck.keys() == b["trainable"].keys()
        for n, t in b["trainable"].items():
            _close(ck[n], t, bf16, f"{name} checkpoint: {n}")
        assert len(torch.load(step / "optimizer.pt", weights_only=True)["fsdp_ranks"]) == 2

    u = two["unet-fp32"]
    assert all(torch.equal(u["resumed"][n], t) for n, t in u["trainable"].items())  # resume is bit-exact
    assert "one process or DDP" in u["refused"] and "2 FSDP processes" in u["refused"]
    assert "direction locks do not run under train.parallel=fsdp" in two["locks"]
    # and a checkpoint of 2 FSDP processes is refused by one process, naming why
    tr = _trainer(tmp_path / "one-resume", "unet-fp32")
    with pytest.raises(TrainingError, match="written by 2 FSDP processes"):
        tr.resume(tmp_path / "fsdp" / "unet-fp32" / "checkpoints" / "step-000002")


# (preset, image resolution, freeze mode, engine moments) of the ledger check
LEDGER_RUNS = (("tiny", 16, "engine", "fp32"), ("tiny", 16, "full", "fp32"), ("flux-tiny", 32, "engine", "fp32"),
               ("tiny", 16, "engine", "8bit"), ("flux-tiny", 32, "engine", "bf16"))


def _ledger_run(out, preset, res, mode, states, batch):
    tr = Trainer(tiny_config(out, f"model.preset={preset}", "train.steps=2", f"freeze.mode={mode}", "freeze.ratio=0.5",
                             "train.mixed_precision=bf16", f"train.batch_size={batch}", "train.parallel=fsdp",
                             f"train.optimizer_states={states}"),
                 dataset=tiny_digits(resolution=res))
    tr.measure_memory = True
    tr.fit()
    return tr


def _against_flat_adamw(world, states):
    """ShardedFlatAdamW with compact moments is FlatAdamW over this process's padded shards: 3
    clipped steps of a sharded model, against a FlatAdamW over copies of the shards given the same
    gradients and the same (global) clip scale, bit for bit."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 300), nn.Linear(300, 1), nn.Linear(1, 7))  # shards: 150 rows, 1 row or none
    fully_shard(m[1], mesh=mesh)
    fully_shard(m, mesh=mesh)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, states=states, seed=3)
    opt = ShardedFlatAdamW(m, [(n, p) for n, p in m.named_parameters()], **hp)
    # the persistent gradient buffer, as the sharded one: its gradient is copied in whole below
    ref = FlatAdamW([(n, nn.Parameter(q.detach().clone())) for n, _, q, _ in opt.shards], grad_buffer="persistent",
                    **hp)
    mine = {n: q for n, _, q, _ in opt.shards}
    start = opt.flat.detach().clone()
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        m(torch.randn(4, 6, generator=g)).square().sum().backward()
        opt.clip_grad_norm_(0.5)
        ref.flat.grad.copy_(opt.flat.grad)  # the same layout: segment by segment
        ref._norm, ref._scale = opt._norm, opt._scale
        opt.step()
        ref.step()
        opt.zero_grad()
    same = all(torch.equal(mine[n], p) for n, p in ref.named) and ref.segments == opt.segments
    return same, float((opt.flat - start).abs().max())  # and how far the step moved the weights


def _ledger_worker(rank, world, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")
    out = {"flat": {states: _against_flat_adamw(world, states) for states in ("bf16", "8bit")}}
    for preset, res, mode, states in LEDGER_RUNS:
        tr = _ledger_run(f"{root}/{preset}-{mode}-{states}", preset, res, mode, states, batch=4)
        assert tr.parallel.sharded
        # the plan of the live (sharded) model: DTensors report their global shapes
        plan = memory_plan(tr.c.unet, tr.guard.frozen_names, mode=mode, states=states).per_device(world)
        report = tr.verify_frozen()
        ok = report.ok if report is not None else mode == "full"  # a full run has no frozen tensor to prove
        out[(preset, mode, states)] = (tr.last_ledger, plan.sharded_bytes, ok, [s.loss for s in tr.history])
    torch.save(out, f"{root}/ledger-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_compact_moments_and_the_ledger_under_fsdp(tmp_path):
    """bf16 and 8-bit moments per shard are FlatAdamW's over the padded shards, bit for bit. Under
    FSDP2 the ledger counts what each process holds: on the busiest (rank 0) exactly the plan's
    per-device shards (padded dim-0 shards of weights, gradients and fp32 / bf16 / 8-bit moments);
    the other rank at most that (torch AdamW's moments of a short last shard are unpadded). The
    activations each process saves are a one-process run's at its share of the batch (FSDP's
    all-gathered weights are weights, not activations). Every guarded run's proof holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ledger_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"ledger-{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        for states, (same, moved) in r["flat"].items():
            assert same and moved > 1e-3, (states, moved)  # 3 steps of lr 1e-2
    for run in LEDGER_RUNS:
        preset, res, mode, states = run
        key = (preset, mode, states)
        (led0, plan0, ok0, loss0), (led1, plan1, ok1, loss1) = ranks[0][key], ranks[1][key]
        assert plan0 == plan1 and led0.static_bytes == plan0, (run, led0.static_bytes, plan0)
        assert 0 < led1.static_bytes <= led0.static_bytes
        assert ok0 and ok1 and loss0 == loss1 and all(math.isfinite(x) for x in loss0)  # the proof holds
        one = _ledger_run(tmp_path / f"one-{preset}-{mode}-{states}", preset, res, mode, states, batch=2)
        assert led0.static_bytes < one.last_ledger.static_bytes
        assert led0.activation_bytes == led1.activation_bytes == one.last_ledger.activation_bytes > 0, run


def test_one_process_fsdp_is_the_plain_path(tmp_path, one_thread):
    runs = {}
    for par in ("ddp", "fsdp"):
        tr = Trainer(tiny_config(tmp_path / par, "train.steps=2", "freeze.mode=engine", "freeze.ratio=0.5",
                                 f"train.parallel={par}", "train.checkpoint_every=null"), dataset=tiny_digits())
        assert type(tr.parallel) is Parallel and tr.model is tr.c.unet
        tr.fit()
        runs[par] = ([s.loss for s in tr.history], tr.trainable_state())
    assert runs["fsdp"][0] == runs["ddp"][0]
    assert all(torch.equal(t, runs["ddp"][1][n]) for n, t in runs["fsdp"][1].items())


@pytest.mark.parametrize("setting", ["train.update_in_backward=true", "train.optimizer=adamw8bit",
                                     "train.compile=blocks"])
def test_fsdp_refuses_what_it_does_not_run(tmp_path, setting):
    extra = ["freeze.mode=engine", "freeze.ratio=0.5", setting]
    tiny_config(tmp_path, *extra)  # valid without FSDP
    with pytest.raises(ConfigError, match=f"train.parallel=fsdp does not run with {setting.split('=')[0]}"):
        tiny_config(tmp_path, *extra, "train.parallel=fsdp")


def test_bad_parallel_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match="train.parallel must be 'ddp' or 'fsdp', got 'zero'"):
        tiny_config(tmp_path, "train.parallel=zero")


def test_fsdp_refuses_a_custom_wiring_and_locks_in_the_optimizer(tmp_path):
    tc = tiny_config(tmp_path, "train.parallel=fsdp").train
    two = DistInfo(rank=0, world=2, local_rank=0)
    with pytest.raises(TrainingError, match="engine's own freeze wiring only"):
        parallel_for(tc, two, torch.device("cpu"), custom_wiring=True)
    assert type(parallel_for(tc, DistInfo(), torch.device("cpu"), custom_wiring=True)) is Parallel
    assert FullyShardedParallel.sharded and not Parallel.sharded
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(TrainingError, match="direction locks do not run"):
        ShardedFlatAdamW(lin, [("weight", lin.weight)], lr=1e-3, locks={"weight": (None, None)})
    with pytest.raises(TrainingError, match="is not sharded by FSDP"):
        ShardedFlatAdamW(lin, [("weight", lin.weight)], lr=1e-3)


def test_a_service_job_cannot_choose_the_parallelism():
    assert "train.extra sets ['parallel'], which the service controls" in extra_problems({"parallel": "fsdp"}, Policy())
