"""The :class:`Runner` interface: run one command in isolation."""

from __future__ import annotations

import abc
import threading

from .request import SandboxRequest
from .result import SandboxResult


class Runner(abc.ABC):
    """Runs one :class:`SandboxRequest` and reports a :class:`SandboxResult`.

    Contract, for every implementation:

    * ``run`` blocks until nothing the command started is alive any more — children,
      grandchildren and double-forked daemons included — whether it exited, timed out or
      was cancelled. Output files are complete (or, after a timeout, hold what was written).
    * A command that runs and fails, crashes, times out, is cancelled or cannot be found is a
      *result*, never an exception.
    * :class:`~.errors.SandboxSetupError` means the command never ran because the host or the
      configuration is broken; nothing of it is left behind. Invalid requests are refused
      when the :class:`SandboxRequest` is built, before any runner sees them.
    * ``cancel``: once set, the whole action is killed within about 0.2 s and the result has
      ``cancelled=True``. The caller owns the event.
    * Thread-safety: one runner may run many requests at once, from different threads.
    * If the worker process dies, every sandbox it started dies too.
    """

    @abc.abstractmethod
    def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
        """Run ``request``; see the class docstring for the contract."""
