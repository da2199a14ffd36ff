"""What a training loop reports while it runs: a progress bar and a JSONL step log.

Shared by the trainer and the mask learner, so both logs follow one rule: a row every
``every`` steps and at the loop's last step, flushed at once (a crashed run's log ends at its last
logged step, which ``checkpoint.trim_log`` relies on when the run resumes). Only the main process
reports; the others pass no log and no bar.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from tqdm import tqdm


class StepLog:
    """A context manager around one call of a loop.

    Args:
        path: the JSONL log, appended to (None: no log).
        every: log every ``every``-th step, and step ``end``.
        end: the step the loop runs to.
        start: the step it starts from (the bar's initial count).
        desc: the bar's label (None: no bar).
        postfix: the bar's postfix from a row.
    """

    def __init__(self, path: Path | None, *, every: int, end: int, start: int, desc: str | None,
                 postfix: Callable[[Mapping[str, Any]], Mapping[str, str]]):
        self.every, self.end, self.postfix = every, end, postfix
        self.bar = tqdm(total=end, initial=start, desc=desc, unit="step", dynamic_ncols=True) if desc else None
        self.file = open(path, "a") if path is not None else None

    def __enter__(self) -> "StepLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()

    def record(self, step: int, row: Mapping[str, Any]) -> None:
        """The row of ``step`` (just taken): into the log when it is due, onto the bar."""
        if self.file is not None and (step % self.every == 0 or step == self.end):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**self.postfix(row))
