"""Tests of runtime.trust: the shared token, its file, and the join handshake on the store."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from partition_cases import EXAMPLES, ROOT, example_spec, hand_plan

from contracts.errors import AuthenticationError
from runtime import protocol as proto
from runtime.trust import (
    TOKEN_ENV,
    Gatekeeper,
    find_token,
    job_prefix,
    join_job,
    new_token,
    read_token_file,
    resolve_token,
    write_token,
)

RIGHT = "a" * 32
WRONG = "b" * 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server() -> Iterator[tuple[dist.TCPStore, int]]:
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=20))
    yield store, port


def _client(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, 1, is_master=False,
                         timeout=timedelta(seconds=20))


def test_the_token_comes_from_the_option_the_environment_or_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert find_token(None, tmp_path) is None
    with pytest.raises(AuthenticationError, match="no token to join the job: pass --token"):
        resolve_token(None, tmp_path)
    path = write_token(tmp_path, "file-token-0123456789")
    assert path == tmp_path / "token" and (path.stat().st_mode & 0o777) == 0o600
    assert resolve_token(None, tmp_path) == "file-token-0123456789"
    monkeypatch.setenv(TOKEN_ENV, "env-token-0123456789")
    assert resolve_token(None, tmp_path) == "env-token-0123456789"
    assert resolve_token(" option-token-0123456789\n", tmp_path) == "option-token-0123456789"
    for bad in ("", "   ", "two words"):
        with pytest.raises(AuthenticationError, match="non-empty string without spaces"):
            resolve_token(bad, tmp_path)
    assert len(new_token()) == 32 and new_token() != new_token()


def test_a_token_file_readable_by_others_is_used_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_token(tmp_path, RIGHT)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="runtime.trust"):
        assert read_token_file(tmp_path) == RIGHT
    assert "readable by others" in caplog.text and "chmod 600" in caplog.text
    write_token(tmp_path, WRONG)           # rewriting restores 0600
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_process_with_the_token_joins_and_shares_the_jobs_keys(
        server: tuple[dist.TCPStore, int]) -> None:
    store, port = server
    gate = Gatekeeper(store, RIGHT)
    try:
        job = join_job(_client(port), RIGHT, 1, timeout_s=10)
        job.set("rx/0/step/0", b"x")
        assert gate.job_store.get("rx/0/step/0") == b"x"
        gate.wait_for({1}, timeout_s=5)
        assert gate.admitted == {1: 1} and gate.refused == []
        # the keys live under a prefix that only the token gives
        assert not store.check(["rx/0/step/0"])
        nonce = proto.get(store, proto.JoinKeys.challenge(), proto.Challenge).nonce
        assert store.check([job_prefix(RIGHT, nonce) + "/rx/0/step/0"])
        assert job_prefix(WRONG, nonce) != job_prefix(RIGHT, nonce)
    finally:
        gate.stop()


_JOINER = textwrap.dedent("""
    import sys
    from datetime import timedelta
    import torch.distributed as dist
    from contracts.errors import AuthenticationError
    from runtime.trust import join_job
    port, token = int(sys.argv[1]), sys.argv[2]
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=False, timeout=timedelta(seconds=20))
    try:
        join_job(store, token, 1, timeout_s=20, where="the job")
    except AuthenticationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print("joined")
""")


def test_a_process_with_the_wrong_token_is_refused_on_both_sides(
        server: tuple[dist.TCPStore, int]) -> None:
    store, port = server
    gate = Gatekeeper(store, RIGHT, where="the launcher")
    began = time.monotonic()
    try:
        joiner = subprocess.run([sys.executable, "-c", _JOINER, str(port), WRONG], cwd=ROOT,
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        # the joiner: one line, refused, non-zero
        assert joiner.returncode == 1 and joiner.stdout == ""
        assert joiner.stderr.count("\n") == 1, joiner.stderr
        assert "rank 1 was refused by the job: this process's token is not the job's" \
            in joiner.stderr
        # the job: one line, the refusal
        with pytest.raises(AuthenticationError) as refused:
            gate.raise_if_refused()
        line = str(refused.value)
        assert "\n" not in line and line.startswith(
            "the launcher refused a process asking to join as rank 1 does not hold the job's "
            "token")
        assert gate.admitted == {}
        # nothing of the job was read or written by the refused process: no key outside
        # the handshake's
        assert all(k.startswith(proto.JoinKeys.PREFIX) for k in store.list_keys())
    finally:
        gate.stop()
    assert time.monotonic() - began < 60      # nothing hangs


def test_a_job_with_another_token_is_refused_by_the_joiner(
        server: tuple[dist.TCPStore, int]) -> None:
    store, port = server
    gate = Gatekeeper(store, WRONG)
    try:
        with pytest.raises(AuthenticationError, match="this process's token is not the job's"):
            join_job(_client(port), RIGHT, 2, timeout_s=10)
        with pytest.raises(AuthenticationError, match="does not hold the job's token"):
            gate.raise_if_refused(linger_s=0.1)
    finally:
        gate.stop()


def test_a_malformed_or_pickled_join_request_is_refused_unread(
        tmp_path: Path, server: tuple[dist.TCPStore, int]) -> None:
    from test_protocol import TRAP_FILE, _blob

    store, _ = server
    gate = Gatekeeper(store, RIGHT, poll_s=0.01)
    try:
        n = int(store.add(proto.JoinKeys.count(), 1))
        store.set(proto.JoinKeys.proof(n), _blob(tmp_path))
        verdict = proto.get(store, proto.JoinKeys.verdict(n), proto.Verdict, timeout_s=10)
        assert not verdict.ok and "a pickle, refused unread" in verdict.reason
        assert not (tmp_path / TRAP_FILE).exists()
        with pytest.raises(AuthenticationError, match="malformed join request"):
            gate.raise_if_refused(linger_s=0.1)
    finally:
        gate.stop()


def test_no_job_on_the_store_is_one_clear_error(server: tuple[dist.TCPStore, int]) -> None:
    _, port = server
    began = time.monotonic()
    with pytest.raises(AuthenticationError, match="published no join challenge within 1 s"):
        join_job(_client(port), RIGHT, 0, timeout_s=1.0)
    assert time.monotonic() - began < 10


def test_partition_writes_a_private_token_and_keeps_it(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    spec = example_spec("mlp.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    plan = hand_plan(7, [3])
    stages = partition(model, inputs, plan)
    out = tmp_path / "part"
    written = save_partition(out, plan, stages, model_spec=str(EXAMPLES / "mlp.py"), onnx=False)
    token = (out / "token").read_text().strip()
    assert written["token"] == out / "token" and len(token) == 32
    assert (out / "token").stat().st_mode & 0o777 == 0o600
    save_partition(out, plan, stages, model_spec=str(EXAMPLES / "mlp.py"), onnx=False)
    assert (out / "token").read_text().strip() == token          # kept: boards keep working
    save_partition(out, plan, stages, model_spec=str(EXAMPLES / "mlp.py"), onnx=False,
                   token=RIGHT)
    assert (out / "token").read_text().strip() == RIGHT


def test_device_entry_points_with_different_tokens_both_stop_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `python -m asteroid_fx.device run` processes of one job (rank 0 hosts the store,
    as a plain env:// launch does); rank 1 has another token: both exit 1 with one line."""
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition

    spec = example_spec("mlp.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(8)
    plan = hand_plan(7, [3], micro_batch=8)
    out = tmp_path / "part"
    save_partition(out, plan, partition(model, inputs, plan),
                   model_spec=str(EXAMPLES / "mlp.py"), onnx=False, token=RIGHT)
    port = str(_free_port())
    procs = []
    for rank, token in ((0, RIGHT), (1, WRONG)):
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        env.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port, "LOCAL_RANK": "0", "PYTHONPATH": str(ROOT)})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "asteroid_fx.device", "run", str(out), "--steps", "2",
             "--timeout", "60", "--token", token],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5 if rank == 0 else 0)    # rank 0 hosts the store
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 1, (stdout, stderr)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, stderr
        assert lines[0].startswith("asteroid-fx device: error: ")
        assert "refused" in lines[0] and "token" in lines[0]
    assert "rank 0 at 127.0.0.1" in outputs[0][1] and "does not hold the job's token" \
        in outputs[0][1]
    assert "rank 1 was refused by rank 0 at 127.0.0.1" in outputs[1][1]
    assert not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((out / "partition.json").read_text())["files"]


def test_cli_run_refuses_an_empty_token_in_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from asteroid_fx.cli import main

    cluster = tmp_path / "c.yaml"
    cluster.write_text("devices:\n  - {name: dev0, type: local}\n  - {name: dev1, type: local}\n")
    model = EXAMPLES / "mlp.py"
    out = tmp_path / "part"
    assert main(["partition", str(model), "--cluster", str(cluster), "--batch-size", "4",
                 "--out", str(out), "--no-onnx", "--costs", "analytic", "--planner",
                 "pp-equal", "--token", RIGHT]) == 0
    assert (out / "token").read_text().strip() == RIGHT
    capsys.readouterr()
    assert main(["run", str(out), "--emulate", str(cluster), "--token", " "]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--token must be a non-empty string without spaces" in err


def test_cli_partition_refuses_a_bad_token_and_a_foreign_directory_before_planning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # both are refused before the plan is printed, and nothing in --out changes
    from asteroid_fx.cli import main

    cluster = tmp_path / "c.yaml"
    cluster.write_text("devices:\n  - {name: dev0, type: local}\n  - {name: dev1, type: local}\n")
    args = ["partition", str(EXAMPLES / "mlp.py"), "--cluster", str(cluster), "--batch-size",
            "4", "--no-onnx", "--costs", "analytic", "--planner", "pp-equal"]
    assert main([*args, "--out", str(tmp_path / "part"), "--token", "has space"]) == 1
    captured = capsys.readouterr()
    assert "without spaces" in captured.err and "Plan for" not in captured.out
    assert not (tmp_path / "part").exists()
    assert main([*args, "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "not a partition directory" in captured.err
    assert "Plan for" not in captured.out
    assert cluster.read_text().startswith("devices:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_token_that_is_not_a_string_is_an_authentication_error() -> None:
    """``token=1234`` was AttributeError: 'int' object has no attribute 'strip'."""
    from contracts.errors import AuthenticationError
    from runtime.trust import check_token

    with pytest.raises(AuthenticationError, match="token must be a string, got int"):
        check_token(1234, "token")  # type: ignore[arg-type]
    assert check_token(" abcdefghijklmnop\n") == "abcdefghijklmnop"
