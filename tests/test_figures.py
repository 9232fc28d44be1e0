"""Tests of ``asteroid_fx.figures``: figures saved whole, in their suffix's format."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from asteroid_fx.figures import save_figure
from contracts.errors import OutputError


@pytest.fixture()
def figure() -> Iterator[object]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    yield fig
    plt.close(fig)


def test_the_suffix_sets_the_format(tmp_path: Path, figure: object) -> None:
    fig = figure
    assert save_figure(fig, tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_figure(fig, tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    assert save_figure(fig, tmp_path / "a.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_failed_write_keeps_the_old_image(tmp_path: Path, figure: object,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.png"
    path.write_bytes(b"old image")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write image '.*run\.png': No space left"):
        save_figure(figure, path)
    assert path.read_bytes() == b"old image"
