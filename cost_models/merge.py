"""Joining cost tables of one model measured on different device types into one table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from contracts.arguments import check_costs
from contracts.errors import CostModelError
from contracts.table import UNMEASURED_TYPES, CostTable, DeviceColumn

__all__ = ["merge_costs"]


def _what(table: CostTable, index: int, names: Sequence[str] | None) -> str:
    label = names[index] if names is not None else f"table {index + 1}"
    return f"{label} ({table.device_type}, measured on {table.host or 'an unknown host'})"


def _check_same_model(first: CostTable, other: CostTable, what_first: str,
                      what_other: str) -> None:
    """Raise ``CostModelError`` unless ``other`` describes the same traced model."""
    if other.model_hash != first.model_hash:
        raise CostModelError(
            f"{what_other} is for model {other.model_name!r} (graph hash {other.model_hash}), "
            f"{what_first} for {first.model_name!r} (hash {first.model_hash}); profile the "
            f"same model file with the same --leaf options on every device type")
    names_a = [(lc.name, lc.op) for lc in first.layers]
    names_b = [(lc.name, lc.op) for lc in other.layers]
    if names_a != names_b:
        diff = next((i for i, (a, b) in enumerate(zip(names_a, names_b))
                     if a != b),
                    min(len(names_a), len(names_b)))
        raise CostModelError(
            f"{what_other} and {what_first} trace to different layers (first difference at "
            f"layer {diff} of {len(names_a)} / {len(names_b)}); profile the same model with "
            f"the same asteroid-fx version on every device type")
    if other.cut_bytes != first.cut_bytes or other.input_bytes != first.input_bytes:
        raise CostModelError(
            f"{what_other} and {what_first} have different cut sizes, so the sample shapes "
            f"differ; profile both with the same model file and sample_batch")
    if tuple(other.batch_sizes) != tuple(first.batch_sizes):
        raise CostModelError(
            f"{what_other} was measured at batch sizes {list(other.batch_sizes)}, "
            f"{what_first} at {list(first.batch_sizes)}; profile both with the same "
            f"--batch-sizes")


def _columns_of(table: CostTable) -> list[DeviceColumn]:
    base = table.base_column
    return ([base] if base is not None else []) + list(table.columns)


def merge_costs(tables: Sequence[CostTable], *,
                names: Sequence[str] | None = None) -> CostTable:
    """One table with a time column per device type (``asteroid-fx costs merge``).

    Args:
        tables: tables of the same model (same trace, checked by graph hash, layers, cut
            sizes and profiled batch sizes), each measured on one device type
            (``asteroid-fx profile --device-type TYPE``); merged tables may be merged again.
        names: what to call each table in error messages (e.g. its file name).

    Returns:
        A table whose base times are the ``local`` table's (the workstation), or the
        first table's when none is ``local``, with every other measured type as a column.

    Raises:
        CostModelError: fewer than one table, different models or batch sizes, or two
            tables (or columns) for the same device type.
    """
    if isinstance(tables, CostTable) or not isinstance(tables, Sequence):
        raise CostModelError(f"merge_costs takes a list of cost tables, got "
                             f"{type(tables).__name__}; e.g. merge_costs([CostTable.load(p) "
                             f"for p in paths])")
    for i, table in enumerate(tables):
        check_costs(table, f"table {i} of merge_costs")
    if not tables:
        raise CostModelError("costs merge needs at least one cost table")
    if names is not None and len(names) != len(tables):
        raise CostModelError(f"got {len(names)} names for {len(tables)} tables")
    local = [i for i, t in enumerate(tables) if t.device_type in UNMEASURED_TYPES]
    if len(local) > 1:
        raise CostModelError(
            f"{_what(tables[local[0]], local[0], names)} and "
            f"{_what(tables[local[1]], local[1], names)} are both unlabelled (type local); "
            f"a merged table has one base: profile boards with --device-type TYPE")
    base_index = local[0] if local else 0
    base = tables[base_index]
    what_base = _what(base, base_index, names)
    owner: dict[str, str] = {}
    if base.device_type not in UNMEASURED_TYPES:
        owner[base.device_type] = what_base
    columns: list[DeviceColumn] = list(base.columns)
    for col in base.columns:
        owner[col.device_type] = what_base
    for i, table in enumerate(tables):
        if i == base_index:
            continue
        what = _what(table, i, names)
        _check_same_model(base, table, what_base, what)
        for col in _columns_of(table):
            if col.device_type in owner:
                raise CostModelError(
                    f"device type {col.device_type!r} is in both {owner[col.device_type]} "
                    f"and {what}; keep one table per device type")
            owner[col.device_type] = what
            columns.append(col)
    columns.sort(key=lambda c: c.device_type)
    meta = dict(base.meta)
    meta["merged_from"] = [
        {"device_type": t.device_type, "host": t.host, "torch_version": t.torch_version,
         "source": t.source, **({"name": names[i]} if names is not None else {})}
        for i, t in enumerate(tables)]
    return replace(base, columns=tuple(columns), meta=meta)
