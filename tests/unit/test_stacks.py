"""The stalled worker's stacks: who may be signalled, and how a dump is shown."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys

from fipo_trainer.cluster.stacks import add_stacks, catches, main_thread_first
from fipo_trainer.cluster.waiting import CallTimeoutError

# As faulthandler lists them: the newest thread first, the main thread (which runs the actor's
# calls) last; the signal landed on a helper thread, marked "Current thread".
DUMP = """Current thread 0x3 (most recent call first):
  File "threading.py", line 331 in wait

Thread 0x2 (most recent call first):
  File "threading.py", line 327 in wait

Thread 0x1 (most recent call first):
  File "worker.py", line 7 in nap
"""


def test_only_a_process_that_handles_sigusr1_is_signalled():
    """SIGUSR1's default action ends a process: one without the handler is left alone."""
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not catches(plain.pid)
    finally:
        plain.kill()
        plain.wait()
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, chain=False)
    try:
        assert catches(os.getpid())
    finally:
        faulthandler.unregister(signal.SIGUSR1)
    assert not catches(os.getpid())
    assert not catches(2**22 + 12345)  # no such process


def test_the_main_thread_that_ran_the_call_comes_first_and_long_dumps_are_cut():
    shown = main_thread_first(DUMP)
    assert shown.splitlines()[:2] == [
        "Thread 0x1 (most recent call first):",
        '  File "worker.py", line 7 in nap',
    ]
    assert shown.count("(most recent call first)") == 3
    cut = main_thread_first(DUMP, max_lines=3).splitlines()
    assert cut[-1] == "  ..." and len(cut) == 4


def test_an_error_without_local_ranks_is_left_as_it_is():
    err = CallTimeoutError("rank 3 did not finish nap", role="g", ranks=[3], method="nap")
    assert add_stacks(err, {0: os.getpid()}, "worker group 'g'") is err
    assert str(err) == "rank 3 did not finish nap"
