"""The guard benchmark's world: data, splits, the publisher's base model and the recogniser.

Data (all real, all shipped in installed packages):

* scikit-learn's 1,797 handwritten digits; the illegal "subject" is one digit class.
* scikit-image's LFW subset (100 faces, 100 non-face background patches) for the setting whose
  legal domain is of a different kind; without scikit-image, crops of the photographs
  scikit-learn and matplotlib ship stand in (recorded in the results).

Two settings, one base model:

* ``same``: illegal digit ``five``, innocent ``six`` (the publisher's own data), legal ``eight``
  (a domain the publisher never saw) -- like the paper's artist-vs-artist setting.
* ``diff``: illegal ``five``, innocent ``background`` patches, legal ``face`` -- like its
  faces-vs-logos setting: the legal domain is another kind of image.

The base is pretrained on every digit except the illegal and the legal ones, plus the
background patches: it has seen neither the target subject nor the legal domains, so users must
adapt it to produce them, which is the situation the guard is for.

Splits (seeded, per domain): the illegal domain is split between the publisher (mask learning)
and the user (fine-tuning, plus a held-out part for the denoising loss); legal domains go to the
user only (train / held-out).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from efficacy import stratified_split
from realdata import concat, has_lfw, lfw_dataset, photo_crops_dataset

from freezeasguard.engine.config import resolve
from freezeasguard.engine.model.components import Components, load_components
from freezeasguard.engine.model.data import ImageDataset, digits_dataset, load_image_folder
from freezeasguard.engine.model.diffusion import NoiseSchedule
from freezeasguard.engine.model.presets import Preset, build_text_encoder, build_unet
from freezeasguard.engine.model.tokenizer import build_tokenizer, caption_words
from freezeasguard.engine.train.trainer import Trainer

log = logging.getLogger("freezeasguard")

# A pixel-space UNet of the tiny preset's shape class, sized for a 2-core CPU: 16 px, two
# levels, cross-attention at the 8x8 level only (self-attention over 256 tokens at 16x16 cost
# half the step time on a CPU for nothing the digits need), 2 heads of 24.
BENCH_PRESET = Preset(
    name="guardbench",
    unet=dict(block_out_channels=(24, 48), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
              addition_embed_type="text", addition_embed_type_num_heads=2),
    text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32),
    vae=dict(block_out_channels=(32,), latent_channels=4),  # unused: pixel space
    space="pixel",
    resolution=16,
    notes="guard benchmark UNet: ~0.56M parameters in 208 tensors, pixel space 16x16",
)


@dataclass(frozen=True)
class Setting:
    """One illegal/innocent/legal triple."""

    name: str
    illegal: str
    innocent: str
    legal: str
    kind: str  # 'same kind' or 'different kind'


@dataclass
class World:
    """Everything the conditions share: data splits, settings, base model, recogniser classes."""

    data: ImageDataset  # all real images, every domain
    settings: list[Setting]
    pretrain: ImageDataset  # the publisher's pretraining mix
    publisher: dict[str, ImageDataset]  # domain -> publisher's images (illegal split, innocent)
    user_train: dict[str, ImageDataset]  # domain -> the user's fine-tuning images
    user_heldout: dict[str, ImageDataset]  # domain -> held-out real images (denoising loss)
    prompts: dict[str, str]  # domain -> the caption users prompt with
    source: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source,
                "settings": [dataclasses.asdict(s) for s in self.settings],
                "pretrain_domains": {d: sum(1 for x in self.pretrain.domains if x == d)
                                     for d in self.pretrain.domain_names()},
                "publisher": {d: len(v) for d, v in self.publisher.items()},
                "user_train": {d: len(v) for d, v in self.user_train.items()},
                "user_heldout": {d: len(v) for d, v in self.user_heldout.items()},
                "prompts": self.prompts}


def _other_kind(resolution: int) -> tuple[ImageDataset, str, str, str]:
    """(dataset, innocent domain, legal domain, source name) of the different-kind setting."""
    if has_lfw():
        return lfw_dataset(resolution), "background", "face", "scikit-image lfw_subset (real faces / non-faces)"
    ds = photo_crops_dataset(resolution)
    return ds, "china", "flower", "crops of scikit-learn's sample photographs (scikit-image not installed)"


def build_world(resolution: int = 16, *, illegal: str = "five", innocent: str = "six", legal: str = "eight",
                folder: str | None = None, folder_domains: tuple[str, str, str] | None = None,
                split_seed: int = 1234) -> World:
    """The default digits (+ other kind) world, or one from an image folder.

    Args:
        folder: an imagefolder with ``metadata.jsonl`` domain labels (a publisher's real data);
            ``folder_domains`` = (illegal, innocent, legal) names it uses. Every other domain of the
            folder goes into the base's pretraining mix.
    """
    if folder is not None:
        if folder_domains is None:
            raise ValueError("an image folder needs folder_domains=(illegal, innocent, legal)")
        data = load_image_folder(folder, resolution)
        ill, inn, leg = folder_domains
        settings = [Setting("folder", ill, inn, leg, "folder")]
        source = {"data": str(folder)}
    else:
        digits = digits_dataset(resolution)
        other, o_inn, o_leg, o_src = _other_kind(resolution)
        data = concat([digits, other])
        ill = illegal
        settings = [Setting("same", illegal, innocent, legal, "same kind"),
                    Setting("diff", illegal, o_inn, o_leg, "different kind")]
        source = {"digits": "scikit-learn load_digits (8x8, bicubic to %d px)" % resolution, "other_kind": o_src}
    illegal_domains = {s.illegal for s in settings}
    legal_domains = {s.legal for s in settings}
    innocent_domains = {s.innocent for s in settings}
    pre_idx = [i for i, d in enumerate(data.domains) if d is not None and d not in illegal_domains | legal_domains]
    publisher, user_train, user_heldout = {}, {}, {}
    for d in sorted(illegal_domains):
        sub = data.select_domains([d])
        pub, tr, ho = stratified_split(sub.domains, [0.5, 0.35, 0.15], split_seed)
        publisher[d], user_train[d], user_heldout[d] = sub.subset(pub), sub.subset(tr), sub.subset(ho)
    for d in sorted(legal_domains):
        sub = data.select_domains([d])
        tr, ho = stratified_split(sub.domains, [0.8, 0.2], split_seed)
        user_train[d], user_heldout[d] = sub.subset(tr), sub.subset(ho)
    for d in sorted(innocent_domains):
        publisher[d] = data.select_domains([d])
    prompts = {}
    for r in data.records:
        if r.domain is not None:
            prompts.setdefault(r.domain, r.caption)
    return World(data, settings, data.subset(pre_idx), publisher, user_train, user_heldout, prompts, source)


# ------------------------------------------------------------------------------------ base model
def new_components(words: tuple[str, ...], seed: int = 0, preset: Preset = BENCH_PRESET) -> Components:
    """Randomly initialised bench networks (seeded); the tokenizer knows ``words``."""
    torch.manual_seed(seed)
    tok = build_tokenizer(words)
    unet = build_unet(preset)
    te = build_text_encoder(preset, tok)
    # DDPM's linear betas (SD's scaled-linear schedule keeps ~10% of the signal of a 16 px image at
    # t = T) and v-prediction (SD 2.x's): with epsilon-prediction the caption barely changes the
    # loss at these sizes (a 0.0015 gap between right and wrong captions after 900 steps, samples
    # ignore the prompt); with v-prediction the gap is 0.11 after 600 steps and samples follow it.
    schedule = NoiseSchedule(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                             prediction_type="v_prediction")
    return Components(unet, [te], [tok], None, schedule, preset.resolution, source=preset.name)


def pretrain_base(world: World, out: Path, *, steps: int, batch_size: int, lr: float, seed: int = 0,
                  preset: Preset = BENCH_PRESET, progress: bool = True) -> Components:
    """The publisher's base, trained from scratch on the pretraining mix by the engine's own trainer
    (full fine-tuning of a randomly initialised UNet) and saved as a model folder; reused when it
    exists with the same recipe.

    The text encoder stays a frozen random CLIP (no pretrained one exists offline); its outputs for
    the digit words differ enough for a v-prediction UNet to follow the prompt. AdamW, a linear
    warm-up then a cosine decay to 10%, clipping at 1.
    """
    warm = min(100, steps // 10)
    recipe = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "preset": preset.unet,
              "noise": "linear 1e-4..0.02, v-prediction", "schedule": f"warmup{warm}-cosine0.1",
              "trainer": "engine Trainer, full fine-tuning",
              "domains": {d: sum(1 for x in world.pretrain.domains if x == d) for d in world.pretrain.domain_names()},
              "words": list(caption_words(world.data.captions))}
    recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as the stamp will read back
    stamp = out / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        log.info("base model: reusing %s", out)
        return load_components(out)
    comps = new_components(caption_words(world.data.captions), seed, preset)
    cfg = resolve(overrides=[
        f"train.steps={steps}", f"train.batch_size={batch_size}", f"train.lr={lr}", f"train.seed={seed}",
        f"train.warmup_steps={warm}", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1", "train.max_grad_norm=1.0",
        "train.weight_decay=0.01", f"train.progress={str(progress).lower()}", "train.checkpoint_every=null",
        f"out_dir={out.with_name(out.name + '.train')}"])
    trainer = Trainer(cfg, components=comps, dataset=world.pretrain)
    trainer.fit()
    trainer.save_final(out)
    (out / "recipe.json").write_text(json.dumps(recipe))
    return load_components(out)
