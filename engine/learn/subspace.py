"""Learning a direction lock: the directions inside each matrix that illegal fine-tuning uses.

Round ``k`` (of ``rounds``) fine-tunes a copy of the base on the publisher's illegal data with the
service's capped settings (the engine's own trainer and flat AdamW) *under the lock learned so
far*, takes each matrix's delta ``D = W - W0`` and adds its next directions to the lock:

* ``select='energy'``: the top left (``out``) / right (``in``) singular vectors of ``D``;
* ``select='contrast'``: a second fine-tune on the innocent data gives ``D_i``; the directions
  maximise ``v^T D D^T v / v^T (D_i D_i^T + ridge) v`` (generalised eigenvectors): much illegal,
  little innocent update energy.

Rounds are adversarial: a user fine-tuning under the lock reroutes to the next directions, which
the next round then locks. Each matrix locks ``round(budget * dim)`` directions in all, spread
evenly over the rounds; a matrix no fine-tune has moved yet (no update energy to follow, e.g. a parameter that
gets no gradient) is not locked. After every round the lock so far is written (``rounds/round-k``), so a
run that stops resumes at the next round; the result is a signed-ready manifest (the tensor mask
of ``cfg.mask`` or none, plus the lock) and a report.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from freezeasguard.engine.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from freezeasguard.engine.errors import MaskLearnError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import SubspaceLock, TensorLock
from freezeasguard.engine.io import atomic_write_json
from freezeasguard.engine.learn.lock_config import LockLearnConfig
from freezeasguard.engine.learn.lock_report import lock_report, plot_lock
from freezeasguard.engine.model.components import Components, load_components
from freezeasguard.engine.model.data import ImageDataset, load_dataset
from freezeasguard.engine.optim.flat import FlatAdamW
from freezeasguard.engine.train.trainer import Trainer
from freezeasguard.engine.train.wiring import Wired

log = logging.getLogger("freezeasguard")
MANIFEST, LOCKS, REPORT = "manifest.json", "manifest.locks.safetensors", "report.json"


@dataclass
class LockResult:
    lock: SubspaceLock
    manifest: Manifest
    rounds: list[dict[str, Any]] = field(default_factory=list)  # energy captured per round
    out: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)  # learn.lock_report.lock_report


class _LockedWiring:
    """Trainer wiring: every tensor but the mask's frozen ones trainable, flat AdamW projecting the
    locked tensors' updates (exactly the service's engine path under a lock). The publisher's own
    simulated user: no manifest, so no guard to prove (``Wired(None, ...)``)."""

    def __init__(self, lock: SubspaceLock, frozen: frozenset[str], tc: TrainConfig):
        self.lock, self.frozen, self.tc = lock, frozen, tc

    def __call__(self, unet: nn.Module):
        for n, p in unet.named_parameters():
            p.requires_grad_(n not in self.frozen)
        named = [(n, p) for n, p in unet.named_parameters() if n not in self.frozen]
        tc = self.tc
        return Wired(None, named, FlatAdamW(named, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                                            weight_decay=tc.weight_decay, locks=self.lock.bases()))


def finetune_delta(c: Components, ds: ImageDataset, lock: SubspaceLock, frozen: frozenset[str],
                   cfg: LockLearnConfig, seed: int, desc: str) -> dict[str, torch.Tensor]:
    """``W - W0`` of every trainable matrix after ``cfg.steps`` capped steps under ``lock``."""
    u = cfg.user
    tc = TrainConfig(steps=cfg.steps, batch_size=min(u.batch_size, len(ds)), lr=u.lr, beta1=u.beta1,
                     beta2=u.beta2, eps=u.eps, weight_decay=u.weight_decay, max_grad_norm=u.max_grad_norm,
                     seed=seed, device=cfg.device, num_threads=cfg.num_threads, progress=False,
                     checkpoint_every=None, log_every=10**9)
    base = {n: p.detach().clone() for n, p in c.unet.named_parameters() if p.dim() >= 2 and n not in frozen}
    with tempfile.TemporaryDirectory() as tmp:
        fc = FinetuneConfig(model=ModelConfig(pretrained=cfg.base), data=DataConfig(path=cfg.data), train=tc,
                            out_dir=tmp)
        trainer = Trainer(fc, components=dataclasses.replace(c, unet=copy.deepcopy(c.unet)), dataset=ds,
                          wiring=_LockedWiring(lock, frozen, tc))
        bar = tqdm(total=cfg.steps, desc=desc, unit="step", leave=False, disable=not cfg.progress)
        trainer.fit(on_step=lambda s: (bar.update(1), bar.set_postfix(loss=f"{s.loss:.4f}")))
        bar.close()
        params = dict(trainer.c.unet.named_parameters())
        return {n: (params[n].detach().cpu().double() - b.cpu().double()).reshape(b.shape[0], -1)
                for n, b in base.items()}


def _complement(basis: torch.Tensor | None, dim: int) -> torch.Tensor:
    """An orthonormal basis (dim x (dim - r)) of the complement of ``basis``'s span (float64)."""
    if basis is None or basis.shape[1] == 0:
        return torch.eye(dim, dtype=torch.float64)
    q, _ = torch.linalg.qr(basis.double(), mode="complete")
    return q[:, basis.shape[1]:]


def new_directions(d: torch.Tensor, current: torch.Tensor | None, k: int, *, d_innocent: torch.Tensor | None = None,
                   ridge: float = 0.1) -> tuple[torch.Tensor, float]:
    """``k`` orthonormal directions (columns, float64) in the complement of ``current`` that carry
    the most of ``d``'s energy (``d``'s rows are the side being locked: pass ``D`` for output
    directions, ``D^T`` for input ones), or, with ``d_innocent``, the most relative to it. Also
    returns the share of ``d``'s energy they capture."""
    q = _complement(current, d.shape[0])
    a = q.mT @ d  # coordinates of the delta in the free space
    total = float(d.square().sum())
    k = min(k, q.shape[1])
    if k <= 0 or total == 0.0:
        return torch.zeros(d.shape[0], 0, dtype=torch.float64), 0.0
    if d_innocent is None:
        u, _, _ = torch.linalg.svd(a, full_matrices=False)
        top = u[:, :k]
        if top.shape[1] < k:  # the delta's rank is below k: fill with other free directions
            top = torch.linalg.qr(torch.cat([top, torch.eye(q.shape[1], dtype=torch.float64)], 1))[0][:, :k]
    else:
        b_ = q.mT @ d_innocent
        cov_i = b_ @ b_.mT
        cov_i += ridge * max(float(torch.diagonal(cov_i).mean()), 1e-30) * torch.eye(q.shape[1], dtype=torch.float64)
        chol = torch.linalg.cholesky(cov_i)
        m = torch.linalg.solve_triangular(chol, a, upper=False)  # L^-1 A
        w, vec = torch.linalg.eigh(m @ m.mT)
        v = torch.linalg.solve_triangular(chol.mT, vec[:, -k:].flip(1), upper=True)  # L^-T w
        top = torch.linalg.qr(v)[0]
    dirs = q @ top
    return dirs, float((dirs.mT @ d).square().sum()) / total


def _append(current: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor | None:
    if new.shape[1] == 0:
        return current
    both = new if current is None else torch.cat([current.double(), new], 1)
    return torch.linalg.qr(both)[0].to(torch.float32).contiguous()


def _targets(c: Components, frozen: frozenset[str], cfg: LockLearnConfig) -> dict[str, tuple[int, int]]:
    """Trainable matrices with their final (out rank, in rank)."""
    out = {}
    for n, p in c.unet.named_parameters():
        if p.dim() < 2 or n in frozen:
            continue
        m, k = p.shape[0], p.numel() // p.shape[0]
        share = cfg.budget / 2 if cfg.side == "both" else cfg.budget
        r = int(round(share * m)) if cfg.side in ("out", "both") and m >= cfg.min_dim else 0
        s = int(round(share * k)) if cfg.side in ("in", "both") and k >= cfg.min_dim else 0
        if r or s:
            out[n] = (r, s)
    return out


def _cum(total: int, k: int, rounds: int) -> int:
    return int(round(total * (k + 1) / rounds))


def learn_lock(cfg: LockLearnConfig, out: str | Path, *, components: Components | None = None,
               dataset: ImageDataset | None = None, resume: bool = False) -> LockResult:
    """Learn a direction lock per ``cfg``; writes the manifest, its locks file, the report and one
    checkpoint per round under ``out``. With ``resume``, continues after the last finished round."""
    cfg = cfg.validate()
    if not cfg.illegal:
        raise MaskLearnError("name at least one illegal domain (--illegal)")
    if cfg.select == "contrast" and not cfg.innocent:
        raise MaskLearnError("select='contrast' needs an innocent domain (--innocent)")
    out = Path(out)
    if components is None:
        if not cfg.base:
            raise MaskLearnError("no base model: pass --base DIR (a model folder in a diffusers pipeline's layout)")
        components = load_components(cfg.base)
    c = components
    ds = dataset if dataset is not None else load_dataset(cfg.data, c.resolution)
    present = ds.domain_names()
    unknown = [d for d in [*cfg.illegal, *cfg.innocent] if d not in present]
    if unknown:
        raise MaskLearnError(f"unknown domain(s) {unknown} in {ds.source}; it has {present}")
    ill = ds.select_domains(cfg.illegal)
    inn = ds.select_domains(cfg.innocent) if cfg.innocent else None
    mask_manifest = Manifest.load(cfg.mask) if cfg.mask else None
    if mask_manifest is not None:
        mask_manifest.check_model(c.unet)
    mask = mask_manifest.mask(c.unet) if mask_manifest is not None else FreezeMask.from_names(c.unet, [])
    frozen = mask.frozen_set
    targets = _targets(c, frozen, cfg)
    if not targets:
        raise MaskLearnError(f"no matrix to lock at budget {cfg.budget} (side {cfg.side})")
    shapes = {n: tuple(p.shape) for n, p in c.unet.named_parameters()}

    state_path = out / "rounds"
    lock, rounds, start = SubspaceLock(), [], 0
    if resume and (state_path / "state.json").is_file():
        st = json.loads((state_path / "state.json").read_text())
        if st.get("config") != cfg.to_dict():
            raise MaskLearnError(f"{state_path} was written with other settings; start in a new folder")
        entries = st["entries"]
        lock = SubspaceLock.load(state_path / LOCKS, entries) if entries else SubspaceLock()
        rounds, start = st["rounds"], len(st["rounds"])
    elif out.exists() and any(out.iterdir()):
        raise MaskLearnError(f"{out} is not empty: pass --resume to continue it, or choose a new folder")

    bar = tqdm(range(start, cfg.rounds), desc="lock rounds", unit="round", disable=not cfg.progress,
               initial=start, total=cfg.rounds)
    for k in bar:
        d_ill = finetune_delta(c, ill, lock, frozen, cfg, cfg.seed + k, f"round {k + 1}: illegal fine-tune")
        d_inn = None
        if inn is not None and (cfg.select == "contrast" or k == 0):
            d_inn = finetune_delta(c, inn, lock, frozen, cfg, cfg.seed + k, f"round {k + 1}: innocent fine-tune")
        new_locks, cap_ill, cap_inn, e_ill, e_inn = {}, 0.0, 0.0, 0.0, 0.0
        for n, (r, s) in targets.items():
            old = lock.locks.get(n)
            u, v = (old.out, old.inp) if old is not None else (None, None)
            d = d_ill[n]
            di = d_inn[n] if d_inn is not None else None
            contrast = di if cfg.select == "contrast" else None
            for side, total, cur in (("out", r, u), ("in", s, v)):
                if not total:
                    continue
                want = _cum(total, k, cfg.rounds) - (0 if cur is None else cur.shape[1])
                mat, mat_i = (d, di) if side == "out" else (d.mT, None if di is None else di.mT)
                dirs, _ = new_directions(mat, cur, want, d_innocent=None if contrast is None else mat_i,
                                         ridge=cfg.contrast_ridge)
                e_ill += float(mat.square().sum())
                cap_ill += float((dirs.mT @ mat).square().sum())
                if mat_i is not None:
                    e_inn += float(mat_i.square().sum())
                    cap_inn += float((dirs.mT @ mat_i).square().sum())
                if side == "out":
                    u = _append(u, dirs)
                else:
                    v = _append(v, dirs)
            if u is not None or v is not None:  # a matrix the fine-tunes never moved (SD3's last text query,
                new_locks[n] = TensorLock(shapes[n], u, v)  # whose output is discarded) stays unlocked
        lock = SubspaceLock(new_locks)
        row = {"round": k + 1, "illegal_energy_captured": cap_ill / e_ill if e_ill else 0.0,
               "innocent_energy_captured": cap_inn / e_inn if e_inn else None,
               "locked_dof": lock.dof, "locked_matrix_share": lock.counts(c.unet)["matrix_ratio"]}
        rounds.append(row)
        bar.set_postfix(captured=f"{100 * row['illegal_energy_captured']:.0f}%",
                        locked=f"{100 * row['locked_matrix_share']:.0f}%")
        state_path.mkdir(parents=True, exist_ok=True)
        lock.save(state_path / LOCKS)
        atomic_write_json(state_path / "state.json", {"config": cfg.to_dict(), "rounds": rounds,
                                                      "entries": lock.entries()})
    bar.close()
    prov = {"method": "subspace-learned", "seed": cfg.seed, "config": cfg.to_dict(), "rounds": rounds}
    manifest = Manifest.build(c.unet, mask, provenance=prov, lock=lock, lock_file=LOCKS)
    manifest.save(out / MANIFEST, lock=lock)
    rep = lock_report(lock, c.unet, rounds)
    atomic_write_json(out / REPORT, rep)
    plot_lock(rep, out / "report.png")
    return LockResult(lock, manifest, rounds, out, rep)

