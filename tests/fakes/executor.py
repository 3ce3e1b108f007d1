"""A fake of our own ``ActionExecutor`` interface (worker/executor.py) for the bot's tests.

What an action does is written in its ``salt`` (so each test action is also unique):

* ``b"exit:N"`` — finish at once with exit code N;
* ``b"block"`` — run until :meth:`FakeExecutor.release` or until cancelled (then
  status CANCELLED, as the real executor reports a cancelled run);
* ``b"raise"`` — raise (a bug in the executor: the bot must survive it);
* ``b"status:N"`` — finish with google.rpc code N (e.g. 9 FAILED_PRECONDITION).

Anything after a further ``:`` only makes the action unique (``b"exit:0:a17"``). A lease
whose payload is a Digest is looked up in ``actions`` (what a CAS would hold).

It records what ran (``started``, ``finished``, ``cancelled``) and the largest number of
actions that ran at once. Thread-safe.
"""

from __future__ import annotations

import threading

from reapi_worker.protos import code_pb2, re_pb2, status_pb2
from reapi_worker.storage.digests import Digest
from reapi_worker.worker.executor import Outcome


def action(salt: str) -> re_pb2.Action:
    empty = Digest.of_bytes(b"").to_proto()
    return re_pb2.Action(command_digest=empty, input_root_digest=empty, salt=salt.encode())


class FakeExecutor:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._released: set[str] = set()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.running = 0
        self.max_running = 0
        self.actions: dict[Digest, re_pb2.Action] = {}

    def register(self, action: re_pb2.Action) -> Digest:
        digest = Digest.of_message(action)
        self.actions[digest] = action
        return digest

    def release(self, salt: str) -> None:
        with self._cond:
            self._released.add(salt)
            self._cond.notify_all()

    def wait_started(self, salt: str, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: salt in self.started, timeout):
                raise TimeoutError(f"{salt} never started")

    def execute(
        self, action_digest: Digest, action: re_pb2.Action | None = None, cancel: threading.Event | None = None
    ) -> Outcome:
        if action is None:
            action = self.actions[action_digest]
        salt = action.salt.decode()
        with self._cond:
            self.started.append(salt)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self._cond.notify_all()
        try:
            return self._behave(salt, cancel or threading.Event())
        finally:
            with self._cond:
                self.running -= 1
                self.finished.append(salt)
                self._cond.notify_all()

    def _behave(self, salt: str, cancel: threading.Event) -> Outcome:
        ok = status_pb2.Status(code=code_pb2.OK)
        kind, _, rest = salt.partition(":")
        arg = rest.split(":")[0]
        if kind == "raise":
            raise RuntimeError("executor bug")
        if kind == "status":
            return Outcome(status=status_pb2.Status(code=int(arg), message=f"fake {arg}"), result=re_pb2.ActionResult())
        if kind == "block":
            while not cancel.is_set():
                with self._cond:
                    if salt in self._released:
                        break
                    self._cond.wait(0.01)
            if cancel.is_set():
                with self._cond:
                    self.cancelled.append(salt)
                return Outcome(status=status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled"), result=re_pb2.ActionResult())
            return Outcome(status=ok, result=re_pb2.ActionResult(exit_code=0), phases={"run": 0.0})
        code = int(arg) if kind == "exit" else 0
        return Outcome(status=ok, result=re_pb2.ActionResult(exit_code=code), phases={"fetch": 0.0, "run": 0.0, "upload": 0.0})
