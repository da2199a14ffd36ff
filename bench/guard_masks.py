"""The publisher's masks for one setting: learned (whole tensors or rows) and baselines, and its
direction locks (learned by the engine's ``learn_lock``, or a random subspace), alone or on top
of a learned tensor mask.

Everything starts from the publisher's data only (its split of the illegal domain + the innocent
domain): a bootstrap fine-tune gives theta_ft, then ``MaskLearner`` (tensors) or
``RowMaskLearner`` (rows) runs the bilevel loop with the service's AdamW as simulated user. The
baselines (random, magnitude, saliency) are built at the same exact budget. Masks are written as
files under the work dir and reused when the recipe is unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from realdata import concat
from rowmask import RowMask, RowMaskLearner

from freezeasguard.engine.config import from_dict
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.learn.baselines import magnitude_mask, saliency_mask
from freezeasguard.engine.learn.config import MaskLearnConfig
from freezeasguard.engine.learn.diagnostics import convergence, loss_summary
from freezeasguard.engine.learn.learner import MaskLearner
from freezeasguard.engine.learn.lock_config import LockLearnConfig
from freezeasguard.engine.learn.pipeline import DiffusionTask, bootstrap_finetune
from freezeasguard.engine.model.components import Components
from freezeasguard.engine.model.data import ImageDataset
from freezeasguard.engine.model.encode import encode_dataset

log = logging.getLogger("freezeasguard")


@dataclass(frozen=True)
class MaskSpec:
    """One mask to make. ``source``: learned | random | magnitude | saliency."""

    source: str  # learned | random | magnitude | saliency | oracle (diagnostic: uses the users' data)
    budget: float  # directions: the share of each matrix's side locked
    by: str = "params"  # params | tensors (rows: params | groups)
    granularity: str = "tensors"  # tensors | rows | directions | tensors+directions (a mask, then a lock)
    seed: int = 0
    variant: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # learner overrides

    @property
    def name(self) -> str:
        v = "".join(f"-{k}={self.variant[k]}" for k in sorted(self.variant))
        return (f"{self.source}-{self.granularity}-{self.by}{round(self.budget * 100):02d}-s{self.seed}{v}")


def learner_config(setting, user_lr: float, user_batch: int, spec: MaskSpec, steps: int,
                   bootstrap_steps: int) -> MaskLearnConfig:
    """The mask-learning config: the service's user optimizer, the paper's T, budget and schedule."""
    d: dict[str, Any] = {
        "illegal": [setting.illegal], "innocent": [setting.innocent], "steps": steps,
        "bootstrap_steps": bootstrap_steps, "seed": spec.seed, "progress": False, "device": "cpu",
        "chunk": 1 if spec.granularity == "rows" else 256,
        "user": {"lr": user_lr, "batch_size": user_batch},
        "mask": {"budget": spec.budget, "budget_by": "params" if spec.by == "params" else "tensors"},
    }
    for k, v in spec.variant.items():  # 'mask.lr', 'steps', 'mask.innocent_weight', ...
        node = d
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return from_dict(MaskLearnConfig, d).validate()


def publisher_data(world, setting) -> ImageDataset:
    return concat([world.publisher[setting.illegal], world.publisher[setting.innocent]])


class MaskMaker:
    """Makes (and caches) the masks of one setting from one base model."""

    def __init__(self, world, setting, base: Components, root: Path, *, user_lr: float, user_batch: int,
                 steps: int, bootstrap_steps: int, oracle_steps: int = 100, lock_steps: int = 100):
        self.world, self.setting, self.base = world, setting, base
        self.root = Path(root) / setting.name
        self.user_lr, self.user_batch = user_lr, user_batch
        self.steps, self.bootstrap_steps = steps, bootstrap_steps
        self.oracle_steps = oracle_steps
        self.lock_steps = lock_steps  # each lock-learning round's fine-tune: the service's step cap
        self.data = publisher_data(world, setting)
        self._theta_ft: dict[int, dict[str, torch.Tensor]] = {}
        self.info: dict[str, Any] = {}

    def _recipe(self, spec: MaskSpec) -> str:
        if "directions" in spec.granularity:
            under = self.mask_spec_under(spec) if spec.granularity == "tensors+directions" else None
            cfg = self.lock_config(spec, None)
            extra = self._recipe(under) if under is not None else ""
            return json.dumps({"lock": cfg.to_dict(), "spec": dataclasses.asdict(spec), "under": extra,
                               "base": self._base_sha(), "n": len(self.data)}, sort_keys=True, default=str)
        cfg = learner_config(self.setting, self.user_lr, self.user_batch, spec, self.steps, self.bootstrap_steps)
        return json.dumps({"cfg": cfg.to_dict(), "spec": dataclasses.asdict(spec), "base": self._base_sha(),
                           "n": len(self.data)}, sort_keys=True, default=str)

    def _base_sha(self) -> str:
        return hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                       for p in self.base.unet.parameters())).hexdigest()[:16]

    def path(self, spec: MaskSpec) -> Path:
        if "directions" in spec.granularity:  # a manifest folder: manifest.json + its locks file
            return self.root / spec.name / "manifest.json"
        return self.root / f"{spec.name}.json"

    def stamp(self, spec: MaskSpec) -> Path:
        return self.root / f"{spec.name}.recipe"

    def get(self, spec: MaskSpec) -> Path:
        """The mask file of ``spec`` (made now unless cached with the same recipe)."""
        out, stamp = self.path(spec), self.stamp(spec)
        recipe = self._recipe(spec)
        if out.is_file() and stamp.is_file() and stamp.read_text() == recipe:
            return out
        self.root.mkdir(parents=True, exist_ok=True)
        if "directions" in spec.granularity:
            info = self._make_lock(spec, out.parent)
        else:
            mask, info = self._make(spec)
            mask.save(out)
        stamp.write_text(recipe)
        (self.root / f"{spec.name}.info.json").write_text(json.dumps(info, indent=1, default=str))
        return out

    def load(self, spec: MaskSpec):
        p = self.get(spec)
        if "directions" in spec.granularity:
            from simusers import LockedGuard

            return LockedGuard.load(p, self.base.unet)
        if spec.granularity == "rows":
            return RowMask.load(p)
        return FreezeMask.from_file(p, self.base.unet)

    # ------------------------------------------------------------------ direction locks
    def mask_spec_under(self, spec: MaskSpec) -> MaskSpec:
        """The learned tensor mask a 'tensors+directions' lock is learned on top of."""
        return MaskSpec("learned", float(spec.variant.get("mask_budget", 0.3)), seed=spec.seed)

    def lock_config(self, spec: MaskSpec, mask_manifest: str | None) -> LockLearnConfig:
        v = spec.variant
        return from_dict(LockLearnConfig, {
            "illegal": [self.setting.illegal], "innocent": [self.setting.innocent], "budget": spec.budget,
            "side": v.get("side", "out"), "rounds": int(v.get("rounds", 3)), "select": v.get("select", "energy"),
            "steps": int(v.get("steps", self.lock_steps)), "seed": spec.seed, "mask": mask_manifest,
            "user": {"lr": self.user_lr, "batch_size": self.user_batch}, "device": "cpu", "progress": False,
        }).validate()

    def _make_lock(self, spec: MaskSpec, folder: Path) -> dict[str, Any]:
        import shutil

        from freezeasguard.engine.guard.manifest import Manifest
        from freezeasguard.engine.guard.subspace import random_lock
        from freezeasguard.engine.learn.subspace import learn_lock

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        unet = self.base.unet
        mask, mask_manifest = FreezeMask.from_names(unet, []), None
        if spec.granularity == "tensors+directions":
            under = self.mask_spec_under(spec)
            mask = self.load(under)
            mask_manifest = str(self.root / f"{spec.name}.mask-manifest.json")
            Manifest.build(unet, mask, provenance={"method": "learned", "bench": under.name}).save(mask_manifest)
        info: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
        if spec.source == "random":
            lock = random_lock(unet, spec.budget, side=spec.variant.get("side", "out"), seed=spec.seed,
                               skip=mask.frozen_set)
            Manifest.build(unet, mask, provenance={"method": "random-subspace", "seed": spec.seed},
                           lock=lock).save(folder / "manifest.json", lock=lock)
        elif spec.source == "learned":
            res = learn_lock(self.lock_config(spec, mask_manifest), folder, components=self.base, dataset=self.data)
            info["rounds"] = res.rounds
            info["report"] = {k: res.report[k] for k in ("counts", "by_kind")}
        else:
            raise ValueError(f"unknown lock source {spec.source!r}")
        return info

    # ------------------------------------------------------------------ making
    def _cfg(self, spec: MaskSpec) -> MaskLearnConfig:
        return learner_config(self.setting, self.user_lr, self.user_batch, spec, self.steps, self.bootstrap_steps)

    def theta_ft(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        """The bootstrap fine-tune on the publisher's mixed data (one per seed and config)."""
        cfg = self._cfg(spec)
        key = (spec.seed, cfg.bootstrap_steps)
        if key not in self._theta_ft:
            comps = dataclasses.replace(self.base, unet=copy.deepcopy(self.base.unet))
            self._theta_ft[key] = ({n: p.detach().clone() for n, p in self.base.unet.named_parameters()}
                                   if cfg.bootstrap_steps == 0 else bootstrap_finetune(comps, self.data, cfg))
        return self._theta_ft[key]

    def learner(self, spec: MaskSpec) -> MaskLearner:
        cfg = self._cfg(spec)
        unet = copy.deepcopy(self.base.unet)
        data = encode_dataset(self.base, self.data)
        task = DiffusionTask(data, self.base.schedule, torch.device("cpu"))
        cls = RowMaskLearner if spec.granularity == "rows" else MaskLearner
        return cls(unet, task, self.data.domains, cfg, theta_ft=self.theta_ft(spec))

    def _make(self, spec: MaskSpec) -> tuple[FreezeMask | RowMask, dict[str, Any]]:
        shapes = {n: tuple(p.shape) for n, p in self.base.unet.named_parameters()}
        info: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
        if spec.source == "random":
            if spec.granularity == "rows":
                return RowMask.random(shapes, spec.budget, spec.by, seed=spec.seed), info
            return FreezeMask.random(shapes, spec.budget, spec.by, seed=spec.seed), info
        if spec.source == "oracle":
            return self._oracle(spec, shapes, info)
        learner = self.learner(spec)
        if spec.source == "magnitude":
            mask = magnitude_mask(learner.base_state(), learner.finetuned_state(), spec.budget, spec.by)
        elif spec.source == "saliency":
            mask = saliency_mask(learner, spec.budget, spec.by)
        elif spec.source == "learned":
            learner.fit()
            info["loss_summary"] = loss_summary(learner)
            mask = learner.export_rows() if spec.granularity == "rows" else learner.export_mask()
            if spec.granularity == "tensors":
                info["convergence"] = convergence(learner, mask)
        else:
            raise ValueError(f"unknown mask source {spec.source!r}")
        return mask, info

    # ------------------------------------------------------------------ the oracle (diagnostic)
    def user_deltas(self, seed: int) -> dict[str, dict[str, torch.Tensor]]:
        """theta_user - theta_base of a full fine-tune on the *user's* illegal and legal data."""
        import tempfile

        from simusers import UserBudget, user_trainer

        out = {}
        for role, dom in (("illegal", self.setting.illegal), ("legal", self.setting.legal)):
            with tempfile.TemporaryDirectory() as tmp:
                tr, _ = user_trainer(self.base, self.world.user_train[dom], None,
                                     UserBudget(self.oracle_steps, self.user_lr, self.user_batch, seed), tmp)
                tr.fit()
                base = dict(self.base.unet.named_parameters())
                out[role] = {n: (p.detach() - base[n].detach()).double() for n, p in tr.c.unet.named_parameters()}
        return out

    def _oracle(self, spec: MaskSpec, shapes, info) -> tuple[FreezeMask | RowMask, dict[str, Any]]:
        """Freeze where the illegal user's update is dense and the legal user's is not.

        Not a publisher's mask: it looks at the users' own fine-tunes (including the legal domain
        the publisher never sees). It bounds what a mask of this granularity can do at all: the
        score of a group is its share of the illegal update's squared norm minus its share of the
        legal update's, per parameter.
        """
        from rowmask import groups_of

        d = self.user_deltas(spec.seed)
        tot = {r: sum(float(v.square().sum()) for v in d[r].values()) for r in d}
        scores = {}
        for n, shape in shapes.items():
            g = groups_of(shape) if spec.granularity == "rows" else 1
            ill = d["illegal"][n].reshape(g, -1).square().sum(1) / tot["illegal"]
            leg = d["legal"][n].reshape(g, -1).square().sum(1) / tot["legal"]
            scores[n] = (ill - leg) / (d["illegal"][n].numel() / g)
        info["update_share"] = {r: _shares(d[r]) for r in d}
        info["update_cosine"] = _cosines(d["illegal"], d["legal"])
        if spec.granularity == "rows":
            return RowMask.from_scores(shapes, scores, spec.budget, spec.by), info
        return FreezeMask.from_scores(shapes, {n: float(v[0]) for n, v in scores.items()}, spec.budget, spec.by), info


def _shares(delta: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of the update's squared norm per kind of tensor."""
    from guard_summary import category

    tot = sum(float(v.square().sum()) for v in delta.values())
    out: dict[str, float] = {}
    for n, v in delta.items():
        out[category(n)] = out.get(category(n), 0.0) + float(v.square().sum()) / tot
    return out


def _cosines(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine between the illegal and the legal update, per kind of tensor and overall."""
    from guard_summary import category

    acc: dict[str, list[float]] = {}
    for n in a:
        c = acc.setdefault(category(n), [0.0, 0.0, 0.0])
        c[0] += float((a[n] * b[n]).sum())
        c[1] += float(a[n].square().sum())
        c[2] += float(b[n].square().sum())
    allc = [sum(v[i] for v in acc.values()) for i in range(3)]
    acc["all"] = allc
    return {k: v[0] / max(1e-30, (v[1] * v[2]) ** 0.5) for k, v in acc.items()}
