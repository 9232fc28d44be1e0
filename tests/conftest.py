"""Shared pytest fixtures: deterministic seeds, one torch thread, opt-in slow tests."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import pytest

_CACHE: list[str] = []
"""The suite's cache folder, made by ``pytest_configure`` (removed at the end)."""


def pytest_configure(config: pytest.Config) -> None:
    # measured cost tables and host speeds are cached (asteroid_fx.cost_source): keep the
    # suite's cache out of the user's home, shared by the tests and the CLIs they spawn
    _CACHE.append(tempfile.mkdtemp(prefix="afx-test-cache-"))
    os.environ["ASTEROID_FX_CACHE"] = _CACHE[-1]


def pytest_unconfigure(config: pytest.Config) -> None:
    # (a folder per run of the suite was left in the temporary directory)
    while _CACHE:
        shutil.rmtree(_CACHE.pop(), ignore_errors=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked @pytest.mark.slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)
