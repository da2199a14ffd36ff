"""Every error a user of the engine can act on, under one base class.

``FreezeAsGuardError`` is what the command line catches to print one line instead of a traceback,
and what a publisher's service catches to refuse a request. Each subclass also derives from the
builtin that describes it (``ValueError`` for bad input, ``RuntimeError`` for a step that could not
be completed), so code written against the builtins keeps working.

Errors that carry several findings (a manifest that does not fit, a refused job, a refused delta)
keep them in ``problems`` and print them one per line.
"""
from __future__ import annotations


class FreezeAsGuardError(Exception):
    """Base of the engine's errors. ``problems`` lists every finding when there are several."""

    def __init__(self, message: str = "", problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


# --------------------------------------------------------------------------- inputs
class ConfigError(FreezeAsGuardError, ValueError):
    """A config that cannot be used; the message names the key and what is wrong."""


class DatasetError(FreezeAsGuardError, ValueError):
    """Bad training data; the message names the file and the metadata line."""


class ModelError(FreezeAsGuardError, ValueError):
    """A model folder or preset that cannot be used; the message names the problem."""


class MaskError(FreezeAsGuardError, ValueError):
    """A mask that cannot be built or does not fit the model; the message names the problem."""


class ManifestError(FreezeAsGuardError, ValueError):
    """A manifest that cannot be read, or a model it does not fit. ``problems`` lists each issue."""


class SignatureError(FreezeAsGuardError, ValueError):
    """A key that cannot be used, or a signature that does not verify; the message says which."""


class PolicyViolation(FreezeAsGuardError, ValueError):
    """A job the policy refuses. ``violations`` (= ``problems``) lists every reason."""

    def __init__(self, violations: list[str], what: str = "job refused"):
        super().__init__(f"{what} ({len(violations)} violation(s)):", violations)

    @property
    def violations(self) -> list[str]:
        return self.problems


class MergeError(FreezeAsGuardError, ValueError):
    """A delta that must not be merged into the base. ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        super().__init__(f"delta refused ({len(problems)} problem(s)):", problems)


# --------------------------------------------------------------------------- running
class TrainingError(FreezeAsGuardError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


class MaskLearnError(FreezeAsGuardError, ValueError):
    """Mask learning cannot start or go on; the message names the problem."""


class FrozenConvError(FreezeAsGuardError, RuntimeError):
    """A frozen conv used or installed in a way it cannot support; the message says which."""


class BackendError(FreezeAsGuardError, RuntimeError):
    """An optional backend (xformers, bitsandbytes, ...) was asked for and cannot run here."""


class LedgerError(FreezeAsGuardError, ValueError):
    """Inputs the memory ledger cannot account for; the message names them."""


class JobError(FreezeAsGuardError, RuntimeError):
    """An accepted job that could not be completed or proven (nothing was published)."""


class JobLogError(FreezeAsGuardError, RuntimeError):
    """The job log cannot be appended to or read (e.g. a damaged last line)."""
