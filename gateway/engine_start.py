"""What the gateway can say about an engine that failed to start.

vLLM's engine core and its workers run in child processes. A worker that raises logs its own
traceback (JSON, telemetry/logs.py); a worker that is killed (out of memory) or crashes in native
code logs nothing, and vLLM reports only "WorkerProc initialization failed due to an exception in a
background process. See stack trace for root cause." The root cause is then how that process
ended: `EngineProcessWatch` follows the gateway's descendants while the engine starts and tells
which ended, and how (the exit status a zombie leaves in /proc before its parent reaps it, when a
poll catches it), and whether the kernel killed processes of this container for memory (cgroup
v2 `memory.events`, `oom_kill`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.02
# Shorter-lived children (a `sh` a library runs at start) are not engine processes: left out.
MIN_LIFETIME_S = 0.5
MEMORY_EVENTS = Path("/sys/fs/cgroup/memory.events")


def oom_kills(events: Path = MEMORY_EVENTS) -> int | None:
    """Processes of this cgroup the kernel killed for memory so far; None where not readable."""
    try:
        lines = events.read_text().splitlines()
    except OSError:
        return None
    counts = dict(line.split() for line in lines if len(line.split()) == 2)
    return int(counts["oom_kill"]) if "oom_kill" in counts else None


@dataclass(frozen=True)
class EndedProcess:
    pid: int
    name: str
    how: str  # "killed by SIGKILL", "exit code 1", or "exit status unknown"

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid}) {self.how}"


def exit_status(pid: int) -> str | None:
    """How a zombie process ended, from field 52 of /proc/PID/stat (waitpid's status); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields 3.. (the name in parentheses may hold spaces)
    if fields[0] != "Z" or len(fields) < 50:
        return None
    status = int(fields[49])
    if status & 0x7F:
        return f"killed by {signal.Signals(status & 0x7F).name}"
    return f"exit code {status >> 8}"


class EngineProcessWatch:
    """While in the block, remembers the descendants of this process and how those that ended did."""

    def __init__(self, interval_s: float = POLL_INTERVAL_S, memory_events: Path = MEMORY_EVENTS) -> None:
        self._interval_s = interval_s
        self._memory_events = memory_events
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-process-watch", daemon=True)
        self._seen: dict[int, tuple[str, float, float]] = {}  # pid -> (last name, first seen, last seen)
        self._how: dict[int, str] = {}
        self._oom_kills_before: int | None = None

    def __enter__(self) -> EngineProcessWatch:
        self._oom_kills_before = oom_kills(self._memory_events)
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the last word: processes that ended as the start failed

    def ended(self) -> list[EndedProcess]:
        alive = {p.pid for p in _descendants() if _status(p) != psutil.STATUS_ZOMBIE}
        return [
            EndedProcess(pid, name, self._how.get(pid, "exit status unknown"))
            for pid, (name, first, last) in self._seen.items()
            if pid not in alive and last - first >= MIN_LIFETIME_S
        ]

    def summary(self) -> str:
        """For the log: the processes that ended, and the kernel's memory kills during the start."""
        parts = [str(process) for process in self.ended()]
        after = oom_kills(self._memory_events)
        if after is not None and self._oom_kills_before is not None and after > self._oom_kills_before:
            parts.append(f"the kernel killed {after - self._oom_kills_before} process(es) for memory (oom_kill)")
        return "; ".join(parts) or "none"

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._poll()

    def _poll(self) -> None:
        now = time.monotonic()
        for process in _descendants():
            try:  # read again at every poll: vLLM renames its processes once started (VLLM::Worker)
                name = process.name()
            except psutil.Error:
                name = None
            previous = self._seen.get(process.pid)
            first = now if previous is None else previous[1]
            self._seen[process.pid] = (name or (previous[0] if previous else "?"), first, now)
        for pid in self._seen:
            if pid not in self._how and (how := exit_status(pid)) is not None:
                self._how[pid] = how


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _status(process: psutil.Process) -> str | None:
    try:
        return str(process.status())
    except psutil.Error:
        return None
