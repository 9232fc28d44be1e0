"""An output file written beside its place and moved there when the run that writes it ends."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contracts.files import check_writable, in_place, landing

__all__ = ["staged_output"]

log = logging.getLogger(__name__)


@contextmanager
def staged_output(path: str | Path | None) -> Iterator[str | None]:
    """Yield where a run should write ``path`` (a metrics file): ``.NAME.partial`` beside it,
    moved to ``path`` when the block ends. When the block raises and ``path`` already held
    a file (an earlier run's metrics), that file is kept and this run's lines go to
    ``STEM.failed.SUFFIX`` beside it, with a warning naming both; without an earlier file
    they go to ``path`` as usual. So a run that fails never empties the metrics a user had.
    None: nothing to stage. ``OutputError`` before the block where ``path`` cannot be
    written (``contracts.files.check_writable``: a directory, a path under a file). A path
    that is not a regular file (``/dev/null``, a FIFO) is written directly, and a symbolic
    link's target is staged, so the link stays (as ``contracts.files.write_bytes`` does)."""
    if path is None:
        yield None
        return
    check_writable(path, "metrics", "metrics.jsonl")   # (before the run, not after it)
    target, existing = landing(path)   # (a link stays; its target gets the lines)
    if in_place(existing):
        # /dev/null, a FIFO a reader waits on: written as it is (the rename put a file in
        # its place, and the reader got nothing)
        yield str(target)
        return
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        yield str(partial)
    except BaseException:
        if partial.exists():
            if target.exists():
                kept = target.with_name(f"{target.stem}.failed{target.suffix}")
                os.replace(partial, kept)
                log.warning("the run failed: %s keeps the metrics it had; this run's are in %s",
                            target, kept)
            else:
                os.replace(partial, target)
        raise
    if partial.exists():
        os.replace(partial, target)
