"""From a base model folder and a labelled dataset to a learned freeze manifest.

``learn_mask`` loads the base model and the data, obtains theta_ft (a given fine-tuned folder, or
a bootstrap fine-tune on mixed illegal + innocent data with the service's ``Trainer``), encodes
the data once (text and VAE are frozen), runs the ``MaskLearner`` and writes the manifest.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from freezeasguard.engine.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from freezeasguard.engine.errors import MaskLearnError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.learn.baselines import baseline_masks
from freezeasguard.engine.learn.config import MaskLearnConfig
from freezeasguard.engine.learn.diagnostics import convergence, loss_summary
from freezeasguard.engine.learn.learner import MaskLearner, resolve_device
from freezeasguard.engine.model.attention import set_attention_backend
from freezeasguard.engine.model.components import Components, load_components
from freezeasguard.engine.model.data import ImageDataset, load_dataset
from freezeasguard.engine.model.diffusion import per_sample_diffusion_loss
from freezeasguard.engine.model.encode import encode_dataset
from freezeasguard.engine.train.trainer import Trainer

log = logging.getLogger("freezeasguard")


@dataclass
class DiffusionTask:
    """A denoiser of any family (UNet or diffusion transformer; ``model.family.predict`` calls it) on
    encoded data (``model.encode.EncodedData`` or ``LiveData``)."""

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
        raise MaskLearnError("no base model: pass --base DIR (a model folder in a diffusers pipeline's layout)")
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
                        seed=cfg.seed, device=cfg.device, num_threads=cfg.num_threads, progress=cfg.progress,
                        checkpoint_every=None)  # the fine-tuned weights are the product, kept as finetuned/
    return FinetuneConfig(model=ModelConfig(pretrained=cfg.base), data=DataConfig(path=cfg.data),
                          train=train, out_dir=out_dir)


def bootstrap_finetune(c: Components, ds: ImageDataset, cfg: MaskLearnConfig) -> dict[str, torch.Tensor]:
    """theta_ft: ``cfg.bootstrap_steps`` steps of the service's fine-tuning on the mixed data.

    Runs on a copy of the denoiser. With a work_dir the fine-tuned model is kept in
    ``work_dir/finetuned`` (pass it as ``finetuned`` to skip this next time).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(cfg.work_dir) / "bootstrap") if cfg.work_dir else tmp
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
        raise MaskLearnError(f"fine-tuned model {path!r} does not match the base denoiser "
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
    for m in c.frozen_networks:
        m.requires_grad_(False).eval()
    c.to(device)
    set_attention_backend(c.unet, "auto")
    ckpt_root = Path(cfg.work_dir) / "checkpoints" if cfg.work_dir else None
    resuming = resume and ckpt_root is not None and any(ckpt_root.glob("step-*/state.json"))
    theta_ft = None
    if cfg.finetuned:
        theta_ft = load_finetuned(cfg.finetuned, c)
    elif cfg.bootstrap_steps and not resuming:
        theta_ft = bootstrap_finetune(c, ds, cfg)
    data = encode_dataset(c, ds, device=device)
    learner = MaskLearner(c.unet, DiffusionTask(data, c.schedule, device), ds.domains, cfg, theta_ft=theta_ft)
    if resuming:
        log.info("resumed mask learning at step %d", learner.resume())
    return learner


@dataclass
class LearnResult:
    learner: MaskLearner
    mask: FreezeMask
    manifest: Manifest
    baselines: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> Manifest


def learned_manifest(learner: MaskLearner, mask: FreezeMask | None = None,
                     provenance: dict[str, Any] | None = None) -> Manifest:
    """A freeze manifest over theta_pre (the base model's bytes) with method 'learned'."""
    mask = mask or learner.export_mask()
    cfg = learner.cfg
    prov = {"method": "learned", "config": cfg.to_dict(), "seed": cfg.seed, "loss_summary": loss_summary(learner),
            "budget": {"ratio": cfg.mask.budget, "by": cfg.mask.budget_by}, **(provenance or {})}
    return Manifest.build(learner.base_state(), mask, provenance=prov)


def baseline_manifests(learner: MaskLearner) -> dict[str, Manifest]:
    """Manifests of the random, magnitude and saliency masks at the learner's exact budget,
    from its current theta_ft (call before ``fit`` to use the bootstrap's)."""
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
    conv = convergence(learner, mask)
    if not conv["converged"]:
        log.warning("the soft mask has not converged: only %.0f%% of the exported frozen parameters have m > 1/2 "
                    "(logits spread over %.3g T); the export ranks small logit differences. More steps or "
                    "a larger mask.lr may help; compare with the baselines (--baselines)",
                    100 * conv["agreement"], conv["spread"])
    manifest = learned_manifest(learner, mask, provenance={"base": cfg.base, "data": cfg.data, "convergence": conv})
    if out is not None and learner.dist.is_main:
        manifest.save(out)
        for name, m in extra.items():
            m.save(baseline_path(out, name))
    return LearnResult(learner, mask, manifest, extra)


def baseline_path(out: str | Path, name: str) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.{name}{out.suffix or '.json'}")
