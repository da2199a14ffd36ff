import math

import pytest
import torch
from helpers import record_grads, tiny_config, tiny_digits

from freezeasguard.engine.errors import TrainingError
from freezeasguard.engine.train.trainer import Trainer


def _params(tr):
    return {n: p.detach().clone() for n, p in tr.c.unet.named_parameters()}


@pytest.mark.slow
def test_loss_goes_down_and_log_is_written(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=25", "train.lr=2e-3")
    tr = Trainer(cfg, dataset=tiny_digits())
    hist = tr.fit()
    first = sum(s.loss for s in hist[:5]) / 5
    last = sum(s.loss for s in hist[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # v-prediction (the tiny preset's): 0.70 -> ~0.50 here
    rows = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(rows) == 25
    assert (tmp_path / "config.json").is_file()
    import json

    row = json.loads(rows[-1])
    for key in ("step", "loss", "lr", "grad_norm", "step_time", "samples_per_s"):
        assert key in row


def test_resume_is_bit_exact(tmp_path):
    ds = tiny_digits()
    ref = Trainer(tiny_config(tmp_path / "a", "train.steps=6", "data.random_flip=true"), dataset=ds)
    ref.fit()
    part = Trainer(tiny_config(tmp_path / "b", "train.steps=6", "data.random_flip=true"), dataset=ds)
    part.fit(3)
    part.save_checkpoint()
    del part
    resumed = Trainer(tiny_config(tmp_path / "b", "train.steps=6", "data.random_flip=true"), dataset=ds)
    assert resumed.resume() == 3
    resumed.fit()
    a, b = _params(ref), _params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    sa, sb = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    ds = tiny_digits()
    one = Trainer(tiny_config(tmp_path / "a", "train.steps=2"), dataset=ds)
    two = Trainer(tiny_config(tmp_path / "b", "train.steps=2", "train.grad_accum=4"), dataset=ds)
    ga, gb = record_grads(one), record_grads(two)
    one.fit()
    two.fit()
    # Same samples and noise; only the fp32 summation order differs. Gradients are compared
    # (AdamW turns a rounding-level difference of a near-zero gradient into an O(lr) step).
    for a, b in zip(ga, gb):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6)
    assert [s.loss for s in one.history] == pytest.approx([s.loss for s in two.history], rel=1e-5)


def test_gradient_checkpointing_and_bf16_autocast_train(tmp_path):
    ds = tiny_digits()
    ref = Trainer(tiny_config(tmp_path / "a", "train.steps=2"), dataset=ds)
    ckpt = Trainer(tiny_config(tmp_path / "b", "train.steps=2", "train.gradient_checkpointing=true"), dataset=ds)
    ref.fit()
    ckpt.fit()
    a, b = _params(ref), _params(ckpt)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    bf = Trainer(tiny_config(tmp_path / "c", "train.steps=3", "train.mixed_precision=bf16"), dataset=ds)
    hist = bf.fit()
    assert all(math.isfinite(s.loss) for s in hist)
    # bf16 loss tracks the fp32 loss to bf16 precision (8 bits of mantissa, a few ops deep)
    assert hist[0].loss == pytest.approx(ref.history[0].loss, rel=3e-2)


def test_non_finite_loss_is_a_clear_error(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "train.steps=2"), dataset=tiny_digits())
    with torch.no_grad():
        next(iter(tr.c.unet.parameters())).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss is nan at step 0"):
        tr.fit()


def test_final_model_reloads_and_generates(tmp_path):
    from freezeasguard.engine.model.components import load_components
    from freezeasguard.engine.model.sampling import generate

    tr = Trainer(tiny_config(tmp_path, "train.steps=2"), dataset=tiny_digits())
    tr.fit()
    path = tr.save_final()
    c = load_components(path)
    for n, p in tr.c.unet.named_parameters():
        assert torch.equal(p.detach(), dict(c.unet.named_parameters())[n])
    img = generate(c, ["a photo of the digit one"], steps=2)
    assert img.shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------- the guard reaches the trainer
def _guarded_base(tmp_path):
    """A tiny base, a manifest freezing its down blocks, and the config of a job that enforces it."""
    from freezeasguard.engine.guard.manifest import Manifest
    from freezeasguard.engine.guard.mask import FreezeMask
    from freezeasguard.engine.model.components import build_components

    base = build_components("tiny", seed=0)
    frozen = [n for n, _ in base.unet.named_parameters() if n.startswith("down_blocks.")]
    mask = FreezeMask.from_names(base.unet, frozen)
    Manifest.build(base.unet, mask, provenance={"method": "test"}).save(tmp_path / "m.json")
    cfg = tiny_config(tmp_path / "run", "train.steps=1", "freeze.mode=engine", f"freeze.manifest={tmp_path / 'm.json'}")
    return base, mask, cfg


def _users_lora(unet):
    """What an API user writes to train LoRA adapters: peft adapters, the base fixed, AdamW; no guard."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]), unet)
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    return named, torch.optim.AdamW([p for _, p in named], lr=1e-3)


@pytest.mark.parametrize("returns", ["pair", "wired"])
def test_a_custom_wiring_without_a_guard_gets_no_final_model_under_a_manifest(tmp_path, returns):
    from freezeasguard.engine.train.wiring import Wired

    base, _, cfg = _guarded_base(tmp_path)
    wiring = _users_lora if returns == "pair" else (lambda unet: Wired(None, *_users_lora(unet)))
    tr = Trainer(cfg, components=base, dataset=tiny_digits(resolution=base.resolution), wiring=wiring)
    tr.fit()
    assert tr.guard is None and tr.verify_frozen() is None
    with pytest.raises(TrainingError, match=r"freeze.manifest=.*m.json is configured, but no guard proved it"):
        tr.save_final()
    assert not (tmp_path / "run" / "final").exists()


def test_without_a_manifest_a_guardless_wiring_still_saves(tmp_path):
    from freezeasguard.engine.model.components import build_components

    base = build_components("tiny", seed=0)
    tr = Trainer(tiny_config(tmp_path, "train.steps=1"), components=base, dataset=tiny_digits(), wiring=_users_lora)
    tr.fit()
    assert (tr.save_final() / "unet").is_dir() and not (tmp_path / "final" / "verify.json").exists()


def test_the_lora_wiring_hands_the_trainer_its_guard_and_the_final_model_is_proven(tmp_path):
    import json

    from freezeasguard.engine.guard.manifest import Manifest
    from freezeasguard.engine.service.lora import LoraWiring, resolve_lora_targets
    from freezeasguard.engine.service.spec import LoraSpec

    base, mask, cfg = _guarded_base(tmp_path)
    manifest = Manifest.load(tmp_path / "m.json")
    modules = resolve_lora_targets(base.unet, mask, ["to_q", "to_v"]).modules
    assert modules and not any(m.startswith("down_blocks.") for m in modules)
    wiring = LoraWiring(modules, LoraSpec(rank=2, alpha=2.0), cfg.train, manifest=manifest)
    tr = Trainer(cfg, components=base, dataset=tiny_digits(resolution=base.resolution), wiring=wiring)
    assert tr.guard is not None and tr.guard.manifest.digest() == manifest.digest()
    with pytest.raises(AttributeError):
        tr.guard = None  # owned from construction: nothing can swap or drop it afterwards
    assert all(".lora_" in n for n, _ in tr.named_trainable)
    tr.fit()
    report = tr.verify_frozen()
    assert report.ok and report.checked == len(mask.frozen)
    proof = json.loads((tr.save_final() / "verify.json").read_text())
    assert proof == {"ok": True, "summary": report.summary(), "manifest_digest": manifest.digest()}
    # a wiring's result is one typed value; anything else is refused, naming the contract
    with pytest.raises(TrainingError, match=r"a wiring returns Wired\(guard, named, optimizer\)"):
        Trainer(tiny_config(tmp_path / "bad", "train.steps=1"), dataset=tiny_digits(), wiring=lambda unet: [])


# ------------------------------------------------------------------------------ the learning-rate schedule
def test_the_schedule_needs_no_optimizer_step_wrapper_and_gives_lambdalrs_rates(tmp_path):
    import warnings

    from freezeasguard.engine.train.schedule import LRSchedule, lr_factor

    over = ("train.steps=4", "train.lr=1e-3", "train.lr_schedule=cosine", "train.warmup_steps=2",
            "train.min_lr_ratio=0.1")
    ds = tiny_digits()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plain = Trainer(tiny_config(tmp_path / "a", *over), dataset=ds)
        record_grads(plain)  # a step replaced after construction: torch's wrapper never sees it
        plain.fit()
        inside = Trainer(tiny_config(tmp_path / "b", *over, "freeze.mode=engine", "freeze.ratio=0.5",
                                     "train.update_in_backward=true"), dataset=ds)
        inside.fit()  # updates inside backward: optimizer.step() is never called
    assert not [str(w.message) for w in seen if "lr_scheduler" in str(w.message) or "optimizer.step" in str(w.message)]
    # the rates torch's LambdaLR gives for the same factor, bit for bit
    p = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([p], lr=1e-3)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: lr_factor(s, plain.cfg.train))
    want = []
    for _ in range(4):
        want.append(ref.get_last_lr()[0])
        ref_opt.step()
        ref.step()
    assert [s.lr for s in plain.history] == want == [s.lr for s in inside.history]
    # a checkpoint written with LambdaLR's state resumes at its step
    sched = LRSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), plain.cfg.train)
    sched.load_state_dict(ref.state_dict())
    assert sched.last_epoch == 4 and sched.get_last_lr() == ref.get_last_lr()
