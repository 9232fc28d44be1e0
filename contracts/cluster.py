"""The cluster: devices, their memory and speed, and the bandwidth and latency of every link."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from contracts.arguments import is_int
from contracts.devices import DEVICE_TYPES, GIB
from contracts.errors import ClusterError, parse_json, read_text

__all__ = ["Device", "Link", "Cluster", "expand_entry"]

_MIB = 2**20

_DEVICE_KEYS = {"name", "type", "memory_gb", "speed", "flops", "workspace_mb", "storage_mb_s"}
_COUNT_KEY = "count"
"""A device entry with ``count: N`` stands for ``N`` devices alike, named ``<name>0`` to
``<name>N-1`` (``expand_entry``): a fleet of 32 boards is three lines."""

MAX_DEVICES = 4096
"""The most devices a cluster may have (a ``count:`` typo of 10**8 built devices for
minutes; the planner is measured up to 64, docs/planner.md)."""

MAX_MEMORY_GB = 1e6
"""The most ``memory_gb`` one device may declare (a petabyte: past it, a typo)."""

MAX_SPEED = 1e6
"""The most ``speed`` (relative to the host that measured the costs) one device may have."""

MAX_FLOPS = 1e18
"""The most ``flops`` (an exaflop per second) one device may declare."""


def _host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * GIB


def _number(value: Any, what: str, entry: Any, *, zero_ok: bool = False,
            unit: str = "", most: float = math.inf) -> float:
    """``value`` as a finite number > 0 (``zero_ok``: >= 0) and at most ``most``, else
    ``ClusterError``."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        of = f" of {unit}" if unit else ""
        raise ClusterError(f"{what} must be a number{of}, got {value!r} in {entry!r}") from None
    if not ((number >= 0 if zero_ok else number > 0) and math.isfinite(number)):
        bound = ("finite and " if math.isinf(number) else "") + (">= 0" if zero_ok else "> 0")
        raise ClusterError(f"{what} must be {bound}{' ' + unit if unit else ''}, got {value!r} "
                           f"in {entry!r}")
    if number > most:
        raise ClusterError(f"{what} must be at most {most:g}{' ' + unit if unit else ''}, got "
                           f"{value!r} in {entry!r}")
    return number


def _positive(value: Any, what: str, entry: Any) -> float:
    return _number(value, what, entry)


def _latency(value: Any, what: str, entry: Any) -> float:
    """A one-way latency in milliseconds: a finite number >= 0."""
    return _number(value, what, entry, zero_ok=True, unit="milliseconds")


_NAME_SEPARATORS = frozenset("@,/=")
"""Characters a device name may not hold (nor white space): ``--fail NAME@STEP``, comma
lists of devices, paths, ``key=value`` options."""

_NETWORK_KEYS = {"bandwidth_mbps", "latency_ms", "links"}
_LINK_KEYS = {"between", "bandwidth_mbps", "latency_ms"}


@dataclass(frozen=True)
class Device:
    """One device. ``speed`` is relative to ``local`` (the profiling host); when it is
    None the speed follows from ``flops`` and the cost table's ``host_flops``.
    ``workspace_bytes`` is what a training process holds there beyond its tensors (its
    type's default, contracts/devices.py, or ``workspace_mb:``); a cost table that
    measured it for the type overrides it, and plans fit a device's stage into the rest
    (``Cluster.workspace_bytes``, ``Cluster.usable_bytes``). ``storage_mb_s``: read and
    write bandwidth of its local storage in megabytes per second (``storage_mb_s:``; None:
    not limited by storage, as when files stay in the page cache), which a PAC disk cache
    pays (docs/finetune.md, "A cache on disk")."""

    name: str
    type: str
    memory_bytes: int
    speed: float | None = None
    flops: float | None = None
    workspace_bytes: int = 0
    storage_mb_s: float | None = None

    def speed_against(self, host_flops: float) -> float:
        """Speed relative to a host whose effective FLOP/s is ``host_flops``."""
        if self.speed is not None:
            return self.speed
        if self.flops is None:  # pragma: no cover - excluded by Cluster validation
            raise ClusterError(f"device {self.name!r} has neither speed nor flops")
        return self.flops / host_flops

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type,
                               "memory_gb": self.memory_bytes / GIB}
        if self.speed is not None:
            out["speed"] = self.speed
        if self.flops is not None:
            out["flops"] = self.flops
        known = DEVICE_TYPES.get(self.type)
        if known is None or self.workspace_bytes != known.workspace_bytes:
            out["workspace_mb"] = self.workspace_bytes / _MIB
        if self.storage_mb_s is not None:
            out["storage_mb_s"] = self.storage_mb_s
        return out

    @classmethod
    def from_entry(cls, entry: Any) -> Device:
        if not isinstance(entry, Mapping):
            raise ClusterError(f"a device is a mapping like {{name: nx0, type: jetson-nano}}, "
                               f"got {entry!r}")
        unknown = set(entry) - _DEVICE_KEYS
        if unknown:
            raise ClusterError(f"unknown device field(s) {sorted(unknown)} in {dict(entry)!r}; "
                               f"allowed: {sorted(_DEVICE_KEYS | {_COUNT_KEY})}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ClusterError(f"every device needs a non-empty string name, got {dict(entry)!r}")
        odd = sorted({ch for ch in name if ch.isspace() or ch in _NAME_SEPARATORS})
        if odd:
            raise ClusterError(f"device name {name!r} holds {''.join(odd)!r}: names are written "
                               f"in flags such as --fail NAME@STEP and comma lists; use letters, "
                               f"digits, '-', '_' or '.'")
        type_name = entry.get("type")
        dtype = DEVICE_TYPES.get(str(type_name))
        if dtype is None:
            raise ClusterError(
                f"unknown device type {type_name!r} for device {name!r}; known types: "
                f"{', '.join(sorted(DEVICE_TYPES))} (or use type: custom with speed and memory_gb)"
            )
        speed = _number(entry["speed"], "speed", dict(entry), most=MAX_SPEED) \
            if "speed" in entry else None
        flops = _number(entry["flops"], "flops", dict(entry), most=MAX_FLOPS) \
            if "flops" in entry else None
        if "memory_gb" in entry:
            memory = int(_number(entry["memory_gb"], "memory_gb", dict(entry),
                                 most=MAX_MEMORY_GB) * GIB)
            if memory < 1:
                raise ClusterError(f"device {name!r}: memory_gb {entry['memory_gb']!r} is less "
                                   f"than one byte; give the device's memory in GiB, e.g. "
                                   f"memory_gb: 4")
        elif dtype.memory_gb is not None:
            memory = int(dtype.memory_gb * GIB)
        elif dtype.name == "local":
            memory = _host_memory_bytes()
        else:
            raise ClusterError(f"device {name!r} of type custom needs memory_gb, "
                               f"e.g. {{name: {name}, type: custom, speed: 0.7, memory_gb: 3}}")
        workspace = dtype.workspace_bytes   # a device too small for it fails to plan
        if "workspace_mb" in entry:
            workspace = int(_number(entry["workspace_mb"], "workspace_mb", dict(entry),
                                    zero_ok=True) * _MIB)
            if workspace >= memory:
                raise ClusterError(f"device {name!r}: workspace_mb {workspace / _MIB:g} leaves "
                                   f"no memory of its {memory / GIB:g} GiB; give a smaller "
                                   f"workspace_mb or a larger memory_gb")
        if speed is None and flops is None:
            if dtype.flops is not None:
                flops = dtype.flops
            elif dtype.name == "local":
                speed = 1.0
            else:
                raise ClusterError(f"device {name!r} of type custom needs speed (relative to "
                                   f"local) or flops, e.g. speed: 0.7")
        storage = _positive(entry["storage_mb_s"], "storage_mb_s", dict(entry)) \
            if "storage_mb_s" in entry else None
        return cls(name=name, type=dtype.name, memory_bytes=memory, speed=speed, flops=flops,
                   workspace_bytes=workspace, storage_mb_s=storage)


def expand_entry(entry: Any) -> list[Any]:
    """The device entries one entry of ``devices:`` stands for: itself, or with ``count: N``
    ``N`` copies named ``<name>0`` .. ``<name>N-1`` (``{name: nano, type: jetson-nano,
    count: 3}``: ``nano0``, ``nano1``, ``nano2``); anything else is left to
    ``Device.from_entry`` to reject."""
    if not isinstance(entry, Mapping) or _COUNT_KEY not in entry:
        return [entry]
    name, count = entry.get("name"), entry[_COUNT_KEY]
    if not isinstance(name, str) or not name:
        raise ClusterError(f"a device entry with count needs a non-empty string name (the "
                           f"devices are named <name>0, <name>1, ...), got {dict(entry)!r}")
    if not is_int(count) or not 1 <= count <= MAX_DEVICES:
        raise ClusterError(f"device entry {name!r}: count must be a whole number from 1 to "
                           f"{MAX_DEVICES} (how many devices like it, named {name}0, {name}1, "
                           f"...), got {count!r}")
    rest = {key: value for key, value in entry.items() if key != _COUNT_KEY}
    return [{**rest, "name": f"{name}{i}"} for i in range(count)]


@dataclass(frozen=True)
class Link:
    """A per-pair override (symmetric): bandwidth in megabits per second and/or one-way
    latency in milliseconds; ``None`` keeps the network's default."""

    a: str
    b: str
    bandwidth_mbps: float | None = None
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"between": [self.a, self.b]}
        if self.bandwidth_mbps is not None:
            out["bandwidth_mbps"] = self.bandwidth_mbps
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        return out


def _speed_or_one(device: Device, host_flops: float) -> float:
    """``device``'s speed against the host, or 1.0 when it cannot be known (a device given
    by ``flops`` and a table without ``host_flops``)."""
    if device.speed is None and host_flops <= 0:
        return 1.0
    return device.speed_against(host_flops)


@dataclass(frozen=True)
class Cluster:
    """Devices plus a symmetric bandwidth and one-way latency for every pair (default +
    overrides). A message of ``n`` bytes between two devices takes
    ``latency + n / bandwidth`` (see docs/latency-model.md)."""

    devices: tuple[Device, ...]
    bandwidth_mbps: float
    links: tuple[Link, ...] = ()
    latency_ms: float = 0.0
    #: the runtime's own cost of one message (seconds) on each device, ``(name, seconds)``
    #: pairs: a property of the cost table (``CostTable.message_cost_s``: probed, fitted by
    #: ``calibrate``), set by :meth:`for_costs`; a message pays the larger of its two ends'
    #: on top of the link's latency; not part of the cluster file or its hash
    message_costs: tuple[tuple[str, float], ...] = ()
    #: each device's fixed workspace as the cost table measured it for its type,
    #: ``(name, bytes)`` pairs where that differs from the device's own ``workspace_bytes``
    #: (its type's default or ``workspace_mb``); set by :meth:`for_costs`, not part of the
    #: cluster file or its hash
    workspaces: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.devices:
            raise ClusterError("a cluster needs at least one device under `devices:`")
        seen: set[str] = set()
        for device in self.devices:
            if device.name in seen:
                raise ClusterError(f"duplicate device name {device.name!r}; names must be "
                                   f"unique (an entry with count: N names its devices "
                                   f"<name>0 .. <name>N-1)")
            seen.add(device.name)
        _positive(self.bandwidth_mbps, "network.bandwidth_mbps", self.bandwidth_mbps)
        given: dict[tuple[frozenset[str], str], list[str]] = {}
        for link in self.links:
            for end in (link.a, link.b):
                if end not in seen:
                    raise ClusterError(f"link {[link.a, link.b]} names unknown device {end!r}; "
                                       f"devices are {sorted(seen)}")
            if link.a == link.b:
                raise ClusterError(f"link {[link.a, link.b]} joins a device to itself")
            if link.bandwidth_mbps is None and link.latency_ms is None:
                raise ClusterError(f"link {[link.a, link.b]} overrides nothing; give "
                                   f"bandwidth_mbps and/or latency_ms")
            if link.bandwidth_mbps is not None:
                _positive(link.bandwidth_mbps, "bandwidth_mbps", [link.a, link.b])
            if link.latency_ms is not None:
                _latency(link.latency_ms, "latency_ms", [link.a, link.b])
            for what, value in (("bandwidth_mbps", link.bandwidth_mbps),
                                ("latency_ms", link.latency_ms)):
                key = (frozenset((link.a, link.b)), what)
                if value is not None and key in given:
                    raise ClusterError(f"links {given[key]} and {[link.a, link.b]} both set "
                                       f"{what} of one pair (a link is both ways); give each "
                                       f"pair's {what} once")
                if value is not None:
                    given[key] = [link.a, link.b]
        _latency(self.latency_ms, "network.latency_ms", self.latency_ms)

    # -- lookup -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def device(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        raise ClusterError(f"unknown device {name!r}; devices are {list(self.names)}")

    def bandwidth_mbps_between(self, a: str, b: str) -> float:
        """Megabits per second between two devices (infinite for a device and itself)."""
        if a == b:
            return math.inf
        return self._overrides[0].get((a, b), self.bandwidth_mbps)

    def bandwidth_bytes_s(self, a: str, b: str) -> float:
        """Bytes per second between two devices."""
        return self.bandwidth_mbps_between(a, b) * 1e6 / 8.0

    def latency_s(self, a: str, b: str) -> float:
        """One-way latency of one message between two devices, seconds (0 for a device and
        itself)."""
        link = self.link_latency_s(a, b)
        costs = self._message_costs
        if a == b or not costs:
            return link
        return link + max(costs.get(a, 0.0), costs.get(b, 0.0))

    def link_latency_s(self, a: str, b: str) -> float:
        """The link's own one-way latency between two devices, seconds, without the
        runtime's per-message cost that :meth:`latency_s` adds (0 for a device and
        itself)."""
        if a == b:
            return 0.0
        return self._overrides[1].get((a, b), self.latency_ms) / 1e3

    @cached_property
    def _message_costs(self) -> dict[str, float]:
        return dict(self.message_costs)

    @cached_property
    def _overrides(self) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
        """Per-pair bandwidth (Mbps) and latency (ms) overrides, both orders of each pair;
        the first link that sets a value wins (one dict lookup per query, not a scan)."""
        bandwidth: dict[tuple[str, str], float] = {}
        latency: dict[tuple[str, str], float] = {}
        for link in self.links:
            for pair in ((link.a, link.b), (link.b, link.a)):
                if link.bandwidth_mbps is not None:
                    bandwidth.setdefault(pair, link.bandwidth_mbps)
                if link.latency_ms is not None:
                    latency.setdefault(pair, link.latency_ms)
        return bandwidth, latency

    def for_costs(self, costs: Any) -> Cluster:
        """This cluster with the cost table's per-message cost (``costs.message_cost_s``:
        the base's ``message_overhead_s`` over each device's speed, or a measured column's
        own) charged on every message, at its slower end. Idempotent: every solver entry
        point calls it, so a table's cost counts once however the calls nest."""
        cost_of = getattr(costs, "message_cost_s", None)
        host_flops = float(getattr(costs, "host_flops", 0.0))
        found = tuple((d.name, float(cost_of(d.type, _speed_or_one(d, host_flops))))
                      for d in self.devices) if callable(cost_of) else ()
        if all(v == 0.0 for _, v in found):
            found = ()
        workspace_of = getattr(costs, "workspace_of", None)
        spaces: tuple[tuple[str, int], ...] = ()
        if callable(workspace_of):
            measured = ((d, workspace_of(d.type)) for d in self.devices)
            spaces = tuple((d.name, int(w)) for d, w in measured
                           if w is not None and int(w) != d.workspace_bytes)
        if found == self.message_costs and spaces == self.workspaces:
            return self
        return replace(self, message_costs=found, workspaces=spaces)

    @cached_property
    def _workspaces(self) -> dict[str, int]:
        own = {d.name: d.workspace_bytes for d in self.devices}
        own.update(self.workspaces)
        return own

    def workspace_bytes(self, name: str) -> int:
        """The fixed bytes a training process holds on device ``name`` beyond its tensors:
        the cost table's measured figure for its type (:meth:`for_costs`), else the
        device's own (its type's default, contracts/devices.py, or ``workspace_mb``)."""
        if name not in self._workspaces:
            self.device(name)     # raises ClusterError naming the devices
        return self._workspaces[name]

    def usable_bytes(self, name: str) -> int:
        """Memory of device ``name`` left for a stage's tensors: its memory less its
        fixed workspace. Every planner fits stages into this."""
        return self.device(name).memory_bytes - self.workspace_bytes(name)

    def message_cost_s(self, name: str) -> float:
        """The runtime's own seconds per message on device ``name`` (see
        :meth:`for_costs`; 0 before it)."""
        return self._message_costs.get(name, 0.0)

    def max_latency_s(self, names: Iterable[str]) -> float:
        """The largest latency between two of ``names`` (0 for fewer than two)."""
        group = list(names)
        return max((self.latency_s(a, b) for a in group for b in group if a != b),
                   default=0.0)

    def speeds(self, host_flops: float) -> dict[str, float]:
        """Every device's declared speed relative to a host of ``host_flops`` effective
        FLOP/s. With a cost table, take speeds and times from ``solver.timing.Timing``
        instead: a device whose type has a column there ignores its declared speed."""
        return {d.name: d.speed_against(host_flops) for d in self.devices}

    def subset(self, names: Iterable[str]) -> Cluster:
        """The cluster restricted to ``names`` (e.g. the survivors of a failure)."""
        keep = set(names)
        return Cluster(
            devices=tuple(d for d in self.devices if d.name in keep),
            bandwidth_mbps=self.bandwidth_mbps,
            links=tuple(lk for lk in self.links if lk.a in keep and lk.b in keep),
            latency_ms=self.latency_ms,
            message_costs=tuple((n, v) for n, v in self.message_costs if n in keep),
            workspaces=tuple((n, v) for n, v in self.workspaces if n in keep),
        )

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        network: dict[str, Any] = {"bandwidth_mbps": self.bandwidth_mbps,
                                   "links": [lk.to_dict() for lk in self.links]}
        if self.latency_ms:     # only when set, so clusters without latency keep their hash
            network["latency_ms"] = self.latency_ms
        return {"devices": [d.to_dict() for d in self.devices], "network": network}

    @property
    def cluster_hash(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Any) -> Cluster:
        if not isinstance(data, Mapping):
            raise ClusterError(f"a cluster file is a mapping with `devices:` and `network:`, "
                               f"got {type(data).__name__}")
        unknown = set(data) - {"devices", "network"}
        if unknown:
            raise ClusterError(f"unknown top-level key(s) {sorted(unknown)}; "
                               f"expected `devices:` and `network:`")
        raw_devices = data.get("devices")
        if not isinstance(raw_devices, list) or not raw_devices:
            raise ClusterError("`devices:` must be a non-empty list of "
                               "{name: ..., type: ...} entries")
        entries = []
        for entry in raw_devices:
            entries.extend(expand_entry(entry))
            if len(entries) > MAX_DEVICES:
                raise ClusterError(f"a cluster has at most {MAX_DEVICES} devices; `devices:` "
                                   f"lists more (check the `count:` of each entry)")
        devices = tuple(Device.from_entry(one) for one in entries)
        network = data.get("network", {}) or {}
        if not isinstance(network, Mapping):
            raise ClusterError(f"`network:` must be a mapping, got {network!r}")
        unknown = set(network) - _NETWORK_KEYS
        if unknown:
            raise ClusterError(f"unknown key(s) {sorted(unknown)} under `network:`; expected "
                               f"{sorted(_NETWORK_KEYS)}")
        bandwidth = _positive(network.get("bandwidth_mbps", 1000.0), "network.bandwidth_mbps",
                              dict(network))
        latency = _latency(network.get("latency_ms", 0.0), "network.latency_ms", dict(network))
        links = []
        for entry in network.get("links", []) or []:
            if (not isinstance(entry, Mapping) or not isinstance(entry.get("between"), list)
                    or len(entry["between"]) != 2
                    or not ({"bandwidth_mbps", "latency_ms"} & set(entry))
                    or set(entry) - _LINK_KEYS):
                raise ClusterError(f"a link is {{between: [a, b], bandwidth_mbps: N, "
                                   f"latency_ms: L}} (either or both of the last two), "
                                   f"got {entry!r}")
            a, b = (str(x) for x in entry["between"])
            links.append(Link(
                a, b,
                _positive(entry["bandwidth_mbps"], "bandwidth_mbps", entry)
                if "bandwidth_mbps" in entry else None,
                _latency(entry["latency_ms"], "latency_ms", entry)
                if "latency_ms" in entry else None))
        return cls(devices=devices, bandwidth_mbps=bandwidth, links=tuple(links),
                   latency_ms=latency)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Cluster:
        import yaml

        p = Path(str(path))
        text = read_text(p, ClusterError, "cluster file", "see examples/clusters/ for the format")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ClusterError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        except RecursionError:
            raise ClusterError(f"{p} is not valid YAML (nested too deeply); see "
                               f"examples/clusters/ for the format") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        return cls.from_dict(parse_json(text, ClusterError, "cluster",
                                        "give the text of Cluster.to_json()"))
