"""Attacks on ``merge_delta``: deltas an adversarial user crafts by hand (having read the source) to
get a malformed adapter, a non-finite value or a delta without provenance past the merge. Each is
refused with one ``MergeError`` naming exactly what is wrong (never a traceback), and leaves the base
as it was; a genuine delta from a real guarded job still merges and equals the trained model.

Deltas are built by hand from the tiny base UNet's state dict under a real manifest (test_jobs'
mask); only the last tests run a (one-step) guarded job.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from test_service_run import FROZEN, FROZEN_ATTN, LORA_TARGETS, publish

from freezeasguard.engine.errors import MergeError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import random_lock
from freezeasguard.engine.io import save_safetensors_atomic
from freezeasguard.engine.model.components import build_components, load_components
from freezeasguard.engine.service.adapters import MAX_RANK
from freezeasguard.engine.service.delta import DELTA_FORMAT, PROVENANCE, load_delta, lora_delta, merge_delta
from freezeasguard.engine.service.plan import plan_job
from freezeasguard.engine.service.policy import Policy
from freezeasguard.engine.service.run import DELTA_FILE, run_job

LIN = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"  # Linear [32, 128] (trainable)
CONV = "up_blocks.1.resnets.0.conv1"  # Conv2d [32, 96, 3, 3] (trainable)
NORM = "up_blocks.1.resnets.0.norm1"  # GroupNorm: weight and bias are 1-D [96]
FULL = f"{CONV}.weight"
FLOATS = "float16, bfloat16, float32, float64"


@pytest.fixture(scope="module")
def w():
    """The tiny base UNet's state, test_jobs' mask over it and the manifest."""
    unet = build_components("tiny", seed=0).unet
    state = {n: p.detach().clone() for n, p in unet.named_parameters()}
    mask = FreezeMask.from_patterns(unet, FROZEN)
    return SimpleNamespace(unet=unet, state=state, mask=mask, frozen=set(mask.frozen),
                           manifest=Manifest.build(state, mask, provenance={"method": "patterns"}))


def _meta(w, method="full", manifest=None, **extra):
    """A genuine delta's metadata (as run_job writes it); ``key=None`` drops a key."""
    man = manifest or w.manifest
    meta = {"format": DELTA_FORMAT, "job_id": "20250101T000000Z-abc123", "method": method, "steps": "3",
            "base_fingerprint": man.base_fingerprint, "manifest_digest": man.digest()}
    if method == "lora":
        meta.update(lora_rank="2", lora_alpha="4.0")
    meta.update(extra)
    return {k: v for k, v in meta.items() if v is not None}


def _pair(w, m, r=2, seed=0, dtype=torch.float32):
    """A LoRA pair of rank ``r`` fitting module ``m``'s weight (A [r, in, *k], B [out, r, *1])."""
    W = w.state[f"{m}.weight"]
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, *W.shape[1:], generator=g) * 0.1
    b = torch.randn(W.shape[0], r, *(1,) * (W.dim() - 2), generator=g) * 0.1
    return {f"{m}.lora_A.weight": a.to(dtype), f"{m}.lora_B.weight": b.to(dtype)}


def _shown(x) -> str:
    """How a refusal quotes a value: its repr, cut to 80 characters."""
    r = repr(x)
    return r if len(r) <= 80 else f"{r[:65]}...' ({len(r)} chars)"


def _refused(w, delta, meta, **kw) -> list[str]:
    before = {n: t.clone() for n, t in w.state.items()}
    with pytest.raises(MergeError) as err:
        merge_delta(w.state, delta, kw.pop("manifest", w.manifest), meta, **kw)
    assert all(torch.equal(w.state[n], before[n]) for n in before)  # the base is untouched
    assert str(err.value).startswith(f"delta refused ({len(err.value.problems)} problem(s)):")
    return err.value.problems


# ------------------------------------------------------------------------------- genuine deltas merge
def test_hand_built_genuine_deltas_merge(w):
    full = {FULL: w.state[FULL] + 0.01, f"{CONV}.bias": w.state[f"{CONV}.bias"] - 0.01}
    merged = merge_delta(w.state, full, w.manifest, _meta(w))
    assert all(torch.equal(merged[n], full[n]) for n in full)
    assert all(merged[n] is w.state[n] for n in w.state if n not in full)

    delta = {**_pair(w, LIN), **_pair(w, CONV, seed=1), **_pair(w, f"{NORM[:-6]}.conv_shortcut", seed=2)}
    merged = merge_delta(w.state, delta, w.manifest, _meta(w, "lora"), max_rank=2)
    for m in (LIN, CONV, f"{NORM[:-6]}.conv_shortcut"):
        a, b = delta[f"{m}.lora_A.weight"].double(), delta[f"{m}.lora_B.weight"].double()
        want = w.state[f"{m}.weight"].double() + 2.0 * torch.einsum("or,ri...->oi...", b.flatten(1), a)
        torch.testing.assert_close(merged[f"{m}.weight"].double(), want, rtol=0, atol=1e-6)
    assert sum(not torch.equal(merged[n], w.state[n]) for n in w.state) == 3


# ------------------------------------------------------------------------------- provenance
@pytest.mark.parametrize("missing", PROVENANCE)
def test_a_delta_without_provenance_is_refused(w, missing):
    meta = _meta(w, **{missing: None})
    assert _refused(w, {FULL: w.state[FULL] + 0.01}, meta) == [
        f"the delta has no provenance: metadata {[missing]} missing (only a guarded job's delta is merged)"]


def test_a_delta_with_no_metadata_at_all_is_refused(w):
    delta = {FULL: w.state[FULL] + 0.01}
    assert _refused(w, delta, None) == [
        "the delta has no metadata: without its provenance (format, job_id, method, base_fingerprint, "
        "manifest_digest) it is not merged"]
    assert _refused(w, delta, {}) == [f"the delta has no provenance: metadata {list(PROVENANCE)} missing "
                                      "(only a guarded job's delta is merged)"]
    assert _refused(w, delta, [("method", "full")]) == ["the delta's metadata is a list, not a mapping of strings"]


@pytest.mark.parametrize("key, value, problem", [
    ("format", "freezeasguard.delta/2", "metadata format 'freezeasguard.delta/2' is not 'freezeasguard.delta/1'"),
    ("format", "", "metadata format '' is not 'freezeasguard.delta/1'"),
    ("method", "FULL", "unknown delta method 'FULL' (a delta is 'full' or 'lora')"),
    ("method", "diff", "unknown delta method 'diff' (a delta is 'full' or 'lora')"),
    ("method", "", "unknown delta method '' (a delta is 'full' or 'lora')"),
    ("job_id", "", "metadata job_id '' is not a job id (1-256 printable characters)"),
    ("job_id", "a\nb", "metadata job_id 'a\\nb' is not a job id (1-256 printable characters)"),
    ("job_id", " j", "metadata job_id ' j' is not a job id (1-256 printable characters)"),
    ("manifest_digest", "0" * 64, "the delta was trained under a different manifest"),
    ("manifest_digest", "ABC", "metadata manifest_digest 'ABC' is not a 64-digit lowercase hex digest"),
    ("manifest_digest", "", "metadata manifest_digest '' is not a 64-digit lowercase hex digest"),
    ("base_fingerprint", "f" * 64, "the delta was trained from a different base model"),
    ("base_fingerprint", "F" * 64, f"metadata base_fingerprint {'F' * 64!r} is not a 64-digit lowercase hex digest"),
    ("steps", "-1", "metadata steps '-1' is not a whole number of steps (plain digits)"),
    ("steps", "3.0", "metadata steps '3.0' is not a whole number of steps (plain digits)"),
])
def test_provenance_values_that_do_not_check_out_are_refused(w, key, value, problem):
    assert _refused(w, {FULL: w.state[FULL] + 0.01}, _meta(w, **{key: value})) == [problem]


def test_metadata_that_is_not_strings_is_refused(w):
    delta = {FULL: w.state[FULL] + 0.01}
    assert _refused(w, delta, _meta(w, job_id=7)) == ["metadata 'job_id': str -> int (metadata is strings only)"]
    assert _refused(w, delta, {**_meta(w), 3: "x"}) == ["metadata 3: int -> str (metadata is strings only)"]
    problems = _refused(w, _pair(w, LIN), _meta(w, "lora", lora_rank=2))
    assert problems == ["metadata 'lora_rank': str -> int (metadata is strings only)",
                        "LoRA delta without lora_rank metadata"]
    # the digests are compared as strings: a digest-like object that "equals" anything is not one
    anything = type("Any", (), {"__eq__": lambda *_: True, "__hash__": lambda _: 0})()
    assert _refused(w, delta, _meta(w, manifest_digest=anything)) == [
        "metadata 'manifest_digest': str -> Any (metadata is strings only)"]


# ------------------------------------------------------------------------------- rank and alpha
@pytest.mark.parametrize("rank", ["4.0", "-4", "+2", "0x10", " 2", "2 ", "2\n", "2_0", "\u0662", "", "two", "1e1",
                                  "9" * 101])
def test_unparseable_lora_rank_is_refused(w, rank):
    assert _refused(w, _pair(w, LIN), _meta(w, "lora", lora_rank=rank)) == [
        f"metadata lora_rank {_shown(rank)} is not a whole number (plain ASCII digits)"]


@pytest.mark.parametrize("rank, problem", [
    ("0", "metadata lora_rank '0': rank zero (an adapter has rank >= 1)"),
    ("000", "metadata lora_rank '000': rank zero (an adapter has rank >= 1)"),
    (None, "LoRA delta without lora_rank metadata"),
    ("1025", f"metadata lora_rank '1025' is above the cap of {MAX_RANK} (max_rank)"),
    ("9" * 100, f"metadata lora_rank {_shown('9' * 100)} is above the cap of {MAX_RANK} (max_rank)"),
])
def test_rank_zero_missing_or_above_the_cap_is_refused(w, rank, problem):
    assert _refused(w, _pair(w, LIN), _meta(w, "lora", lora_rank=rank)) == [problem]


def test_the_callers_rank_cap_is_applied(w):
    assert _refused(w, _pair(w, LIN, r=4), _meta(w, "lora", lora_rank="4"), max_rank=3) == [
        "metadata lora_rank '4' is above the cap of 3 (max_rank)",
        f"module {LIN!r}: adapter rank 4 is above the cap of 3 (max_rank)"]
    # the tensors' own rank is capped too, whatever the metadata claims
    assert _refused(w, _pair(w, LIN, r=4), _meta(w, "lora", lora_rank="2"), max_rank=3) == [
        f"module {LIN!r}: adapter rank 4 is above the cap of 3 (max_rank)"]
    merge_delta(w.state, _pair(w, LIN, r=3), w.manifest, _meta(w, "lora", lora_rank="3"), max_rank=3)


@pytest.mark.parametrize("max_steps, max_rank", [(-1, 4), (1.5, 4), (True, 4), (10, 0), (10, "4"), (10, None)])
def test_bad_caps_from_the_caller_are_refused(w, max_steps, max_rank):
    assert _refused(w, _pair(w, LIN), _meta(w, "lora"), max_steps=max_steps, max_rank=max_rank) == [
        f"max_steps must be a whole number >= 0 and max_rank one >= 1, got {max_steps!r} and {max_rank!r}"]


@pytest.mark.parametrize("alpha", ["nan", "NaN", "inf", "-inf", "infinity", "-1", "-0.5", "0", "0.0", "1e999",
                                   "1e-400", "0x10", "", " 4", "4_0", "4,0", "\u0664", "1e1000", None])
def test_non_finite_or_non_positive_alpha_is_refused(w, alpha):
    problem = ("LoRA delta without lora_alpha metadata" if alpha is None
               else f"metadata lora_alpha {alpha!r} is not a positive finite number")
    assert _refused(w, _pair(w, LIN), _meta(w, "lora", lora_alpha=alpha)) == [problem]


@pytest.mark.parametrize("alpha", ["4", "4.", ".5", "1e-05", "2.5E+1"])
def test_plain_decimal_alphas_are_read(w, alpha):
    merged = merge_delta(w.state, _pair(w, LIN), w.manifest, _meta(w, "lora", lora_alpha=alpha))
    d = merged[f"{LIN}.weight"].double() - w.state[f"{LIN}.weight"].double()
    ba = lora_delta(*_pair(w, LIN).values(), 1.0).double()
    torch.testing.assert_close(d, ba * float(alpha) / 2, rtol=1e-4, atol=1e-6)


def test_a_scaling_that_overflows_the_merged_weight_is_refused(w):
    delta = {n: t * 1e15 for n, t in _pair(w, LIN).items()}  # finite, B A ~ 1e28 in fp32
    assert _refused(w, delta, _meta(w, "lora", lora_alpha="1e300")) == [
        f"module {LIN!r}: the merged weight is not finite (the adapter times 5e+299 overflows float32)"]


# ------------------------------------------------------------------------------- adapter shapes
@pytest.mark.parametrize("m", [NORM, CONV, "up_blocks.1.attentions.0.norm"], ids=["norm", "conv-bias", "attn-norm"])
def test_an_adapter_on_a_1d_weight_is_refused(w, m):
    if m == CONV:  # a bias as the "module": <conv>.bias.lora_A.weight -> <conv>.bias.weight, no such tensor
        delta = {f"{m}.bias.lora_A.weight": torch.ones(2, 1), f"{m}.bias.lora_B.weight": torch.ones(32, 2)}
        assert _refused(w, delta, _meta(w, "lora")) == [f"module '{m}.bias' is not a module of the base model"]
        return
    n = w.state[f"{m}.weight"].shape[0]
    for a, b in [(torch.ones(2, 1), torch.ones(n, 2)), (torch.ones(2), torch.ones(n, 2)),
                 (torch.ones(2, n), torch.ones(1, 2))]:
        delta = {f"{m}.lora_A.weight": a, f"{m}.lora_B.weight": b}
        assert _refused(w, delta, _meta(w, "lora")) == [
            f"module {m!r}: its weight is a 1-D float32 tensor [{n}]; adapters go on Linear (2-D) or "
            "Conv2d (4-D) float weights only"]


def _shape_msg(m, a, b, W):
    form = "A [r, in, kh, kw], B [out, r, 1, 1]" if len(W) == 4 else "A [r, in], B [out, r]"
    return f"module {m!r}: adapter shapes A {a}, B {b} do not fit the weight {W} (needs {form})"


@pytest.mark.parametrize("m, a, b", [
    (LIN, [2, 32], [32, 2]),  # transposed: A [r, out], B [in, r]
    (LIN, [2, 128], [128, 2]),
    (LIN, [2, 128, 1], [32, 2]),
    (LIN, [2, 128], [32, 2, 1]),
    (LIN, [], [32, 2]),  # 0-dim A
    (LIN, [2, 128], []),  # 0-dim B
    (LIN, [], []),
    (LIN, [2, 128, 1, 1], [32, 2, 1, 1]),  # conv-shaped pair on a Linear
    (CONV, [2, 96, 1, 1], [32, 2, 1, 1]),  # A kernel 1x1 on a 3x3 conv
    (CONV, [2, 96, 3, 1], [32, 2, 1, 1]),
    (CONV, [2, 96, 3, 3], [32, 2, 3, 3]),  # B with a kernel: its flatten would change the rank
    (CONV, [2, 96 * 9], [32, 2]),  # a flattened Linear-style pair on a conv
    (CONV, [2, 96, 3, 3], [32, 2]),
    (CONV, [2, 32, 3, 3], [96, 2, 1, 1]),
])
def test_adapter_shapes_that_do_not_fit_the_weight_are_refused(w, m, a, b):
    delta = {f"{m}.lora_A.weight": torch.ones(a) * 0.01, f"{m}.lora_B.weight": torch.ones(b) * 0.01}
    assert _refused(w, delta, _meta(w, "lora")) == [_shape_msg(m, a, b, list(w.state[f"{m}.weight"].shape))]


@pytest.mark.parametrize("a, b, meta_rank, problem", [
    ([3, 128], [32, 3], "2", "adapter rank 3 (A [3, 128], B [32, 3]) disagrees with metadata lora_rank 2"),
    ([1, 128], [32, 1], "2", "adapter rank 1 (A [1, 128], B [32, 1]) disagrees with metadata lora_rank 2"),
    ([2, 128], [32, 3], "2", None),  # A and B disagree with each other
    ([3, 128], [32, 2], "3", None),
    ([0, 128], [32, 0], "2", "rank-zero adapter (A [0, 128], B [32, 0])"),
    ([0, 128], [32, 0], "1", "rank-zero adapter (A [0, 128], B [32, 0])"),
])
def test_adapter_rank_must_match_the_metadata_and_itself(w, a, b, meta_rank, problem):
    delta = {f"{LIN}.lora_A.weight": torch.ones(a) * 0.01, f"{LIN}.lora_B.weight": torch.ones(b) * 0.01}
    want = _shape_msg(LIN, a, b, [32, 128]) if problem is None else f"module {LIN!r}: {problem}"
    assert _refused(w, delta, _meta(w, "lora", lora_rank=meta_rank)) == [want]


def test_every_module_of_a_delta_is_checked_against_one_rank(w):
    delta = {**_pair(w, LIN, r=2), **_pair(w, CONV, r=3)}
    assert _refused(w, delta, _meta(w, "lora")) == [
        f"module {CONV!r}: adapter rank 3 (A [3, 96, 3, 3], B [32, 3, 1, 1]) disagrees with metadata lora_rank 2"]


# ------------------------------------------------------------------------------- dtypes and values
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_floating_adapters_and_tensors_are_refused(w, dtype):
    name = str(dtype).removeprefix("torch.")
    pair = {n: (t * 10).to(dtype) for n, t in _pair(w, LIN).items()}
    assert _refused(w, pair, _meta(w, "lora")) == [
        f"'{LIN}.lora_A.weight': dtype {name} is not a floating-point dtype ({FLOATS})",
        f"'{LIN}.lora_B.weight': dtype {name} is not a floating-point dtype ({FLOATS})"]
    assert _refused(w, {FULL: w.state[FULL].to(dtype)}, _meta(w)) == [
        f"{FULL!r}: dtype {name} is not a floating-point dtype ({FLOATS})"]


@pytest.mark.parametrize("da, db", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float64, torch.float32)])
def test_an_adapter_pair_of_two_dtypes_is_refused(w, da, db):
    a, b = _pair(w, LIN).values()
    delta = {f"{LIN}.lora_A.weight": a.to(da), f"{LIN}.lora_B.weight": b.to(db)}
    assert _refused(w, delta, _meta(w, "lora")) == [
        f"module {LIN!r}: lora_A is {str(da)[6:]}, lora_B {str(db)[6:]} (the pair must share one dtype)"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["full", "lora_A", "lora_B", "full-frozen"])
def test_non_finite_values_in_any_delta_tensor_are_refused(w, bad, where):
    if where.startswith("full"):
        n = f"{FROZEN_ATTN}.to_q.weight" if where == "full-frozen" else FULL
        t = w.state[n].clone()
        t.view(-1)[7] = bad
        assert _refused(w, {n: t}, _meta(w)) == [f"{n!r} holds non-finite values (nan or inf)"]
    else:
        delta = _pair(w, CONV)
        delta[f"{CONV}.{where}.weight"].view(-1)[3] = bad
        assert _refused(w, delta, _meta(w, "lora")) == [f"'{CONV}.{where}.weight' holds non-finite values (nan or inf)"]


def test_tensors_that_are_not_dense_tensors_with_data_are_refused(w):
    t = w.state[FULL]
    assert _refused(w, {FULL: t.numpy()}, _meta(w)) == [f"{FULL!r} is a ndarray, not a tensor"]
    assert _refused(w, {FULL: t.tolist()}, _meta(w)) == [f"{FULL!r} is a list, not a tensor"]
    assert _refused(w, {FULL: torch.empty_like(t, device="meta")}, _meta(w)) == [
        f"{FULL!r}: a torch.strided tensor on meta (a delta tensor is dense and holds data)"]
    sparse = w.state[f"{LIN}.weight"].to_sparse()
    assert _refused(w, {f"{LIN}.weight": sparse}, _meta(w)) == [
        f"'{LIN}.weight': a torch.sparse_coo tensor on cpu (a delta tensor is dense and holds data)"]
    a, b = _pair(w, LIN).values()
    assert _refused(w, {f"{LIN}.lora_A.weight": a.to_sparse(), f"{LIN}.lora_B.weight": b}, _meta(w, "lora")) == [
        f"'{LIN}.lora_A.weight': a torch.sparse_coo tensor on cpu (a delta tensor is dense and holds data)"]


def test_full_tensors_of_another_shape_or_dtype_are_refused(w):
    t = w.state[FULL]
    for bad in (torch.tensor(0.5), t.double(), t.half(), t.flatten(), t[:1]):
        assert _refused(w, {FULL: bad}, _meta(w)) == [
            f"{FULL!r}: {bad.dtype} {list(bad.shape)} in the delta, {t.dtype} {list(t.shape)} in the base"]


# ------------------------------------------------------------------------------- the freeze
def test_an_adapter_on_a_module_with_a_frozen_weight_or_bias_is_refused(w):
    for frozen in (f"{CONV}.weight", f"{CONV}.bias"):
        mask = FreezeMask.from_names(w.unet, [frozen])
        man = Manifest.build(w.state, mask, provenance={"method": "names"})
        assert _refused(w, _pair(w, CONV), _meta(w, "lora", manifest=man), manifest=man) == [
            f"module {CONV!r} has frozen tensor(s) {[frozen]}; the adapter would change them"]
    m = f"{FROZEN_ATTN}.to_q"
    assert _refused(w, _pair(w, m), _meta(w, "lora")) == [
        f"module {m!r} has frozen tensor(s) {[f'{m}.weight']}; the adapter would change them"]


def test_a_frozen_tensor_copied_with_other_bytes_is_a_change(w):
    n = "down_blocks.0.attentions.0.proj_in.bias"
    assert n in w.frozen
    t = w.state[n].clone()
    t[0] = 0.0
    base = {**w.state, n: t}  # a base whose frozen tensor holds +0.0 ...
    man = Manifest.build(base, w.mask, provenance={"method": "patterns"})
    neg = t.clone()
    neg[0] = -0.0  # ... and a delta that "copies" it as -0.0 (torch.equal says equal; the bytes differ)
    with pytest.raises(MergeError) as err:
        merge_delta(base, {n: neg}, man, _meta(w, manifest=man))
    assert err.value.problems == [f"{n!r} is frozen by the manifest; the delta would change it"]
    merged = merge_delta(base, {n: t.clone(), FULL: w.state[FULL] + 0.01}, man, _meta(w, manifest=man))
    assert merged[n] is base[n]  # an exact copy keeps the base's own tensor


# ------------------------------------------------------------------------------- names and mixing
def test_full_tensors_and_adapters_do_not_mix_in_one_delta(w):
    pair = _pair(w, CONV)
    assert _refused(w, {**pair, FULL: w.state[FULL] + 0.01}, _meta(w, "lora")) == [
        f"{FULL!r} is not a LoRA adapter tensor (a full tensor in a LoRA delta)"]
    assert _refused(w, {**pair, FULL: w.state[FULL] + 0.01}, _meta(w, "full")) == [
        f"'{CONV}.lora_A.weight' is not a tensor of the base model (a LoRA adapter tensor in a full delta)",
        f"'{CONV}.lora_B.weight' is not a tensor of the base model (a LoRA adapter tensor in a full delta)"]
    assert _refused(w, {f"{CONV}.lora_A.weight": pair[f"{CONV}.lora_A.weight"]}, _meta(w, "lora")) == [
        f"module {CONV!r}: adapter has ['lora_A'] (needs lora_A and lora_B)"]


@pytest.mark.parametrize("name", [f"{CONV}.lora_A.default.weight", f"{CONV}.base_layer.lora_A.weight",
                                  f"{CONV.upper()}.lora_A.weight", f"{CONV}.lora_a.weight", "lora_A.weight"])
def test_another_spelling_of_a_module_is_not_that_module(w, name):
    delta = {**_pair(w, CONV), name: _pair(w, CONV)[f"{CONV}.lora_A.weight"]}
    problems = _refused(w, delta, _meta(w, "lora"))
    assert len(problems) == 1
    assert problems[0] in (f"{name!r} is not a LoRA adapter tensor (<module>.lora_A/B.weight)",
                           f"module {name.removesuffix('.lora_A.weight')!r}: adapter has ['lora_A'] "
                           "(needs lora_A and lora_B)")


@pytest.mark.parametrize("name", [f"{CONV}..lora_A.weight", f" {CONV}.lora_A.weight", f"{CONV}.lora_A.weight\n",
                                  "up_blocks.1.resnets.0.c\u043env1.lora_A.weight", "../../etc/passwd",
                                  f"{CONV}.lora_A.weight\x00", "", "a" * 600, f"{FULL}/", "\u202e.weight"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_delta_tensor_names_with_odd_characters_are_refused(w, name, method):
    delta = {**(_pair(w, CONV) if method == "lora" else {FULL: w.state[FULL] + 0.01}), name: torch.ones(2)}
    assert _refused(w, delta, _meta(w, method)) == [
        f"delta tensor name {_shown(name)} has odd characters or length (names are dot-separated ASCII [A-Za-z0-9_] "
        "parts, at most 512 characters)"]


def test_non_string_names_an_empty_delta_and_a_delta_that_is_not_a_mapping_are_refused(w):
    assert _refused(w, {FULL: w.state[FULL] + 0.01, 5: torch.ones(1)}, _meta(w)) == [
        "delta tensor name 5 is a int, not a string"]
    assert _refused(w, {}, _meta(w)) == ["the delta holds no tensors"]
    assert _refused(w, [(FULL, w.state[FULL])], _meta(w)) == [
        "the delta is a list, not a mapping of name -> tensor"]


def test_a_base_that_is_not_a_state_dict_is_refused(w):
    with pytest.raises(MergeError, match="base: not a model or state dict of tensors"):
        merge_delta({"x": 3}, {FULL: w.state[FULL]}, w.manifest, _meta(w))
    with pytest.raises(MergeError, match="base: not a model or state dict of tensors"):
        merge_delta(42, {FULL: w.state[FULL]}, w.manifest, _meta(w))


def test_unreadable_files_are_refused_by_load_delta(tmp_path):
    with pytest.raises(MergeError, match="cannot read the delta checkpoint"):
        load_delta(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(MergeError, match="cannot read the delta checkpoint"):
        load_delta(tmp_path / "junk.safetensors")
    save_safetensors_atomic({"x": torch.ones(1)}, tmp_path / "d.safetensors", metadata={"format": "other"})
    with pytest.raises(MergeError, match="not a delta checkpoint"):
        load_delta(tmp_path / "d.safetensors")


# ------------------------------------------------------------------------------- steps and locks
@pytest.fixture(scope="module")
def locked(w):
    lock = random_lock(w.state, 0.25, side="out", seed=0, skip=frozenset(w.frozen))
    man = Manifest.build(w.state, w.mask, provenance={"method": "patterns"}, lock=lock)
    victim = f"{LIN}.weight"
    lk = lock.locks[victim]
    g = torch.Generator().manual_seed(3)
    d = lk.out.double() @ torch.randn(lk.out.shape[1], lk.n, generator=g, dtype=torch.float64)  # all locked
    d *= 1e-4 * float(w.state[victim].double().norm()) / float(d.norm())
    return SimpleNamespace(lock=lock, manifest=man, delta={victim: w.state[victim] + d.float().view(lk.shape)})


@pytest.mark.parametrize("steps", [None, "-1", "1e3", "0x10", "3.0", " 3", "", "9" * 101])
def test_a_locked_merge_needs_valid_steps(w, locked, steps):
    meta = _meta(w, manifest=locked.manifest, steps=steps)
    assert _refused(w, locked.delta, meta, manifest=locked.manifest, lock=locked.lock) == [
        f"the delta's metadata has no valid 'steps' ({_shown(steps)}): its direction locks cannot be checked against "
        "a tolerance"]


def test_a_huge_steps_claim_does_not_widen_the_lock_tolerance(w, locked):
    # 1e-4 of ||W0|| along locked directions: over the tolerance at 10 steps, within it at 10^12
    meta = _meta(w, manifest=locked.manifest, steps="9" * 100)
    problems = _refused(w, locked.delta, meta, manifest=locked.manifest, lock=locked.lock, max_steps=10)
    assert len(problems) == 1 and problems[0].startswith(f"'{LIN}.weight': locked-direction residual ")
    assert problems[0].endswith(": the delta moves the base along directions the manifest locks")
    # the same delta passes when the claim is believed: the cap is what refused it
    merge_delta(w.state, locked.delta, locked.manifest, meta, lock=locked.lock, max_steps=10 ** 12)


# ------------------------------------------------------------------------------- a real guarded job
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    pub = publish(tmp_path_factory.mktemp("publisher"), n_images=4)  # one batch of 4
    root = tmp_path_factory.mktemp("job")
    spec = pub.spec(root / "job.yaml", method="lora", train={"steps": 1},
                    lora={"rank": 2, "alpha": 2.0, "targets": [*LORA_TARGETS, CONV]})
    plan = plan_job(spec, pub.policy_path, manifest=pub.manifest_path, base=pub.base, out=root / "out",
                    log_path=root / "jobs.jsonl")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny job on a shared 2-core host: one thread is faster
    try:
        run_job(plan)
    finally:
        torch.set_num_threads(n)
    delta, meta = load_delta(root / "out" / DELTA_FILE)
    return SimpleNamespace(pub=pub, plan=plan, delta=delta, meta=meta, policy=Policy.load(pub.policy_path))


def test_a_genuine_lora_delta_from_a_real_job_merges_and_equals_the_trained_model(job, one_thread):
    pub, plan = job.pub, job.plan
    merged = merge_delta(pub.base_state, job.delta, pub.manifest, job.meta, max_rank=job.policy.max_lora_rank)
    unet = plan.components.unet.eval()
    params = dict(unet.named_parameters())
    scaling = float(job.meta["lora_alpha"]) / int(job.meta["lora_rank"])
    assert scaling == 1.0
    assert CONV in plan.lora_modules
    for m in plan.lora_modules:  # the trained model's effective weight W + s B A, in float64
        a, b = params[f"{m}.lora_A.default.weight"].double(), params[f"{m}.lora_B.default.weight"].double()
        want = params[f"{m}.base_layer.weight"].double() + scaling * torch.einsum("or,ri...->oi...", b.flatten(1), a)
        torch.testing.assert_close(merged[f"{m}.weight"].double(), want, rtol=0, atol=1e-6)
    changed = {n for n in merged if not torch.equal(merged[n], pub.base_state[n])}
    assert changed == {f"{m}.weight" for m in plan.lora_modules}

    fresh = load_components(pub.base).unet.eval()
    fresh.load_state_dict(merged, strict=False)
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, encoder_hidden_states=cond).sample,
                                   unet(x, t, encoder_hidden_states=cond).sample, rtol=1e-5, atol=1e-5)


def test_the_real_jobs_delta_with_one_thing_changed_is_refused(job):
    d, meta = job.delta, job.meta
    assert _refused_job(job, d, {k: v for k, v in meta.items() if k != "job_id"}) == [
        "the delta has no provenance: metadata ['job_id'] missing (only a guarded job's delta is merged)"]
    shapes = {m: (list(d[f"{m}.lora_A.weight"].shape), list(d[f"{m}.lora_B.weight"].shape))
              for m in job.plan.lora_modules}
    assert sorted(_refused_job(job, d, {**meta, "lora_rank": "4"})) == sorted(
        f"module {m!r}: adapter rank 2 (A {a}, B {b}) disagrees with metadata lora_rank 4"
        for m, (a, b) in shapes.items())
    problems = _refused_job(job, d, meta, max_rank=1)
    assert problems[0] == "metadata lora_rank '2' is above the cap of 1 (max_rank)"
    assert sorted(problems[1:]) == sorted(f"module {m!r}: adapter rank 2 is above the cap of 1 (max_rank)"
                                          for m in job.plan.lora_modules)
    bad = dict(d)
    bad[f"{CONV}.lora_B.weight"] = bad[f"{CONV}.lora_B.weight"].clone().fill_(math.nan)
    assert _refused_job(job, bad, meta) == [f"'{CONV}.lora_B.weight' holds non-finite values (nan or inf)"]


def _refused_job(job, delta, meta, **kw):
    with pytest.raises(MergeError) as err:
        merge_delta(job.pub.base_state, delta, job.pub.manifest, meta, **kw)
    return err.value.problems
