"""The freeze engine's training path: twin models against torch AdamW, proof, and savings."""
import pytest
import torch
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.errors import TrainingError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.optim.flat import FlatAdamW
from freezeasguard.engine.train.ledger import count_saved_activations
from freezeasguard.engine.train.trainer import Trainer


def _manifest(tmp_path, unet, ratio=0.5, seed=0, by="params"):
    mask = FreezeMask.random(unet, ratio, by=by, seed=seed)
    path = tmp_path / "mask.json"
    Manifest.build(unet, mask, provenance={"method": "random", "seed": seed}).save(path)
    return mask, path


def test_engine_matches_torch_adamw_on_the_trainable_subset(tmp_path):
    ds = tiny_digits()
    base = build_components("tiny", seed=0)
    mask, path = _manifest(tmp_path, base.unet)
    eng = Trainer(tiny_config(tmp_path / "e", "train.steps=4", "freeze.mode=engine", f"freeze.manifest={path}"),
                  components=build_components("tiny", seed=0), dataset=ds)
    ref = Trainer(tiny_config(tmp_path / "r", "train.steps=4", "freeze.mode=naive", f"freeze.manifest={path}"),
                  components=build_components("tiny", seed=0), dataset=ds)
    assert isinstance(eng.optimizer, FlatAdamW) and isinstance(ref.optimizer, torch.optim.AdamW)
    eng.fit()
    ref.fit()
    before = dict(base.unet.named_parameters())
    pe, pr = dict(eng.c.unet.named_parameters()), dict(ref.c.unet.named_parameters())
    for n in mask.trainable:
        # fp32 master weights; torch's fused vs foreach AdamW differ by evaluation order only
        torch.testing.assert_close(pe[n], pr[n], rtol=1e-5, atol=1e-6, msg=n)
        assert not torch.equal(pe[n], before[n])
    for n in mask.frozen:
        assert torch.equal(pe[n], before[n]) and not pe[n].requires_grad and pe[n].grad is None
    # no optimizer state for frozen tensors: the flat buffer holds exactly the trainable params
    assert eng.optimizer.flat.numel() == mask.stats().trainable_params
    assert eng.verify_frozen().ok


def test_bf16_storage_and_ledger_match_the_analytic_formulas(tmp_path):
    ds = tiny_digits()
    base = build_components("tiny", seed=0)
    mask, path = _manifest(tmp_path, base.unet)
    tr = Trainer(tiny_config(tmp_path, "train.steps=1", "freeze.mode=engine", f"freeze.manifest={path}",
                             "train.mixed_precision=bf16"), components=base, dataset=ds)
    tr.measure_memory = True
    tr.train_step()
    led = tr.last_ledger
    params = dict(tr.c.unet.named_parameters())
    n_train = mask.stats().trainable_params
    norm_params = {n for n in mask.frozen if params[n].dtype == torch.float32}
    bf16 = sum(params[n].numel() for n in mask.frozen if n not in norm_params)
    fp32_frozen = sum(params[n].numel() for n in norm_params)
    assert all("norm" in n for n in norm_params), sorted(n for n in norm_params if "norm" not in n)
    assert led.weights_frozen.get("bfloat16", 0) == 2 * bf16
    assert led.frozen_weight_bytes == 2 * bf16 + 4 * fp32_frozen
    assert led.trainable_weight_bytes == 4 * n_train
    assert led.grad_bytes == 4 * n_train          # one flat fp32 gradient buffer
    assert led.optimizer_state_bytes == 8 * n_train  # exp_avg + exp_avg_sq, nothing for frozen
    assert led.activation_bytes and led.activation_bytes > 0
    tr.fit(3)
    assert tr.verify_frozen().ok  # live bf16 copies still equal the rounded originals
    out = tr.save_final()
    from freezeasguard.engine.cli.verify import load_unet_state
    from freezeasguard.engine.guard.verify import verify_frozen

    state = load_unet_state(out)
    assert all(state[n].dtype == torch.float32 for n in mask.frozen)  # exported in original bytes
    assert verify_frozen(Manifest.load(path), state).ok


def test_frozen_prefix_records_almost_nothing():
    c = build_components("tiny", seed=0)
    unet = c.unet
    last = {"conv_out.weight", "conv_out.bias"}
    for n, p in unet.named_parameters():
        p.requires_grad_(n in last)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    cond = torch.randn(2, 77, 32)
    with count_saved_activations(unet) as frozen_prefix:
        unet(x, t, encoder_hidden_states=cond).sample.square().mean().backward()
    for p in unet.parameters():
        p.requires_grad_(True)
    with count_saved_activations(unet) as full:
        unet(x, t, encoder_hidden_states=cond).sample.square().mean().backward()
    # only conv_out's input (and the loss's) is kept when everything before it is frozen
    assert frozen_prefix.bytes < 0.05 * full.bytes, (frozen_prefix.bytes, full.bytes)


def test_final_model_refused_when_a_frozen_tensor_changed(tmp_path):
    ds = tiny_digits()
    base = build_components("tiny", seed=0)
    mask, path = _manifest(tmp_path, base.unet)
    tr = Trainer(tiny_config(tmp_path / "job", "train.steps=2", "freeze.mode=engine", f"freeze.manifest={path}"),
                 components=base, dataset=ds)
    tr.fit()
    tr.save_checkpoint()
    victim = sorted(mask.frozen)[0]
    with torch.no_grad():
        dict(tr.c.unet.named_parameters())[victim].view(-1)[0] += 1.0
    with pytest.raises(TrainingError, match=f"refusing to write.*{victim}"):
        tr.save_final()
    assert not (tmp_path / "job" / "final").exists()
    assert (tmp_path / "job" / "checkpoints" / "step-000002" / "state.json").is_file()


@pytest.mark.slow
def test_verify_cli_names_the_changed_tensor(tmp_path):
    import subprocess
    import sys

    from freezeasguard.engine.model.components import save_components

    c = build_components("tiny", seed=0)
    mask, path = _manifest(tmp_path, c.unet, ratio=0.3, by="tensors")
    save_components(c, tmp_path / "model")
    cli = [sys.executable, "-m", "freezeasguard.engine.cli", "verify", "--manifest", str(path),
           "--model", str(tmp_path / "model")]
    ok = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "bit-identical" in ok.stdout
    victim = sorted(mask.frozen)[1]
    with torch.no_grad():
        dict(c.unet.named_parameters())[victim].view(-1)[3] *= -1.0001
    save_components(c, tmp_path / "model")
    bad = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert victim in bad.stdout and "FAIL" in bad.stdout


def test_manifest_for_another_base_is_refused(tmp_path):
    other = build_components("tiny", seed=1)
    _, path = _manifest(tmp_path, other.unet)
    from freezeasguard.engine.errors import ManifestError

    with pytest.raises(ManifestError, match="fingerprint"):
        Trainer(tiny_config(tmp_path / "j", "freeze.mode=engine", f"freeze.manifest={path}"),
                components=build_components("tiny", seed=0), dataset=tiny_digits())


def test_full_mode_ledger_is_16_bytes_per_param(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "train.steps=1"), dataset=tiny_digits())
    tr.measure_memory = True
    tr.train_step()
    led = tr.last_ledger
    n = sum(p.numel() for p in tr.c.unet.parameters())
    n_t = len(list(tr.c.unet.parameters()))
    assert led.weight_bytes == 4 * n and led.grad_bytes == 4 * n
    assert led.optimizer_state_bytes == 8 * n + 4 * n_t  # m, v per param + torch's step per tensor


def test_adamw8bit_states_for_trainable_tensors_only(tmp_path):
    pytest.importorskip("bitsandbytes")
    from freezeasguard.engine.backends import bitsandbytes_backend

    if not bitsandbytes_backend().available:
        pytest.skip(bitsandbytes_backend().reason)
    ds = tiny_digits()
    base = build_components("tiny", seed=0)
    mask, path = _manifest(tmp_path, base.unet)
    tr = Trainer(tiny_config(tmp_path / "j", "train.steps=2", "freeze.mode=engine", f"freeze.manifest={path}",
                             "train.optimizer=adamw8bit"), components=base, dataset=ds)
    assert type(tr.optimizer).__name__ == "AdamW8bit"
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    named = dict(tr.c.unet.named_parameters())
    assert all(id(named[n]) not in opt_params for n in mask.frozen)
    tr.measure_memory = True
    tr.train_step()
    hist = tr.fit(3)
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in hist)
    n_train = mask.stats().trainable_params
    # 8-bit moments for big tensors (+ per-block scales), fp32 below bitsandbytes' 4,096-element floor
    assert tr.last_ledger.optimizer_state_bytes < 8 * n_train * 0.5
    assert tr.verify_frozen().ok


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "torch_fused", "torch"])
def test_flat_adamw_backends_match_torch_adamw_on_a_unet(backend):
    """FlatAdamW (Triton kernel in the interpreter, torch's fused AdamW, the eager reference) vs
    torch.optim.AdamW on the tiny UNet's trainable half, N steps with clipping; then a state_dict
    round trip continues exactly where the original goes."""
    import copy

    from freezeasguard.engine.optim.groups import param_groups

    torch.manual_seed(0)
    base = build_components("tiny", seed=0).unet
    mask = FreezeMask.random(base, 0.5, by="params", seed=0)

    def twin():
        m = copy.deepcopy(base)
        for n, p in m.named_parameters():
            p.requires_grad_(not mask.is_frozen(n))
        return m, [(n, p) for n, p in m.named_parameters() if p.requires_grad]

    ours, named_o = twin()
    ref, named_r = twin()
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = FlatAdamW(named_o, backend=backend, **hp)
    ropt = torch.optim.AdamW(param_groups(named_r, hp["weight_decay"]), lr=hp["lr"], betas=hp["betas"],
                             eps=hp["eps"], foreach=False)
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 32)

    def step(model, optimizer, flat):
        loss = model(x, t, encoder_hidden_states=c).sample.square().mean()
        loss.backward()
        if flat:
            optimizer.clip_grad_norm_(0.05)
        else:
            torch.nn.utils.clip_grad_norm_([p for _, p in named_r], 0.05)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step(ours, opt, True)
        step(ref, ropt, False)
    # fp32 throughout; kernel / fused / eager differ from torch's per-tensor loop by rounding order
    for (n, a), (_, b) in zip(named_o, named_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    sd = copy.deepcopy(opt.state_dict())
    clone, named_c = twin()
    with torch.no_grad():
        for (_, a), (_, b) in zip(named_c, named_o):
            a.copy_(b)
    opt2 = FlatAdamW(named_c, backend=backend, **hp)
    opt2.load_state_dict(sd)
    step(ours, opt, True)
    step(clone, opt2, True)
    for (n, a), (_, b) in zip(named_o, named_c):
        assert torch.equal(a, b), n


@pytest.mark.slow
def test_verify_against_another_model_says_so_in_its_first_line(tmp_path):
    import subprocess
    import sys

    from freezeasguard.engine.model.components import save_components

    c = build_components("tiny", seed=0)
    _, path = _manifest(tmp_path, c.unet, ratio=0.3, by="tensors")
    save_components(build_components("small", seed=0), tmp_path / "other")  # same block names, other shapes
    out = subprocess.run([sys.executable, "-m", "freezeasguard.engine.cli", "verify", "--manifest", str(path),
                          "--model", str(tmp_path / "other")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    first = out.stdout.splitlines()[0]
    n = len(list(c.unet.parameters()))
    assert first.startswith("manifest is for another model: ") and f"of {n} tensors differ in shape" in first, first
    assert len(out.stdout.splitlines()) < 50  # details capped, counts say how many
