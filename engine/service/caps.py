"""Every value of a job spec typed, finite and bounded; every setting that scales the update
counted against the learning-rate cap.

A cap on ``train.lr`` alone is no cap: the size of what a user can learn per step also depends on
the adapter's scaling and on the optimizer's moments. The *update scale* of a job is

    train.lr  x  (lora.alpha / lora.rank, for LoRA)  x  (AdamW step bound of the betas / of the defaults)

The last factor compares the bound on one AdamW step of a coordinate, ``lr max(1, (1 - beta1) /
sqrt(1 - beta2))`` (Kingma & Ba, section 2.1), with its value at the engine's default betas (0.9,
0.999), for which ``max_lr`` is stated: betas whose worst step is larger count as that much more
learning rate (1 for the defaults; up to 100x at beta1 = 0, beta2 = 0.99999). The update scale must
not exceed the policy's ``max_lr``. Warm-up, cosine decay, clipping and a larger ``eps`` only shrink
steps; weight decay is bounded by the policy separately.

``raw_type_problems`` checks the spec *as written*: a number where a number belongs (not a string
or a boolean), a list of strings where one belongs, so ``"1e-4"`` or ``true`` never slips through the
config parser's coercions; ``value_problems`` checks the parsed spec against the policy and the
engine's sane limits. Both return named problems; nothing raises.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from freezeasguard.engine.config import TrainConfig
from freezeasguard.kernels.choices import STATE_KINDS

# Engine limits: not the publisher's choice, only what keeps a job sane and its record readable.
MAX_SEED = 2**32 - 1
MAX_TEXT = 256  # a name, a caption column, a domain, a LoRA target pattern
MAX_LIST = 256  # entries of domains / lora.targets
EPS_RANGE = (1e-12, 1.0)
MAX_GRAD_NORM = 1e6
BETA_MAX = 0.99999
CHOICES = {"lr_schedule": ("constant", "cosine"), "mixed_precision": ("fp32", "bf16"),
           "optimizer": ("adamw", "adamw8bit"), "optimizer_states": STATE_KINDS}


def _kind(tp: Any) -> str | None:
    """'int' / 'float' / 'bool' / 'str' / 'strs' for a field's annotation (None: anything else)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            return None
        tp = args[0]
    if typing.get_origin(tp) in (list, tuple):
        return "strs"
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(tp)


def _type_problem(value: Any, kind: str, where: str) -> str | None:
    if value is None:
        return None  # Optional fields; a None where None is not allowed fails the value checks
    if kind == "bool":
        return None if isinstance(value, bool) else f"{where} must be true or false, got {value!r}"
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{where} must be an integer, got {value!r}"
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{where} must be a number, got {value!r}"
        return None if math.isfinite(value) else f"{where} must be a finite number, got {value!r}"
    if kind == "str":
        if not isinstance(value, str):
            return f"{where} must be a string, got {value!r}"
        return None if len(value) <= 4096 and "\x00" not in value else f"{where} is not a usable string"
    if kind == "strs":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"{where} must be a list of strings, got {value!r}"
    return None


def raw_type_problems(cls: type, data: Any, where: str = "") -> list[str]:
    """Type problems of the raw mapping ``data`` for dataclass ``cls`` (unknown keys are left to
    the strict parser, which names the closest key)."""
    if not isinstance(data, dict):
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        full = f"{where}.{f.name}" if where else f.name
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            out += raw_type_problems(inner[0], data[f.name], full)
        elif f.name == "extra" and isinstance(data[f.name], dict):
            out += raw_type_problems(TrainConfig, data[f.name], f"{full}")
        elif (kind := _kind(tp)) is not None and (p := _type_problem(data[f.name], kind, full)):
            out.append(p)
    return out


def _within(out: list[str], where: str, value: Any, lo: float, hi: float, cap: str = "") -> None:
    """``lo <= value <= hi``, else a named problem (``cap``: the policy field ``hi`` comes from)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        out.append(f"{where} must be a number, got {value!r}")
    elif cap and math.isfinite(value) and value > hi:
        out.append(f"{where} {value:g} exceeds the policy cap {cap} {hi:g}")
    elif not (math.isfinite(value) and lo <= value <= hi):
        out.append(f"{where} {value!r} is outside [{lo:g}, {hi:g}]")


def _adam_bound(beta1: float, beta2: float) -> float:
    return max(1.0, (1.0 - beta1) / math.sqrt(1.0 - beta2))


def adam_factor(beta1: float, beta2: float) -> float:
    """How much larger one AdamW step can be with these betas than with the engine's defaults
    (0.9, 0.999), for which the policy's max_lr is stated; never below 1."""
    return max(1.0, _adam_bound(beta1, beta2) / _adam_bound(TrainConfig.beta1, TrainConfig.beta2))


def update_scale(spec: Any) -> tuple[float, list[str]]:
    """The job's update scale (see the module docstring) and the factors it is made of."""
    t = spec.train
    beta1 = float(t.extra.get("beta1", TrainConfig.beta1))
    beta2 = float(t.extra.get("beta2", TrainConfig.beta2))
    scale, parts = float(t.lr), [f"train.lr {t.lr:g}"]
    if spec.method == "lora":
        lo = spec.lora_settings
        s = lo.alpha / lo.rank
        scale *= s
        parts.append(f"lora.alpha / lora.rank {s:g}")
    a = adam_factor(beta1, beta2)
    if a != 1.0:
        scale *= a
        parts.append(f"AdamW step bound of beta1 {beta1:g}, beta2 {beta2:g} vs the defaults {a:g}")
    return scale, parts


def value_problems(spec: Any, policy: Any) -> list[str]:
    """Every numeric and text field of a parsed job spec against the policy and the engine limits."""
    out: list[str] = []
    t = spec.train
    _within(out, "train.lr", t.lr, 0.0, policy.max_lr, "max_lr")
    if t.lr == 0:
        out.append("train.lr must be > 0")
    _within(out, "train.steps", t.steps, 1, policy.max_steps, "max_steps")
    _within(out, "train.batch_size", t.batch_size, 1, policy.max_batch_size, "max_batch_size")
    if t.resolution is not None:
        _within(out, "train.resolution", t.resolution, 1, policy.max_resolution, "max_resolution")
    _within(out, "train.seed", t.seed, 0, MAX_SEED)
    for where, text in (("name", spec.name), ("data.caption_column", spec.data.caption_column)):
        if text is not None and len(text) > MAX_TEXT:
            out.append(f"{where} is longer than {MAX_TEXT} characters")
    for where, items in (("data.domains", spec.data.domains),
                         ("lora.targets", spec.lora.targets if spec.lora is not None else None)):
        if items is not None and (len(items) > MAX_LIST or any(len(x) > MAX_TEXT or not x for x in items)):
            out.append(f"{where} must hold at most {MAX_LIST} non-empty names of at most {MAX_TEXT} characters")
    if spec.lora is not None:
        lo = spec.lora
        _within(out, "lora.rank", lo.rank, 1, policy.max_lora_rank, "max_lora_rank")
        _within(out, "lora.alpha", lo.alpha, 1e-6, 1e6)
        _within(out, "lora.dropout", lo.dropout, 0.0, 0.999)
    out += _extra_value_problems(t, policy)
    # Every factor a usable number and lr itself within the cap: count the ones that scale the update.
    if _scale_inputs_ok(spec) and spec.train.lr <= policy.max_lr:
        scale, parts = update_scale(spec)
        if scale > policy.max_lr * (1 + 1e-9):
            out.append(f"the update scale {' x '.join(parts)} = {scale:g} exceeds the policy cap max_lr "
                       f"{policy.max_lr:g} (every setting that scales the update counts against it)")
    return out


def _scale_inputs_ok(spec: Any) -> bool:
    def num(v: Any, lo: float, hi: float) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi

    t = spec.train
    ok = num(t.lr, 0.0, math.inf) and all(num(t.extra[k], 0.0, BETA_MAX) for k in ("beta1", "beta2") if k in t.extra)
    if spec.method == "lora":
        lo = spec.lora_settings
        ok = ok and num(lo.rank, 1, math.inf) and num(lo.alpha, 0.0, math.inf)
    return ok


def _extra_value_problems(t: Any, policy: Any) -> list[str]:
    out: list[str] = []
    e = t.extra
    for key, choices in CHOICES.items():
        if key in e and e[key] not in choices:
            out.append(f"train.extra.{key} must be one of {list(choices)}, got {e[key]!r}")
    if "grad_accum" in e:
        _within(out, "train.extra.grad_accum", e["grad_accum"], 1, max(1, t.batch_size))
        if isinstance(e["grad_accum"], int) and e["grad_accum"] >= 1 and t.batch_size % e["grad_accum"]:
            out.append(f"train.extra.grad_accum {e['grad_accum']} does not divide train.batch_size {t.batch_size}")
    if "warmup_steps" in e:
        _within(out, "train.extra.warmup_steps", e["warmup_steps"], 0, t.steps)
    if "min_lr_ratio" in e:
        _within(out, "train.extra.min_lr_ratio", e["min_lr_ratio"], 0.0, 1.0)
    if "weight_decay" in e:
        _within(out, "train.extra.weight_decay", e["weight_decay"], 0.0, policy.max_weight_decay,
                "max_weight_decay")
    for key in ("beta1", "beta2"):
        if key in e:
            _within(out, f"train.extra.{key}", e[key], 0.0, BETA_MAX)
    if "eps" in e:
        _within(out, "train.extra.eps", e["eps"], *EPS_RANGE)
    if e.get("max_grad_norm") is not None:
        v = e["max_grad_norm"]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= MAX_GRAD_NORM):
            out.append(f"train.extra.max_grad_norm must be null or in (0, {MAX_GRAD_NORM:g}], got {v!r}")
    return out
