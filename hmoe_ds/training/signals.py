"""Stopping a run on a signal: every rank stops at the same step, after a checkpoint when asked.

How the ``deepspeed`` command handles signals (DeepSpeed 0.19.8, one node):
the runner (``deepspeed.launcher.runner``) starts the per-node launcher
(``python -m deepspeed.launcher.launch``) with ``subprocess.Popen`` and waits;
it installs no handler for local runs, so SIGINT makes it raise
``KeyboardInterrupt`` and exit, and SIGTERM kills it outright. Either way the
launcher and the ranks, which are not told, keep training. The launcher does
forward SIGINT/SIGTERM: it sends SIGTERM to every rank's process tree and
SIGKILLs what is left after 30 s.

So each rank, when its parent is DeepSpeed's launcher, runs a watchdog thread
(:class:`StopWatch`) that notices the runner exiting: the launcher is then
re-parented, which ``/proc/<launcher>/stat`` shows within the poll interval.
``PR_SET_PDEATHSIG`` cannot do this: it follows the *parent* (the launcher),
which outlives the runner. A SIGTERM handler on the ranks covers the launcher's
own forwarding and a scheduler that signals the whole process group.

Either event only *requests* a stop: the trainer all-reduces the request at the
next optimizer-step boundary (:meth:`hmoe_ds.training.guard.StepGuard.end_step`),
so every rank stops after the same step; with ``run.save_on_signal`` (default)
it saves a checkpoint there first, as preemptible clusters need, then exits with
status 143. A rank that does not get there within :data:`GRACE_S` seconds of the
request (blocked on a dead peer, say) exits by itself, so no rank outlives its
run. The ranks cannot tell a SIGINT from a SIGTERM sent to the runner alone (the
runner just disappears), so both are handled as SIGTERM; SIGINT to the whole
process group (Ctrl-C in the terminal) reaches the ranks themselves and stops
them at once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from hmoe_ds.runner import parent_pid, process_args  # re-exported: their old import path keeps working

__all__ = ["EXIT_CODE", "GRACE_S", "StopWatch", "parent_pid", "process_args"]

EXIT_CODE = 128 + signal.SIGTERM  # the shell's convention for "terminated by SIGTERM"
GRACE_S = 120.0  # a step plus a save of a large model; the tiny test models need a few seconds
POLL_S = 0.5


def _cmdline(pid: int) -> str:
    return " ".join(process_args(pid))


class StopWatch:
    """Collects stop requests (SIGTERM, the runner exiting) for the trainer; see the module docstring."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.reason: str | None = None
        self.grace_s = grace_s
        self._previous: object = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deadline: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        """Ask the run to stop at the next step boundary; arm the exit deadline once."""
        if self.reason is not None:
            return
        self.reason = reason
        self._deadline = threading.Timer(self.grace_s, self._overdue)
        self._deadline.daemon = True
        self._deadline.start()

    def _overdue(self) -> None:
        print(f"rank {os.environ.get('RANK', '?')}: still running {self.grace_s:.0f} s after the stop request "
              f"({self.reason}); exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is not None:  # a second SIGTERM: stop now
            os._exit(EXIT_CODE)
        self.request("SIGTERM")

    def start(self) -> "StopWatch":
        """Install the SIGTERM handler (main thread) and, under DeepSpeed's launcher, the runner watchdog."""
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        launcher = os.getppid()
        if "deepspeed.launcher.launch" in _cmdline(launcher):
            runner = parent_pid(launcher)
            if runner is not None and runner > 1:
                self._thread = threading.Thread(target=self._watch, args=(launcher, runner),
                                                name="hmoe-runner-watchdog", daemon=True)
                self._thread.start()
        return self

    def _watch(self, launcher: int, runner: int) -> None:
        while not self._stop.wait(POLL_S):
            if os.getppid() != launcher:
                self.request(f"the deepspeed launcher (pid {launcher}) exited")
                return
            if parent_pid(launcher) != runner:
                self.request(f"the deepspeed runner (pid {runner}) exited (interrupted or terminated)")
                return

    def close(self) -> None:
        """Stop watching, disarm the exit deadline (the run is ending by itself) and restore the SIGTERM handler."""
        self._stop.set()
        if self._deadline is not None:
            self._deadline.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]
            self._previous = None

