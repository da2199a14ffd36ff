"""``bench/run.py plan-step``: a real guarded training step next to the memory plan.

The plan (``bench/run.py plan``) counts bytes from shapes alone. This runs the step it describes:
the preset's denoiser, randomly initialised on the device; the engine's own freeze wiring
(``train.wiring.apply_freeze``: the seeded random whole-tensor mask of the plan, its manifest,
bf16 frozen storage, the flat AdamW with the setup's moments, or updates in backward); then
``--steps`` training steps of the flow-matching or diffusion loss under bf16 autocast, on random
latents and random text conditioning of the shapes the real text encoders give (the text
encoders and the VAE are not built: a service caches their outputs, ``data.cache=true``). Each
setup reports, side by side:

* the plan's static bytes and the live ledger's (``train.ledger``, exact: they must be equal);
* the activations autograd saved in the first step (counted by the ledger's hook);
* on CUDA, ``torch.cuda.max_memory_allocated`` during the steps (reset after the setup, so the
  fp32 initialisation of the model does not count) and the memory resident after the setup.

    python bench/run.py plan-step --preset flux --setups engine+8bit+in-backward,engine --resolution 256
    python bench/run.py plan-step --preset flux-tiny --device cpu --out /tmp/plan-step   # a CPU check

Setups run one after another in this process, each on a freshly built model.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import time
from pathlib import Path
from typing import Any

import torch
from common import conditions, conditions_markdown, markdown_table, refuse_dirty_results, write_results
from plan import SETUPS

from freezeasguard.engine.config import resolve
from freezeasguard.engine.model.components import preset_schedule
from freezeasguard.engine.model.diffusion import diffusion_loss
from freezeasguard.engine.model.families import family_of
from freezeasguard.engine.model.family import Cond
from freezeasguard.engine.model.presets import build_unet, get_preset, param_summary, vae_scale_factor
from freezeasguard.engine.train import update
from freezeasguard.engine.train.ledger import count_saved_activations, memory_ledger
from freezeasguard.engine.train.memplan import memory_plan
from freezeasguard.engine.train.wiring import apply_freeze

GiB = 2**30
SETUP_NAMES = [name for name, _, _ in SETUPS]
# text tokens of each family's conditioning (CLIP's 77; SD3: 77 CLIP + 256 T5; Flux: 512 T5)
TEXT_TOKENS = {"sd": 77, "sdxl": 77, "sd3": 77 + 256, "flux": 512}


def random_cond(model: torch.nn.Module, batch: int, resolution: int, g: torch.Generator) -> Cond | torch.Tensor:
    """Conditioning of the shapes ``model``'s family's text encoders give, drawn at random."""
    fam, cfg = family_of(model), model.config
    n = TEXT_TOKENS[fam.name]
    if fam.name == "sd":
        return torch.randn(batch, n, cfg.cross_attention_dim, generator=g)
    if fam.name == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        size = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        return Cond(fam, {"encoder_hidden_states": torch.randn(batch, n, cfg.cross_attention_dim, generator=g),
                          "text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": size.expand(batch, 6)})
    tensors = {"encoder_hidden_states": torch.randn(batch, n, cfg.joint_attention_dim, generator=g),
               "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g)}
    if fam.name == "flux":
        tensors["guidance"] = torch.full((batch,), 3.5)
    return Cond(fam, tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setup(preset: str, setup: str, *, device: torch.device, resolution: int, batch: int, steps: int,
              frozen: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Build, guard and train ``preset`` under ``setup`` (a name of ``plan.SETUPS``); one result row."""
    kw, over = next((kw, over) for name, kw, over in SETUPS if name == setup)
    ratio = [] if "freeze.mode=full" in over else [f"freeze.ratio={frozen}"]
    cfg = resolve(overrides=[*(o for o in over if not o.startswith("freeze.ratio=")), *ratio,
                             "freeze.budget_by=params", "train.mixed_precision=bf16", f"train.seed={seed}",
                             "train.lr=1e-5", f"train.batch_size={batch}"])
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    unet = build_unet(preset, resolution=resolution, device=device)
    tensors, params = param_summary(unet)
    guard, named, opt = apply_freeze(cfg, unet, device)
    frozen_names = list(guard.frozen_names)
    plan = memory_plan(unet, frozen_names, **kw)
    _sync(device)
    setup_s = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    fam = family_of(unet)
    schedule = preset_schedule(preset).to(device)
    channels, size = fam.latent_channels(unet), resolution // vae_scale_factor(get_preset(preset).vae)
    g = torch.Generator().manual_seed(seed)
    cond = random_cond(unet, batch, resolution, g).to(device)
    trainable = [p for _, p in named]
    times, losses, ledger = [], [], None
    for step in range(steps):
        ts = time.perf_counter()
        x0 = torch.randn(batch, channels, size, size, generator=g).to(device)
        noise = torch.randn(batch, channels, size, size, generator=g).to(device)
        t = schedule.sample_timesteps(batch, generator=g).to(device)
        counter = count_saved_activations(unet) if step == 0 else contextlib.nullcontext()
        with counter as saved, torch.autocast(device.type, dtype=torch.bfloat16):
            loss = diffusion_loss(unet, schedule, x0, cond, noise, t)
        update.before_backward(opt, loss, step)
        loss.backward()
        update.apply_update(opt, trainable, cfg.train.max_grad_norm, step=step, loss=float(loss.detach()))
        if step == 0:  # at the step's peak point, as the trainer measures it
            ledger = memory_ledger(unet, opt, saved_activation_bytes=saved, frozen_names=frozen_names or None)
        opt.zero_grad(set_to_none=getattr(opt, "zero_grad_set_to_none", True))
        _sync(device)
        times.append(time.perf_counter() - ts)
        losses.append(float(loss))
    row = {"preset": preset, "setup": setup, "params": params, "tensors": tensors,
           "frozen_params": plan.frozen_params, "frozen_tensors": len(frozen_names),
           "resolution": resolution, "batch": batch, "steps": steps, "losses": losses,
           "plan_static_bytes": plan.static_bytes, "ledger_static_bytes": ledger.static_bytes,
           "plan_equals_ledger": plan.static_bytes == ledger.static_bytes,
           "activation_bytes": ledger.activation_bytes, "setup_s": setup_s, "step_s": times,
           "resident_after_setup_bytes": resident,
           "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
           "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None}
    del unet, guard, named, opt, trainable, cond, ledger
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _gib(v: int | None) -> float | str:
    return "" if v is None else v / GiB


def render(rows: list[dict[str, Any]], cond: dict[str, Any]) -> str:
    table = [{**r, "plan_gib": _gib(r["plan_static_bytes"]), "ledger_gib": _gib(r["ledger_static_bytes"]),
              "equal": "yes" if r["plan_equals_ledger"] else "**no**", "act_gib": _gib(r["activation_bytes"]),
              "sum_gib": _gib(r["plan_static_bytes"] + (r["activation_bytes"] or 0)),
              "max_alloc_gib": _gib(r["cuda_max_allocated_bytes"]),
              "step_s_last": r["step_s"][-1]} for r in rows]
    cols = [("setup", "setup"), ("plan_gib", "plan static GiB"), ("ledger_gib", "ledger static GiB"),
            ("equal", "plan = ledger"), ("act_gib", "saved activations GiB"), ("sum_gib", "static + act GiB"),
            ("max_alloc_gib", "max_memory_allocated GiB"), ("step_s_last", "last step s"), ("setup_s", "setup s")]
    r0 = rows[0]
    head = (f"# bench/run.py plan-step\n\n`{r0['preset']}`: {r0['params']:,} parameters in {r0['tensors']:,} "
            f"tensors, {r0['frozen_params'] / r0['params']:.2%} of the parameters frozen ({r0['frozen_tensors']} "
            f"tensors, seeded random mask), {r0['resolution']} px, batch {r0['batch']}, {r0['steps']} steps, bf16 "
            "autocast, random latents and text conditioning.\n\n")
    return head + markdown_table(table, cols) + "\n\n" + conditions_markdown(cond) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run.py plan-step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux", help="model preset (default: %(default)s)")
    p.add_argument("--setups", default="engine+8bit+in-backward,engine",
                   help=f"comma-separated, of {', '.join(SETUP_NAMES)} (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=256, help="image resolution in pixels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="training steps per setup (default: %(default)s)")
    p.add_argument("--frozen", type=float, default=0.5, help="fraction of parameters frozen (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "plan"),
                   help="folder for step.md and step.json (default: bench/results/plan)")
    args = p.parse_args(argv)
    refuse_dirty_results(args.out)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUP_NAMES]
    if unknown or not setups:
        p.error(f"unknown setup(s) {unknown}: choose from {', '.join(SETUP_NAMES)}")
    get_preset(args.preset)  # a clear error for an unknown preset, before anything is built
    if args.steps < 1 or args.batch < 1 or args.resolution % 16:
        p.error("--steps and --batch must be >= 1, --resolution a multiple of 16")
    device = torch.device(args.device)
    rows = []
    for s in setups:
        print(f"{args.preset} / {s}: building and guarding on {device} ...", flush=True)
        rows.append(run_setup(args.preset, s, device=device, resolution=args.resolution, batch=args.batch,
                              steps=args.steps, frozen=args.frozen, seed=args.seed))
        r = rows[-1]
        print(f"  plan {r['plan_static_bytes'] / GiB:.2f} GiB, ledger {r['ledger_static_bytes'] / GiB:.2f} GiB, "
              f"losses {r['losses']}", flush=True)
    cond = conditions(mask_seed=args.seed, frozen=args.frozen, data="random latents and text conditioning "
                      "(TEXT_TOKENS tokens per prompt), no text encoder or VAE built",
                      peak="torch.cuda.max_memory_allocated over the steps, reset after the setup")
    md = render(rows, cond)
    j, m = write_results(Path(args.out), "step", {"suite": "plan-step", "conditions": cond, "rows": rows}, md)
    print(md)
    print(f"\nwritten: {j}, {m}")
    return 0 if all(r["plan_equals_ledger"] for r in rows) else 1
