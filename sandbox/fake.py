""":class:`FakeRunner`: a :class:`~.runner.Runner` that runs nothing, for the executor's tests.

Shipped beside the real runner (as httpx ships its mock transport) so that tests of the
executor pipeline use an in-repo fake of *our* interface instead of mocking subprocess.
It isolates nothing and must never be chosen by the composition root.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .request import SandboxRequest
from .result import SandboxResult
from .runner import Runner
from .usage import ResourceUsage

#: What ``respond`` may return: a result, or just the exit code.
Response = SandboxResult | int


class FakeRunner(Runner):
    """Answers each request with ``respond(request)`` and records the requests.

    ``respond`` may write ``request.stdout_path`` / ``stderr_path`` itself; when it does not,
    the fake creates them empty, as a real run would. It may raise to simulate a
    SandboxSetupError. Thread-safe.
    """

    def __init__(self, respond: Callable[[SandboxRequest], Response] = lambda request: 0) -> None:
        self._respond = respond
        self._lock = threading.Lock()
        self.requests: list[SandboxRequest] = []

    def run(self, request: SandboxRequest, cancel: threading.Event | None = None) -> SandboxResult:
        with self._lock:
            self.requests.append(request)
        for path in {request.stdout_path, request.stderr_path}:
            open(path, "wb").close()  # truncated, as a real run does
        response = self._respond(request)
        if isinstance(response, SandboxResult):
            return response
        return SandboxResult(
            exit_code=response, signal=None, timed_out=False,
            cancelled=cancel is not None and cancel.is_set(), oom_killed=False,
            usage=ResourceUsage(wall_seconds=0.0),
        )
