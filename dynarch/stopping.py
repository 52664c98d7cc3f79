"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM, what batch schedulers send before
they kill a job: the first signal asks the training loop to stop before its next step, where it
writes a checkpoint and marks the history ``interrupted``; a second Ctrl-C stops at once (the
run then resumes from its last checkpoint). Either way ``dynarch run resume=DIR`` continues it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

from dynarch.errors import DynarchError

SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class RunInterrupted(DynarchError):
    """The run stopped on a signal; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """While entered (main thread only), SIGINT and SIGTERM set ``signum`` instead of killing
    the process; the loop asks :meth:`requested` between steps.

    ``last_word`` (under torchrun): left by an error, SIGTERM stays ignored. When a rank dies,
    torchrun SIGTERMs the others within 0.1 s, while they are still writing why they failed;
    the default action would end them without a word (torchrun SIGKILLs after 30 s)."""

    def __init__(self, last_word: bool = False) -> None:
        self.signum: int | None = None
        self.last_word = last_word
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self.last_word and self._previous:
            self._previous[signal.SIGTERM] = signal.SIG_IGN
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: now
        self.signum = signum
