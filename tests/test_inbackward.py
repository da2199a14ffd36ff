"""AdamW applied inside backward (no gradient buffer): the same steps as the flat buffer's, clipping by
the previous step's norm against a reference of that rule, locks, the refusals, resume and the ledger."""
import pytest
import torch
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.errors import ConfigError, TrainingError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import random_lock
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.optim.flat import FlatAdamW
from freezeasguard.engine.optim.inbackward import InBackwardAdamW
from freezeasguard.engine.optim.project import register_lock_hooks
from freezeasguard.engine.train.trainer import Trainer
from freezeasguard.kernels.project import as_matrix, locked_energy

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.GELU(),
                               torch.nn.Linear(8, 3))


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    # every few steps a batch 30x larger: a gradient spike for clipping to act on
    return torch.randn(16, 6, generator=g) * (30.0 if step % 3 == 2 else 1.0), torch.randn(16, 3, generator=g)


def _loss(model, step):
    x, y = _batch(step)
    return (model(x) - y).square().mean()


def _run_in_backward(model, steps, **kw):
    opt = InBackwardAdamW(list(model.named_parameters()), **HP, **kw)
    norms = []
    for s in range(steps):
        opt.begin_step()
        _loss(model, s).backward()
        norms.append(float(opt.finish_step()))
        assert all(p.grad is None for p in model.parameters())  # no gradient outlives its update
    return opt, norms


def test_without_clipping_the_steps_are_the_flat_buffers_bit_for_bit():
    a, b = _model(), _model()
    _run_in_backward(a, 6)
    opt = FlatAdamW(list(b.named_parameters()), **HP)
    for s in range(6):
        _loss(b, s).backward()
        opt.clip_grad_norm_(None)
        opt.step()
        opt.zero_grad()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n  # the same fused AdamW over the same fp32 gradients, per tensor


def test_clipping_follows_the_previous_steps_norm_rule_against_a_reference():
    """Reference: stock autograd + torch.optim.AdamW, each step's gradients scaled by
    min(1, max / (norm of the previous step's unclipped gradients + 1e-6)), the first unclipped."""
    max_norm, steps = 0.5, 9
    a, ref = _model(), _model()
    _, norms = _run_in_backward(a, steps, max_grad_norm=max_norm)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                             {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])
    prev, ref_norms = None, []
    for s in range(steps):
        opt.zero_grad()
        _loss(ref, s).backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
        ref_norms.append(float(norm))
        if prev is not None:
            coef = torch.clamp(max_norm / (prev + 1e-6), max=1.0)
            for p in ref.parameters():
                p.grad.mul_(coef)
        prev = norm
        opt.step()
    assert max(ref_norms) > 5 * max_norm  # the spikes are there and clipping acts
    # the norm reported is this step's unclipped one; fp32 sums in another order: ~1e-6 relative
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    for (n, p), (_, q) in zip(a.named_parameters(), ref.named_parameters()):
        # fused vs foreach AdamW and a differently ordered norm: a few fp32 ulp per step, 9 steps
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=n)


def test_a_tensor_without_a_gradient_is_stepped_with_zeros_as_the_flat_buffer_does():
    a, b = _model(), _model()
    extra_a, extra_b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    oa = InBackwardAdamW(list(a.named_parameters()) + [("unused", extra_a)], **HP)
    ob = FlatAdamW(list(b.named_parameters()) + [("unused", extra_b)], **HP)
    for s in range(3):
        oa.begin_step()
        _loss(a, s).backward()
        oa.finish_step()
        _loss(b, s).backward()
        ob.clip_grad_norm_(None)
        ob.step()
        ob.zero_grad()
    assert torch.equal(extra_a, extra_b) and not torch.equal(extra_a, torch.ones(4, 4))  # decayed


def test_locked_directions_stay_untouched_and_match_the_hooked_reference():
    a, b = _model(), _model()
    lock = random_lock(dict(a.named_parameters()), 0.3, side="out", seed=0)
    bases = lock.bases()
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    opt = InBackwardAdamW(list(a.named_parameters()), locks=bases, **HP)
    ref = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 1e-2},
                             {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])
    register_lock_hooks(ref, list(b.named_parameters()), bases)
    for s in range(5):
        opt.begin_step()
        _loss(a, s).backward()
        opt.finish_step()
        ref.zero_grad()
        _loss(b, s).backward()
        ref.step()
    params, refs = dict(a.named_parameters()), dict(b.named_parameters())
    for n, (u, v) in bases.items():
        d = as_matrix((params[n] - before[n]).detach().double())
        assert float(d.norm()) > 0
        # the update's locked part: fp32 rounding of a projection, <= ~1e-6 of its size
        energy = locked_energy(d, None if u is None else u.double(), None if v is None else v.double())
        assert float(energy) <= 1e-10 * float(d.square().sum()), n
    for n in params:
        torch.testing.assert_close(params[n], refs[n], rtol=2e-5, atol=2e-6, msg=n)


def test_misuse_is_refused_with_what_to_do():
    m = _model()
    opt = InBackwardAdamW(list(m.named_parameters()), **HP)
    with pytest.raises(TrainingError, match="outside a training step"):
        _loss(m, 0).backward()
    for p in m.parameters():
        p.grad = None
    opt.begin_step()
    loss = _loss(m, 0)
    loss.backward(retain_graph=True)
    with pytest.raises(TrainingError, match="second gradient in one step"):
        loss.backward()
    with pytest.raises(TrainingError, match="not step"):
        opt.step()


def test_a_non_finite_gradient_stops_the_updates_and_names_the_tensor():
    m = _model()
    opt = InBackwardAdamW(list(m.named_parameters()), **HP)
    first = m[0].weight.detach().clone()
    opt.begin_step()
    out = m(torch.randn(4, 6))
    (out.sum() * float("inf")).backward()
    with pytest.raises(TrainingError, match=r"gradient of 4\.(weight|bias) is not finite"):
        opt.finish_step()
    assert torch.equal(m[0].weight, first)  # backward reaches the first layer last: it was not updated


def _manifest(tmp_path, unet, ratio=0.5, lock=0.0):
    mask = FreezeMask.random(unet, ratio, by="params", seed=0)
    lk = random_lock(unet, lock, side="out", seed=0, skip=mask.frozen_set) if lock else None
    path = tmp_path / "m.json"
    Manifest.build(unet, mask, provenance={"method": "random"}, lock=lk,
                   lock_file="m.locks.safetensors" if lk else None).save(path, lock=lk)
    return mask, path


def test_the_trainer_with_updates_in_backward_matches_the_plain_engine_and_holds_no_gradients(tmp_path):
    ds = tiny_digits()
    mask, path = _manifest(tmp_path, build_components("tiny", seed=0).unet, lock=0.25)
    over = ["train.steps=3", "freeze.mode=engine", f"freeze.manifest={path}", "train.max_grad_norm=null"]
    ib = Trainer(tiny_config(tmp_path / "ib", *over, "train.update_in_backward=true"),
                 components=build_components("tiny", seed=0), dataset=ds)
    pl = Trainer(tiny_config(tmp_path / "pl", *over), components=build_components("tiny", seed=0), dataset=ds)
    assert isinstance(ib.optimizer, InBackwardAdamW) and "updates applied in backward" in ib.optimizer.describe()
    for tr in (ib, pl):
        tr.measure_memory = True
        tr.fit()
    pi, pp = dict(ib.c.unet.named_parameters()), dict(pl.c.unet.named_parameters())
    for n in mask.trainable:
        # the locked chunks are projected per tensor here, per shape group there: same fp32 GEMMs
        # in another batching, ~1 ulp
        torch.testing.assert_close(pi[n], pp[n], rtol=1e-6, atol=1e-7, msg=n)
    assert ib.verify_frozen().ok and pl.verify_frozen().ok
    li, lp = ib.last_ledger, pl.last_ledger
    n_train = mask.stats().trainable_params
    biggest = max(pi[n].numel() for n in mask.trainable)
    assert li.grad_bytes == 0 and li.grad_transient_bytes == 4 * biggest
    assert lp.grad_bytes == 4 * n_train
    # + the previous step's norm (a 0-d fp32 tensor), which the next step clips by
    assert li.static_bytes == lp.static_bytes - 4 * n_train + 4 * biggest + 4


def test_resume_with_updates_in_backward_is_bit_exact(tmp_path):
    ds = tiny_digits()
    over = ["freeze.mode=engine", "freeze.ratio=0.5", "train.update_in_backward=true", "train.max_grad_norm=0.05"]
    Trainer(tiny_config(tmp_path / "a", "train.steps=2", *over), dataset=ds).fit()
    more = Trainer(tiny_config(tmp_path / "a", "train.steps=4", *over), dataset=ds)
    assert more.resume() == 2
    more.fit()
    ref = Trainer(tiny_config(tmp_path / "b", "train.steps=4", *over), dataset=ds)
    ref.fit()
    assert [s.grad_norm for s in ref.history][1] > 0.05  # the clip acts from the second step
    a, b = dict(ref.c.unet.named_parameters()), dict(more.c.unet.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)  # the previous norm travels in the checkpoint


@pytest.mark.parametrize("over, match", [
    (["train.grad_accum=2"], "train.update_in_backward needs train.grad_accum=1"),
    (["freeze.mode=naive"], "train.update_in_backward needs freeze.mode=engine"),
    (["train.optimizer=adamw8bit"], "train.update_in_backward needs freeze.mode=engine and train.optimizer=adamw"),
])
def test_combinations_it_cannot_do_are_config_errors(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, "freeze.mode=engine", "freeze.ratio=0.5", "train.update_in_backward=true", *over)
