"""From a base model folder and a labelled dataset to a learned freeze manifest.

``learn_mask`` loads the base model and the data, obtains theta_ft (a given fine-tuned folder, or
a bootstrap fine-tune on mixed illegal + innocent data with the service's ``Trainer``), encodes
the data once (text and VAE are frozen), runs the ``MaskLearner`` and writes the manifest.
``mask_step_cost`` times a mask-learning step against a plain fine-tuning step.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from freezeasguard.engine.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from freezeasguard.engine.data import ImageDataset, load_dataset
from freezeasguard.engine.mask import FreezeMask
from freezeasguard.engine.masklearn import MaskLearnConfig, MaskLearner, MaskLearnError, resolve_device
from freezeasguard.engine.models import Components, load_components

log = logging.getLogger("freezeasguard")


def per_sample_diffusion_loss(unet: nn.Module, schedule, x0: torch.Tensor, cond: torch.Tensor,
                              noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE of each sample, fp32 [B] (its mean is ``train.diffusion_loss``)."""
    x_t = schedule.add_noise(x0, noise, t)
    out = unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
    err = F.mse_loss(out.float(), schedule.target(x0, noise, t).float(), reduction="none")
    return err.flatten(1).mean(1)


@dataclass
class DiffusionTask:
    """A UNet on encoded data (``encode.EncodedData`` or ``LiveData``)."""

    data: Any
    schedule: Any
    device: torch.device

    def draw(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        shape = self.data.sample_shape
        noise = torch.randn((n, *shape), generator=generator)
        t = self.schedule.sample_timesteps(n, generator=generator)
        eps = torch.randn((n, *shape), generator=generator)  # VAE posterior sample (latent space)
        return noise, t, eps

    def losses(self, model: nn.Module, idx: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        noise, t, eps = draws
        x0, cond = self.data.batch(idx, None, eps, self.device)
        return per_sample_diffusion_loss(model, self.schedule, x0, cond, noise.to(self.device),
                                         t.to(self.device))


def load_base(cfg: MaskLearnConfig) -> Components:
    if not cfg.base:
        raise MaskLearnError("no base model: pass --base DIR (a Stable Diffusion layout folder)")
    return load_components(cfg.base)


def select_domains(ds: ImageDataset, cfg: MaskLearnConfig) -> ImageDataset:
    present = ds.domain_names()
    unknown = [d for d in [*cfg.illegal, *cfg.innocent] if d not in present]
    if unknown:
        raise MaskLearnError(f"unknown domain(s) {unknown} in {ds.source}; it has {present}")
    if not cfg.illegal or not cfg.innocent:
        raise MaskLearnError("name at least one illegal and one innocent domain")
    return ds.select_domains([*cfg.illegal, *cfg.innocent])


def _finetune_config(cfg: MaskLearnConfig, out_dir: str) -> FinetuneConfig:
    u = cfg.user
    train = TrainConfig(steps=cfg.bootstrap_steps, batch_size=u.batch_size, lr=u.lr, beta1=u.beta1,
                        beta2=u.beta2, eps=u.eps, weight_decay=u.weight_decay, max_grad_norm=u.max_grad_norm,
                        mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
                        seed=cfg.seed, device=cfg.device, num_threads=cfg.num_threads, progress=cfg.progress)
    return FinetuneConfig(model=ModelConfig(pretrained=cfg.base), data=DataConfig(path=cfg.data),
                          train=train, out_dir=out_dir)


def bootstrap_finetune(c: Components, ds: ImageDataset, cfg: MaskLearnConfig) -> dict[str, torch.Tensor]:
    """theta_ft: ``cfg.bootstrap_steps`` steps of the service's fine-tuning on the mixed data.

    Runs on a copy of the UNet. With a work_dir the fine-tuned model is kept in
    ``work_dir/finetuned`` (pass it as ``finetuned`` to skip this next time).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(cfg.work_dir) / "bootstrap") if cfg.work_dir else tmp
        from freezeasguard.engine.train import Trainer

        trainer = Trainer(_finetune_config(cfg, out), components=dataclasses.replace(c, unet=copy.deepcopy(c.unet)),
                          dataset=ds)
        trainer.fit()
        if cfg.work_dir:
            trainer.save_final(Path(cfg.work_dir) / "finetuned")
        return {n: p.detach() for n, p in trainer.c.unet.named_parameters()}


def load_finetuned(path: str, c: Components) -> dict[str, torch.Tensor]:
    ft = dict(load_components(path).unet.named_parameters())
    base = dict(c.unet.named_parameters())
    bad = [n for n in base if n not in ft or ft[n].shape != base[n].shape]
    if bad or len(ft) != len(base):
        raise MaskLearnError(f"fine-tuned model {path!r} does not match the base UNet "
                             f"({len(bad)} tensor(s) missing or reshaped, e.g. {bad[:3]})")
    return {n: t.detach() for n, t in ft.items()}


def build_learner(cfg: MaskLearnConfig, *, components: Components | None = None,
                  dataset: ImageDataset | None = None, resume: bool = False) -> MaskLearner:
    """Everything up to the first step: inputs, theta_ft, encoded data, learner (resumed if asked
    and a checkpoint exists under work_dir; the bootstrap is then skipped)."""
    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    c = components if components is not None else load_base(cfg)
    ds = select_domains(dataset if dataset is not None else load_dataset(cfg.data, c.resolution), cfg)
    if ds.resolution != c.resolution:
        raise MaskLearnError(f"dataset resolution {ds.resolution} != model resolution {c.resolution}")
    device = resolve_device(cfg.device)
    for m in (c.text_encoder, c.vae):
        if m is not None:
            m.requires_grad_(False).eval()
    c.to(device)
    try:
        from freezeasguard.kernels.attention import set_attention_backend

        set_attention_backend(c.unet, "auto")
    except ImportError:  # attention dispatch not installed: diffusers' default processor stays
        pass
    ckpt_root = Path(cfg.work_dir) / "checkpoints" if cfg.work_dir else None
    resuming = resume and ckpt_root is not None and any(ckpt_root.glob("step-*/state.json"))
    theta_ft = None
    if cfg.finetuned:
        theta_ft = load_finetuned(cfg.finetuned, c)
    elif cfg.bootstrap_steps and not resuming:
        theta_ft = bootstrap_finetune(c, ds, cfg)
    from freezeasguard.engine.encode import encode_dataset

    data = encode_dataset(c, ds, device=device)
    learner = MaskLearner(c.unet, DiffusionTask(data, c.schedule, device), ds.domains, cfg, theta_ft=theta_ft)
    if resuming:
        log.info("resumed mask learning at step %d", learner.resume())
    return learner


@dataclass
class LearnResult:
    learner: MaskLearner
    mask: FreezeMask
    manifest: Any  # freezeasguard.engine.manifest.Manifest
    baselines: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> Manifest


def baseline_manifests(learner: MaskLearner) -> dict[str, Any]:
    """Manifests of the random, magnitude and saliency masks at the learner's exact budget,
    from its current theta_ft (call before ``fit`` to use the bootstrap's)."""
    from freezeasguard.engine.manifest import Manifest
    from freezeasguard.engine.mask_baselines import baseline_masks

    if not bool(learner.theta_d.any()):
        log.warning("theta_ft equals theta_pre: the magnitude and saliency baselines are all ties "
                    "(set bootstrap_steps or finetuned)")
    cfg = learner.cfg
    masks = baseline_masks(learner, seed=cfg.seed)
    stat = {"random": "seeded permutation", "magnitude": "RMS(theta_pre - theta_ft) / RMS(theta_pre) per tensor",
            "saliency": "-dU/dm at m = 1/2, first order, 4 batches"}
    return {name: Manifest.build(learner.base_state(), m, provenance={
        "method": name, "statistic": stat[name], "config": cfg.to_dict(), "seed": cfg.seed,
        "budget": {"ratio": cfg.mask.budget, "by": cfg.mask.budget_by}}) for name, m in masks.items()}


def learn_mask(cfg: MaskLearnConfig, out: str | Path | None = None, *, components: Components | None = None,
               dataset: ImageDataset | None = None, resume: bool = False, baselines: bool = False) -> LearnResult:
    """Learn a mask and (main process, ``out`` given) write it as a manifest.

    With ``baselines``, the three baseline masks at the same budget are made first (from the
    bootstrap's theta_ft) and written next to ``out`` as ``OUT.<name>.json``. Afterwards the
    UNet's parameters are views of the learner's theta(m) buffer, not the base weights.
    """
    learner = build_learner(cfg, components=components, dataset=dataset, resume=resume)
    extra = baseline_manifests(learner) if baselines else {}
    learner.fit()
    if cfg.work_dir and cfg.checkpoint_every:
        learner.save_checkpoint()
    mask = learner.export_mask()
    conv = learner.convergence(mask)
    if not conv["converged"]:
        log.warning("the soft mask has not converged: only %.0f%% of the exported frozen parameters have m > 1/2 "
                    "(logits spread over %.3g T); the export ranks small logit differences. More steps or "
                    "a larger mask.lr may help; compare with the baselines (--baselines)",
                    100 * conv["agreement"], conv["spread"])
    manifest = learner.manifest(mask, provenance={"base": cfg.base, "data": cfg.data, "convergence": conv})
    if out is not None and learner.dist.is_main:
        manifest.save(out)
        for name, m in extra.items():
            m.save(baseline_path(out, name))
    return LearnResult(learner, mask, manifest, extra)


def baseline_path(out: str | Path, name: str) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.{name}{out.suffix or '.json'}")


# ------------------------------------------------------------------------------------ cost
def mask_step_cost(learner: MaskLearner, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Median time of a simulated-user step, a mask step and a plain fine-tuning step.

    The plain step is what the service runs: the same model, batch and loss, every tensor
    trainable, torch AdamW (fused on CUDA) with clipping. It runs on a deep copy of the model;
    the learner's state advances (use a throwaway learner). Steps are interleaved so that host
    noise hits all three alike.

    Returns:
        seconds per step (``plain_s``, ``user_s``, ``mask_s``, ``cycle_s`` = the average step of
        a ``mask.every`` cycle), their ratios to ``plain_s``, the update-only parts
        (``plain_update_s``: clip + AdamW; ``user_update_s``: clip + flat bilevel update), and
        the conditions.
    """
    from freezeasguard.engine.train import param_groups

    cfg, u, dev = learner.cfg, learner.cfg.user, learner.device
    plain = copy.deepcopy(learner.model)
    for p in plain.parameters():
        p.grad = None
    named = list(plain.named_parameters())
    opt = torch.optim.AdamW(param_groups(named, u.weight_decay), lr=u.lr, betas=(u.beta1, u.beta2),
                            eps=u.eps, fused=dev.type == "cuda")

    def sync() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def plain_step(s: int) -> tuple[float, float]:
        t0 = sync()
        idx, draws, coefs = learner.step_inputs(s)
        opt.zero_grad(set_to_none=True)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
        with amp:
            losses = learner.task.losses(plain, idx, draws).float()
        (losses * coefs[0]).sum().backward()
        t1 = sync()
        if u.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), u.max_grad_norm)
        opt.step()
        return sync() - t0, sync() - t1

    def user_step(s: int) -> tuple[float, float]:
        t0 = sync()
        learner.backward(s, publisher=False)
        t1 = sync()
        learner.user_update()
        return sync() - t0, sync() - t1

    def mask_step(s: int) -> tuple[float, float]:
        t0 = sync()
        learner.backward(s, publisher=True)
        t1 = sync()
        learner.mask_update(learner.reduced_dots())
        return sync() - t0, sync() - t1

    times: dict[str, list[tuple[float, float]]] = {"plain": [], "user": [], "mask": []}
    for r in range(warmup + repeats):
        for name, fn in (("plain", plain_step), ("user", user_step), ("mask", mask_step)):
            t = fn(r)
            if r >= warmup:
                times[name].append(t)
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    upd = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    every = cfg.mask.every
    cycle = ((every - 1) * med["user"] + med["mask"]) / every
    n_params = sum(learner.layout.numels)
    return {
        "plain_s": med["plain"], "user_s": med["user"], "mask_s": med["mask"], "cycle_s": cycle,
        "ratio_user": med["user"] / med["plain"], "ratio_mask": med["mask"] / med["plain"],
        "ratio_cycle": cycle / med["plain"],
        "plain_update_s": upd["plain"], "user_update_s": upd["user"], "mask_update_s": upd["mask"],
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": u.batch_size,
        "tensors": len(learner.layout), "params": n_params, "mixed_precision": cfg.mixed_precision,
        "repeats": repeats,
    }
