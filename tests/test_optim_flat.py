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
            p.grad = grad.clone()  # set by hand: copied into the step's gradient buffer
            q.grad = grad.clone()
        before = [p.grad.clone() for _, p in named]
        norm = opt.clip_grad_norm_(1.0)
        torch.nn.utils.clip_grad_norm_([q for _, q in ref_named], 1.0)
        assert float(norm) > 1.0  # the clip is active
        opt.step()
        ref.step()
        assert all(torch.equal(p.grad, b) for (_, p), b in zip(named, before))  # the step left them as they were
        opt.zero_grad()
        for (n, p), (_, q) in zip(named, ref_named):
            # torch's clip multiplies by max/(norm + 1e-6) in fp32 like ours: a few fp32 ulp apart
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_norm_is_refused_and_nothing_changes(bad):
    named = _named()
    opt = FlatAdamW(named, lr=1e-2)
    for _, p in named:
        p.grad = torch.full_like(p, 0.5)
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
        opts[backend] = FlatAdamW(named, lr=1e-2, backend=backend, grad_buffer="persistent")
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


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.GELU(), torch.nn.Linear(40, 30), torch.nn.GELU(),
                               torch.nn.Linear(30, 5))


@pytest.mark.parametrize("states", ["fp32", "8bit"])
def test_the_step_scoped_gradient_buffer_steps_as_the_persistent_one_bit_for_bit(states):
    """Chunks allocated at their first gradient (here 4, through two accumulated backwards per step)
    against the one buffer kept for the optimizer's life: the same AdamW over the same gradients."""
    nets = {k: _net() for k in ("step", "persistent")}
    opts = {k: FlatAdamW(list(m.named_parameters()), lr=1e-2, grad_buffer=k, grad_chunks=4, states=states,
                         backend="torch" if states == "8bit" else "auto") for k, m in nets.items()}
    assert len(opts["step"].grads.ranges) > 1 and len(opts["persistent"].grads.ranges) == 1
    for s in range(4):
        for k, m in nets.items():
            for micro in range(2):  # gradient accumulation: in place into the chunks
                g = torch.Generator().manual_seed(10 * s + micro)
                m(torch.randn(8, 6, generator=g)).square().mean().backward()
            assert opts[k].grads.allocated_bytes == 4 * opts[k].flat.numel()
            opts[k].clip_grad_norm_(None)
            opts[k].step()
            opts[k].zero_grad()
        assert all(p.grad is None for p in nets["step"].parameters())  # released after the update
        assert opts["step"].grads.allocated_bytes == 0 and opts["step"].flat.grad is None
        assert torch.equal(opts["step"].flat, opts["persistent"].flat), s
    assert opts["persistent"].grads_between_steps and not opts["step"].grads_between_steps


def test_a_clipped_step_scoped_step_matches_the_persistent_buffer_to_fp32_rounding():
    nets = {k: _net(1) for k in ("step", "persistent")}
    opts = {k: FlatAdamW(list(m.named_parameters()), lr=1e-2, grad_buffer=k, grad_chunks=3) for k, m in nets.items()}
    norms = {}
    for k, m in nets.items():
        m(torch.randn(8, 6, generator=torch.Generator().manual_seed(0))).square().mean().mul(1e3).backward()
        norms[k] = opts[k].clip_grad_norm_(0.1)
        opts[k].step()
    assert float(norms["persistent"]) > 0.1  # the clip acts
    # the norm sums per-chunk norms: an fp32 sum in another order, ~1 ulp; the update follows it
    torch.testing.assert_close(norms["step"], norms["persistent"], rtol=1e-6, atol=0)
    torch.testing.assert_close(opts["step"].flat, opts["persistent"].flat, rtol=1e-6, atol=1e-7)
