"""SIGTERM/SIGINT during training: noted by a handler, agreed on by every rank at the next step boundary,
and ended with a checkpoint (the trainer raises StoppedBySignal after it)."""
from __future__ import annotations

import atexit
import os
import signal
import threading

from mfrnet_ds.engine import dist as D


class StoppedBySignal(Exception):
    """train() stopped on SIGTERM/SIGINT at a step boundary, after its checkpoint (and, with train.eval_on_stop,
    its evaluation): the run is not finished and `--resume` continues it. Exit status 128 + the signal."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """SIGTERM and SIGINT, while training: noted, and acted on at the next step boundary, where the ranks agree
    (D.agree_max) so that every rank stops after the same step, also when the signal reached only some of them
    or reached them in different steps. A second SIGINT interrupts at once (KeyboardInterrupt).

    The main thread blocks both signals (a handler notes them when another thread takes one; the step boundary
    also collects one left pending), and DataLoader workers, forked from it, inherit the block: torch's worker
    handler makes a worker die of a SIGTERM that is not its rank's, and its rank would then raise ("DataLoader
    worker ... is killed by signal") wherever it is instead of saving. A scheduler, `kill -TERM -PGID` and
    DeepSpeed's launcher (terminate_process_tree) all signal the workers too. Loaders end their workers
    without signals; an exit hook ends those an exception left behind (_end_workers_at_exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0     # the first signal this process got (0: none)
        self.agreed = 0       # the signal every rank stopped on (0: none)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signal.signal works only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
            atexit.unregister(_end_workers_at_exit)    # once, and after multiprocessing's (LIFO)
            atexit.register(_end_workers_at_exit)
        return self

    def __exit__(self, *exc):
        if self._previous:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)   # one still pending reaches _handle
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}

    def _handle(self, signum, frame=None):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.received:
            self.received = signum
            # os.write: logging is not safe inside a signal handler
            os.write(2, f"rank {os.environ.get('RANK', '0')}: {signal.Signals(signum).name} received: stopping "
                        f"after this step with a checkpoint\n".encode())

    def check(self) -> int:
        """Collective, at every step boundary on every rank: the signal to stop on, 0 to go on."""
        if self._previous and not self.received:
            pending = signal.sigpending() & set(self.SIGNALS)   # blocked in every thread: still pending
            if pending:
                self._handle(signal.sigwait(pending))
        self.agreed = D.agree_max(self.received)
        return self.agreed


def _end_workers_at_exit() -> None:
    """At exit, SIGKILL the DataLoader workers still alive: those of a loader an exception left behind (its
    traceback holds it). They block SIGTERM (StopSignals), so multiprocessing's own exit hook, which
    SIGTERMs its daemonic children and then joins them, would wait forever. Runs before that hook (LIFO)."""
    import multiprocessing
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # torch's handler would raise for each
        for p in workers:
            p.kill()
        for p in workers:
            p.join(timeout=10)
