"""The flat-buffer AdamW: backend choice, a step that never writes the gradients, non-finite norms."""
import pytest
import torch
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.errors import TrainingError
from freezeasguard.engine.optim.flat import FlatAdamW, resolve_flat_backend
from freezeasguard.engine.train.trainer import Trainer
from freezeasguard.kernels import _triton


def _named(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.nn.Parameter(torch.randn(5, 7, generator=g))) for i in range(n)] + \
           [("b", torch.nn.Parameter(torch.randn(7, generator=g)))]


def test_auto_backend_on_cuda_without_triton_falls_back_and_says_so(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(_triton, "status", lambda: _triton.TritonStatus(False, None, "import failed: no triton"))
    backend, why = resolve_flat_backend("auto", cuda)
    assert backend == "torch_fused" and "CUDA without Triton (import failed: no triton)" in why
    monkeypatch.setattr(_triton, "status", lambda: _triton.TritonStatus(True, "3.9", "CUDA device present"))
    assert resolve_flat_backend("auto", cuda) == ("triton", "CUDA: one Triton launch")
    assert resolve_flat_backend("auto", torch.device("cpu"))[0] == "torch_fused"  # never the interpreter
    assert resolve_flat_backend("torch", torch.device("cpu")) == ("torch", "requested")
    with pytest.raises(ValueError, match="flat AdamW backend"):
        resolve_flat_backend("cuda", cuda)
    opt = FlatAdamW(_named(), lr=1e-2)
    assert "AdamW backend torch_fused (cpu: torch's fused AdamW)" in opt.describe()
    assert resolve_flat_backend("auto", torch.device("cpu"), "8bit")[0] == "torch"  # torch_fused keeps fp32 only
    with pytest.raises(ValueError, match="flat AdamW backend must be one of"):
        resolve_flat_backend("torch_fused", torch.device("cpu"), "bf16")


@pytest.mark.parametrize("backend", ["torch_fused", "torch"])
def test_a_clipped_step_reads_the_gradient_buffer_and_never_writes_it(backend):
    named = _named()
    opt = FlatAdamW(named, lr=1e-2, backend=backend)
    ref_named = _named()
    ref = torch.optim.AdamW([{"params": [p for _, p in ref_named[:3]], "weight_decay": 1e-2},
                             {"params": [ref_named[3][1]], "weight_decay": 0.0}], lr=1e-2)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        for (_, p), (_, q) in zip(named, ref_named):
            grad = torch.randn(p.shape, generator=g) * 10
            p.grad.copy_(grad)
            q.grad = grad.clone()
        before = opt.flat.grad.clone()
        norm = opt.clip_grad_norm_(1.0)
        torch.nn.utils.clip_grad_norm_([q for _, q in ref_named], 1.0)
        assert float(norm) > 1.0  # the clip is active
        opt.step()
        ref.step()
        assert torch.equal(opt.flat.grad, before)  # the step left the gradients as they were
        for (n, p), (_, q) in zip(named, ref_named):
            # torch's clip multiplies by max/(norm + 1e-6) in fp32 like ours: a few fp32 ulp apart
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_norm_is_refused_and_nothing_changes(bad):
    named = _named()
    opt = FlatAdamW(named, lr=1e-2)
    for _, p in named:
        p.grad.fill_(0.5)
    opt.step()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[opt.flat].items()}
    params = opt.flat.detach().clone()
    named[1][1].grad[0, 0] = bad
    for clip in (1.0, None):
        opt.clip_grad_norm_(clip)
        with pytest.raises(TrainingError, match="gradient norm is (inf|nan): the AdamW step was refused"):
            opt.step()
        assert torch.equal(opt.flat, params) and opt.state[opt.flat]["step"] == state["step"]
        assert torch.equal(opt.state[opt.flat]["exp_avg"], state["exp_avg"])
    with pytest.raises(TrainingError):
        opt.step()  # also without a clip_grad_norm_ call first


@pytest.mark.parametrize("mode", ["full", "engine"])
def test_trainer_refuses_an_infinite_gradient_before_any_update(tmp_path, mode):
    extra = ("freeze.mode=engine", "freeze.ratio=0.3") if mode == "engine" else ()
    tr = Trainer(tiny_config(tmp_path, "train.steps=3", *extra), dataset=tiny_digits())
    name, p = tr.named_trainable[-1]
    p.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = {n: q.detach().clone() for n, q in tr.named_trainable}
    with pytest.raises(TrainingError, match="gradient norm is (inf|nan) at step 0"):
        tr.fit()
    assert all(torch.equal(q.detach(), before[n]) for n, q in tr.named_trainable)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "final").exists()


@pytest.mark.gpu
def test_on_cuda_the_triton_step_matches_torch_fused():
    if _triton.blocker(torch.device("cuda")) is not None:
        pytest.skip(f"Triton cannot run here: {_triton.blocker(torch.device('cuda'))}")
    opts = {}
    for backend in ("auto", "torch_fused"):
        named = [(n, torch.nn.Parameter(p.detach().cuda())) for n, p in _named(seed=3)]
        opts[backend] = FlatAdamW(named, lr=1e-2, backend=backend)
    assert opts["auto"].backend == "triton"
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grad = torch.randn(opts["auto"].flat.numel(), generator=g).cuda() * 10
        for opt in opts.values():
            opt.flat.grad.copy_(grad)
            opt.clip_grad_norm_(1.0)
            opt.step()
    # both are fp32 AdamW; the kernel uses correctly rounded div/sqrt, torch's may not: a few ulp
    torch.testing.assert_close(opts["auto"].flat, opts["torch_fused"].flat, rtol=1e-6, atol=1e-7)
