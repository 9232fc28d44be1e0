"""Saving a matplotlib figure whole or not at all, in the format its path's suffix names."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from contracts.files import write_bytes

__all__ = ["save_figure"]


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Render ``fig`` (a matplotlib ``Figure``) in memory and write it to ``path`` in one
    piece ([Note: whole files] in ``contracts.files``: a full disk keeps the old image and
    raises ``OutputError``); the format is the suffix's (PNG without one). Returns the
    path."""
    target = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=target.suffix.lstrip(".").lower() or "png")
    write_bytes(target, buffer.getvalue(), "image")
    return target
