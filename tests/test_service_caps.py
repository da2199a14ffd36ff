"""Red team of the service's caps and pins: every field of a job spec typed, finite and bounded,
what scales the update counted against the lr cap, the whole model folder pinned, only the
manifests the policy lists, the key from the policy only. Each refusal names the problem and
leaves nothing behind."""
import json
import math
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_redteam import _refused, _snapshot
from test_service_run import publish

from freezeasguard.engine.errors import ConfigError, JobError, PolicyViolation
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.service.caps import adam_factor, update_scale
from freezeasguard.engine.service.joblog import read_entries
from freezeasguard.engine.service.plan import plan_job
from freezeasguard.engine.service.policy import Policy, spec_problems
from freezeasguard.engine.service.run import run_job, submit
from freezeasguard.engine.service.signing import load_key, sign_manifest
from freezeasguard.engine.service.spec import JobSpec


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    return publish(tmp_path_factory.mktemp("publisher"))


def _spec_text(pub, tmp_path, text: str, name="job.yaml"):
    """A job spec written as raw YAML (so .nan, .inf, strings and booleans reach the parser)."""
    path = tmp_path / name
    path.write_text(f"data: {{path: {json.dumps(str(pub.data))}}}\n" + text)
    return path


def _refused_any(pub, tmp_path, spec_path):
    """Refused at planning (PolicyViolation or ConfigError); nothing written."""
    before = _snapshot(pub.root, tmp_path)
    with pytest.raises((PolicyViolation, ConfigError)) as err:
        submit(spec_path, pub.policy_path, manifest=pub.manifest_path, base=pub.base,
               out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    assert _snapshot(pub.root, tmp_path) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.jsonl").exists()
    return str(err.value)


# ----------------------------------------------------------------------------------- class 1: caps
@pytest.mark.parametrize("text, named", [
    # settings that scale the update, each counted against max_lr (1e-3 in this policy)
    ("method: lora\nlora: {rank: 4, alpha: 64, targets: [to_q]}\ntrain: {lr: 1.0e-3}\n",
     "lora.alpha / lora.rank 16 = 0.016 exceeds the policy cap max_lr 0.001"),
    ("train: {lr: 1.0e-3, extra: {beta1: 0.0, beta2: 0.99999}}\n", "AdamW step bound of beta1 0, beta2 0.99999"),
    ("train: {lr: 5.0e-4, extra: {beta1: 0.0, beta2: 0.9999}}\n", "exceeds the policy cap max_lr 0.001"),
    # bounded by the policy or by the engine
    ("train: {extra: {weight_decay: 1000.0}}\n",
     "train.extra.weight_decay 1000 exceeds the policy cap max_weight_decay"),
    ("train: {extra: {min_lr_ratio: 50.0, lr_schedule: cosine}}\n", "train.extra.min_lr_ratio 50.0 is outside [0, 1]"),
    ("train: {steps: 3, extra: {warmup_steps: 1000000}}\n", "train.extra.warmup_steps 1000000 is outside [0, 3]"),
    ("train: {extra: {eps: 0.0}}\n", "train.extra.eps 0.0 is outside [1e-12, 1]"),
    ("train: {extra: {beta2: 1.0}}\n", "train.extra.beta2 1.0 is outside [0, 0.99999]"),
    ("train: {extra: {max_grad_norm: 1.0e+300}}\n", "train.extra.max_grad_norm must be null or in (0, 1e+06]"),
    ("train: {extra: {grad_accum: 3}, batch_size: 4}\n", "train.extra.grad_accum 3 does not divide train.batch_size 4"),
    ("train: {seed: -5}\n", "train.seed -5 is outside [0, 4.29497e+09]"),
    ("train: {steps: 100000000000000000000}\n", "train.steps 1e+20 exceeds the policy cap max_steps 50"),
    ("train: {batch_size: 0}\n", "train.batch_size 0 is outside [1, 8]"),
    ("train: {resolution: 100000}\n", "train.resolution 100000 exceeds the policy cap max_resolution 64"),
    ("method: lora\nlora: {rank: 0, targets: [to_q]}\n", "lora.rank 0 is outside [1, 64]"),
    ("method: lora\nlora: {rank: 4, dropout: 1.0, targets: [to_q]}\n", "lora.dropout 1.0 is outside [0, 0.999]"),
    ("train: {extra: {optimizer: sgd}}\n", "train.extra.optimizer must be one of ['adamw', 'adamw8bit']"),
    # how the service runs a job is the service's: memory options and compilation
    ("train: {extra: {compile: blocks}}\n", "train.extra sets ['compile'], which the service controls"),
    ("train: {extra: {update_in_backward: true}}\n",
     "train.extra sets ['update_in_backward'], which the service controls"),
    # compact moments change what a step can do: only those the policy lists
    ("train: {extra: {optimizer_states: 8bit}}\n",
     "train.extra.optimizer_states '8bit' is not allowed by the policy (allowed: ['fp32'])"),
    ("train: {extra: {optimizer_states: int4}}\n", "train.extra.optimizer_states must be one of"),
    (f"name: {'x' * 300}\n", "name is longer than 256 characters"),
])
def test_every_value_is_bounded_and_what_scales_the_update_counts(pub, tmp_path, text, named):
    assert named in _refused_any(pub, tmp_path, _spec_text(pub, tmp_path, text))


@pytest.mark.parametrize("text, named", [
    ("train: {lr: .nan}\n", "train.lr must be a finite number, got nan"),
    ("train: {lr: .inf}\n", "train.lr must be a finite number, got inf"),
    ("train: {lr: '1e-4'}\n", "train.lr must be a number, got '1e-4'"),
    ("train: {lr: true}\n", "train.lr must be a number, got True"),
    ("train: {steps: 2.5}\n", "train.steps must be an integer, got 2.5"),
    ("train: {steps: 'ten'}\n", "train.steps must be an integer, got 'ten'"),
    ("train: {extra: {weight_decay: -.inf}}\n", "train.extra.weight_decay must be a finite number, got -inf"),
    ("train: {extra: {warmup_steps: 2.0}}\n", "train.extra.warmup_steps must be an integer, got 2.0"),
    ("method: lora\nlora: {alpha: .nan, targets: [to_q]}\n", "lora.alpha must be a finite number, got nan"),
    ("method: lora\nlora: {targets: to_q}\n", "lora.targets must be a list of strings, got 'to_q'"),
    ("train_vae: 'no'\n", "train_vae must be true or false, got 'no'"),
    ("train: {extra: {mixed_precision: 16}}\n", "train.extra.mixed_precision must be a string, got 16"),
])
def test_non_finite_and_wrongly_typed_values_are_named(pub, tmp_path, text, named):
    assert named in _refused_any(pub, tmp_path, _spec_text(pub, tmp_path, text))


def test_adam_factor_is_one_at_the_defaults_and_bounds_the_step():
    assert adam_factor(0.9, 0.999) == 1.0 and adam_factor(0.5, 0.9) == 1.0
    assert math.isclose(adam_factor(0.0, 0.99999), (1 / math.sqrt(1e-5)) / (0.1 / math.sqrt(1e-3)))
    spec = JobSpec.from_dict({"data": {"path": "d"}, "method": "lora", "lora": {"rank": 8, "alpha": 4},
                              "train": {"lr": 1e-4}})
    assert math.isclose(update_scale(spec)[0], 5e-5)  # alpha below rank earns nothing extra either way


# A job spec generator: every field, with finite, huge, negative, non-finite and wrongly typed values.
_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                 st.sampled_from([0, 1, 1e-12, 1e-4, 1e-3, 0.5, 0.999, 1.0, 2**63]), st.booleans(),
                 st.text(max_size=5), st.none())
_small_int = st.one_of(st.integers(-3, 60), _num)
_spec = st.fixed_dictionaries({"data": st.just({"path": "DATA"})}, optional={
    "method": st.sampled_from(["full", "lora", "textual_inversion", 3]),
    "name": st.one_of(st.text(max_size=300), st.integers()),
    "lora": st.fixed_dictionaries({}, optional={"rank": _small_int, "alpha": _num, "dropout": _num,
                                                "targets": st.sampled_from([["to_q"], [], "to_q", [3]])}),
    "train": st.fixed_dictionaries({}, optional={
        "lr": _num, "steps": _small_int, "batch_size": _small_int, "seed": _small_int, "resolution": _small_int,
        "extra": st.fixed_dictionaries({}, optional={
            k: _num for k in ("weight_decay", "beta1", "beta2", "eps", "min_lr_ratio", "max_grad_norm",
                              "warmup_steps", "grad_accum")})}),
    "train_text_encoder": st.one_of(st.booleans(), _num),
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_spec)
def test_generated_specs_are_refused_by_name_or_within_every_cap(data):
    policy = Policy(base_fingerprint="0" * 64, model_fingerprint="0" * 64, manifests=["0" * 64],
                    log_key_file="k", signature={"key_file": "k"}, max_lr=1e-3, max_steps=50, max_batch_size=8,
                    max_resolution=64)
    try:
        spec = JobSpec.from_dict(data)
    except ConfigError as exc:
        assert str(exc).startswith("job spec: ")
        return
    problems = spec_problems(spec, policy)
    if problems:
        assert all(isinstance(p, str) and p for p in problems)
        return
    # Accepted: every cap holds, and the update scale is within max_lr.
    t = spec.train
    assert 0 < t.lr <= policy.max_lr and 1 <= t.steps <= 50 and 1 <= t.batch_size <= 8
    assert update_scale(spec)[0] <= policy.max_lr * (1 + 1e-9)
    for v in t.extra.values():
        assert v is None or (isinstance(v, (int, float)) and math.isfinite(v))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(lr=st.floats(1e-6, 1e-3), steps=st.integers(1, 2), beta1=st.floats(0.0, 0.99), wd=st.floats(0.0, 0.1))
def test_generated_accepted_specs_train_within_the_caps(pub, tmp_path_factory, lr, steps, beta1, wd):
    """What the policy accepts really trains: the trained config is the capped one, the proof holds."""
    tmp = tmp_path_factory.mktemp("gen")
    spec = {"data": {"path": str(pub.data)}, "train": {"lr": lr, "steps": steps, "batch_size": 4,
                                                      "extra": {"beta1": beta1, "weight_decay": wd}}}
    (tmp / "job.json").write_text(json.dumps(spec))
    try:
        plan = plan_job(tmp / "job.json", pub.policy_path, manifest=pub.manifest_path, base=pub.base,
                        out=tmp / "out", log_path=tmp / "jobs.jsonl")
    except PolicyViolation as exc:
        assert "update scale" in str(exc)  # only the counted scale can refuse these
        return
    result = run_job(plan)
    cfg = result.record["config"]["train"]
    assert cfg["lr"] == lr <= 1e-3 and cfg["steps"] == steps and cfg["beta1"] == beta1
    assert result.record["verify"]["ok"] and len(result.record["train"]["losses"]) == steps


# ----------------------------------------------------------------------------------- class 2: pins
def _copy_base(pub, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(pub.base, base)
    return base


@pytest.mark.parametrize("edit", ["unet_config", "scheduler", "tokenizer", "text_encoder_weights", "extra_file",
                                  "removed_file"])
def test_every_file_of_the_model_folder_is_pinned(pub, tmp_path, edit):
    base = _copy_base(pub, tmp_path)
    if edit == "unet_config":  # same tensors, different model (a config the UNet fingerprint cannot see)
        cfg = json.loads((base / "unet" / "config.json").read_text())
        cfg["norm_eps"] = cfg.get("norm_eps", 1e-5) * 10
        (base / "unet" / "config.json").write_text(json.dumps(cfg))
    elif edit == "scheduler":
        f = next((base / "scheduler").glob("*.json"))
        cfg = json.loads(f.read_text())
        cfg["num_train_timesteps"] = 500
        f.write_text(json.dumps(cfg))
    elif edit == "tokenizer":
        f = sorted(p for p in (base / "tokenizer").iterdir() if p.is_file())[0]
        f.write_bytes(f.read_bytes() + b"\n")
    elif edit == "text_encoder_weights":
        f = next((base / "text_encoder").glob("*.safetensors"))
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 1
        f.write_bytes(bytes(raw))
    elif edit == "extra_file":
        (base / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")
    else:
        (base / "scheduler" / "scheduler_config.json").unlink()
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml"), base=base) if edit != "removed_file" else \
        "\n".join(_expect_violation(pub, tmp_path, base))
    assert "base model folder" in text or (edit == "removed_file" and "no scheduler_config.json" in text)


def _expect_violation(pub, tmp_path, base):
    with pytest.raises(PolicyViolation) as err:
        submit(pub.spec(tmp_path / "job.yaml"), pub.policy_path, manifest=pub.manifest_path, base=base,
               out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.jsonl").exists()
    return err.value.violations


def test_a_signed_manifest_the_policy_does_not_list_is_refused(pub, tmp_path):
    # The publisher once signed a manifest that freezes nothing: a job must not run under it.
    key = load_key(pub.root / "keys" / "publisher.key")
    unet = {n: t for n, t in pub.base_state.items()}
    empty = sign_manifest(Manifest.build(unet, FreezeMask.from_patterns(unet, []), provenance={"method": "none"}),
                          key)
    empty.save(tmp_path / "empty.json")
    text = _refused(pub, tmp_path, pub.spec(tmp_path / "job.yaml"), manifest=tmp_path / "empty.json")
    assert "is not one the policy accepts (policy manifests)" in text
    # Listed, it is still held to the minimum guarded share.
    policy = pub.write_policy(tmp_path / "p.yaml", manifests=[empty.digest()], min_guard_share=0.1)
    with pytest.raises(PolicyViolation, match="guards 0.0% of the UNet's parameters, under the policy's "
                                              "min_guard_share 10.0%"):
        plan_job(pub.spec(tmp_path / "job.yaml"), policy, manifest=tmp_path / "empty.json", base=pub.base,
                 out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")


def test_the_verification_key_comes_only_from_the_policy(pub, tmp_path):
    with pytest.raises(TypeError):
        plan_job(pub.spec(tmp_path / "job.yaml"), pub.policy_path, manifest=pub.manifest_path, base=pub.base,
                 out=tmp_path / "out", key_file=pub.root / "keys" / "publisher.key")
    from freezeasguard.engine.cli.main import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["job", "submit", str(pub.spec(tmp_path / "job.yaml")), "--policy", str(pub.policy_path),
                  "--manifest", str(pub.manifest_path), "--base", str(pub.base), "--key-file", "x"])
    # A policy without a log key, or with only a public one, cannot run jobs.
    doc = yaml.safe_load(pub.policy_path.read_text())
    del doc["log_key_file"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="log_key_file must name the service's log signing key"):
        Policy.load(tmp_path / "p.yaml")


def test_the_model_folder_is_checked_again_right_before_training(pub, tmp_path):
    base = _copy_base(pub, tmp_path)
    policy = pub.write_policy(tmp_path / "p.yaml")
    plan = plan_job(pub.spec(tmp_path / "job.yaml", train={"steps": 1}), policy, manifest=pub.manifest_path,
                    base=base, out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    f = next((base / "scheduler").glob("*.json"))
    f.write_text(f.read_text() + " ")  # swapped after review
    with pytest.raises(JobError, match="the base model folder changed after review"):
        run_job(plan)
    assert not (tmp_path / "out").exists()
    statuses = [e["record"]["status"] for _, e in read_entries(tmp_path / "jobs.jsonl")]
    assert statuses == ["started", "failed"]


def test_a_data_root_confines_every_job_to_it(pub, tmp_path):
    root = tmp_path / "datasets"
    shutil.copytree(pub.data, root / "digits")
    (root / "escape").symlink_to(pub.data)  # inside by name, outside in fact
    policy = pub.write_policy(tmp_path / "p.yaml", data_root=str(root))
    said = []
    for path in (str(pub.data), str(root / "escape"), str(root / "digits" / ".." / ".." / "nowhere"), "/etc"):
        with pytest.raises(PolicyViolation) as err:
            plan_job(pub.spec(tmp_path / "job.yaml", data={"path": path}), policy, manifest=pub.manifest_path,
                     base=pub.base, out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
        said.append([v for v in err.value.violations if v.startswith("dataset:")])
    assert all(s == [f"dataset: data.path is outside the service's data root {str(root)!r}"] for s in said), said
    plan = plan_job(pub.spec(tmp_path / "job.yaml", data={"path": str(root / "digits")}), policy,
                    manifest=pub.manifest_path, base=pub.base, out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    assert len(plan.dataset) == 8
