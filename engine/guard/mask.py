"""Freeze masks keyed by tensor name, with exact budgets by tensor count or by parameter count.

A mask says which parameter tensors of a model stay at the publisher's weights. It is keyed by
name (never by position, so a reordered or re-wrapped model cannot silently shift it) and holds
the model's names and sizes, so it can report both ratios: a tensor-count budget can freeze a very
different fraction of *parameters* (404 of SD v1.5's 686 tensors are biases and norms holding
0.05% of its parameters).

Budgets are exact, not a penalty that drifts:

* ``by="tensors"``: exactly ``tensor_budget(ratio, n) = round(ratio * n)`` tensors are frozen
  (Python's ``round``: halves go to the even neighbour).
* ``by="params"``: tensors are visited in priority order (descending score, or a seeded
  permutation for random masks) and each is frozen if it still fits under
  ``param_budget(ratio, total) = floor(ratio * total)`` parameters. This greedy fill never exceeds
  the budget; skipping a tensor that does not fit lets smaller, lower-priority tensors fill the
  remainder, so the achieved ratio is usually within one small tensor of the target. ``stats()``
  reports what was achieved.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import random as _random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, Union

import torch
from torch import nn

from freezeasguard.engine.errors import MaskError
from freezeasguard.engine.io import atomic_write_json

Budget = Literal["tensors", "params"]

# What the constructors accept as "the model": a module (its named_parameters), a mapping of name
# to tensor / shape / numel, or an existing mask (its names and sizes).
ModelLike = Union[nn.Module, Mapping[str, Any], "FreezeMask"]


def _numel(value: Any, name: str) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, bool):  # bool is an int; it is never a valid size
        raise MaskError(f"tensor {name!r}: expected a tensor, shape or numel, got a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return math.prod(int(d) for d in value)
    raise MaskError(f"tensor {name!r}: expected a tensor, shape or numel, got {type(value).__name__}")


def named_numels(source: ModelLike) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Ordered tensor names and element counts of a model, mapping or mask."""
    if isinstance(source, FreezeMask):
        return source.names, source.numels
    if isinstance(source, nn.Module):
        pairs = [(n, p.numel()) for n, p in source.named_parameters()]
    elif isinstance(source, Mapping):
        pairs = [(str(n), _numel(v, str(n))) for n, v in source.items()]
    else:
        raise MaskError(f"expected an nn.Module, a mapping of name -> tensor/shape, or a FreezeMask; "
                        f"got {type(source).__name__}")
    if not pairs:
        raise MaskError("the model has no parameter tensors")
    names, numels = zip(*pairs)
    return tuple(names), tuple(numels)


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise MaskError(f"freeze ratio must be in [0, 1], got {ratio}")
    return ratio


def _check_by(by: str) -> None:
    if by not in ("tensors", "params"):
        raise MaskError(f"budget must be counted by 'tensors' or 'params', got {by!r}")


def tensor_budget(ratio: float, n_tensors: int) -> int:
    """Number of tensors a tensor-count budget freezes: ``round(ratio * n_tensors)``."""
    return round(_check_ratio(ratio) * n_tensors)


def param_budget(ratio: float, total_params: int) -> int:
    """Most parameters a parameter-count budget may freeze: ``floor(ratio * total_params)``.

    The product is rounded to 6 decimals first so that float noise (``0.29 * 100`` is
    ``28.999999999999996``) does not drop a whole parameter.
    """
    return math.floor(round(_check_ratio(ratio) * total_params, 6))


@dataclass(frozen=True)
class MaskStats:
    """How much of a model a mask freezes, counted by tensors and by parameters."""

    frozen_tensors: int
    total_tensors: int
    frozen_params: int
    total_params: int

    @property
    def tensor_ratio(self) -> float:
        return self.frozen_tensors / self.total_tensors if self.total_tensors else 0.0

    @property
    def param_ratio(self) -> float:
        return self.frozen_params / self.total_params if self.total_params else 0.0

    @property
    def trainable_tensors(self) -> int:
        return self.total_tensors - self.frozen_tensors

    @property
    def trainable_params(self) -> int:
        return self.total_params - self.frozen_params

    def to_dict(self) -> dict[str, dict[str, float | int]]:
        return {
            "tensors": {"frozen": self.frozen_tensors, "total": self.total_tensors,
                        "ratio": self.tensor_ratio},
            "params": {"frozen": self.frozen_params, "total": self.total_params,
                       "ratio": self.param_ratio},
        }


@dataclass(frozen=True, eq=False)
class FreezeMask:
    """Immutable set of frozen tensor names over the ordered tensors of one model.

    Build it with one of the ``from_*`` / ``random`` constructors, which check every name against
    the model. ``names`` and ``numels`` follow the model's ``named_parameters()`` order.
    """

    names: tuple[str, ...]
    numels: tuple[int, ...]
    frozen_set: frozenset[str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "numels", tuple(int(k) for k in self.numels))
        object.__setattr__(self, "frozen_set", frozenset(self.frozen_set))
        if len(self.names) != len(self.numels):
            raise MaskError(f"{len(self.names)} names but {len(self.numels)} sizes")
        if len(set(self.names)) != len(self.names):
            raise MaskError("duplicate tensor names in the model")
        unknown = self.frozen_set - set(self.names)
        if unknown:
            raise MaskError(f"{len(unknown)} frozen name(s) are not tensors of the model: "
                            f"{sorted(unknown)}")

    # ----------------------------------------------------------------------------- queries
    @property
    def frozen(self) -> tuple[str, ...]:
        """Frozen tensor names, in model order."""
        return tuple(n for n in self.names if n in self.frozen_set)

    @property
    def trainable(self) -> tuple[str, ...]:
        """Trainable tensor names, in model order."""
        return tuple(n for n in self.names if n not in self.frozen_set)

    def is_frozen(self, name: str) -> bool:
        if name in self.frozen_set:
            return True
        if name not in self._index:
            raise MaskError(f"{name!r} is not a tensor of the masked model")
        return False

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {n: i for i, n in enumerate(self.names)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def as_tensor(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """One entry per tensor, in model order: 1 (True) where frozen."""
        return torch.tensor([n in self.frozen_set for n in self.names], dtype=dtype)

    def stats(self) -> MaskStats:
        frozen_params = sum(k for n, k in zip(self.names, self.numels) if n in self.frozen_set)
        return MaskStats(len(self.frozen_set), len(self.names), frozen_params, sum(self.numels))

    def summary(self) -> str:
        s = self.stats()
        return (f"frozen {s.frozen_tensors}/{s.total_tensors} tensors ({s.tensor_ratio:.2%}), "
                f"{s.frozen_params:,}/{s.total_params:,} params ({s.param_ratio:.2%})")

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        # Two masks are equal when they freeze the same names of the same tensors; order is
        # bookkeeping, names are identity.
        if not isinstance(other, FreezeMask):
            return NotImplemented
        return (self.frozen_set == other.frozen_set
                and dict(zip(self.names, self.numels)) == dict(zip(other.names, other.numels)))

    def __hash__(self) -> int:
        return hash((self.frozen_set, frozenset(zip(self.names, self.numels))))

    def __repr__(self) -> str:
        return f"FreezeMask({self.summary()})"

    # ----------------------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """The plain mask file: frozen names in model order, plus both counts for readers."""
        return {"frozen": list(self.frozen), "counts": self.stats().to_dict()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``{"frozen": [...], "counts": {...}}`` atomically (readable by ``from_file``)."""
        return atomic_write_json(path, self.to_dict())

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_names(cls, model_or_named_shapes: ModelLike, names: Iterable[str]) -> "FreezeMask":
        """Freeze exactly ``names``; every one must be a tensor of the model."""
        all_names, numels = named_numels(model_or_named_shapes)
        if isinstance(names, str):
            raise MaskError("names must be an iterable of tensor names, not a single string")
        wanted = set(names)
        unknown = sorted(wanted - set(all_names))
        if unknown:
            raise MaskError(f"{len(unknown)} name(s) are not tensors of the model: {unknown}")
        return cls(all_names, numels, frozenset(wanted))

    @classmethod
    def from_patterns(cls, model: ModelLike, patterns: str | Iterable[str]) -> "FreezeMask":
        """Freeze every tensor whose name matches one of the ``fnmatch`` globs (case-sensitive).

        A pattern that matches nothing is an error: it is almost always a typo.
        """
        all_names, numels = named_numels(model)
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        frozen: set[str] = set()
        unmatched = []
        for pat in pats:
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                unmatched.append(pat)
            frozen.update(hits)
        if unmatched:
            raise MaskError(f"pattern(s) matching no tensor of the model: {unmatched}")
        return cls(all_names, numels, frozenset(frozen))

    @classmethod
    def from_priority(cls, model: ModelLike, order: Sequence[str], ratio: float,
                      by: Budget = "tensors") -> "FreezeMask":
        """Freeze a budget's worth of tensors taken from ``order`` (highest priority first).

        ``order`` must list every tensor of the model exactly once. See the module docstring for
        the two budget rules.
        """
        _check_by(by)
        ratio = _check_ratio(ratio)
        all_names, numels = named_numels(model)
        if len(order) != len(all_names) or set(order) != set(all_names):
            raise MaskError("priority order must list every tensor of the model exactly once")
        if by == "tensors":
            chosen = order[:tensor_budget(ratio, len(all_names))]
        else:
            size = dict(zip(all_names, numels))
            room = param_budget(ratio, sum(numels))
            chosen = []
            for n in order:
                if size[n] <= room:
                    chosen.append(n)
                    room -= size[n]
        return cls(all_names, numels, frozenset(chosen))

    @classmethod
    def random(cls, model: ModelLike, ratio: float, by: Budget = "tensors",
               seed: int = 0) -> "FreezeMask":
        """A seeded random mask with an exact budget.

        The permutation is drawn over the *sorted* names with Python's ``random.Random(seed)``, so
        the mask depends only on the seed and the set of names, not on parameter order or the
        torch version.
        """
        _check_by(by)
        all_names, _ = named_numels(model)
        order = sorted(all_names)
        _random.Random(seed).shuffle(order)
        return cls.from_priority(model, order, ratio, by)

    @classmethod
    def from_scores(cls, model: ModelLike, scores: Mapping[str, float] | Sequence[float] | torch.Tensor,
                    ratio: float, by: Budget = "tensors") -> "FreezeMask":
        """Exact top-k projection of per-tensor scores: higher scores are frozen first.

        Args:
            model: the model (or names and sizes) the scores belong to.
            scores: one finite score per tensor, by name, or in model order (sequence/1-D tensor).
            ratio: freeze budget in [0, 1].
            by: count the budget in 'tensors' or 'params'.

        Ties are broken by name (ascending), so the result is deterministic.
        """
        all_names, _ = named_numels(model)
        if isinstance(scores, Mapping):
            missing = sorted(set(all_names) - set(scores))
            unknown = sorted(set(scores) - set(all_names))
            if missing or unknown:
                raise MaskError(f"scores do not match the model's tensors: missing {missing}, "
                                f"unknown {unknown}")
            by_name = {n: float(scores[n]) for n in all_names}
        else:
            values = (scores.detach().flatten().double().cpu().tolist()
                      if isinstance(scores, torch.Tensor) else [float(s) for s in scores])
            if len(values) != len(all_names):
                raise MaskError(f"got {len(values)} scores for {len(all_names)} tensors")
            by_name = dict(zip(all_names, values))
        bad = sorted(n for n, s in by_name.items() if not math.isfinite(s))
        if bad:
            raise MaskError(f"non-finite score for {len(bad)} tensor(s): {bad}")
        order = sorted(all_names, key=lambda n: (-by_name[n], n))
        return cls.from_priority(model, order, ratio, by)

    @classmethod
    def from_dict(cls, obj: Any, model: ModelLike, source: str = "mask") -> "FreezeMask":
        """A plain mask object ``{"frozen": [names...]}`` (as ``to_dict`` writes), checked against
        ``model``. Manifests are read by ``guard.manifest.load_mask``."""
        if not isinstance(obj, dict) or not isinstance(obj.get("frozen"), list) \
                or not all(isinstance(n, str) for n in obj["frozen"]):
            raise MaskError(f"{source} must hold {{\"frozen\": [tensor names...]}} or be a manifest")
        try:
            return cls.from_names(model, obj["frozen"])
        except MaskError as exc:
            raise MaskError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, model: ModelLike) -> "FreezeMask":
        """Read a plain mask file written by ``save``, checked against ``model``."""
        obj = read_json(path)
        if isinstance(obj, dict) and "schema" in obj:
            raise MaskError(f"{str(path)!r} is a manifest: read it with "
                            "freezeasguard.engine.guard.manifest.load_mask (or Manifest.load)")
        return cls.from_dict(obj, model, source=f"mask file {str(path)!r}")


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of a mask file or manifest, or a ``MaskError`` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MaskError(f"mask file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MaskError(f"mask file {str(path)!r} is not valid JSON: {exc}") from None
    except OSError as exc:  # a folder, no permission, ...
        raise MaskError(f"mask file {str(path)!r} cannot be read: {exc}") from None
