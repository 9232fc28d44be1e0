"""Tests of runtime.protocol: store keys, typed JSON messages, strict decoding, no pickles."""

from __future__ import annotations

import json
import math
import pickle
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from contracts.errors import ProtocolError
from runtime import protocol as proto
from runtime.checkpoint import StageState, state_from_bytes, state_to_bytes
from runtime.emulator import free_port
from runtime.replication import WorkerSpec
from runtime.train import TrainConfig, WorkerResult

#: set by _Trap.__reduce__'s payload if anything ever unpickles it
TRAP_FILE = "unpickled.txt"


class _Trap:
    """Unpickling this object writes a file: proof that a payload was (not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))


def _blob(tmp_path: Path) -> bytes:
    """A pickle that runs ``touch tmp_path/unpickled.txt`` when loaded."""
    return pickle.dumps(_Trap(tmp_path / TRAP_FILE))


@pytest.fixture()
def store() -> Iterator[dist.TCPStore]:
    yield dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, wait_for_workers=False,
                        timeout=timedelta(seconds=10))


def _spec() -> WorkerSpec:
    return WorkerSpec(generation=2, mode="replay", plan_version=3, devices=("a", "b", "c"),
                      stages=(0, 1, 1), holders={0: ("b",), 1: ()}, steps=6,
                      fail_at={"b": 4}, event={"event": "recovery", "failed": ["x"]},
                      link_bytes_s=((math.inf, 1e6, 1e6), (1e6, math.inf, 2e6),
                                    (1e6, 2e6, math.inf)))


MESSAGES = [
    proto.HeartbeatInfo(pid=12, host="nano0"),
    proto.FatalReport("CUDA error"),
    proto.StepRecord({"step": 3, "loss": 2.5, "peak_memory_bytes": {"a": 10}}),
    proto.ComputeTiming(forward_s=0.01, backward_s=0.02, rounds=8),
    proto.ReplicationSummary({"snapshot_ms": 0.3}),
    proto.StartTimes(hooks=1.0, restore=2.0, restored=3.0),
    proto.RecoveryEvent({"event": "recovery", "failed": ["b"], "total_s": 0.4}),
    proto.KilledAt(123.5),
    proto.LeftMarker(step=2, at=5.0, signal_at=None, device="b"),
    proto.RecoverNotice((1, 2)),
    proto.Wake("recover"),
    proto.Handoff(rank=1, device="b", stage=1, own_steps=(3, 4), own_names=("w", "b"),
                  held_steps={0: (3, 4)}, held_names={0: ("x",)}),
    proto.Waiting(2),
    proto.StateRequest(step=4, to="rx/1/restore/a/0", names=("w",)),
    proto.StateRequest(step=4, to="rx/0/own/1/0", held=0),
    proto.Manifest(step=4, parts=(proto.ManifestPart(names=("w",), own=4),
                                  proto.ManifestPart(names=("x",), held=0),
                                  proto.ManifestPart(names=("y",), key="rx/1/restore/a/1"))),
    proto.Assignment(rank=1, world=3, directory="/p/recovery/gen1",
                     config=TrainConfig(steps=6, link_bytes_s=((1.0, 2.0), (2.0, 1.0)),
                                        compute_scale=2.0, time_factor=1.5,
                                        prediction="calibrated"),
                     spec=_spec(), cgroup=None, requests=2),
    proto.ExitOrder(requests=1),
    proto.Challenge(nonce="ab", proof="cd"),
    proto.JoinProof(rank=1, nonce="ef", proof="01"),
    proto.Verdict(ok=False, reason="no"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_as_json(message: object) -> None:
    data = proto.encode(message)
    envelope = json.loads(data)
    assert set(envelope) == {"kind", "v", "body"} and envelope["v"] == proto.VERSION
    assert envelope["kind"] == proto.kind_of(message)
    assert proto.decode(data, type(message)) == message


def test_an_assignment_carries_plain_data_and_rebuilds_the_config_and_spec() -> None:
    message = MESSAGES[16]
    assert isinstance(message, proto.Assignment)
    body = json.loads(proto.encode(message))["body"]
    assert body["directory"] == "/p/recovery/gen1" and body["spec"]["holders"] == {
        "0": ["b"], "1": []}
    back = proto.decode(proto.encode(message), proto.Assignment, proto.ExitOrder)
    assert isinstance(back, proto.Assignment)
    assert back.config == message.config and back.spec == message.spec
    assert back.spec.holders == {0: ("b",), 1: ()} and back.spec.link_bytes_s is not None
    assert math.isinf(back.spec.link_bytes_s[0][0])
    exit_order = proto.decode(proto.encode(proto.ExitOrder(3)), proto.Assignment,
                              proto.ExitOrder)
    assert exit_order == proto.ExitOrder(3)


def _body(message: object) -> dict[str, object]:
    body: dict[str, object] = json.loads(proto.encode(message))["body"]
    return body


def _envelope(kind: str, body: object, version: int = proto.VERSION) -> bytes:
    return json.dumps({"kind": kind, "v": version, "body": body}).encode()


@pytest.mark.parametrize(("data", "message"), [
    (b"", "0 bytes"),
    (b"not json", "not a JSON message"),
    (b"{broken", "not a JSON message"),
    (json.dumps({"kind": "handoff", "body": {}}).encode(), "expected an object with kind"),
    (_envelope("handoff", {}, version=9), "message version 9, this reads 1"),
    (_envelope("assignment", {}), "expected a handoff message, got \"assignment\""),
    (_envelope("handoff", {**_body(MESSAGES[11]), "extra": 1}),
     r"unexpected field\(s\) \['extra'\] in Handoff"),
    (_envelope("handoff", {k: v for k, v in _body(MESSAGES[11]).items() if k != "stage"}),
     "Handoff lacks the field 'stage'"),
    (_envelope("handoff", {**_body(MESSAGES[11]), "rank": "1"}),
     r"handoff\)\.rank: expected an integer, got \"1\""),
    (_envelope("handoff", {**_body(MESSAGES[11]), "rank": True}), "expected an integer"),
    (_envelope("handoff", {**_body(MESSAGES[11]), "held_steps": {"zero": [1]}}),
     "expected integer keys, got 'zero'"),
    (_envelope("handoff", {**_body(MESSAGES[11]), "own_names": [1]}),
     r"own_names\[0\]: expected a string"),
    (_envelope("handoff", [1, 2]), "expected an object for Handoff"),
])
def test_malformed_or_unexpected_payloads_raise_a_typed_error(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        proto.decode(data, proto.Handoff, where="store key 'rx/0/handoff/1'")


def test_invariants_of_a_message_are_checked_when_decoding() -> None:
    part = {"names": ["w"], "own": 3, "held": 0}
    with pytest.raises(ProtocolError, match="exactly one of own, held, key"):
        proto.decode(_envelope("manifest", {"step": 3, "parts": [part]}), proto.Manifest)
    with pytest.raises(ProtocolError, match="wake reason must be"):
        proto.decode(_envelope("wake", {"reason": "run"}), proto.Wake)
    with pytest.raises(ProtocolError, match="an integer 'step'"):
        proto.decode(_envelope("step", {"data": {"loss": 1.0}}), proto.StepRecord)
    with pytest.raises(ProtocolError, match="larger than any message"):
        proto.decode(b"{" + b" " * proto.MAX_MESSAGE_BYTES + b"}", proto.Handoff)
    with pytest.raises(ProtocolError, match="not a message of runtime.protocol"):
        proto.encode(object())


def test_a_pickle_in_the_store_is_refused_and_never_unpickled(tmp_path: Path,
                                                             store: dist.TCPStore) -> None:
    blob = _blob(tmp_path)
    keys = proto.Keys(0)
    for name, kind in [(keys.handoff(1), proto.Handoff), (keys.restore("a"), proto.Manifest),
                       (keys.next("a"), proto.Assignment), (keys.recover(), proto.RecoverNotice)]:
        store.set(name, blob)
        with pytest.raises(ProtocolError, match=r"a pickle, refused unread") as info:
            proto.get(store, name, kind)
        assert name in str(info.value)
    # state bytes (weights from the store) refuse a pickle too, and a pickled result
    with pytest.raises(ProtocolError, match="a pickle, refused unread"):
        state_from_bytes(blob, where="store key 'rx/1/restore/a/0'")
    with pytest.raises(ProtocolError, match="a pickle, refused unread"):
        proto.decode_result(blob)
    assert not (tmp_path / TRAP_FILE).exists()
    pickle.loads(blob)   # the trap works: loading it would have run code
    assert (tmp_path / TRAP_FILE).exists()


def test_a_survivor_refuses_a_pickled_assignment(tmp_path: Path, store: dist.TCPStore) -> None:
    spec = WorkerSpec(generation=0, mode="replay", plan_version=0, devices=("a", "b"),
                      stages=(0, 1), holders={0: (), 1: ()})
    hooks = spec.hooks(store, 0, 2)
    try:
        store.set(proto.Keys(0).next("a"), _blob(tmp_path))
        with pytest.raises(ProtocolError, match="a pickle, refused unread"):
            hooks.next_generation(limit_s=5.0)
    finally:
        hooks.close()
    assert not (tmp_path / TRAP_FILE).exists()


def test_a_survivor_writes_answers_only_to_answer_keys(tmp_path: Path,
                                                       store: dist.TCPStore) -> None:
    from torch import nn

    from runtime.replication import announce_failure

    spec = WorkerSpec(generation=0, mode="replay", plan_version=0, devices=("a", "b"),
                      stages=(0, 1), holders={0: (), 1: ()})
    hooks = spec.hooks(store, 0, 2)
    try:
        module = nn.Linear(2, 2)
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        hooks.restore(module, opt, 0)
        hooks.step_done(0, module, opt)
        hooks.step_committed(0, {"step": 0})
        announce_failure(store, 0, [1], 2)
        keys = proto.Keys(0)
        deadline = time.monotonic() + 5
        while not store.check([keys.handoff(0)]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # a request to overwrite a control key (here: rank 1's next assignment) is refused
        proto.put(store, keys.want(0, 0), proto.StateRequest(step=0, to=keys.next("b")))
        time.sleep(0.3)
        assert not store.check([keys.next("b")])
    finally:
        hooks.close()


def test_answer_keys() -> None:
    keys = proto.Keys(3)
    assert keys.is_answer_key(keys.own(1, 0)) and keys.is_answer_key(keys.restore_part("a", 2))
    assert proto.Keys(4).restore_part("a", "data") == "rx/4/restore/a/data"
    assert keys.is_answer_key(proto.Keys(4).restore_part("a", 2))
    for name in (keys.next("a"), keys.restore("a"), keys.handoff(1), keys.recover(),
                 proto.Keys(2).own(1, 0), proto.Keys(5).restore_part("a", 0),
                 "asteroid/join/verdict/1", "pg/3/x", "rx/x/own/1/0", keys.own(1, 0) + "/x"):
        assert not keys.is_answer_key(name), name


def test_keys_of_a_generation() -> None:
    keys = proto.Keys(2)
    assert keys.heartbeat(1) == "hb/2/1" and keys.heartbeat_info(1) == "hb/2/1/info"
    assert keys.fatal(0) == "fatal/2/0" and keys.fatal_count() == "fatal/2/count"
    assert keys.process_group() == "pg/2" and keys.channel(1, "nx") == "rx/2/chan/1/nx"
    assert keys.handoff(3) == proto.key(2, "handoff", 3) == "rx/2/handoff/3"
    assert proto.JoinKeys.challenge() == "asteroid/join/challenge"


def test_a_worker_result_travels_as_json_and_raw_tensors() -> None:
    result = WorkerResult(rank=1, device="b", stage=1, losses=[2.0, 1.5], round_times=[0.1],
                          forward_s=0.01, state={"fc.weight": torch.randn(3, 2)},
                          ended_after=None, peak_memory_bytes=100, tensor_memory={"params": 24})
    data = proto.encode_result(result)
    back = proto.decode_result(data)
    assert back.losses == result.losses and back.tensor_memory == result.tensor_memory
    assert back.state is not None and torch.equal(back.state["fc.weight"],
                                                  result.state["fc.weight"])
    assert proto.decode_result(proto.encode_result(WorkerResult(0, "a", 0))).state is None
    with pytest.raises(ProtocolError, match="declares"):
        proto.decode_result(data[:20])


def test_state_bytes_are_checked_strictly() -> None:
    data = state_to_bytes(StageState(step=2, model={"w": torch.ones(4)}))
    assert torch.equal(state_from_bytes(data).model["w"], torch.ones(4))
    start = len(b"AFXSTATE1") + 8
    length = int.from_bytes(data[len(b"AFXSTATE1"):start], "little")
    header = json.loads(data[start:start + length])

    def with_header(h: dict[str, object]) -> bytes:
        text = json.dumps(h).encode()
        return b"AFXSTATE1" + len(text).to_bytes(8, "little") + text + data[start + length:]

    bad_dtype = {**header, "t": [{**header["t"][0], "d": "manual_seed"}]}
    with pytest.raises(ProtocolError, match="malformed tensor entry"):
        state_from_bytes(with_header(bad_dtype))
    too_far = {**header, "t": [{**header["t"][0], "shape": [1000]}]}
    with pytest.raises(ProtocolError, match="lies beyond"):
        state_from_bytes(with_header(too_far))
    with pytest.raises(ProtocolError, match="header declares"):
        state_from_bytes(data[:start + 4])
    with pytest.raises(ProtocolError, match="other fields"):
        state_from_bytes(with_header({**header, "t": [{"s": "model"}]}))


def test_the_runtime_never_unpickles() -> None:
    """No module of runtime/ imports pickle, calls torch.load without weights_only=True, or
    uses torch.distributed's pickling ``*_object`` collectives."""
    import ast

    root = Path(__file__).resolve().parents[1] / "runtime"
    problems = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill") for n in names):
                    problems.append(f"{where}: imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "load" and isinstance(node.func.value, ast.Name) \
                        and node.func.value.id == "torch":
                    safe = [k for k in node.keywords if k.arg == "weights_only"
                            and isinstance(k.value, ast.Constant) and k.value.value is True]
                    if not safe:
                        problems.append(f"{where}: torch.load without weights_only=True")
                if node.func.attr.endswith("_object") or node.func.attr.endswith(
                        "_object_list"):
                    problems.append(f"{where}: {node.func.attr} pickles objects")
    assert problems == []


def test_state_bytes_larger_than_the_store_takes_in_one_value_go_in_chunks(
        store: dist.TCPStore) -> None:
    # the libuv TCPStore server refuses a value over 8 MiB and drops the connection: a
    # stage state of 25 MiB (EfficientNet's first stage) stopped a replay
    state = StageState(step=4, model={"w": torch.arange(9 * 2**20 // 4 + 3, dtype=torch.float32)})
    data = state_to_bytes(state)
    assert len(data) > 8 * 2**20
    proto.put_bytes(store, "rx/1/restore/slow0/data", data)
    assert proto.get_bytes(store, "rx/1/restore/slow0/data") == data
    assert store.check(["rx/1/restore/slow0/data/#2"])   # 3 chunks of <= 4 MiB
    back = state_from_bytes(proto.get_bytes(store, "rx/1/restore/slow0/data"))
    assert torch.equal(back.model["w"], state.model["w"])
    proto.put_bytes(store, "small", b"")
    assert proto.get_bytes(store, "small") == b""


def test_chunked_bytes_refuse_what_is_not_a_chunk_head(store: dist.TCPStore,
                                                       tmp_path: Path) -> None:
    store.set("raw", _blob(tmp_path))
    with pytest.raises(ProtocolError, match="head of chunked state bytes"):
        proto.get_bytes(store, "raw")
    proto.put_bytes(store, "cut", b"x" * 10)
    store.set("cut/#0", b"x" * 9)   # a chunk that lost a byte
    with pytest.raises(ProtocolError, match="declares 10 bytes but its chunks hold 9"):
        proto.get_bytes(store, "cut")
    assert not (tmp_path / TRAP_FILE).exists()
