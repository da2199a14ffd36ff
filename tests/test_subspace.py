"""Direction locks (the subspace guard): the projection kernel, its enforcement in the optimizers,
the locks file and manifest section (and how tampering with them is caught), and the trainer's proof.

fp32 tolerances used below (u = 2^-24 ~ 6e-8, the fp32 unit roundoff):
* a projection ``d - U (U^T d)`` with rank r <= 16 rounds each element by at most ~ (r + 2) u |d|max,
  i.e. <= ~1e-6 |d|max; 1e-5 |d|max leaves a 10x margin and is still ~1e5 below any projection error
  a wrong basis, side or transpose would make (O(|d|)).
* the same bound on ``U^T P(d)`` gives a locked energy <= ~(1e-6)^2 ||d||^2; 1e-10 ||d||^2 is the cap.
"""
import copy
import json
import math

import pytest
import torch
from helpers import tiny_config, tiny_digits
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from freezeasguard.engine.errors import ManifestError, TrainingError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.guard.mask import FreezeMask
from freezeasguard.engine.guard.subspace import (
    LOCKS_FORMAT,
    SubspaceLock,
    TensorLock,
    random_lock,
    residual_tolerance,
)
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.optim.flat import FlatAdamW
from freezeasguard.engine.optim.project import register_lock_hooks
from freezeasguard.engine.service.policy import manifest_signature_problems
from freezeasguard.engine.service.signing import new_hmac_key, sign_manifest
from freezeasguard.engine.train.trainer import Trainer
from freezeasguard.kernels.project import locked_energy, project_off_, project_off_ref


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded for the whole module (as the conftest's ``one_thread``): the tensors are tiny,
    and two threads on a shared 2-core host run them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _orth(dim, r, g):
    return torch.linalg.qr(torch.randn(dim, r, generator=g))[0].contiguous()


def _mat(t):
    return t.detach().reshape(t.shape[0], -1).double()


def _residual(delta, out, inp):
    """sqrt(||U^T D||^2 + ||D V||^2) of a delta shaped like its weight (float64)."""
    return math.sqrt(float(locked_energy(_mat(delta), None if out is None else out.double(),
                                         None if inp is None else inp.double())))


def mixed_lock(model, *, skip=frozenset(), ratio=0.25, seed=0) -> SubspaceLock:
    """A random lock with every kind of lock in it: output side only, input side only, and both,
    cycling over the model's matrices (sorted by name)."""
    lo = random_lock(model, ratio, side="out", seed=seed, skip=skip)
    li = random_lock(model, ratio, side="in", seed=seed + 1, skip=skip)
    locks = {}
    for i, n in enumerate(sorted(set(lo.locks) & set(li.locks))):
        kind = i % 3
        locks[n] = TensorLock(lo.locks[n].shape, lo.locks[n].out if kind != 1 else None,
                              li.locks[n].inp if kind != 0 else None)
    return SubspaceLock(locks)


# ------------------------------------------------------------------------------- 1. the kernel
@pytest.mark.parametrize("sides", ["out", "in", "both"])
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
def test_project_off_matches_the_float64_reference_and_leaves_no_locked_energy(sides, batched):
    g = torch.Generator().manual_seed(1)
    G, m, n, r, s = 3, 24, 18, 5, 4
    shape = (G, m, n) if batched else (m, n)
    d = torch.randn(shape, generator=g)

    def basis(dim, rank):
        if not batched:
            return _orth(dim, rank, g)
        return torch.stack([_orth(dim, rank, g) for _ in range(G)])

    out = basis(m, r) if sides in ("out", "both") else None
    inp = basis(n, s) if sides in ("in", "both") else None
    want = project_off_ref(d, out, inp)
    got = project_off_(d.clone(), out, inp)
    # fp32 in place vs float64 explicit projectors: see the module docstring (1e-5 |d|max)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(d.abs().max()))

    total = d.double().square().sum((-2, -1))
    before, after = locked_energy(d, out, inp), locked_energy(got, out, inp)
    assert bool((before > 0.05 * total).all())  # the input really had energy in the locked directions
    assert bool((after <= 1e-10 * total).all()), (after / total)
    # the part it kept is exactly the part outside the lock: projecting twice changes ~nothing
    torch.testing.assert_close(project_off_(got.clone(), out, inp), got, rtol=0, atol=1e-5 * float(d.abs().max()))


def test_zero_padded_bases_give_the_unpadded_result():
    g = torch.Generator().manual_seed(2)
    G, m, n = 3, 16, 20
    ranks_out, ranks_in = (1, 4, 2), (3, 1, 5)
    d = torch.randn(G, m, n, generator=g)
    outs = [_orth(m, r, g) for r in ranks_out]
    inps = [_orth(n, s, g) for s in ranks_in]
    U = torch.zeros(G, m, max(ranks_out))
    V = torch.zeros(G, n, max(ranks_in))
    for i in range(G):
        U[i, :, :ranks_out[i]] = outs[i]
        V[i, :, :ranks_in[i]] = inps[i]
    padded = project_off_(d.clone(), U, V)
    tol = 1e-5 * float(d.abs().max())  # fp32 GEMM rounding order only (module docstring)
    for i in range(G):
        single = project_off_(d[i].clone(), outs[i], inps[i])
        torch.testing.assert_close(padded[i], single, rtol=0, atol=tol)
        torch.testing.assert_close(padded[i], project_off_ref(d[i], outs[i], inps[i]), rtol=0, atol=tol)
    # an all-zero basis projects nothing at all
    assert torch.equal(project_off_(d.clone(), torch.zeros(G, m, 3), None), d)


def test_project_off_refuses_bases_that_do_not_fit():
    d = torch.randn(6, 5)
    with pytest.raises(ValueError, match="does not fit"):
        project_off_(d, torch.randn(5, 2), None)
    with pytest.raises(ValueError, match="float64"):
        project_off_(d, torch.randn(6, 2, dtype=torch.float64), None)
    with pytest.raises(ValueError, match=r"\[m, n\] or \[G, m, n\]"):
        project_off_(torch.randn(6), None, None)


# ------------------------------------------------------------------------------- 2. FlatAdamW
class Net(nn.Module):
    """Linear and conv layers with several same-shape weights (some locked, some not)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 10), nn.Linear(12, 10), nn.Linear(12, 10)  # [10, 12]
        self.d = nn.Linear(10, 6)
        self.conv1, self.conv2 = nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, 3)  # [6, 4, 3, 3]: 6 x 36
        self.conv3 = nn.Conv2d(4, 6, 3)  # same shape, unlocked
        self.conv4 = nn.Conv2d(6, 5, 1)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _net_locks(seed=0):
    """a, b: output side (ranks 3, 2: one group, padded); d: input side; conv1, conv2: both sides."""
    g = torch.Generator().manual_seed(100 + seed)
    return {"a.weight": (_orth(10, 3, g), None), "b.weight": (_orth(10, 2, g), None),
            "d.weight": (None, _orth(10, 4, g)),
            "conv1.weight": (_orth(6, 2, g), _orth(36, 5, g)), "conv2.weight": (_orth(6, 1, g), _orth(36, 7, g))}


def _set_grads(named, step):
    g = torch.Generator().manual_seed(1000 + step)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g)  # set by hand: the optimizer copies it into its buffer


@pytest.mark.parametrize("chunk_numel", [1, 300, 1 << 26])
def test_flat_adamw_locks_hold_and_leave_the_rest_bit_identical(chunk_numel):
    steps = 30
    locks = _net_locks()
    runs = {}
    for locked in (True, False):
        net = _net()
        named = list(net.named_parameters())
        base = {n: p.detach().clone() for n, p in named}
        opt = FlatAdamW(named, lr=1e-2, locks=locks if locked else None, lock_chunk_numel=chunk_numel)
        for step in range(steps):
            _set_grads(named, step)
            opt.step()
        runs[locked] = (opt, {n: p.detach().clone() for n, p in named}, base)
    opt, after, base = runs[True]
    if chunk_numel == 1:  # every tensor its own chunk: the shape groups are cut
        assert len(opt.locks.chunks) == 5 and len(opt.locks.groups) == 3
    elif chunk_numel == 300:  # a chunk spanning two groups ({a, b} and d), then one conv each
        assert [len(c) for c in opt.locks.chunks] == [2, 1, 1] and len(opt.locks.groups) == 3
    else:
        assert len(opt.locks.chunks) == 1
    assert "5 locked tensors in 3 shape groups" in opt.describe()
    _, free_after, _ = runs[False]
    for n, (u, v) in locks.items():
        delta = after[n] - base[n]
        dn = float(delta.double().norm())
        res = _residual(delta, u, v)
        w0n = float(base[n].double().norm())
        tol = residual_tolerance(steps, w0n, dn)
        assert res <= tol <= 1e-5 * (w0n + dn), (n, res, tol)  # fp32 rounding over 30 steps, not more
        assert res <= 1e-4 * dn, (n, res, dn)  # far below the update itself
        # without the lock the same tensor does move along the locked directions: the check can fail
        assert _residual(free_after[n] - base[n], u, v) > 1e3 * tol, n
    for n in after:
        if n not in locks:  # unlocked tensors: the exact same fp32 arithmetic, locks or not
            assert torch.equal(after[n], free_after[n]), n


def test_flat_adamw_locked_steps_equal_torch_adamw_then_the_reference_projection(one_thread):
    locks = _net_locks(seed=3)
    net, ref_net = _net(1), _net(1)
    named, ref_named = list(net.named_parameters()), list(ref_net.named_parameters())
    opt = FlatAdamW(named, lr=1e-2, weight_decay=1e-2, locks=locks, lock_chunk_numel=300, backend="torch")
    ref = torch.optim.AdamW([{"params": [p for _, p in ref_named if p.dim() >= 2], "weight_decay": 1e-2},
                             {"params": [p for _, p in ref_named if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)
    refs = dict(ref_named)
    for step in range(3):
        _set_grads(named, step)
        for n, p in named:
            refs[n].grad = p.grad.detach().clone()
        old = {n: refs[n].detach().clone() for n in locks}
        opt.step()
        ref.step()
        with torch.no_grad():  # the reference: the plain AdamW update, projected in float64
            for n, (u, v) in locks.items():
                d = (refs[n] - old[n]).reshape(old[n].shape[0], -1)
                refs[n].copy_((old[n].reshape(d.shape) + project_off_ref(d, u, v)).view_as(old[n]))
        for n, p in named:
            # AdamW updates are ~lr = 1e-2 per element; fp32 projection and evaluation order differ
            # by a few ulp of the weights (|w| < 1): 1e-6 absolute
            torch.testing.assert_close(p.detach(), refs[n].detach(), rtol=1e-6, atol=1e-6, msg=n)
        # and the reference's weight did move this step, locked directions aside
        assert all(not torch.equal(refs[n], old[n]) for n in locks)


def test_flat_adamw_refuses_locks_on_tensors_it_does_not_train():
    named = list(_net().named_parameters())
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="a.bias"):
        FlatAdamW(named, lr=1e-2, locks={"a.bias": (_orth(10, 1, g), None)})
    with pytest.raises(ValueError, match="nope"):
        FlatAdamW(named, lr=1e-2, locks={"nope": (_orth(10, 1, g), None)})


# ------------------------------------------------------------------------------- 3. step hooks
def test_register_lock_hooks_on_torch_adamw_hold_the_lock(one_thread):
    steps = 30
    locks = _net_locks(seed=5)
    net, free = _net(2), _net(2)
    named, free_named = list(net.named_parameters()), list(free.named_parameters())
    base = {n: p.detach().clone() for n, p in named}
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    free_opt = torch.optim.AdamW([p for _, p in free_named], lr=1e-2)
    handles = register_lock_hooks(opt, named, locks)
    assert len(handles) == 2
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        for (_, p), (_, q) in zip(named, free_named):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        free_opt.step()
    now, free_now = dict(named), dict(free_named)
    for n, (u, v) in locks.items():
        delta = now[n].detach() - base[n]
        dn = float(delta.double().norm())
        res = _residual(delta, u, v)
        assert res <= residual_tolerance(steps, float(base[n].double().norm()), dn), (n, res)
        assert res <= 1e-4 * dn and _residual(free_now[n].detach() - base[n], u, v) > 1e-2 * dn, n
    for n, p in now.items():
        if n not in locks:
            assert torch.equal(p, free_now[n]), n  # hooks touch the locked tensors only


def test_register_lock_hooks_whole_mode_keeps_lora_factors_in_the_allowed_space(one_thread):
    g = torch.Generator().manual_seed(7)
    m, n, r = 20, 16, 4
    U, V = _orth(m, 5, g), _orth(n, 3, g)
    B = nn.Parameter(torch.randn(m, r, generator=g))  # not in the allowed space to start with
    A = nn.Parameter(torch.randn(r, n, generator=g))
    opt = torch.optim.AdamW([A, B], lr=1e-2)
    register_lock_hooks(opt, [("A", A), ("B", B)], {"B": (U, None), "A": (None, V)}, mode="whole")
    # projected once at registration, before any step
    assert float((U.mT @ B.detach()).norm()) <= 1e-5 * float(B.detach().norm())
    for step in range(10):
        A.grad = torch.randn(A.shape, generator=g)
        B.grad = torch.randn(B.shape, generator=g)
        opt.step()
        # fp32 projection of an O(1) factor: ~1e-7 relative; 1e-5 leaves margin
        assert float((U.mT @ B.detach()).norm()) <= 1e-5 * float(B.detach().norm()), step
        assert float((A.detach() @ V).norm()) <= 1e-5 * float(A.detach().norm()), step
    BA = B.detach().double() @ A.detach().double()
    assert _residual(BA, U, V) <= 1e-5 * float(BA.norm())
    with pytest.raises(ValueError, match="mode must be"):
        register_lock_hooks(opt, [("A", A)], {}, mode="both")
    with pytest.raises(ValueError, match="not handed to the optimizer"):
        register_lock_hooks(opt, [("A", A)], {"C": (U, None)})


# ------------------------------------------------------------------------------- 4. files
@pytest.fixture(scope="module")
def base():
    return build_components("tiny", seed=0)


@pytest.fixture(scope="module")
def mask(base):
    return FreezeMask.random(base.unet, 0.3, by="tensors", seed=0)


@pytest.fixture(scope="module")
def lock(base, mask):
    return mixed_lock(base.unet, skip=frozenset(mask.frozen), seed=0)


def _same_lock(a: SubspaceLock, b: SubspaceLock) -> bool:
    return a.locks.keys() == b.locks.keys() and all(
        x.shape == y.shape and all((p is None and q is None) or (p is not None and q is not None and torch.equal(p, q))
                                   for p, q in zip(x.bases(), y.bases()))
        for x, y in ((a.locks[n], b.locks[n]) for n in a.locks))


def test_the_mixed_lock_covers_every_kind(lock, mask):
    assert len(lock) > 10
    sides = {(lk.out is not None, lk.inp is not None) for lk in lock.locks.values()}
    assert sides == {(True, False), (False, True), (True, True)}
    assert any(len(lk.shape) == 4 for lk in lock.locks.values())  # convs too
    assert not set(lock.locks) & set(mask.frozen)
    for lk in lock.locks.values():
        r, s = lk.ranks
        assert lk.dof == r * lk.n + s * lk.m - r * s


def test_subspace_lock_save_load_round_trip(lock, tmp_path):
    path = lock.save(tmp_path / "x.locks.safetensors")
    back = SubspaceLock.load(path, lock.entries())
    assert _same_lock(back, lock) and back.entries() == lock.entries() and back.dof == lock.dof
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == LOCKS_FORMAT


def test_manifest_round_trip_with_a_lock(base, mask, lock, tmp_path):
    man = Manifest.build(base.unet, mask, provenance={"method": "random"}, lock=lock)
    assert man.schema == "freezeasguard.manifest/2" and set(man.locked_names) == set(lock.locks)
    assert man.locks["counts"]["tensors"] == len(lock) and man.locks["counts"]["dof"] == lock.dof
    path = man.save(tmp_path / "manifest.json", lock=lock)
    assert (tmp_path / man.locks["file"]).is_file()
    back = Manifest.load(path)
    assert back.to_dict() == man.to_dict() and back.digest() == man.digest()
    got = back.load_lock(path)
    assert _same_lock(got, lock) and got.entries() == lock.entries()
    # a manifest without locks has none
    plain = Manifest.build(base.unet, mask, provenance={"method": "random"})
    assert plain.locks is None and plain.load_lock(path) is None and "locks" not in plain.to_dict()


def test_the_digest_and_signature_cover_the_locks_section(base, mask, lock, tmp_path):
    key = new_hmac_key()
    man = sign_manifest(Manifest.build(base.unet, mask, provenance={"method": "random"}, lock=lock), key)
    assert manifest_signature_problems(man, key) == []
    digest = man.digest()
    for edit in (lambda lk: lk.__setitem__("file", "other.locks.safetensors"),
                 lambda lk: next(iter(lk["tensors"].values())).__setitem__("dof", 1),
                 lambda lk: lk["counts"].__setitem__("dof", lk["counts"]["dof"] + 1),
                 lambda lk: lk["tensors"].pop(next(iter(lk["tensors"])))):
        other = copy.deepcopy(man)
        edit(other.locks)
        assert other.digest() != digest
        assert manifest_signature_problems(other, key), "an edited locks section must break the signature"
    dropped = copy.deepcopy(man)
    dropped.locks = None
    assert dropped.digest() != digest and manifest_signature_problems(dropped, key)


def test_manifest_save_refuses_a_lock_it_does_not_record(base, mask, lock, tmp_path):
    man = Manifest.build(base.unet, mask, provenance={"method": "random"}, lock=lock)
    with pytest.raises(ManifestError, match="pass lock="):
        man.save(tmp_path / "manifest.json")  # the bases would be missing
    other = mixed_lock(base.unet, skip=frozenset(mask.frozen), seed=9)
    with pytest.raises(ManifestError, match="not the one this manifest records"):
        man.save(tmp_path / "manifest.json", lock=other)
    assert not (tmp_path / "manifest.json").exists()


def test_two_locked_manifests_in_one_folder_keep_their_own_bases(base, mask, lock, tmp_path):
    other = mixed_lock(base.unet, skip=frozenset(mask.frozen), seed=9)
    a = Manifest.build(base.unet, mask, provenance={"method": "random"}, lock=lock)
    a.save(tmp_path / "a.json", lock=lock)
    b = Manifest.build(base.unet, mask, provenance={"method": "random"}, lock=other)
    with pytest.raises(ManifestError, match="holds other bases"):
        b.save(tmp_path / "b.json", lock=other)
    assert not (tmp_path / "b.json").exists()
    assert _same_lock(Manifest.load(tmp_path / "a.json").load_lock(tmp_path / "a.json"), lock)


# ------------------------------------------------------------------------------- 5. tampering
@pytest.fixture
def saved(base, mask, lock, tmp_path):
    man = Manifest.build(base.unet, mask, provenance={"method": "random"}, lock=lock)
    path = man.save(tmp_path / "manifest.json", lock=lock)
    return man, path, tmp_path / man.locks["file"]


def _edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _first_lock(man, side=None):
    return next(n for n, e in man.locks["tensors"].items() if side is None or side in e)


def test_a_changed_basis_byte_is_caught(saved):
    _, path, lockfile = saved
    data = bytearray(lockfile.read_bytes())
    data[-1] ^= 0x01  # the last byte is basis data (safetensors: header, then the tensors)
    lockfile.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256 mismatch") as err:
        Manifest.load(path).load_lock(path)
    assert "does not match the manifest" in str(err.value)


@pytest.mark.parametrize("field", ["rank", "sha256"])
def test_an_edited_manifest_rank_or_sha_is_caught(saved, field):
    man, path, _ = saved
    name = _first_lock(man, "out")

    def edit(obj):
        e = obj["locks"]["tensors"][name]["out"]
        e[field] = e["rank"] + 1 if field == "rank" else "0" * 64

    _edit_json(path, edit)
    edited = Manifest.load(path)  # still well formed ...
    with pytest.raises(ManifestError, match="manifest says rank" if field == "rank" else "sha256 mismatch") as err:
        edited.load_lock(path)  # ... but not the bases it names
    assert name in str(err.value)


def test_edited_lock_counts_are_caught(saved):
    _, path, _ = saved
    _edit_json(path, lambda o: o["locks"]["counts"].__setitem__("dof", o["locks"]["counts"]["dof"] - 1))
    with pytest.raises(ManifestError, match="locks.counts .* disagree with the locks"):
        Manifest.load(path)


def test_a_lock_on_a_frozen_tensor_is_refused(base, mask, lock, saved):
    victim = next(n for n in mask.frozen if base.unet.get_parameter(n).dim() >= 2)
    bad = SubspaceLock({**lock.locks, victim: random_lock({victim: base.unet.get_parameter(victim)}, 0.25).locks[victim]})
    with pytest.raises(ManifestError, match=f"lock '{victim}': the tensor is frozen"):
        Manifest.build(base.unet, mask, lock=bad)
    _, path, _ = saved  # the same lock written into a saved manifest by hand

    def edit(obj):
        ent = bad.entries()[victim]
        obj["locks"]["tensors"][victim] = ent
        obj["locks"]["counts"]["tensors"] += 1
        obj["locks"]["counts"]["dof"] += ent["dof"]

    _edit_json(path, edit)
    with pytest.raises(ManifestError, match=f"lock '{victim}': the tensor is frozen"):
        Manifest.load(path)


def test_a_lock_on_a_1d_tensor_is_refused(base, mask, lock, saved):
    bias = next(n for n in mask.trainable if base.unet.get_parameter(n).dim() == 1)
    k = base.unet.get_parameter(bias).numel()
    one_d = TensorLock((k,), _orth(k, 2, torch.Generator().manual_seed(0)))
    with pytest.raises(ManifestError, match=f"lock '{bias}': only tensors with 2\\+ dimensions"):
        Manifest.build(base.unet, mask, lock=SubspaceLock({**lock.locks, bias: one_d}))
    _, path, _ = saved

    def edit(obj):
        obj["locks"]["tensors"][bias] = {"shape": [k], "dof": 2, "out": {"rank": 2, "sha256": "a" * 64}}
        obj["locks"]["counts"]["tensors"] += 1
        obj["locks"]["counts"]["dof"] += 2

    _edit_json(path, edit)
    with pytest.raises(ManifestError, match=f"lock '{bias}': only tensors with 2\\+ dimensions"):
        Manifest.load(path)


def test_an_extra_basis_in_the_locks_file_is_refused(saved):
    man, path, lockfile = saved
    with safe_open(str(lockfile), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = f.metadata()
    name = _first_lock(man, "out")
    if "in" in man.locks["tensors"][name]:
        name = next(n for n, e in man.locks["tensors"].items() if "in" not in e)
    extra = f"{name}::in"
    tensors[extra] = _orth(math.prod(man.locks["tensors"][name]["shape"][1:]), 1, torch.Generator())
    save_file(tensors, str(lockfile), metadata=meta)
    with pytest.raises(ManifestError, match=f"basis '{extra}' is in the file but not in the manifest"):
        Manifest.load(path).load_lock(path)


def test_a_missing_locks_file_is_refused(saved):
    _, path, lockfile = saved
    lockfile.unlink()
    with pytest.raises(ManifestError, match="locks file .* does not exist"):
        Manifest.load(path).load_lock(path)


def test_a_locks_file_name_with_a_path_is_refused(base, mask, lock, saved):
    _, path, _ = saved
    _edit_json(path, lambda o: o["locks"].__setitem__("file", "../x.safetensors"))
    with pytest.raises(ManifestError, match="locks file must be a bare"):
        Manifest.load(path)
    with pytest.raises(ManifestError, match="locks file must be a bare"):
        Manifest.build(base.unet, mask, lock=lock, lock_file="../x.safetensors")


def test_a_schema_1_manifest_with_locks_is_refused(saved):
    _, path, _ = saved
    _edit_json(path, lambda o: o.__setitem__("schema", "freezeasguard.manifest/1"))
    with pytest.raises(ManifestError, match="locks need schema 'freezeasguard.manifest/2'"):
        Manifest.load(path)
    # schema 1 without locks is still read
    _edit_json(path, lambda o: o.pop("locks"))
    assert Manifest.load(path).locks is None


def test_a_non_orthonormal_basis_is_refused_by_build(base, mask, lock):
    name = next(n for n, lk in lock.locks.items() if lk.out is not None)
    lk = lock.locks[name]
    skewed = lk.out.clone()
    skewed[:, 0] *= 1.01  # a 2% error in B^T B, far over the 1e-4 fp32 QR allowance
    bad = SubspaceLock({**lock.locks, name: TensorLock(lk.shape, skewed, lk.inp)})
    with pytest.raises(ManifestError, match=f"lock '{name}': out basis is not orthonormal"):
        Manifest.build(base.unet, mask, lock=bad)


# ------------------------------------------------------------------------------- 6. the trainer
def _params(tr):
    return {n: p.detach().clone() for n, p in tr.c.unet.named_parameters()}


def test_engine_trainer_proves_its_locks_refuses_a_violation_and_resumes_bit_exact(base, mask, lock, tmp_path):
    ds = tiny_digits()
    man = Manifest.build(base.unet, mask, provenance={"method": "random"}, lock=lock)
    path = man.save(tmp_path / "manifest.json", lock=lock)
    over = ("freeze.mode=engine", f"freeze.manifest={path}")
    base_state = {n: p.detach().clone() for n, p in base.unet.named_parameters()}

    ref = Trainer(tiny_config(tmp_path / "ref", "train.steps=4", *over),
                  components=build_components("tiny", seed=0), dataset=ds)
    assert isinstance(ref.optimizer, FlatAdamW) and ref.optimizer.locks is not None
    assert len(ref.guard.lock) == len(lock)
    ref.fit()
    report = ref.verify_frozen()
    assert report.ok, report.summary()
    assert report.locks_checked == len(lock) and 0 < report.max_lock_residual <= 1.0
    assert f"all {len(lock)} locked tensors within tolerance" in report.summary()
    now = _params(ref)
    moved = [n for n in lock.locks if not torch.equal(now[n], base_state[n])]
    assert moved == list(lock.locks)  # every locked tensor trained (off its locked directions)

    # kill and resume: 2 steps + checkpoint, a new trainer resumes for 2 more == 4 straight steps
    part = Trainer(tiny_config(tmp_path / "part", "train.steps=4", *over),
                   components=build_components("tiny", seed=0), dataset=ds)
    part.fit(2)
    part.save_checkpoint()
    del part
    resumed = Trainer(tiny_config(tmp_path / "part", "train.steps=4", *over),
                      components=build_components("tiny", seed=0), dataset=ds)
    assert resumed.resume() == 2
    resumed.fit()
    got = _params(resumed)
    assert all(torch.equal(got[n], now[n]) for n in now)
    again = resumed.verify_frozen()
    assert again.ok and again.locks_checked == len(lock), again.summary()

    # a realistic change (10% of ||W0||) with a thousandth of its energy along locked directions
    victim = next(n for n, lk in lock.locks.items() if lk.out is not None and lk.inp is not None)
    lk = lock.locks[victim]
    p = dict(ref.c.unet.named_parameters())[victim]
    w0 = base_state[victim]
    g = torch.Generator().manual_seed(0)
    free = project_off_ref(torch.randn(lk.m, lk.n, generator=g, dtype=torch.float64), lk.out.double(), lk.inp.double())
    locked = lk.out.double() @ torch.randn(lk.out.shape[1], lk.n, generator=g, dtype=torch.float64)
    free *= 0.1 * float(w0.double().norm()) / float(free.norm())
    locked *= math.sqrt(1e-3) * float(free.norm()) / float(locked.norm())
    change = (free + locked).to(torch.float32).view_as(p)
    assert 0.5e-3 < lk.energy(change) / float(change.double().square().sum()) < 2e-3
    with torch.no_grad():
        p.add_(change)
    bad = ref.verify_frozen()
    assert not bad.ok and bad.lock_violation == [victim] and bad.hash_mismatch == []
    assert victim in bad.details[victim] and "locked-direction residual" in bad.details[victim]
    assert "1 of" in bad.summary() and "moved along locked directions" in bad.summary()
    with pytest.raises(TrainingError, match=f"refusing to write.*{victim}"):
        ref.save_final()
    assert not (tmp_path / "ref" / "final").exists()


def test_engine_trainer_without_the_locks_file_refuses_to_start(base, mask, lock, tmp_path):
    man = Manifest.build(base.unet, mask, provenance={"method": "random"}, lock=lock)
    path = man.save(tmp_path / "manifest.json", lock=lock)
    (tmp_path / man.locks["file"]).unlink()
    with pytest.raises(ManifestError, match="does not exist"):
        Trainer(tiny_config(tmp_path / "j", "freeze.mode=engine", f"freeze.manifest={path}"),
                components=build_components("tiny", seed=0), dataset=tiny_digits())
