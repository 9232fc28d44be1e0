"""Runs every command of the README's bash blocks in a fresh clone: wall time, peak memory."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# [Note: checking the README]
# Issue 14 asks that every command in the README finish on its example in under a minute on
# the 2-core host, using under 2 GB, or refuse up front; the definition of done asks that
# what an issue adds works from a clean checkout via the README. This tool takes every
# ```bash block of README.md, joins backslash continuations, splits `a && b` chains, and
# runs each command in order in a fresh `git clone` of this checkout's HEAD (so `runs/` and
# `out/` start empty, as for a new user), with this Python's `asteroid-fx` on PATH.
# Skipped, with the reason printed: `pip install ...` (it would re-point this environment's
# editable install at the clone; the quick start's install is what CI does), the test
# command (.ci/run runs it), and the board-side `torchrun ... asteroid_fx.device` launch
# (one process per board; tests/test_device_launch.py runs it on loopback).
# Memory is the peak over 0.2 s samples of the summed resident set of every process in the
# command's session (the emulator's workers included), so a short spike can be missed.

WALL_TARGET_S = 60.0
MEMORY_TARGET_BYTES = 2 << 30
SAMPLE_S = 0.2


@dataclass(frozen=True)
class Command:
    """One README command: its text, the environment assignments before it, its argv."""

    text: str
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]


def bash_blocks(readme: str) -> list[str]:
    """The bodies of the README's ```bash fenced blocks, in order."""
    return re.findall(r"^```bash\n(.*?)^```", readme, flags=re.S | re.M)


def commands(block: str) -> list[Command]:
    """The commands of one block: continuations joined, comments dropped, ``&&`` split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out: list[Command] = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            part, words = words[:cut], words[cut + 1:]
            env = []
            while part and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", part[0]):
                name, _, value = part.pop(0).partition("=")
                env.append((name, value))
            if part:
                out.append(Command(shlex.join([f"{k}={v}" for k, v in env] + part),
                                   tuple(env), tuple(part)))
    return out


def skip_reason(command: Command) -> str | None:
    """Why ``command`` is not run here, or None."""
    argv = command.argv
    if argv[0] == "pip":
        return "installs: would re-point this environment's editable install"
    if argv[:3] == ("python", "-m", "pytest"):
        return "the test command: .ci/run runs it"
    if argv[0] == "torchrun":
        return "one process per board (tests/test_device_launch.py runs it on loopback)"
    return None


def _session_memory(session: int) -> tuple[int, int]:
    """Summed resident and proportional (PSS) bytes of the processes of ``session`` (Linux
    /proc; PSS 0 where ``smaps_rollup`` cannot be read). Summed RSS counts the pages the
    processes share (libtorch, the Python runtime) once per process; PSS splits them
    between the sharers, so its sum is the memory the session really holds."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss = pss = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != session:
                continue
            rss += int((entry / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        try:
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


def run(command: Command, cwd: Path, timeout_s: float) -> dict[str, object]:
    """Runs ``command`` in ``cwd`` in a session of its own; returns rc, wall and peak RSS."""
    env = dict(os.environ, **dict(command.env))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = list(command.argv)
    if argv[0] == "python":
        argv[0] = sys.executable
    start = time.monotonic()
    peak = peak_pss = 0
    with open(cwd / "check_readme.log", "ab") as log:
        log.write(f"\n$ {command.text}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        rc: int | None = None
        while rc is None:
            rss, pss = _session_memory(proc.pid)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            try:
                rc = proc.wait(timeout=SAMPLE_S)
            except subprocess.TimeoutExpired:
                if time.monotonic() - start > timeout_s:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    rc = -9
    wall = time.monotonic() - start
    return {"command": command.text, "rc": rc, "wall_s": round(wall, 1),
            "peak_rss_mib": round(peak / 2**20, 1), "peak_pss_mib": round(peak_pss / 2**20, 1),
            "within_targets": rc == 0 and wall <= WALL_TARGET_S and peak <= MEMORY_TARGET_BYTES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds before a command is killed (default 600)")
    parser.add_argument("--only", default="", help="run only commands containing this text")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    found = [c for block in bash_blocks(args.readme.read_text()) for c in commands(block)]
    work = Path(tempfile.mkdtemp(prefix="afx-readme-"))
    clone = work / "checkout"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(f"{len(found)} commands from {args.readme}; running in {clone} "
                  f"(log: {clone / 'check_readme.log'}); load {os.getloadavg()[0]:.1f}")
    rows: list[dict[str, object]] = []
    for command in found:
        reason = skip_reason(command)
        if reason is None and args.only and args.only not in command.text:
            reason = f"not matching --only {args.only!r}"
        if reason is not None:
            rows.append({"command": command.text, "skipped": reason})
            continue
        console.print(f"$ {command.text}")
        rows.append(run(command, clone, args.timeout))
        console.print(f"  rc {rows[-1]['rc']}  {rows[-1]['wall_s']} s  "
                      f"{rows[-1]['peak_rss_mib']} MiB RSS, {rows[-1]['peak_pss_mib']} MiB PSS")
    table = Table(title=f"README commands (load {os.getloadavg()[0]:.1f} at the end; "
                        f"targets: rc 0, <= {WALL_TARGET_S:.0f} s, <= 2 GiB summed RSS)")
    table.add_column("command", no_wrap=True, overflow="ellipsis", max_width=72)
    for column in ("rc", "wall (s)", "peak RSS (MiB)", "peak PSS (MiB)", "verdict"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        if "skipped" in row:
            table.add_row(str(row["command"]), "-", "-", "-", "-", f"skipped: {row['skipped']}")
        else:
            verdict = "ok" if row["within_targets"] else ("FAILED" if row["rc"] else "slow/large")
            table.add_row(str(row["command"]), str(row["rc"]), str(row["wall_s"]),
                          str(row["peak_rss_mib"]), str(row["peak_pss_mib"]), verdict)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any(row.get("rc") not in (None, 0) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
