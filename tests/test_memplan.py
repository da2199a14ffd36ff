"""The shape-only memory plan against the exact ledger of real setups (UNet, SD3 and Flux
transformers), on the meta device and per FSDP2 process; and the fp32 norm rule it relies on."""
import copy
import math

import pytest
import torch
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from helpers import tiny_config, tiny_digits
from torch import nn

from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.tensor import FP32_NORMS, fp32_param_names
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.families import family_of, get_family
from freezeasguard.engine.model.presets import build_unet, get_preset
from freezeasguard.engine.train.memplan import memory_plan
from freezeasguard.engine.train.trainer import Trainer

SETUPS = [  # (freeze.mode, optimizer_states, update_in_backward)
    ("full", "fp32", False), ("naive", "fp32", False), ("engine", "fp32", False), ("engine", "bf16", False),
    ("engine", "8bit", False), ("engine", "fp32", True), ("engine", "8bit", True),
]


@pytest.mark.parametrize("preset", ["tiny", "sd3-tiny", "flux-tiny"])
@pytest.mark.parametrize("mode, states, in_backward", SETUPS)
def test_the_plan_is_the_ledger_byte_for_byte(tmp_path, preset, mode, states, in_backward):
    base = build_components(preset, seed=0)
    mask = FreezeMask.random(base.unet, 0.5, by="params", seed=0)
    plan = memory_plan(base.unet, mask.frozen, mode=mode, states=states, in_backward=in_backward)
    over = [f"freeze.mode={mode}", f"train.optimizer_states={states}", "train.mixed_precision=bf16",
            f"train.update_in_backward={str(in_backward).lower()}", "train.steps=1", f"model.preset={preset}"]
    if mode != "full":
        Manifest.build(base.unet, mask, provenance={"method": "random"}).save(tmp_path / "m.json")
        over.append(f"freeze.manifest={tmp_path / 'm.json'}")
    tr = Trainer(tiny_config(tmp_path / "run", *over), components=base, dataset=tiny_digits(resolution=base.resolution))
    tr.measure_memory = True
    stats = tr.train_step()
    led = tr.last_ledger
    assert math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
    if mode == "engine":  # frozen norm weights (Flux's RMSNorms, SD's group/layer norms) held in fp32
        live = dict(base.unet.named_parameters())
        norms = fp32_param_names(base.unet) & set(mask.frozen)
        assert all(live[n].dtype == torch.float32 for n in norms)
        assert all(live[n].dtype == torch.bfloat16 for n in set(mask.frozen) - norms)
        assert led.weights_frozen.get("float32", 0) == 4 * sum(live[n].numel() for n in norms)
    assert plan.frozen_weight_bytes == led.frozen_weight_bytes
    assert plan.trainable_weight_bytes == led.trainable_weight_bytes
    assert plan.grad_bytes == led.grad_bytes
    assert plan.grad_transient_bytes == led.grad_transient_bytes
    assert plan.optimizer_state_bytes == led.optimizer_state_bytes
    assert plan.static_bytes == led.static_bytes


def test_sd15_on_the_meta_device():
    unet = build_unet("sd15", device="meta")
    names = [n for n, _ in unet.named_parameters()]
    full = memory_plan(unet, [], mode="full")
    assert full.params == 859_520_964
    half = FreezeMask.random(unet, 0.5, by="params", seed=0)
    eng = memory_plan(unet, half.frozen, mode="engine", states="8bit", in_backward=True)
    assert eng.frozen_params == half.stats().frozen_params and eng.grad_bytes == 0
    # 8-bit moments + fp32 master + bf16 frozen: about (2 + 4) / 2 + 2 / 2 = 4 of full's 16 B/param
    assert 0.24 < eng.static_bytes / full.static_bytes < 0.27
    assert eng.per_device(8).static_bytes * 8 >= eng.static_bytes
    with pytest.raises(ValueError, match="not in the model"):
        memory_plan(unet, ["nope"], mode="naive")
    with pytest.raises(ValueError, match="engine options"):
        memory_plan(unet, names[:1], mode="naive", states="8bit")
    assert torch.device("meta") == next(unet.parameters()).device


def test_per_device_is_fsdp2_sharding_plus_its_transients():
    unet = build_unet("flux-tiny", device="meta")
    mask = FreezeMask.random(unet, 0.5, by="params", seed=0)
    plan = memory_plan(unet, mask.frozen, mode="engine")
    one = plan.per_device(1)
    assert one.static_bytes == plan.static_bytes and one.fsdp_transient_bytes == 0  # the plain path
    params, frozen, norms = dict(unet.named_parameters()), set(mask.frozen), fp32_param_names(unet)

    def held(n, p, rows):  # bytes of a dim-0 shard of `rows` rows in the engine's storage dtype
        return rows * (p.numel() // p.shape[0]) * (2 if n in frozen and n not in norms else 4)

    for devices in (2, 3, 8):
        d = plan.per_device(devices)
        shard = {n: -(-p.shape[0] // devices) for n, p in params.items()}
        assert d.frozen_weight_bytes == sum(held(n, p, shard[n]) for n, p in params.items() if n in frozen)
        assert d.trainable_weight_bytes == sum(held(n, p, shard[n]) for n, p in params.items() if n not in frozen)
        assert d.grad_bytes == d.trainable_weight_bytes and d.optimizer_state_bytes == 2 * d.grad_bytes
        blocks = family_of(unet).blocks(unet)
        unit = {b: sum(held(f"{b}.{n}", p, p.shape[0]) for n, p in unet.get_submodule(b).named_parameters())
                for b in blocks}
        in_blocks = {f"{b}.{n}" for b in blocks for n, _ in unet.get_submodule(b).named_parameters()}
        root = sum(held(n, p, p.shape[0]) for n, p in params.items() if n not in in_blocks)
        assert d.gather_transient_bytes == root + 2 * max(unit.values())
        grads = {b: sum(4 * p.numel() for n, p in unet.get_submodule(b).named_parameters() if f"{b}.{n}" not in frozen)
                 for b in blocks}
        grads["<root>"] = sum(4 * p.numel() for n, p in params.items() if n not in in_blocks and n not in frozen)
        assert d.reduce_transient_bytes == 2 * max(grads.values())
        assert d.static_bytes == d.sharded_bytes + d.gather_transient_bytes + d.reduce_transient_bytes
    with pytest.raises(ValueError):
        plan.per_device(0)
    with pytest.raises(ValueError, match="one-device"):
        plan.per_device(2).per_device(2)


@pytest.mark.parametrize("preset", ["sd15", "sdxl", "sd3", "flux"])
def test_the_fp32_rule_holds_every_norm_weight_of_the_denoisers(preset):
    unet = build_unet(preset, device="meta")
    rule = fp32_param_names(unet)
    own = {f"{m}.{k}": mod for m, mod in unet.named_modules() for k, _ in mod.named_parameters(recurse=False)}
    norms = {n for n, mod in own.items() if "Norm" in type(mod).__name__}
    assert rule == norms  # every norm layer's own weight, and nothing else (no Linear of an AdaLayerNorm)
    assert all(not isinstance(own[n], (nn.Linear, nn.Conv2d)) for n in rule)
    if preset == "flux":  # its q/k norms are torch RMSNorms with weights
        assert sum(isinstance(own[n], nn.RMSNorm) for n in rule) == 152


def test_the_fp32_rule_holds_diffusers_rmsnorm_weights():
    # SD3.5's qk norms: diffusers' RMSNorm, whose forward casts activations to a bf16 weight's dtype
    cfg = {**get_preset("sd3-tiny").unet, "qk_norm": "rms_norm"}
    model = get_family("sd3").build_denoiser(cfg, 16, 16)
    rms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, DiffusersRMSNorm)}
    assert rms and rms <= fp32_param_names(model)


@pytest.mark.parametrize("layer", [nn.LayerNorm(64), nn.GroupNorm(4, 16), nn.RMSNorm(64), DiffusersRMSNorm(64, 1e-6)],
                         ids=lambda m: type(m).__name__)
def test_a_bf16_copy_changes_a_norm_but_not_a_linear_under_autocast(layer):
    """Why the rule exists: autocast rounds a Linear's weight to bf16 at every use, so a bf16-held copy
    computes the same bits; a norm applies its weight at its stored precision, so a copy would not."""
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert isinstance(layer, FP32_NORMS)
    for mod in (layer, nn.Linear(64, 64)):
        with torch.no_grad():
            for p in mod.parameters():
                p.normal_(generator=torch.Generator().manual_seed(1))
        low = copy.deepcopy(mod)
        for p in low.parameters():
            p.data = p.data.to(torch.bfloat16)
        with torch.autocast("cpu", torch.bfloat16):
            same = torch.equal(mod(x).float(), low(x).float())
        assert same == isinstance(mod, nn.Linear)
