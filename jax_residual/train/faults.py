"""What clusters do to a run, and how it stops: preemption, a lost process, a failed save.

Each fault ends the run with one line on stderr and its own exit status (README, training):

  4  stopped by SIGTERM / SIGINT (a preemption notice): the step in progress finished, a
     checkpoint of it was saved, rerunning the same command resumes from it
  5  a process of a multi-process run was lost (killed, crashed, unreachable)
  6  a checkpoint could not be written (disk full, permission lost, ...): the previous one is kept

Several processes agree on the step to stop at through the JAX distributed runtime's preemption
sync point (`multihost_utils.reached_preemption_sync_point`): its notifier catches SIGTERM in
any process and every process stops after the same step. A lost process is noticed by its
peers when a collective fails or the runtime's heartbeat times out (--heartbeat-timeout).
"""

from __future__ import annotations

import signal
import time

import jax
from jax.experimental import multihost_utils

PREEMPTED, PEER_LOST, SAVE_FAILED = 4, 5, 6


class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint of its last step."""


class PeerLost(RuntimeError):
    """A process of a multi-process run stopped answering; this one stops too."""


class StopRequest:
    """Whether the run should stop after a step: a SIGTERM/SIGINT noted once `install`ed, or, with
    several processes, the runtime's preemption sync point (the same step on every process)."""

    def __init__(self):
        self.received: str | None = None

    def note(self, signum, frame):
        """Signal handler: remember the signal; the loop stops after the step in progress."""
        self.received = signal.Signals(signum).name

    def forward_to_notifier(self, signum, frame):
        """SIGINT with several processes: passed on as SIGTERM, which the runtime's preemption
        notifier catches and shares with every process."""
        self.received = signal.Signals(signum).name
        signal.raise_signal(signal.SIGTERM)

    def install(self):
        """From now on SIGTERM and SIGINT request a stop instead of ending the process; returns the
        function that puts the previous handlers back. With several processes SIGTERM stays with
        the runtime's notifier (installed by jax.distributed.initialize)."""
        handlers = ({signal.SIGINT: self.forward_to_notifier} if jax.process_count() > 1
                    else {signal.SIGTERM: self.note, signal.SIGINT: self.note})
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}

        def restore():
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return restore

    def stop_after(self, step: int) -> bool:
        """True once the run should stop after `step`; with several processes every process must
        call this after every step (the sync point agrees on one step for all)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def describe(self) -> str:
        if jax.process_count() > 1:
            return f"a preemption notice (SIGTERM to any of the {jax.process_count()} processes)"
        return self.received or "a signal"


def leave_together(deadline_s: float, poll_s: float = 0.05):
    """End this process's part in a multi-process run so that process 0, whose coordination
    service the others talk to, goes last: the others disconnect from the runtime, process 0
    waits (up to `deadline_s`) until the runtime counts none of them live. (With the runtime
    recoverable, its own shutdown does not wait for them, and a process whose coordinator is
    already gone is aborted.)"""
    from jax._src import distributed

    multihost_utils.sync_global_devices("jax_residual: leaving")
    if jax.process_index() != 0:
        jax.distributed.shutdown()
        return
    end, everyone = time.monotonic() + deadline_s, list(range(jax.process_count()))
    while set(distributed.global_state.client.get_live_nodes(everyone)) - {0} and time.monotonic() < end:
        time.sleep(poll_s)


def lost_processes(deadline_s: float, poll_s: float = 0.2) -> list[int]:
    """The processes of this multi-process run the distributed runtime no longer counts as live,
    polled until some are missing or `deadline_s` passes ([] then). The coordinator itself
    unreachable counts as process 0 lost."""
    from jax._src import distributed  # the runtime client; multihost_utils.live_devices asks it the same

    everyone = list(range(jax.process_count()))
    end = time.monotonic() + deadline_s
    while True:
        try:
            live = distributed.global_state.client.get_live_nodes(everyone)
        except Exception:  # the coordination service (process 0) is gone
            return [0]
        lost = [p for p in everyone if p not in live]
        if lost or time.monotonic() > end:
            return lost
        time.sleep(poll_s)


def peer_lost(error: BaseException, heartbeat_timeout_s: int, step: int, last_saved: int | None) -> PeerLost | None:
    """The PeerLost error for `error` raised during step `step` of a multi-process run, if the
    runtime reports a process lost within the heartbeat timeout (+ 5 s); None if every process
    is live (then `error` is a fault of its own)."""
    lost = lost_processes(heartbeat_timeout_s + 5)
    if not lost:
        return None
    saved = f"the last checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint was saved"
    names = ", ".join(map(str, lost))
    return PeerLost(f"lost process {names} of {jax.process_count()} during step {step} "
                    f"({type(error).__name__}), so this one stops; {saved}: restart every process with the same "
                    "command to resume from it")
