"""A driver that looks hung tells where it is: SIGUSR1, or a Ctrl-C that did not stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from fipo_trainer.trainer.interrupt import reporting_hangs, stderr_with_fd

PROGRAM = textwrap.dedent(
    """
    import sys, time
    from fipo_trainer.trainer.interrupt import reporting_hangs

    def waiting_for_a_stalled_worker():
        print("ready", flush=True)  # inside the try: a Ctrl-C right after it is still caught
        time.sleep(60)

    def stuck_in_cleanup():
        time.sleep(float(sys.argv[1]))

    with reporting_hangs(stop_within_s=1.0):
        try:
            waiting_for_a_stalled_worker()
        except KeyboardInterrupt:
            stuck_in_cleanup()
    """
)


def start(cleanup_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(cleanup_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on():
    proc = start(cleanup_s=0.0)
    try:
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(1.0)
        assert proc.poll() is None  # SIGUSR1's default action would have ended it
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "Current thread" in err and "waiting_for_a_stalled_worker" in err, err
    assert "stuck_in_cleanup" not in err  # the stop was quick: no second report


def test_a_ctrl_c_that_does_not_stop_the_process_reports_where_it_is_stuck():
    proc = start(cleanup_s=4.0)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "stuck_in_cleanup" in err, err
    assert proc.returncode == 0


def test_the_handlers_are_the_callers_again_after_the_block(capsys):
    """In-process callers (pytest, a script calling ``train_main``) keep their own Ctrl-C
    handler, and pytest's captured stderr (no file descriptor) is no obstacle."""
    before = signal.getsignal(signal.SIGINT)
    with reporting_hangs():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
    assert stderr_with_fd() is sys.__stderr__  # capsys's stream has no descriptor
