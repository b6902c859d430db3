"""lower_engine_priority renices every thread of every child process, and only those.

It renices all children of the calling process, so it runs in a process of its own here (pytest's
children include the e2e tests' gateways)."""

from __future__ import annotations

import json
import subprocess
import sys

# A parent with two children: one with a second thread already running (as vLLM's engine core has),
# one that has exited but is not reaped yet (listed, with nothing to renice: skipped).
SCRIPT = """
import json, os, subprocess, sys, time
import psutil
from gateway.engine.vllm_engine import lower_engine_priority

worker = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); print('up', flush=True); time.sleep(60)"
engine = subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE)
assert engine.stdout.readline() == b"up\\n"
gone = subprocess.Popen([sys.executable, "-c", "pass"])
time.sleep(0.5)
threads = psutil.Process(engine.pid).threads()
lower_engine_priority(7)
print(json.dumps({
    "threads": len(threads),
    "child": sorted({os.getpriority(os.PRIO_PROCESS, t.id) for t in threads}),
    "parent": os.getpriority(os.PRIO_PROCESS, os.getpid()),
}))
engine.kill()
"""


def test_every_thread_of_every_child_gets_the_niceness_and_the_parent_keeps_its_own() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"threads": 2, "child": [7], "parent": 0}
