"""Writing the contracts' files whole or not at all: a failed write keeps the old file."""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

from contracts.errors import OutputError

__all__ = ["check_writable", "in_place", "landing", "write_bytes", "write_text"]


def write_text(path: str | os.PathLike[str], text: str, what: str = "file") -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (``write_bytes``)."""
    write_bytes(path, text.encode("utf-8"), what)


def write_bytes(path: str | os.PathLike[str], data: bytes, what: str = "file") -> None:
    """Write ``data`` to ``path`` so that it is there whole or not at all.

    [Note: whole files]
    A plan, a cost table or a PAC plan written with ``Path.write_text`` was truncated in
    place first: a full disk (``--out`` on a nearly full SD card of a board) or a quota
    left a half-written JSON file where a good one had been, and the CLI called the
    ``OSError`` an internal error. Here the text goes to a hidden file beside ``path``
    (same directory, so same file system), is flushed to disk, and then replaces ``path``
    in one ``os.replace``; the new file takes the old one's permission bits (a new file
    gets the umask's, as ``open`` gives). Where ``path`` exists and is not a regular file
    (``/dev/stdout``, a FIFO) it is written directly, since replacing it would replace the
    device node; a symbolic link is followed, so the link stays and its target changes.
    Any ``OSError`` becomes an ``OutputError`` naming ``what``, the path and the cause;
    the hidden file is removed and the old file, if any, is untouched."""
    try:
        target, existing = landing(path)
    except OSError as exc:
        raise _failed(what, Path(path), exc) from None
    if in_place(existing):
        try:
            with open(target, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise _failed(what, target, exc) from None
        return
    hidden = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(hidden, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if existing is not None:
            os.chmod(hidden, stat.S_IMODE(existing.st_mode))
        os.replace(hidden, target)
    except OSError as exc:
        try:
            hidden.unlink()
        except OSError:
            pass
        raise _failed(what, target, exc) from None


def landing(path: str | os.PathLike[str]) -> tuple[Path, os.stat_result | None]:
    """Where a write of ``path`` lands, and what is there now: a symbolic link's target
    (the link stays, its target changes) and that file's ``os.stat`` (None where nothing
    is there yet); an ``OSError`` other than a missing file is raised."""
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    try:
        return target, os.stat(target)
    except FileNotFoundError:
        return target, None


def in_place(existing: os.stat_result | None) -> bool:
    """Whether a write must go into the file itself, not replace it: it exists and is not a
    regular file (``/dev/null``, ``/dev/stdout``, a FIFO a reader waits on; replacing it
    would put a regular file in the node's place)."""
    return existing is not None and not stat.S_ISREG(existing.st_mode)


def _failed(what: str, path: Path, exc: OSError) -> OutputError:
    """The ``OutputError`` of a write of ``what`` to ``path`` that failed with ``exc``."""
    cause = exc.strerror or str(exc)
    return OutputError(f"cannot write {what} {str(path)!r}: {cause}; nothing was written "
                       f"(an existing file is kept): free space or give another path")


def check_writable(path: str | os.PathLike[str] | None, option: str, example: str = "", *,
                   directory: bool = False) -> None:
    """Check, before any work, that ``path`` (the value of ``option``: a file to write, like
    ``example``, or with ``directory`` a directory to fill) can be written, making a file's
    missing parent directories; an ``OutputError`` naming it and the fix otherwise, so that
    a plan, a profile or a run's metrics is never computed and then lost for want of a
    directory (the API's ``run(metrics=DIR)`` trained to the end, then failed)."""
    if path is None:
        return
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise OutputError(f"{option} {str(path)!r} is a file, not a directory; give a new "
                          f"or an existing directory")
    if not directory and path.is_dir():
        raise OutputError(f"{option} {str(path)!r} is a directory; give a file name, e.g. "
                          f"{str(path / example)!r}")
    made = path if directory else path.parent       # (the directory the output goes in)
    parent = made
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot make the directory {str(made)!r} for {option} "
                          f"{str(path)!r}: {str(parent)!r} is a file; give a path in a "
                          f"directory")
    if not directory:   # (a partition or fine-tuning directory is made by its writer)
        try:
            made.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot make the directory {str(made)!r} for {option} "
                              f"{str(path)!r}: {exc.strerror or exc}; give a path in a "
                              f"writable directory") from None
        parent = made
    try:        # a file made and removed: what root may not write (/sys, /proc) too
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".asteroid-fx-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {str(parent)!r} ({option} {str(path)!r}): "
                          f"{exc.strerror or exc}; give a path in a writable directory") from None
