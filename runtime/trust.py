"""Joining a job: the shared token, where it comes from, and the store handshake that checks it.

Example (what the emulator's launcher and its device processes do)::

    token = resolve_token(None, "out/")                  # --token, $ASTEROID_TOKEN, out/token
    gate = Gatekeeper(store, token)                      # the job: publishes a challenge
    job_store = join_job(client_store, token, rank=2)    # a device: proves the token, or
                                                         # AuthenticationError
    dist.init_process_group("gloo", store=dist.PrefixStore("pg/0", job_store), ...)

[Note: trust boundary]
A job's processes share one secret, the token (``--token``, the environment variable
``ASTEROID_TOKEN``, or the file ``DIR/token`` that ``asteroid-fx partition`` writes with mode
0600). Before a process may take part it runs a challenge-response handshake on the c10d
store, the only keys outside the job's prefix (``runtime.protocol.JoinKeys``):

1. the job (the emulator's launcher, or rank 0 under torchrun) publishes a ``Challenge``: a
   fresh random nonce and HMAC-SHA256(token, "job", nonce), its proof that it holds the
   token;
2. a joiner checks that proof (``hmac.compare_digest``), then writes a ``JoinProof``: its
   rank, its own nonce and HMAC(token, "join", challenge nonce, rank, its nonce);
3. the job checks the proof and answers with a ``Verdict``: admitted (with
   HMAC(token, "admit", ...) bound to the joiner's nonce, which the joiner checks) or
   refused. A refused or wrong-token process stops with ``AuthenticationError`` and one
   line on each side, before it has read or written anything of the job.

Every other key of the job lives under a prefix derived from the token and the nonce
(HMAC(token, "keys", nonce)), which a process without the token cannot compute, and every
value in the store is a typed JSON message or raw tensor bytes (``runtime.protocol``),
never a pickle: nothing that reaches the store can make a device run code.

What the token does not do: the c10d store itself has no access control and nothing is
encrypted. A process that can reach the store's port can list its keys (``list_keys``),
read them, overwrite them or delete them, and anyone who can see the traffic sees the keys,
the activations and the weights. So a party on the network can disrupt or corrupt a job,
but not join it with a guessed rank, and not make a device execute code through the store.
Run jobs on a network you trust (a home or lab LAN, a VPN), and keep the token file as
private as the partition directory.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from contracts.errors import AuthenticationError, ProtocolError
from runtime import protocol as proto

__all__ = [
    "TOKEN_ENV",
    "TOKEN_FILE",
    "new_token",
    "check_token",
    "write_token",
    "read_token_file",
    "find_token",
    "resolve_token",
    "job_prefix",
    "Gatekeeper",
    "join_job",
]

log = logging.getLogger(__name__)

#: environment variable that holds the token when ``--token`` is not given
TOKEN_ENV = "ASTEROID_TOKEN"
#: name of the token file in a partition directory (mode 0600)
TOKEN_FILE = "token"
#: tokens shorter than this are accepted with a warning
MIN_TOKEN_CHARS = 16
#: longest pause between two polls of the gatekeeper while nobody joins (seconds)
_IDLE_POLL_S = 0.1
#: seconds the gatekeeper polls at full speed after it starts or is told to ``expect()``
_EXPECT_S = 15.0
_WHERE = ("--token, the environment variable ASTEROID_TOKEN, or the file DIR/token that "
          "`asteroid-fx partition` writes")


def new_token() -> str:
    """A fresh random token: 32 hex characters (128 bits)."""
    return secrets.token_hex(16)


def check_token(token: str, source: str = "the token") -> str:
    """``token`` without surrounding white space; ``AuthenticationError`` when it is empty or
    contains white space inside (a short one is accepted with a warning)."""
    if not isinstance(token, str):
        raise AuthenticationError(f"{source} must be a string, got {type(token).__name__}")
    text = token.strip()
    if not text or any(ch.isspace() for ch in text):
        raise AuthenticationError(f"{source} must be a non-empty string without spaces, got "
                                  f"{len(text)} characters; generate one with "
                                  f"`python -c \"import secrets; print(secrets.token_hex(16))\"`")
    if len(text) < MIN_TOKEN_CHARS:
        log.warning("%s has only %d characters; use at least %d (e.g. secrets.token_hex(16))",
                    source, len(text), MIN_TOKEN_CHARS)
    return text


def write_token(directory: str | Path, token: str) -> Path:
    """Write ``token`` to ``DIR/token``, readable by its owner only (mode 0600)."""
    path = Path(directory) / TOKEN_FILE
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (check_token(token) + "\n").encode())
    finally:
        os.close(fd)
    os.chmod(path, 0o600)       # an existing file keeps its mode through O_TRUNC
    return path


def read_token_file(directory: str | Path) -> str | None:
    """The token in ``DIR/token``, or None when there is no such file."""
    path = Path(directory) / TOKEN_FILE
    if not path.is_file():
        return None
    mode = path.stat().st_mode & 0o077
    if mode:
        log.warning("%s is readable by others (mode %o); `chmod 600 %s`", path,
                    path.stat().st_mode & 0o777, path)
    return check_token(path.read_text(), f"the token in {path}")


def find_token(explicit: str | None, directory: str | Path | None = None) -> str | None:
    """The job's token: ``explicit`` (``--token``), else ``$ASTEROID_TOKEN``, else
    ``DIR/token``; None when none is set (``AuthenticationError`` for an empty one)."""
    if explicit is not None:
        return check_token(explicit, "--token")
    env = os.environ.get(TOKEN_ENV)
    if env is not None:
        return check_token(env, f"${TOKEN_ENV}")
    return read_token_file(directory) if directory is not None else None


def resolve_token(explicit: str | None, directory: str | Path | None = None) -> str:
    """:func:`find_token`, required.

    Raises:
        AuthenticationError: no token is set, or the token is empty.
    """
    found = find_token(explicit, directory)
    if found is not None:
        return found
    raise AuthenticationError(f"no token to join the job: pass {_WHERE} (re-run `asteroid-fx "
                              f"partition` to get one, or copy DIR/token from the "
                              f"workstation)")


def _mac(token: str, *parts: object) -> str:
    message = "\x1f".join(str(p) for p in parts).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def job_prefix(token: str, nonce: str) -> str:
    """The prefix of every key of the job whose challenge has ``nonce``."""
    return "asteroid/job/" + _mac(token, "keys", nonce)[:24]


class Gatekeeper:
    """The job's side of the handshake: publishes the challenge and, from a daemon thread,
    admits or refuses every ``JoinProof`` (see [Note: trust boundary]).

    ``job_store`` is the job's prefixed store. A refusal is logged once and kept in
    ``refused`` (one line each); the supervisor ends the job with :meth:`raise_if_refused`.
    """

    def __init__(self, store: dist.Store, token: str, *, poll_s: float = 0.01,
                 where: str = "the job") -> None:
        self.store = store
        self.token = token
        self.nonce = secrets.token_hex(16)
        self.where = where
        self.job_store: dist.Store = dist.PrefixStore(job_prefix(token, self.nonce), store)
        self.admitted: dict[int, int] = {}      # rank -> how many times it was admitted
        self.refused: list[str] = []
        self._refused_at: list[int] = []        # the proofs refused (their numbers)
        self._seen = 0
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._expect = threading.Event()
        proto.put(store, proto.JoinKeys.challenge(),
                  proto.Challenge(nonce=self.nonce, proof=_mac(token, "job", self.nonce)))
        self._thread = threading.Thread(target=self._run, name="asteroid-fx-gatekeeper",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # polls (a blocking ``store.wait`` with a timeout logs a warning at every timeout):
        # every ``poll_s`` while processes are expected (``expect``: for ``_EXPECT_S``) or
        # just joined, backing off to ``_IDLE_POLL_S`` while nobody joins
        store = proto.clone_store(self.store)
        interval = self._poll_s
        eager_until = time.monotonic() + _EXPECT_S
        while not self._stop.is_set():
            if self._expect.wait(interval):
                self._expect.clear()
                eager_until = time.monotonic() + _EXPECT_S
            try:
                answered = self.check(store)
            except (RuntimeError, OSError) as exc:     # the store went away: the job ends
                log.debug("gatekeeper stops: %s", exc)
                return
            eager = answered or time.monotonic() < eager_until
            interval = self._poll_s if eager else min(2 * interval, _IDLE_POLL_S)

    def expect(self) -> None:
        """Processes are about to join: poll every ``poll_s`` again (for ``_EXPECT_S``)."""
        self._expect.set()

    def check(self, store: dist.Store | None = None) -> int:
        """Answer every proof written since the last call; returns how many."""
        store = store or self.store
        count = int(store.add(proto.JoinKeys.count(), 0))
        answered = 0
        while self._seen < count:
            self._seen += 1
            self._answer(store, self._seen)
            answered += 1
        return answered

    def _answer(self, store: dist.Store, n: int) -> None:
        name = proto.JoinKeys.proof(n)
        try:
            proof = proto.get(store, name, proto.JoinProof, timeout_s=5.0)
        except ProtocolError as exc:
            self._refuse(store, n, f"a malformed join request ({exc})")
            return
        except RuntimeError:      # counted but never written (the joiner died)
            return
        expected = _mac(self.token, "join", self.nonce, proof.rank, proof.nonce)
        if not hmac.compare_digest(expected, proof.proof):
            self._refuse(store, n, f"a process asking to join as rank {proof.rank} does not "
                                   f"hold the job's token")
            return
        with self._lock:
            self.admitted[proof.rank] = self.admitted.get(proof.rank, 0) + 1
        proto.put(store, proto.JoinKeys.verdict(n), proto.Verdict(
            ok=True, proof=_mac(self.token, "admit", self.nonce, proof.rank, proof.nonce)))

    def _refuse(self, store: dist.Store, n: int, reason: str) -> None:
        line = f"{self.where} refused {reason}; it must use the job's token ({_WHERE})"
        with self._lock:       # recorded first: a verdict read implies a refusal on record
            self.refused.append(line)
            self._refused_at.append(n)
        log.debug("%s", line)
        proto.put(store, proto.JoinKeys.verdict(n), proto.Verdict(ok=False, reason=reason))

    def wait_for(self, ranks: set[int], timeout_s: float) -> None:
        """Block until each of ``ranks`` was admitted once (torchrun's rank 0 before the
        process group); ``AuthenticationError`` at the first refusal or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.raise_if_refused()
            with self._lock:
                missing = sorted(r for r in ranks if r not in self.admitted)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AuthenticationError(f"ranks {missing} did not join {self.where} within "
                                          f"{timeout_s:.0f} s (started with the same "
                                          f"partition directory and token?)")
            time.sleep(self._poll_s)

    def raise_if_refused(self, linger_s: float = 3.0) -> None:
        """``AuthenticationError`` (the first refusal's line) when a process was refused,
        after waiting (at most ``linger_s``) until the refused processes read their verdict:
        the store may end with this process."""
        with self._lock:
            first = self.refused[0] if self.refused else None
            numbers = list(self._refused_at)
        if first is None:
            return
        deadline = time.monotonic() + linger_s
        for n in numbers:
            while (int(self.store.add(proto.JoinKeys.read(n), 0)) == 0
                   and time.monotonic() < deadline):
                time.sleep(self._poll_s)
        raise AuthenticationError(first)

    def stop(self) -> None:
        self._stop.set()
        self._expect.set()
        self._thread.join(timeout=5.0)


def join_job(store: dist.Store, token: str, rank: int, *, timeout_s: float = 60.0,
             where: str = "the job") -> dist.Store:
    """Prove the token to the job on ``store`` as ``rank`` and return the job's prefixed
    store (see [Note: trust boundary]).

    Raises:
        AuthenticationError: no challenge within ``timeout_s``, the job does not hold the
            same token, or the job refused this process.
    """
    wait = timedelta(seconds=timeout_s)
    try:
        store.wait([proto.JoinKeys.challenge()], wait)
        challenge = proto.get(store, proto.JoinKeys.challenge(), proto.Challenge)
    except ProtocolError as exc:
        raise AuthenticationError(f"{where} published a malformed challenge ({exc}); is "
                                  f"this an asteroid-fx job?") from None
    except RuntimeError as exc:
        raise AuthenticationError(f"{where} published no join challenge within "
                                  f"{timeout_s:.0f} s ({_first_line(exc)}); start the job "
                                  f"(rank 0 / the launcher) with asteroid-fx") from None
    mine = secrets.token_hex(16)
    n = int(store.add(proto.JoinKeys.count(), 1))
    proto.put(store, proto.JoinKeys.proof(n), proto.JoinProof(
        rank=rank, nonce=mine, proof=_mac(token, "join", challenge.nonce, rank, mine)))
    job_holds_token = hmac.compare_digest(_mac(token, "job", challenge.nonce), challenge.proof)
    try:
        verdict = proto.get(store, proto.JoinKeys.verdict(n), proto.Verdict,
                            timeout_s=timeout_s)
    except ProtocolError as exc:
        raise AuthenticationError(f"{where} answered with a malformed verdict ({exc})") \
            from None
    except RuntimeError as exc:
        raise AuthenticationError(f"{where} did not answer the join request of rank {rank} "
                                  f"within {timeout_s:.0f} s ({_first_line(exc)})") from None
    try:
        store.add(proto.JoinKeys.read(n), 1)
    except RuntimeError:      # the job already ended: the verdict was read all the same
        pass
    if not job_holds_token or not verdict.ok:
        raise AuthenticationError(f"rank {rank} was refused by {where}: this process's token "
                                  f"is not the job's; use the job's token ({_WHERE})")
    expected = _mac(token, "admit", challenge.nonce, rank, mine)
    if not hmac.compare_digest(expected, verdict.proof):
        raise AuthenticationError(f"{where} admitted rank {rank} without proving the token; "
                                  f"refusing to join it")
    return dist.PrefixStore(job_prefix(token, challenge.nonce), store)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
