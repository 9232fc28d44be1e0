"""What processes of a job say to each other: every c10d store key and typed JSON messages.

Example::

    from runtime import protocol as proto
    keys = proto.Keys(generation)
    proto.put(store, keys.handoff(rank), proto.Handoff(rank=rank, device="nx0", stage=1, ...))
    handoff = proto.get(store, keys.handoff(rank), proto.Handoff)   # typed, validated

[Note: store protocol]
Every key the runtime reads or writes in the c10d store is built here (``Keys``), and every
value is one of the frozen dataclass messages below, written by :func:`encode` as JSON::

    {"kind": "handoff", "v": 1, "body": {...the dataclass fields...}}

:func:`decode` is strict: the bytes must be UTF-8 JSON of exactly that shape, ``kind`` must
be one the reader expects, the body must have every required field and no other, and each
field must have its declared type (checked from the dataclass annotations; a JSON list
becomes a tuple, an integer-keyed mapping has decimal-string keys). Anything else raises
``ProtocolError`` naming the key and what was found; a payload that starts like a pickle is
reported as one and never read further. Nothing in the store is ever unpickled. Stage states
(weights, optimizer state) travel as raw tensor bytes in the flat format of
``runtime.checkpoint`` (a JSON header naming each tensor, then its bytes), whose reader is
strict in the same way. Heartbeat and fatal-report counters are plain ``store.add``
integers.

Keys of one job live under the job's prefix (``runtime.trust``: derived from the shared
token, so a process without it does not know them); only the handshake keys
(``JoinKeys``) are outside it. Keys of generation ``g`` (a group rebuilt after a recovery
uses ``g + 1``, so stale keys are never read):

| key | message | written by |
|---|---|---|
| ``hb/<g>/<rank>`` | counter (``store.add``) | every rank's heartbeat thread |
| ``hb/<g>/<rank>/info`` | ``HeartbeatInfo`` | every rank, once |
| ``fatal/<g>/<rank>``, ``fatal/<g>/count`` | ``FatalReport``, counter | a failing rank |
| ``pg/<g>/...`` | the process group's own rendezvous | ``init_process_group`` |
| ``rx/<g>/chan/<stage>/<holder>/...`` | a replica channel's gloo rendezvous | sender and holder |
| ``rx/<g>/step/<k>`` | ``StepRecord`` | rank 0 after committing step k |
| ``rx/<g>/compute/<rank>`` | ``ComputeTiming`` | every rank, every few rounds |
| ``rx/<g>/stats/<rank>`` | ``ReplicationSummary`` | every rank after its last step |
| ``rx/<g>/times/<rank>`` | ``StartTimes`` | every rank when restored |
| ``rx/<g>/event`` | ``RecoveryEvent`` | rank 0 at the first round after a recovery |
| ``rx/<g>/killed_at`` | ``KilledAt`` | a device killing itself (``--fail``) |
| ``rx/<g>/left/<rank>``, ``rx/<g>/left/count`` | ``LeftMarker``, counter | a device leaving |
| ``rx/<g>/recover`` | ``RecoverNotice`` | the launcher on a failure |
| ``rx/<g>/wake/<rank>`` | ``Wake`` | the launcher, or the rank itself on close |
| ``rx/<g>/handoff/<rank>`` | ``Handoff`` | every survivor |
| ``rx/<g>/waiting/<rank>`` | ``Waiting`` | a survivor that left the failed round |
| ``rx/<g>/want/<rank>/<n>`` | ``StateRequest`` | the launcher |
| ``rx/<g>/own/<rank>/<n>`` | state bytes | the asked survivor |
| ``rx/<g>/restore/<device>/<part>`` | state bytes | the asked survivor, or the launcher |
| ``rx/<g>/next/<device>`` (g: the old one) | ``Assignment`` or ``ExitOrder`` | the launcher |
| ``rx/<g>/restore/<device>`` | ``Manifest`` | the launcher |

Between a launcher and its own child processes (the emulator's result channels) a finished
rank's ``WorkerResult`` travels as :func:`encode_result` bytes (JSON plus flat state bytes),
and under torchrun the ranks gather the same bytes with ``all_gather`` of byte tensors: no
``pickle.loads`` and no ``torch.load(weights_only=False)`` anywhere in the runtime.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, TypeVar, Union, overload

import torch.distributed as dist

from contracts.arguments import is_int, is_number
from contracts.errors import ProtocolError

__all__ = [
    "VERSION",
    "MAX_MESSAGE_BYTES",
    "Keys",
    "JoinKeys",
    "key",
    "HeartbeatInfo",
    "FatalReport",
    "StepRecord",
    "ComputeTiming",
    "ReplicationSummary",
    "StartTimes",
    "RecoveryEvent",
    "KilledAt",
    "LeftMarker",
    "RecoverNotice",
    "Wake",
    "Handoff",
    "Waiting",
    "StateRequest",
    "ManifestPart",
    "Manifest",
    "Assignment",
    "ExitOrder",
    "Challenge",
    "JoinProof",
    "Verdict",
    "encode",
    "decode",
    "put",
    "get",
    "get_if_present",
    "put_bytes",
    "get_bytes",
    "CHUNK_BYTES",
    "clone_store",
    "store_port",
    "encode_result",
    "decode_result",
    "kind_of",
]

#: version of the message envelope; a reader refuses other versions
VERSION = 1
#: a JSON message larger than this is refused unread (state bytes are not JSON messages)
MAX_MESSAGE_BYTES = 16 * 2**20

T = TypeVar("T")
U = TypeVar("U")
_Bytes = Union[bytes, bytearray, memoryview, str]


# ---------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------

def key(generation: int, *parts: object) -> str:
    """Store key ``rx/<generation>/<parts...>`` (recovery keys; prefer :class:`Keys`)."""
    return "/".join(["rx", str(generation), *(str(p) for p in parts)])


@dataclass(frozen=True)
class Keys:
    """Every store key of one generation of a job (see [Note: store protocol])."""

    generation: int

    # -- failure detection (heartbeat.py) --------------------------------------------------
    def heartbeat(self, rank: int) -> str:
        return f"hb/{self.generation}/{rank}"

    def heartbeat_info(self, rank: int) -> str:
        return f"hb/{self.generation}/{rank}/info"

    def fatal(self, rank: int) -> str:
        return f"fatal/{self.generation}/{rank}"

    def fatal_count(self) -> str:
        return f"fatal/{self.generation}/count"

    # -- rendezvous prefixes ---------------------------------------------------------------
    def process_group(self) -> str:
        """Prefix (for ``dist.PrefixStore``) of the training process group's rendezvous."""
        return f"pg/{self.generation}"

    def channel(self, stage: int, holder: str) -> str:
        """Prefix of the replica channel of ``stage`` to ``holder`` (a two-rank gloo group)."""
        return key(self.generation, "chan", stage, holder)

    # -- training progress -----------------------------------------------------------------
    def step(self, step: int) -> str:
        return key(self.generation, "step", step)

    def compute(self, rank: int) -> str:
        return key(self.generation, "compute", rank)

    def stats(self, rank: int) -> str:
        return key(self.generation, "stats", rank)

    def times(self, rank: int) -> str:
        return key(self.generation, "times", rank)

    def event(self) -> str:
        return key(self.generation, "event")

    def killed_at(self) -> str:
        return key(self.generation, "killed_at")

    # -- failure and hand-over -------------------------------------------------------------
    def left(self, rank: int) -> str:
        return key(self.generation, "left", rank)

    def left_count(self) -> str:
        return key(self.generation, "left", "count")

    def recover(self) -> str:
        return key(self.generation, "recover")

    def wake(self, rank: int) -> str:
        return key(self.generation, "wake", rank)

    def handoff(self, rank: int) -> str:
        return key(self.generation, "handoff", rank)

    def waiting(self, rank: int) -> str:
        return key(self.generation, "waiting", rank)

    def want(self, rank: int, n: int) -> str:
        return key(self.generation, "want", rank, n)

    def own(self, rank: int, n: int) -> str:
        """Where a survivor puts the answer to its ``n``-th request (by default)."""
        return key(self.generation, "own", rank, n)

    def next(self, device: str) -> str:
        """``device``'s place in the generation after this one (``Assignment``/``ExitOrder``)."""
        return key(self.generation, "next", device)

    def restore(self, device: str) -> str:
        """``device``'s restore ``Manifest`` in this generation."""
        return key(self.generation, "restore", device)

    def restore_part(self, device: str, part: object) -> str:
        """State bytes of one part of ``device``'s restore in this generation."""
        return key(self.generation, "restore", device, part)

    def is_answer_key(self, name: str) -> bool:
        """Whether ``name`` is a key a survivor may write an answer to: one of this
        generation's or the next one's ``own``/``restore`` parts (never a control key)."""
        parts = name.split("/")
        if len(parts) < 4 or parts[0] != "rx" or not parts[1].isdigit():
            return False
        generation = int(parts[1])
        if generation not in (self.generation, self.generation + 1):
            return False
        if parts[2] == "own":
            return len(parts) == 5 and parts[3].isdigit() and parts[4].isdigit()
        return parts[2] == "restore" and len(parts) == 5 and bool(parts[3]) and bool(parts[4])


class JoinKeys:
    """The handshake keys (``runtime.trust``): the only keys outside a job's prefix."""

    PREFIX = "asteroid/join"

    @classmethod
    def challenge(cls) -> str:
        return f"{cls.PREFIX}/challenge"

    @classmethod
    def count(cls) -> str:
        return f"{cls.PREFIX}/count"

    @classmethod
    def proof(cls, n: int) -> str:
        return f"{cls.PREFIX}/proof/{n}"

    @classmethod
    def verdict(cls, n: int) -> str:
        return f"{cls.PREFIX}/verdict/{n}"

    @classmethod
    def read(cls, n: int) -> str:
        """Counter a joiner bumps once it has read its verdict (a refusing job waits for
        it, bounded, before it stops, so that the refused process learns why)."""
        return f"{cls.PREFIX}/read/{n}"


# ---------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------

_KIND_OF: dict[type, str] = {}         # message class -> kind
#: classes that messages name in annotations but that live in other runtime modules
#: (imported when first needed, so that this module imports nothing of the runtime)
_FOREIGN: dict[str, tuple[str, str]] = {
    "TrainConfig": ("runtime.train", "TrainConfig"),
    "WorkerSpec": ("runtime.replication", "WorkerSpec"),
    "WorkerResult": ("runtime.train", "WorkerResult"),
}
_NESTED: dict[str, type] = {}           # dataclasses usable inside messages, by name


def _message(kind: str) -> Callable[[type[T]], type[T]]:
    def register(cls: type[T]) -> type[T]:
        _KIND_OF[cls] = kind
        _NESTED[cls.__name__] = cls
        return cls
    return register


@_message("heartbeat-info")
@dataclass(frozen=True)
class HeartbeatInfo:
    """Who beats for a rank: its process id and host name."""

    pid: int
    host: str


@_message("fatal")
@dataclass(frozen=True)
class FatalReport:
    """The error of a rank that cannot go on."""

    message: str


@_message("step")
@dataclass(frozen=True)
class StepRecord:
    """A committed step's metrics line (``{"step", "loss", "round_time_s", ...}``)."""

    data: Mapping[str, Any]

    def __post_init__(self) -> None:
        step = self.data.get("step")
        if not is_int(step):
            raise ValueError(f"a step record needs an integer 'step', got {step!r}")


@_message("compute")
@dataclass(frozen=True)
class ComputeTiming:
    """A rank's median forward and backward seconds per micro-batch over ``rounds``."""

    forward_s: float
    backward_s: float
    rounds: int


@_message("stats")
@dataclass(frozen=True)
class ReplicationSummary:
    """A rank's side work per step (``ReplicationStats.summary()``)."""

    values: Mapping[str, int | float]


@_message("times")
@dataclass(frozen=True)
class StartTimes:
    """``time.time()`` when a rank's hooks were made, its restore began and ended."""

    hooks: float
    restore: float
    restored: float


@_message("event")
@dataclass(frozen=True)
class RecoveryEvent:
    """A completed recovery event (the ``{"event": "recovery", ...}`` metrics line)."""

    data: Mapping[str, Any]


@_message("killed")
@dataclass(frozen=True)
class KilledAt:
    """``time.time()`` just before a device killed itself (``--fail``)."""

    at: float


@_message("left")
@dataclass(frozen=True)
class LeftMarker:
    """A device that leaves gracefully after committing ``step``."""

    step: int
    at: float
    signal_at: float | None
    device: str


@_message("recover")
@dataclass(frozen=True)
class RecoverNotice:
    """The ranks of the generation that are lost."""

    failed: tuple[int, ...]


@_message("wake")
@dataclass(frozen=True)
class Wake:
    """Wakes a rank's hand-over watcher: ``recover`` or ``close``."""

    reason: str

    def __post_init__(self) -> None:
        if self.reason not in ("recover", "close"):
            raise ValueError(f"wake reason must be 'recover' or 'close', got {self.reason!r}")


@_message("handoff")
@dataclass(frozen=True)
class Handoff:
    """What a survivor keeps after a failure: its own committed steps and the state names,
    and the replicas it holds (per stage: steps and names)."""

    rank: int
    device: str
    stage: int
    own_steps: tuple[int, ...]
    own_names: tuple[str, ...]
    held_steps: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    held_names: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


@_message("waiting")
@dataclass(frozen=True)
class Waiting:
    """A survivor left the failed round and waits for its next assignment."""

    rank: int


@_message("request")
@dataclass(frozen=True)
class StateRequest:
    """The launcher asks a survivor for state of committed ``step``: a replica it holds
    (``held``: the stage) or part of its own snapshot (``names``; all when None), to be
    written as state bytes to the store key ``to``."""

    step: int
    to: str
    names: tuple[str, ...] | None = None
    held: int | None = None

    def __post_init__(self) -> None:
        if self.held is not None and self.names is not None:
            raise ValueError("a request names either a held stage or own state names")


@_message("manifest-part")
@dataclass(frozen=True)
class ManifestPart:
    """Where the state ``names`` come from: this process's own snapshot of step ``own``,
    the replica of stage ``held`` it holds, or the state bytes under store key ``key``."""

    names: tuple[str, ...]
    own: int | None = None
    held: int | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.own, self.held, self.key) if v is not None]
        if len(given) != 1:
            raise ValueError(f"a manifest part needs exactly one of own, held, key; got "
                             f"own={self.own!r}, held={self.held!r}, key={self.key!r}")


@_message("manifest")
@dataclass(frozen=True)
class Manifest:
    """A device's restore plan: the step its state is of, and where each part comes from."""

    step: int
    parts: tuple[ManifestPart, ...]


@_message("assignment")
@dataclass(frozen=True)
class Assignment:
    """A surviving process's place in the next generation: its rank and world size, the
    partition directory to load its stage from, its training configuration and
    fault-tolerance spec, its cgroup (emulation) and how many requests for its old state
    it must answer first."""

    rank: int
    world: int
    directory: str
    config: TrainConfig
    spec: WorkerSpec
    cgroup: str | None = None
    requests: int = 0


@_message("exit")
@dataclass(frozen=True)
class ExitOrder:
    """A surviving process has no place in the next generation: answer ``requests``
    requests for its state, then exit."""

    requests: int = 0


@_message("challenge")
@dataclass(frozen=True)
class Challenge:
    """The job's handshake challenge (``runtime.trust``): a fresh nonce, and the job's proof
    that it holds the token."""

    nonce: str
    proof: str


@_message("proof")
@dataclass(frozen=True)
class JoinProof:
    """A joining process's proof that it holds the token, for ``rank``."""

    rank: int
    nonce: str
    proof: str


@_message("verdict")
@dataclass(frozen=True)
class Verdict:
    """The job's answer to one ``JoinProof``: admitted (with the job's proof bound to the
    joiner's nonce) or refused (with the reason)."""

    ok: bool
    proof: str = ""
    reason: str = ""


if TYPE_CHECKING:  # the annotations above (resolved at decode time through _FOREIGN)
    from runtime.replication import WorkerSpec
    from runtime.train import TrainConfig


# ---------------------------------------------------------------------------------------
# the codec
# ---------------------------------------------------------------------------------------

_Check = Callable[[Any, str], Any]      # (JSON value, where) -> typed value


def _fail(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"{where}: {what}")


def _split_top(text: str, sep: str) -> list[str]:
    """Split ``text`` at ``sep`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


_CHECKS: dict[str, _Check] = {}


def _checker(annotation: str) -> _Check:
    """The validator of a dataclass field annotation (a string: ``from __future__ import
    annotations``). Supported: int, float, str, bool, Any, None, Optional[X], X | Y,
    Tuple/tuple[X, ...], tuple[X, Y], List/list[X], Mapping/Dict/dict[K, V], and the
    dataclasses of this protocol."""
    found = _CHECKS.get(annotation)
    if found is None:
        found = _CHECKS[annotation] = _build_checker(annotation.strip())
    return found


def _build_checker(text: str) -> _Check:
    union = _split_top(text, "|")
    if len(union) > 1:
        return _union([_checker(u) for u in union], text)
    if text.startswith("Optional[") and text.endswith("]"):
        return _union([_checker(text[9:-1]), _checker("None")], text)
    if text.startswith("Union[") and text.endswith("]"):
        return _union([_checker(u) for u in _split_top(text[6:-1], ",")], text)
    if "[" in text:
        head, inner = text.split("[", 1)
        args = _split_top(inner[:-1], ",")
        head = head.strip()
        if head in ("tuple", "Tuple") and len(args) == 2 and args[1] == "...":
            return _sequence(_checker(args[0]), text)
        if head in ("tuple", "Tuple"):
            return _fixed_tuple([_checker(a) for a in args], text)
        if head in ("list", "List"):
            return _sequence(_checker(args[0]), text, as_list=True)
        if head in ("dict", "Dict", "Mapping") and len(args) == 2:
            return _mapping(args[0], _checker(args[1]), text)
        raise TypeError(f"runtime.protocol cannot check the annotation {text!r}")
    return _scalar(text)


def _union(options: list[_Check], text: str) -> _Check:
    def check(value: Any, where: str) -> Any:
        for option in options:
            try:
                return option(value, where)
            except ProtocolError:
                continue
        raise _fail(where, f"expected {text}, got {_show(value)}")
    return check


def _sequence(item: _Check, text: str, as_list: bool = False) -> _Check:
    def check(value: Any, where: str) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, f"expected {text}, got {_show(value)}")
        items = [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if as_list else tuple(items)
    return check


def _fixed_tuple(items: list[_Check], text: str) -> _Check:
    def check(value: Any, where: str) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise _fail(where, f"expected {text}, got {_show(value)}")
        return tuple(c(v, f"{where}[{i}]") for i, (c, v) in enumerate(zip(items, value)))
    return check


def _mapping(key_text: str, value: _Check, text: str) -> _Check:
    if key_text not in ("str", "int"):
        raise TypeError(f"runtime.protocol mappings need str or int keys, not {key_text!r}")

    def check(data: Any, where: str) -> Any:
        if not isinstance(data, Mapping):
            raise _fail(where, f"expected {text}, got {_show(data)}")
        out = {}
        for k, v in data.items():
            if not isinstance(k, str):
                raise _fail(where, f"expected {text}, got the key {k!r}")
            name: str | int = k
            if key_text == "int":
                if not (k.isdigit() or (k[:1] == "-" and k[1:].isdigit())):
                    raise _fail(where, f"expected integer keys, got {k!r}")
                name = int(k)
            out[name] = value(v, f"{where}[{k!r}]")
        return out
    return check


def _scalar(name: str) -> _Check:
    if name == "Any":
        return lambda value, where: value
    if name == "None":
        def none(value: Any, where: str) -> None:
            if value is not None:
                raise _fail(where, f"expected null, got {_show(value)}")
        return none
    if name == "bool":
        def boolean(value: Any, where: str) -> bool:
            if not isinstance(value, bool):
                raise _fail(where, f"expected true or false, got {_show(value)}")
            return value
        return boolean
    if name == "int":
        def integer(value: Any, where: str) -> int:
            if not is_int(value):
                raise _fail(where, f"expected an integer, got {_show(value)}")
            return value
        return integer
    if name == "float":
        def number(value: Any, where: str) -> float:
            if not is_number(value):
                raise _fail(where, f"expected a number, got {_show(value)}")
            return float(value)
        return number
    if name == "str":
        def string(value: Any, where: str) -> str:
            if not isinstance(value, str):
                raise _fail(where, f"expected a string, got {_show(value)}")
            return value
        return string
    if name == "torch.Tensor":       # tensors never travel inside JSON
        def tensor(value: Any, where: str) -> Any:
            raise _fail(where, "tensors are not carried inside a JSON message")
        return tensor
    return lambda value, where: _from_json(_dataclass_named(name), value, where)


def _dataclass_named(name: str) -> type:
    cls = _NESTED.get(name)
    if cls is None and name in _FOREIGN:
        module, attribute = _FOREIGN[name]
        cls = _NESTED[name] = getattr(importlib.import_module(module), attribute)
    if cls is None:
        raise TypeError(f"runtime.protocol does not know the type {name!r}")
    return cls


def _from_json(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a JSON object, strictly."""
    if not isinstance(data, Mapping):
        raise _fail(where, f"expected an object for {cls.__name__}, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _fail(where, f"unexpected field(s) {unknown} in {cls.__name__} (fields: "
                           f"{sorted(fields)})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(where, f"{cls.__name__} lacks the field {name!r}")
            continue
        kwargs[name] = _checker(str(f.type))(data[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise _fail(where, f"invalid {cls.__name__}: {exc}") from None


def _to_json(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise _fail(where, f"cannot encode the mapping key {k!r}")
            out[str(k)] = _to_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _fail(where, f"cannot encode a {type(value).__name__} in a JSON message")


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool)) \
        or value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind_for_class(cls: type) -> str:
    kind = _KIND_OF.get(cls)
    if kind is None and cls.__name__ == "WorkerResult" \
            and cls is _dataclass_named("WorkerResult"):
        return "result"
    if kind is None:
        raise TypeError(f"{cls.__name__} is not a message of runtime.protocol")
    return kind


def kind_of(message: object) -> str:
    """The ``kind`` a message is written with (``ProtocolError`` for other objects)."""
    try:
        return _kind_for_class(type(message))
    except TypeError as exc:
        raise ProtocolError(str(exc)) from None


def encode(message: object) -> bytes:
    """``{"kind", "v", "body"}`` JSON bytes of a message dataclass."""
    kind = kind_of(message)
    body = _to_json(message, kind)
    try:
        return json.dumps({"kind": kind, "v": VERSION, "body": body},
                          separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{kind}: cannot encode as JSON: {exc}") from None


def _describe_bytes(data: bytes) -> str:
    head = bytes(data[:8])
    if head[:1] == b"\x80":
        return f"{len(data)} bytes starting {head!r}: a pickle, refused unread"
    if head[:2] == b"PK":
        return f"{len(data)} bytes starting {head!r}: a zip archive (torch.save), not a message"
    return f"{len(data)} bytes starting {head!r}: not a JSON message"


@overload
def decode(data: _Bytes, expected: type[T], /, *, where: str = ...) -> T: ...


@overload
def decode(data: _Bytes, expected: type[T], other: type[U], /, *,
           where: str = ...) -> T | U: ...


def decode(data: _Bytes, *expected: type[Any], where: str = "message") -> Any:
    """The message in ``data``, which must be of one of the ``expected`` classes.

    Raises:
        ProtocolError: not UTF-8 JSON (e.g. a pickle: never unpickled), not an envelope of
            this version, a kind that is not expected, or a body that does not match the
            message's fields and types. The message names ``where`` (e.g. the store key).
    """
    if not expected:
        raise TypeError("decode() needs at least one expected message class")
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise _fail(where, f"{len(raw)} bytes is larger than any message "
                           f"({MAX_MESSAGE_BYTES}); refused unread")
    if not raw.lstrip()[:1] == b"{":
        raise _fail(where, _describe_bytes(raw))
    try:
        envelope = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _fail(where, _describe_bytes(raw)) from None
    if not isinstance(envelope, dict) or set(envelope) != {"kind", "v", "body"}:
        raise _fail(where, f"expected an object with kind, v and body, got {_show(envelope)}")
    if envelope["v"] != VERSION:
        raise _fail(where, f"message version {envelope['v']!r}, this reads {VERSION}: run "
                           f"the same asteroid-fx on every device")
    kinds = {_kind_for_class(cls): cls for cls in expected}
    kind = envelope["kind"]
    if not isinstance(kind, str) or kind not in kinds:
        raise _fail(where, f"expected a {' or '.join(sorted(kinds))} message, got "
                           f"{_show(kind)}")
    return _from_json(kinds[kind], envelope["body"], f"{where} ({kind})")


# ---------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------

def put(store: dist.Store, name: str, message: object) -> None:
    """Write ``message`` under ``name``."""
    store.set(name, encode(message))  # type: ignore[arg-type]


@overload
def get(store: dist.Store, name: str, expected: type[T], /, *,
        timeout_s: float | None = ...) -> T: ...


@overload
def get(store: dist.Store, name: str, expected: type[T], other: type[U], /, *,
        timeout_s: float | None = ...) -> T | U: ...


def get(store: dist.Store, name: str, *expected: type[Any],
        timeout_s: float | None = None) -> Any:
    """The message under ``name`` (waits for it like ``store.get``, or up to ``timeout_s``),
    which must be of one of the ``expected`` classes (see :func:`decode`)."""
    if timeout_s is not None:
        store.wait([name], timedelta(seconds=timeout_s))
    return decode(store.get(name), *expected, where=f"store key {name!r}")


#: the largest value one ``store.set`` writes: the c10d TCPStore's libuv server (the
#: default since torch 2.4) refuses a message over 8 MiB ("Invalid payload size") and
#: drops the connection, so state bytes go in chunks of at most this many bytes
CHUNK_BYTES = 4 * 2**20
_CHUNKS_MAGIC = b"AFXCHUNKS1"
_CHUNKS_HEAD = struct.Struct("<QQ")   # chunk count, total bytes


def _chunk_key(name: str, index: int) -> str:
    return f"{name}/#{index}"


def put_bytes(store: dist.Store, name: str, data: bytes | bytearray | memoryview) -> None:
    """Write raw bytes (a stage state) under ``name`` in chunks of at most ``CHUNK_BYTES``:
    the chunks at ``name/#0..`` first, then at ``name`` a head with their count and the
    total length, so a reader that waits for ``name`` finds every chunk in place."""
    view = memoryview(data).cast("B")
    count = max(1, -(-len(view) // CHUNK_BYTES))
    for index in range(count):
        piece = view[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES]
        store.set(_chunk_key(name, index), bytes(piece))  # type: ignore[arg-type]
    store.set(name, _CHUNKS_MAGIC + _CHUNKS_HEAD.pack(count, len(view)))  # type: ignore[arg-type]


def get_bytes(store: dist.Store, name: str) -> bytes:
    """The bytes :func:`put_bytes` wrote under ``name`` (waits for the head like
    ``store.get``).

    Raises:
        ProtocolError: the value at ``name`` is not a chunk head, or the chunks do not
            add up to the length it declares.
    """
    head = bytes(store.get(name))
    where = f"store key {name!r}"
    if not head.startswith(_CHUNKS_MAGIC) or len(head) != len(_CHUNKS_MAGIC) + _CHUNKS_HEAD.size:
        raise _fail(where, "expected the head of chunked state bytes, got "
                           + _describe_bytes(head))
    count, total = _CHUNKS_HEAD.unpack(head[len(_CHUNKS_MAGIC):])
    if count > total // CHUNK_BYTES + 1:
        raise _fail(where, f"declares {count} chunks for {total} bytes")
    data = b"".join(bytes(store.get(_chunk_key(name, index))) for index in range(count))
    if len(data) != total:
        raise _fail(where, f"declares {total} bytes but its chunks hold {len(data)}")
    return data


def clone_store(store: dist.Store) -> dist.Store:
    """A second client of the same store, with the same prefix (its own connection, so a
    blocking ``get``/``wait`` of one thread cannot stall another); the store itself where
    this torch cannot clone (torch < 2.5)."""
    clone = getattr(store, "clone", None)
    if callable(clone):
        try:
            cloned: dist.Store = clone()
            return cloned
        except RuntimeError:  # pragma: no cover - store type without clone support
            pass
    return store


def store_port(store: dist.Store) -> int:
    """The TCP port of the c10d server behind ``store`` (through prefixes); -1 if none."""
    seen: Any = store
    for _ in range(8):
        port = getattr(seen, "port", None)
        if isinstance(port, int):
            return port
        seen = getattr(seen, "underlying_store", None)
        if seen is None:
            break
    return -1


def get_if_present(store: dist.Store, name: str, expected: type[T]) -> T | None:
    """The message under ``name``, or None when the key is not set."""
    if not store.check([name]):
        return None
    return decode(store.get(name), expected, where=f"store key {name!r}")


# ---------------------------------------------------------------------------------------
# a finished rank's result (emulator queue, torchrun gather)
# ---------------------------------------------------------------------------------------

_RESULT_MAGIC = b"AFXRES1"


def encode_result(result: Any) -> bytes:
    """A ``runtime.train.WorkerResult`` as bytes: its fields as a JSON message, then its
    ``state`` (if any) in the flat state format of ``runtime.checkpoint``."""
    from runtime.checkpoint import StageState, state_to_bytes

    state = result.state
    body = encode(dataclasses.replace(result, state=None))
    tail = b"" if state is None else state_to_bytes(StageState(step=-1, model=dict(state)))
    return b"".join((_RESULT_MAGIC, struct.pack("<Q", len(body)), body, tail))


def decode_result(data: bytes | bytearray | memoryview, where: str = "worker result"
                  ) -> Any:
    """Inverse of :func:`encode_result` (strict: see :func:`decode`)."""
    from runtime.checkpoint import state_from_bytes

    raw = bytes(data)
    start = len(_RESULT_MAGIC) + 8
    if not raw.startswith(_RESULT_MAGIC) or len(raw) < start:
        raise _fail(where, _describe_bytes(raw))
    (length,) = struct.unpack("<Q", raw[len(_RESULT_MAGIC):start])
    if start + length > len(raw):
        raise _fail(where, f"declares {length} bytes of JSON but holds {len(raw) - start}")
    result: Any = decode(raw[start:start + length], _dataclass_named("WorkerResult"),
                         where=where)
    tail = raw[start + length:]
    if tail:
        result.state = dict(state_from_bytes(tail, where=f"{where} state").model)
    return result
