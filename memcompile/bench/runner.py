"""Run each setup in its own process, so peak-memory counters start clean and a setup that runs out
of memory or crashes becomes a row of the table ("OOM", "error: ...") rather than the end of the bench.

The child (``memcompile.bench.worker``) prints progress lines on stderr and its result as one JSON line
on stdout; this side shows which setup is running, for how long, and what it is doing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable

RESULT_PREFIX = "BENCH_RESULT "
PROGRESS_PREFIX = "[bench] "


def _error_line(stderr_tail: list[str]) -> str:
    """The exception line of a traceback (the last line naming an error), else the last line."""
    lines = [ln.strip() for ln in stderr_tail if ln.strip() and not ln.startswith(PROGRESS_PREFIX)]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or ln.startswith("Killed"):
            return ln[:160]
    return lines[-1][:160] if lines else "no output"


class Progress:
    """One line per setup on stderr; on a terminal the line is redrawn with the elapsed time."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.index = total, stream, 0
        self.live = stream.isatty()

    def start(self, label: str) -> None:
        self.index += 1
        self.label, self.started, self.note = label, time.perf_counter(), "starting"
        if not self.live:
            print(f"[{self.index}/{self.total}] {label}: running", file=self.stream, flush=True)
        self.tick()

    def tick(self, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        if self.live:
            elapsed = time.perf_counter() - self.started
            line = f"[{self.index}/{self.total}] {self.label}: {self.note} ({elapsed:.0f} s)"
            self.stream.write("\r\033[K" + line)
            self.stream.flush()

    def done(self, status: str) -> None:
        elapsed = time.perf_counter() - self.started
        prefix = "\r\033[K" if self.live else ""
        print(f"{prefix}[{self.index}/{self.total}] {self.label}: {status} in {elapsed:.1f} s",
              file=self.stream, flush=True)


def run_isolated(job: dict, progress: Progress, timeout: float | None = None) -> dict:
    """Run ``job`` in a fresh Python process; always returns a result dict with a ``status``."""
    progress.start(job["setup"])
    cmd = [sys.executable, "-m", "memcompile.bench.worker", json.dumps(job)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    result: dict = {}
    tail: deque[str] = deque(maxlen=40)

    def read_stdout():
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result.update(json.loads(line[len(RESULT_PREFIX):]))

    def read_stderr():
        for line in proc.stderr:
            if line.startswith(PROGRESS_PREFIX):
                progress.note = line[len(PROGRESS_PREFIX):].strip()
            tail.append(line.rstrip("\n"))

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for t in readers:
        t.start()
    start = time.perf_counter()
    timed_out = False
    try:
        while proc.poll() is None:
            if timeout is not None and time.perf_counter() - start > timeout:
                timed_out = True
                break
            progress.tick()
            time.sleep(0.5)
    finally:
        if proc.poll() is None:  # timed out, or the bench itself was interrupted: the setup goes too
            proc.kill()
        proc.wait()
    for t in readers:
        t.join(timeout=5)
    if timed_out:
        result = {"status": f"error: timed out after {timeout:.0f} s ({progress.note})"}
    elif not result:
        code = proc.returncode
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        result = {"status": f"error: {why}: {_error_line(list(tail))}"}
    result.setdefault("setup", job.get("setup"))
    if result["status"] != "ok":  # the traceback, for the JSON lines; the table shows one line
        result["stderr_tail"] = [ln for ln in tail if not ln.startswith(PROGRESS_PREFIX)][-20:]
    progress.done(result["status"][:120])
    return result


def run_setups(setups: list, job_for: Callable[[object], dict], timeout: float | None = None) -> list[dict]:
    """Each setup in its own process, in order; one whose dependency is missing becomes an
    "unavailable: ..." row without starting a process."""
    from memcompile.bench.setups import unavailable

    progress = Progress(len(setups))
    rows = []
    for setup in setups:
        reason = unavailable(setup)
        if reason is not None:
            progress.start(setup.name)
            row = {"setup": setup.name, "status": f"unavailable: {reason}"}
            progress.done(row["status"])
        else:
            row = run_isolated(job_for(setup), progress, timeout=timeout)
        rows.append(row)
    return rows
