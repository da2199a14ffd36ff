"""Every feature on every model family: a tiny SDXL UNet, a tiny SD3 MMDiT and a tiny Flux transformer
(32 px, latent space) each run guarded fine-tuning (bf16, the memory ledger, ``verify``), mask learning,
a learned direction lock, and the service (signed manifests, a policy, full and LoRA jobs, the audit
log, deltas merged back), and a base with a changed denoiser or second text encoder is refused.

The expensive setup (a base folder, a learned mask, a learned lock, keys, a policy, three jobs) is
built once per family; the Flux family also goes through the command line as the README does.
"""
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from freezeasguard.engine.cli.main import main as cli_main
from freezeasguard.engine.cli.verify import buffer_names
from freezeasguard.engine.config import resolve
from freezeasguard.engine.errors import JobError, MergeError, PolicyViolation
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.subspace import residual_tolerance
from freezeasguard.engine.guard.tensor import fp32_param_names
from freezeasguard.engine.io import save_safetensors_atomic
from freezeasguard.engine.learn.config import MaskLearnConfig, MaskOptConfig, UserConfig
from freezeasguard.engine.learn.lock_config import LockLearnConfig
from freezeasguard.engine.learn.pipeline import learn_mask
from freezeasguard.engine.learn.report import format_report, group_counts
from freezeasguard.engine.learn.subspace import learn_lock
from freezeasguard.engine.model.components import build_components, load_components, save_components
from freezeasguard.engine.model.data import digits_dataset, load_dataset, write_image_folder
from freezeasguard.engine.service.audit import audit_jobs
from freezeasguard.engine.service.delta import load_delta, lora_delta, merge_delta
from freezeasguard.engine.service.lora import LORA_MODULE_TYPES
from freezeasguard.engine.service.plan import plan_job
from freezeasguard.engine.service.policy import policy_for
from freezeasguard.engine.service.run import DELTA_FILE, run_job
from freezeasguard.engine.service.signing import load_key, new_hmac_key, save_key, sign_manifest
from freezeasguard.engine.train.trainer import Trainer

TINY = ["sdxl-tiny", "sd3-tiny", "flux-tiny"]
RES = 32
STEPS = 3
# LoRA targets of each family (a pattern that matches nothing refuses a job): the attention projections
# (of both streams in a transformer) and the MLPs.
_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]
_JOINT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TARGETS = {"sdxl-tiny": _ATTN, "sd3-tiny": _ATTN + _JOINT, "flux-tiny": _ATTN + _JOINT + ["proj_mlp"]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core host: one thread is faster
    yield
    torch.set_num_threads(n)


def _digits(n_per_domain=8):
    ds = digits_dataset(RES, classes=(1, 7))
    idx = [i for d in ("one", "seven") for i in [j for j, x in enumerate(ds.domains) if x == d][:n_per_domain]]
    return ds.subset(idx)


def _params(folder: Path, denoiser_dir: str) -> dict:
    return load_file(folder / denoiser_dir / "diffusion_pytorch_model.safetensors")


def _targets_of(model, frozen: set, patterns) -> list[str]:
    """Independent oracle of the modules a LoRA job may adapt: matched by a pattern's name suffix,
    an adaptable layer, no own tensor frozen."""
    out = []
    for n, m in model.named_modules():
        if not isinstance(m, LORA_MODULE_TYPES) or not any(n == p or n.endswith("." + p) for p in patterns):
            continue
        if not {f"{n}.{k}" for k, _ in m.named_parameters(recurse=False)} & frozen:
            out.append(n)
    return out


@dataclasses.dataclass
class Fam:
    name: str
    root: Path
    base: Path
    data: Path
    denoiser_dir: str
    text_dirs: list
    base_state: dict
    mask_path: Path
    mask_man: Manifest
    lock_path: Path
    lock_man: Manifest
    lock: object
    policy_path: Path
    log_key: Path

    def components(self):
        return load_components(self.base)


@pytest.fixture(scope="module", params=TINY)
def fam(request, tmp_path_factory):
    """A base folder, an image folder, a learned mask, a learned lock (both signed) and a policy."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    c = build_components(name, seed=0)
    save_components(c, root / "base")
    write_image_folder(_digits(), root / "data")
    user = UserConfig(batch_size=4, lr=1e-3)
    mask_cfg = MaskLearnConfig(base=str(root / "base"), data=str(root / "data"), illegal=["seven"], innocent=["one"],
                               steps=6, bootstrap_steps=2, user=user, mask=MaskOptConfig(budget=0.3, every=3),
                               progress=False)
    learn_mask(mask_cfg, root / "mask.json")
    lock_cfg = LockLearnConfig(base=str(root / "base"), data=str(root / "data"), illegal=["seven"], innocent=["one"],
                               budget=0.3, rounds=2, steps=2, user=user, progress=False)
    learn_lock(lock_cfg, root / "lock")
    key = new_hmac_key()
    save_key(key, root / "keys" / "publisher.key")
    save_key(new_hmac_key(), root / "keys" / "service.key")
    mask_man = sign_manifest(Manifest.load(root / "mask.json"), key)
    mask_man.save(root / "mask.json")
    lock_path = root / "lock" / "manifest.json"
    lock = Manifest.load(lock_path).load_lock(lock_path)
    lock_man = sign_manifest(Manifest.load(lock_path), key)
    lock_man.save(lock_path, lock=lock)
    base = load_components(root / "base")
    policy = policy_for([mask_man, lock_man], root / "keys" / "publisher.key", root / "base",
                        log_key_file=root / "keys" / "service.key", text_encoder=base.text_encoders,
                        max_lr=1e-3, max_steps=50, max_batch_size=8)
    policy.save(root / "policy.yaml")
    return Fam(name, root, root / "base", root / "data", c.family.denoiser_dir, c.family.text_dirs,
               {n: p.detach().clone() for n, p in base.unet.named_parameters()}, root / "mask.json", mask_man,
               lock_path, lock_man, lock, root / "policy.yaml", root / "keys" / "service.key")


# ----------------------------------------------------------------------------- mask learning
def test_learned_mask_covers_the_denoisers_tensors(fam):
    mask = fam.mask_man.mask()
    assert list(mask.names) == list(fam.base_state)  # every tensor of the denoiser, in model order
    sizes = {n: t.numel() for n, t in fam.base_state.items()}
    frozen = sum(sizes[n] for n in mask.frozen)
    assert abs(frozen / sum(sizes.values()) - 0.3) <= max(sizes.values()) / sum(sizes.values())
    assert fam.mask_man.provenance["method"] == "learned"
    Manifest.load(fam.mask_path).check_model(fam.components().unet)  # bound to this base

    blocks = {r.group: r for r in group_counts(mask, "block")}
    kinds = {r.group: r for r in group_counts(mask, "kind")}
    assert sum(r.tensors for r in blocks.values()) == sum(r.tensors for r in kinds.values()) == len(mask.names)
    model = fam.components().unet
    if fam.name == "sdxl-tiny":
        want = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        assert set(want + ["mid_block", "up_blocks.0"]) <= set(blocks) and "resnet" in kinds
    else:  # transformers: one group per block, and their own kinds
        want = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
        if fam.name == "flux-tiny":
            want += [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
        assert set(want) <= set(blocks) and not any(g.startswith("transformer_blocks") and g not in want
                                                     for g in blocks)
        attn = [n for n in mask.names if re.match(r"(single_)?transformer_blocks\.\d+\.attn\.(?!norm)", n)]
        ff = [n for n in mask.names if re.match(r"(single_)?transformer_blocks\.\d+\.(ff|ff_context|proj_mlp)\.", n)
              or re.match(r"single_transformer_blocks\.\d+\.proj_out\.", n)]
        mod = [n for n in mask.names if re.search(r"(^|\.)norm[^.]*\.linear\.", n)]
        assert (kinds["attention"].tensors, kinds["feedforward"].tensors, kinds["modulation"].tensors) == \
            (len(attn), len(ff), len(mod))
        assert "resnet" not in kinds and kinds["embedding"].tensors > 0
    text = format_report(mask, fam.name)
    assert all(b in text for b in want)


# ----------------------------------------------------------------------- guarded fine-tuning
def _trainer(fam, tmp_path, manifest: Path, *extra, domains=None):
    cfg = resolve(preset=fam.name, overrides=[
        "freeze.mode=engine", f"freeze.manifest={manifest}", f"train.steps={STEPS}", "train.batch_size=4",
        "train.progress=false", f"out_dir={tmp_path / 'run'}", *extra])
    ds = load_dataset(str(fam.data), RES)
    return Trainer(cfg, components=fam.components(), dataset=ds.select_domains(domains) if domains else ds)


def _with_state(folder: Path, denoiser_dir: str, state: dict, where: Path) -> Path:
    """A copy of a model folder whose denoiser holds ``state``."""
    shutil.copytree(folder, where)
    save_safetensors_atomic(state, where / denoiser_dir / "diffusion_pytorch_model.safetensors",
                            metadata={"format": "pt"})
    return where


def _verify(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main(["verify", *map(str, args)])
    return rc, capsys.readouterr().out


def test_guarded_finetune_bf16_ledger_and_verify(fam, tmp_path, capsys):
    mask = fam.mask_man.mask()
    tr = _trainer(fam, tmp_path, fam.mask_path, "train.mixed_precision=bf16")
    tr.measure_memory = True
    tr.fit()
    led = tr.last_ledger
    sizes = {n: t.numel() for n, t in fam.base_state.items()}
    n_frozen = sum(sizes[n] for n in mask.frozen)
    n_train = sum(sizes.values()) - n_frozen
    fp32 = set(mask.frozen) & fp32_param_names(tr.c.unet)  # norm weights stay fp32
    assert (led.frozen_params, led.trainable_params) == (n_frozen, n_train)
    assert led.weights_frozen.get("bfloat16", 0) == 2 * (n_frozen - sum(sizes[n] for n in fp32))
    assert led.trainable_weight_bytes == led.grad_bytes == 4 * n_train and led.optimizer_state_bytes == 8 * n_train
    assert led.activation_bytes > 0
    assert tr.verify_frozen().ok
    final = tr.save_final()

    state = _params(final, fam.denoiser_dir)
    assert all(torch.equal(state[n], fam.base_state[n]) for n in mask.frozen)  # exported in original bytes
    assert any(not torch.equal(state[n], fam.base_state[n]) for n in mask.trainable)
    rc, out = _verify(capsys, "--manifest", fam.mask_path, "--model", final)
    assert rc == 0 and f"all {len(mask.frozen)} frozen tensors are bit-identical" in out
    # the same proof fails on a model whose frozen tensor moved by one ulp
    name = mask.frozen[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = torch.nextafter(state[name].view(-1)[0], torch.tensor(math.inf))
    moved = _with_state(final, fam.denoiser_dir, state, tmp_path / "moved")
    rc, out = _verify(capsys, "--manifest", fam.mask_path, "--model", moved)
    assert rc == 1 and f"FAIL {name!r}" in out and "1 of" in out


def test_verify_tells_buffers_from_parameters(fam, tmp_path, capsys):
    """SD3 keeps its sin-cos position table in its weights file: not a parameter, never trained, not in
    the manifest, but checked against the base's when --base is given."""
    buffers = buffer_names(fam.base)
    assert buffers == ({"pos_embed.pos_embed"} if fam.name == "sd3-tiny" else set())
    if not buffers:
        return
    rc, out = _verify(capsys, "--manifest", fam.mask_path, "--model", fam.base)
    assert rc == 0 and "buffers: 1 not covered by the manifest (pos_embed.pos_embed)" in out
    assert _verify(capsys, "--manifest", fam.mask_path, "--model", fam.base, "--base", fam.base)[0] == 0
    state = _params(fam.base, fam.denoiser_dir)
    state["pos_embed.pos_embed"] = state["pos_embed.pos_embed"] * 2
    moved = _with_state(fam.base, fam.denoiser_dir, state, tmp_path / "moved")
    rc, out = _verify(capsys, "--manifest", fam.mask_path, "--model", moved, "--base", fam.base)
    assert rc == 1 and "FAIL buffer 'pos_embed.pos_embed': differs from the base's" in out


# --------------------------------------------------------------------------- direction locks
def test_learned_lock_is_enforced_and_proven(fam, tmp_path, capsys):
    lock = fam.lock
    shapes = {n: fam.base_state[n].dim() for n in lock.locks}
    if fam.name == "sdxl-tiny":
        assert {2, 4} <= set(shapes.values())  # linear and conv matrices
    else:
        assert any(n.endswith("attn.to_q.weight") for n in lock.locks)
        assert any(".ff." in n or "proj_mlp" in n for n in lock.locks)
    assert fam.lock_man.provenance["method"] == "subspace-learned" and len(fam.lock_man.provenance["rounds"]) == 2
    report = json.loads((fam.lock_path.parent / "report.json").read_text())
    groups = [r["group"] for r in report["by_block"]]
    first = "down_blocks.1" if fam.name == "sdxl-tiny" else "transformer_blocks.0"
    assert first in groups and len(groups) == len(set(groups))
    assert sum(r["locked_dof"] for r in report["by_block"]) == sum(r["locked_dof"] for r in report["by_kind"]) \
        == lock.dof

    tr = _trainer(fam, tmp_path, fam.lock_path, domains=["seven"])
    tr.fit()
    proof = tr.verify_frozen()
    assert proof.ok and proof.locks_checked == len(lock)
    final = tr.save_final()
    state = _params(final, fam.denoiser_dir)
    for n, lk in lock.locks.items():
        d = (state[n].double() - fam.base_state[n].double()).reshape(lk.shape[0], -1)
        assert d.norm() > 0  # trained, yet not along the locked directions
        assert math.sqrt(lk.energy(d)) <= residual_tolerance(STEPS, float(fam.base_state[n].double().norm()),
                                                                     float(d.norm()))
    rc, out = _verify(capsys, "--manifest", fam.lock_path, "--model", final, "--base", fam.base, "--steps", STEPS)
    assert rc == 0 and f"all {len(lock)} locked tensors within tolerance" in out
    # moving one locked tensor along its first locked output direction breaks the proof
    n, lk = next((n, lk) for n, lk in lock.locks.items() if lk.out is not None)
    w = state[n].reshape(lk.shape[0], -1)
    state[n] = (w + 1e-2 * w.norm() * lk.out[:, :1] @ torch.ones(1, w.shape[1]) / w.shape[1] ** 0.5
                ).reshape(state[n].shape).contiguous()
    moved = _with_state(final, fam.denoiser_dir, state, tmp_path / "moved")
    rc, out = _verify(capsys, "--manifest", fam.lock_path, "--model", moved, "--base", fam.base, "--steps", STEPS)
    assert rc == 1 and f"FAIL {n!r}" in out and "moved along locked directions" in out


def test_lock_learning_leaves_a_matrix_without_gradient_unlocked(tmp_path):
    """SD3's last block discards its text stream, so its ``add_q_proj`` gets no gradient: without weight
    decay no fine-tune moves it, and the lock (which follows update energy) leaves it out instead of
    writing a lock without a basis."""
    c = build_components("sd3-tiny", seed=0)
    dead = f"transformer_blocks.{len(c.unet.transformer_blocks) - 1}.attn.add_q_proj.weight"
    cfg = LockLearnConfig(illegal=["seven"], budget=0.3, rounds=2, steps=2, progress=False,
                          user=UserConfig(batch_size=4, lr=1e-3, weight_decay=0.0))
    res = learn_lock(cfg, tmp_path / "lock", components=c, dataset=_digits(4))
    assert dead not in res.lock and "transformer_blocks.0.attn.add_q_proj.weight" in res.lock
    assert Manifest.load(tmp_path / "lock" / "manifest.json").load_lock(tmp_path / "lock" / "manifest.json") \
        .entries() == res.lock.entries()


# --------------------------------------------------------------------------------- the service
def _spec(fam, where: Path, name: str, method: str = "full", **lora) -> Path:
    spec = {"name": name, "data": {"path": str(fam.data), "domains": ["seven"]}, "method": method,
            "train": {"lr": 1e-3, "steps": 2, "batch_size": 4}}
    if method == "lora":
        spec["lora"] = {"rank": 4, "alpha": 4.0, "targets": TARGETS[fam.name], **lora}
    path = where / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def jobs(fam, tmp_path_factory):
    """Three jobs of one log: full under the mask, LoRA under the mask (frozen modules skipped),
    LoRA under the lock."""
    where = tmp_path_factory.mktemp(f"{fam.name}-jobs")
    out = {}
    for name, manifest, method, lora in (("full", fam.mask_path, "full", {}),
                                         ("lora-mask", fam.mask_path, "lora", {"skip_frozen": True}),
                                         ("lora-lock", fam.lock_path, "lora", {})):
        plan = plan_job(_spec(fam, where, name, method, **lora), fam.policy_path, manifest=manifest, base=fam.base,
                        out=where / name, log_path=where / "jobs.jsonl")
        out[name] = (plan, run_job(plan))
    return where, out


def _merge(fam, folder: Path, manifest_path: Path):
    delta, meta = load_delta(folder / DELTA_FILE)
    man = Manifest.load(manifest_path)
    return delta, meta, merge_delta(fam.base_state, delta, man, meta, lock=man.load_lock(manifest_path))


def test_full_job_delta_and_merge(fam, jobs):
    where, done = jobs
    plan, result = done["full"]
    mask = fam.mask_man.mask()
    rec = result.record
    assert rec["status"] == "completed" and rec["verify"]["ok"] and rec["verify"]["checked"] == len(mask.frozen)
    delta, meta, merged = _merge(fam, where / "full", fam.mask_path)
    assert set(delta) == set(mask.trainable) and meta["manifest_digest"] == fam.mask_man.digest()
    assert all(merged[n] is fam.base_state[n] for n in mask.frozen)
    # re-applied to the base, the delta gives exactly the trained denoiser
    live = dict(plan.components.unet.named_parameters())
    assert all(torch.equal(merged[n], live[n].detach()) for n in mask.trainable)
    assert any(not torch.equal(merged[n], fam.base_state[n]) for n in mask.trainable)
    # a delta that carries a changed frozen tensor is refused
    name = mask.frozen[0]
    bad = {**delta, name: fam.base_state[name] + 1e-3}
    with pytest.raises(MergeError, match=re.escape(f"{name!r} is frozen by the manifest")):
        merge_delta(fam.base_state, bad, fam.mask_man, meta)


def test_lora_job_adapts_only_modules_the_mask_leaves_open(fam, jobs):
    where, done = jobs
    plan, result = done["lora-mask"]
    frozen = set(fam.mask_man.frozen_names)
    model = fam.components().unet
    want = _targets_of(model, frozen, TARGETS[fam.name])
    assert want and plan.lora_modules == want
    assert len(result.record["method"]["skipped"]) == len(_targets_of(model, set(), TARGETS[fam.name])) - len(want)
    delta, meta, merged = _merge(fam, where / "lora-mask", fam.mask_path)
    assert set(delta) == {f"{m}.lora_{p}.weight" for m in want for p in "AB"}
    assert all(merged[n] is fam.base_state[n] for n in frozen)
    assert sum(not torch.equal(merged[f"{m}.weight"], fam.base_state[f"{m}.weight"]) for m in want) > 0


def test_lora_job_under_the_lock_adapts_transformer_layers_and_keeps_the_lock(fam, jobs):
    where, done = jobs
    plan, result = done["lora-lock"]
    model = fam.components().unet
    want = _targets_of(model, set(), TARGETS[fam.name])  # a lock alone leaves every module open to LoRA
    assert plan.lora_modules == want
    if fam.name != "sdxl-tiny":  # both streams' projections and the MLPs of a transformer
        assert any(m.endswith("add_q_proj") for m in want) and any(m.endswith("ff.net.2") for m in want)
    if fam.name == "flux-tiny":
        assert any(m.endswith("proj_mlp") for m in want)
    rec = result.record
    assert rec["verify"]["ok"] and rec["verify"]["locks_checked"] > 0
    delta, meta, merged = _merge(fam, where / "lora-lock", fam.lock_path)  # merge_delta checks the lock too
    locked = [m for m in want if f"{m}.weight" in fam.lock.locks]
    assert locked
    moved = []
    for m in locked:  # every adapter's B A is off the locked directions, to fp32 rounding of its projection
        d = lora_delta(delta[f"{m}.lora_A.weight"], delta[f"{m}.lora_B.weight"], 1.0).double()
        assert math.sqrt(fam.lock.locks[f"{m}.weight"].energy(d)) <= 1e-5 * float(d.norm())
        if d.norm() > 0:  # (SD3's last block discards its text stream: its add_q_proj gets no gradient)
            moved.append(m)
            assert not torch.equal(merged[f"{m}.weight"], fam.base_state[f"{m}.weight"])
    assert len(moved) >= len(locked) - 1, sorted(set(locked) - set(moved))


def test_job_log_audits(fam, jobs):
    where, _ = jobs
    report = audit_jobs(where / "jobs.jsonl", outputs=True, key=load_key(fam.log_key))
    assert report.ok and report.signatures_checked and report.records == 6 and not report.interrupted


# ---------------------------------------------------------------------------- a tampered base
def _bump(path: Path, pick=None) -> str:
    """Add 1e-3 to one element of one tensor of a safetensors file (the first, or ``pick``)."""
    state = load_file(path)
    name = pick or next(iter(state))
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3
    save_safetensors_atomic(state, path, metadata={"format": "pt"})
    return name


def _refusal(fam, base: Path, where: Path) -> str:
    with pytest.raises(PolicyViolation) as exc:
        plan_job(_spec(fam, where, "job"), fam.policy_path, manifest=fam.mask_path, base=base, out=where / "out",
                 log_path=where / "jobs.jsonl")
    return str(exc.value)


def test_tampered_base_is_refused(fam, tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(fam.base, copy)
    plan_job(_spec(fam, tmp_path, "job"), fam.policy_path, manifest=fam.mask_path, base=copy, out=tmp_path / "out",
             log_path=tmp_path / "jobs.jsonl")  # an exact copy is the pinned base
    trainable = next(n for n in fam.base_state if n not in set(fam.mask_man.frozen_names))
    _bump(copy / fam.denoiser_dir / "diffusion_pytorch_model.safetensors", trainable)
    text = _refusal(fam, copy, tmp_path)
    what = "UNet" if fam.denoiser_dir == "unet" else "transformer"
    assert "base model folder fingerprint" in text and f"base {what} fingerprint" in text

    for te in fam.text_dirs[1:]:  # text_encoder_2 (and SD3's text_encoder_3)
        shutil.rmtree(copy)
        shutil.copytree(fam.base, copy)
        _bump(copy / te / "model.safetensors")
        text = _refusal(fam, copy, tmp_path)
        assert "base model folder fingerprint" in text
        assert f"text encoder fingerprint is not the pinned one (over all {len(fam.text_dirs)} text encoders)" in text
    shutil.rmtree(copy)
    shutil.copytree(fam.base, copy)
    tok = copy / "tokenizer_2" / "tokenizer_config.json"
    tok.write_text(json.dumps({**json.loads(tok.read_text()), "model_max_length": 7}))
    assert "base model folder fingerprint" in _refusal(fam, copy, tmp_path)


def test_base_changed_after_review_is_not_trained(fam, tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(fam.base, copy)
    plan = plan_job(_spec(fam, tmp_path, "job"), fam.policy_path, manifest=fam.mask_path, base=copy,
                    out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    _bump(copy / fam.text_dirs[-1] / "model.safetensors")
    with pytest.raises(JobError, match="the base model folder changed after review"):
        run_job(plan)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "jobs.jsonl").read_text().splitlines()[-1])["record"]["status"] == "failed"


# ------------------------------------------------------------------------- the command line
def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_flux_through_the_command_line(tmp_path, monkeypatch, capsys):
    """The README's first run, on the tiny Flux transformer."""
    monkeypatch.chdir(tmp_path)
    quiet = ["--set", "train.progress=false", "--set", "train.batch_size=4"]

    def ok(*args):
        rc, out, err = _cli(capsys, *args)
        assert rc == 0, f"{args[0]} failed ({rc}): {err[-2000:]}"
        return out

    ok("export-digits", "--out", "data", "--resolution", RES, "--classes", "1,7")
    ok("finetune", "--preset", "flux-tiny", "--data", "data", "--steps", 2, *quiet, "--out", "runs/base")
    base = Path("runs/base/final")
    assert (base / "transformer").is_dir() and (base / "text_encoder_2").is_dir()
    ok("learn-mask", "--base", base, "--data", "data", "--illegal", "seven", "--innocent", "one", "--budget", 0.3,
       "--bootstrap-steps", 2, "--steps", 6, "--set", "user.batch_size=4", "--set", "mask.every=3",
       "--set", "progress=false", "--out", "mask.json")
    out = ok("mask-report", "mask.json")
    assert "single_transformer_blocks.1" in out and "feedforward" in out and "modulation" in out
    ok("finetune", "--model", base, "--data", "data", "--set", "data.domains=[seven]", "--steps", 2, *quiet,
       "--set", "freeze.mode=engine", "--set", "freeze.manifest=mask.json", "--set", "train.mixed_precision=bf16",
       "--out", "runs/guarded")
    out = ok("verify", "--manifest", "mask.json", "--model", "runs/guarded/final")
    assert "frozen tensors are bit-identical" in out

    ok("learn-lock", "--base", base, "--data", "data", "--illegal", "seven", "--innocent", "one", "--budget", 0.3,
       "--rounds", 1, "--steps", 2, "--lr", 1e-3, "--batch-size", 4, "--set", "progress=false", "--out", "runs/lock")
    ok("keygen", "--out", "keys/publisher.key", "--public", "keys/publisher.pem")
    ok("keygen", "--out", "keys/service.key", "--public", "keys/service.pem")
    ok("sign", "--manifest", "mask.json", "--key", "keys/publisher.key")
    ok("sign", "--manifest", "runs/lock/manifest.json", "--key", "keys/publisher.key")
    ok("policy", "init", "--manifest", "mask.json", "--manifest", "runs/lock/manifest.json", "--key-file",
       "keys/publisher.pem", "--log-key", "keys/service.key", "--base", base, "--out", "policy.yaml",
       "--max-lr", 1e-3)
    Path("job.yaml").write_text(yaml.safe_dump({
        "name": "sevens", "data": {"path": "data", "domains": ["seven"]}, "method": "lora",
        "lora": {"rank": 4, "targets": ["to_q", "add_q_proj", "proj_mlp", "ff.net.2"]},
        "train": {"lr": 1e-4, "steps": 2, "batch_size": 4}}))
    out = ok("job", "submit", "job.yaml", "--policy", "policy.yaml", "--manifest", "runs/lock/manifest.json",
             "--base", base, "--out", "runs/jobs/sevens")
    assert "locked tensors within tolerance" in out
    delta, _ = load_delta("runs/jobs/sevens/delta.safetensors")
    assert any(".proj_mlp.lora_A" in n for n in delta) and any(".add_q_proj.lora_B" in n for n in delta)
    assert "chain intact" in ok("audit", "runs/jobs/jobs.jsonl", "--outputs", "--key", "keys/service.pem")
    assert "chain intact" in ok("audit", "runs/jobs/jobs.jsonl", "--outputs", "--policy", "policy.yaml")

    shutil.copytree(base, "tampered")
    _bump(Path("tampered/text_encoder_2/model.safetensors"))
    rc, _, err = _cli(capsys, "job", "submit", "job.yaml", "--policy", "policy.yaml", "--manifest",
                      "runs/lock/manifest.json", "--base", "tampered", "--out", "runs/jobs/tampered")
    assert rc == 2 and "refused" in err and "base model folder fingerprint" in err
    assert not Path("runs/jobs/tampered").exists()
