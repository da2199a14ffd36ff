"""Job records as JSON trees: the one conversion every record goes through before it is logged."""
from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from freezeasguard.engine.errors import JobLogError


def encodable(obj: Any, where: str = "record") -> Any:
    """A JSON-encodable copy of ``obj``: the conversion ``append_record`` applies to every record.

    * non-finite floats (anywhere, at any depth) become the strings ``"nan"``, ``"inf"``, ``"-inf"``;
    * tuples become lists; subclasses of str/int/float become the plain type; bools stay bools;
    * dicts must have string keys.

    Deterministic: equal inputs give equal outputs, and an output is its own ``encodable``.

    Raises:
        JobLogError naming the key path (e.g. ``record.train.losses[3]``) of the first value that
        is not JSON (bytes, arbitrary objects, a non-string dict key, a reference cycle).
    """
    return _encodable(obj, where, set())


def _encodable(obj: Any, where: str, active: set[int]) -> Any:
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int):
        return int.__int__(obj)
    if isinstance(obj, float):
        obj = float.__float__(obj)
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in active:
            raise JobLogError(f"{where}: a reference cycle (the record contains itself); a job record must be "
                              "a JSON tree")
        active.add(id(obj))
        try:
            if isinstance(obj, dict):
                out = {}
                for k, v in obj.items():
                    if not isinstance(k, str):
                        raise JobLogError(f"{where}: key {k!r} ({type(k).__name__}) is not a string; JSON object "
                                          "keys must be strings")
                    out[str(k)] = _encodable(v, f"{where}.{k}", active)
                return out
            return [_encodable(v, f"{where}[{i}]", active) for i, v in enumerate(obj)]
        finally:
            active.discard(id(obj))
    raise JobLogError(f"{where}: {type(obj).__name__} is not a JSON value (a job record holds only "
                      "str, int, float, bool, None, lists and string-keyed objects)")


def utc_now() -> str:
    """The time stamp of job records: UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
