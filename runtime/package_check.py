"""Check a stage package against its plan, its own file digests and its model before anything runs.

Example::

    from runtime.package_check import check_package
    plan = check_package("out/")      # PartitionError naming the file and the fix, or the plan

[Note: package check]
``asteroid-fx partition`` records in ``partition.json`` the SHA-256 of every file the runtime
reads (``plan.json``, ``model.py``, each ``stage_<i>.py`` and ``stage_<i>.weights.pt``), next
to the model's graph hash and each stage's layers. Before a run starts (the launcher, and
every device under torchrun, on its own copy of the directory) ``check_package`` verifies:

* ``plan.json`` and ``partition.json`` parse, and describe the same stages (count, layers)
  of the same model (``model_hash``);
* every stage file is present, and every recorded file has the recorded digest: a
  ``plan.json`` from another partition, a changed ``model.py``, or a stage file of another
  run is named, with the fix (copy the whole directory again, or re-run ``partition``).

This catches mistakes (mixed or half-copied directories); it is not a signature: whoever
can write the directory can rewrite ``partition.json`` too. A package written before the
digests existed is checked for everything but the digests, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from contracts.errors import PartitionError
from contracts.plan import Plan
from runtime.stage_io import (
    PartitionMeta,
    load_partition_meta,
    load_plan,
    stage_file,
    weights_file,
)

__all__ = ["file_digest", "package_files", "check_package"]

log = logging.getLogger(__name__)

_FIX = "copy the whole partition directory again, or re-run `asteroid-fx partition`"


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_files(meta: PartitionMeta) -> list[str]:
    """The files of a package that the runtime reads (relative names)."""
    names = ["plan.json"]
    if meta.model_file is not None:
        names.append(meta.model_file)
    for i in range(meta.num_stages):
        names += [stage_file(".", i).name, weights_file(".", i).name]
    return names


def check_package(directory: str | Path) -> Plan:
    """Check the package in ``directory`` (see [Note: package check]) and return its plan.

    Raises:
        PartitionError: a missing or changed file, or a plan that does not belong to the
            stage files; the message names the file and the fix.
    """
    root = Path(directory)
    plan = load_plan(root)
    meta = load_partition_meta(root)
    where = f"{str(root)!r}"
    if meta.num_stages != plan.num_stages:
        raise PartitionError(f"plan.json of {where} has {plan.num_stages} stages but its stage "
                             f"files are {meta.num_stages}: plan.json does not belong to this "
                             f"package; {_FIX}")
    if meta.model_hash and plan.model_hash and meta.model_hash != plan.model_hash:
        raise PartitionError(f"plan.json of {where} was made for model {plan.model_hash} but "
                             f"the stage files for model {meta.model_hash}; {_FIX}")
    for i, (stage, saved) in enumerate(zip(plan.stages, meta.stages)):
        if tuple(saved.layers) != tuple(stage.layers):
            raise PartitionError(f"plan.json of {where} puts layers {list(stage.layers)} in "
                                 f"stage {i} but stage_{i}.py holds layers "
                                 f"{list(saved.layers)}; {_FIX}")
    needed = package_files(meta)
    for name in needed:
        if not (root / name).is_file():
            raise PartitionError(f"{str(root / name)!r} is missing; {_FIX}")
    if not meta.files:
        log.warning("%s records no file digests (written by an older asteroid-fx): its files "
                    "are not verified; re-run `asteroid-fx partition`", root / "partition.json")
        return plan
    unrecorded = [n for n in needed if n not in meta.files]
    if unrecorded:
        raise PartitionError(f"partition.json of {where} records no digest of {unrecorded}; "
                             f"{_FIX}")
    for name, expected in sorted(meta.files.items()):
        path = root / name
        if not path.is_file():
            raise PartitionError(f"{str(path)!r} is missing; {_FIX}")
        found = file_digest(path)
        if found != expected:
            raise PartitionError(f"{str(path)!r} is not the file this package was written with "
                                 f"(SHA-256 {found[:12]}..., partition.json records "
                                 f"{expected[:12]}...); {_FIX}")
    return plan
