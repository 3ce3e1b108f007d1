"""Retrying gRPC calls: :class:`RetryPolicy` (how long to wait between attempts) and
:func:`call_with_retries` (the loop every CAS call runs in).

The loop is the one place where a ``grpc.RpcError`` of a CAS call becomes an error of
:mod:`reapi_worker.protos.errors` (through :func:`~reapi_worker.protos.errors.from_grpc`).
UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are retried: every call the CAS
client makes is idempotent (content-addressed reads and writes), so even a call that timed
out after the server acted may run again. The bot's session loop uses the same policy for
its own backoff.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from reapi_worker.protos.errors import InvalidArgument, Unavailable, from_grpc

T = TypeVar("T")

#: The statuses worth another attempt: the server is overloaded, away, or was too slow.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed calls are retried.

    After the n-th consecutive failure (n = 1, 2, ...) the client waits
    ``min(max_backoff, initial_backoff * multiplier**(n-1))`` reduced by a random fraction
    of at most ``jitter`` (so that many workers failing together do not retry in step).
    With ``multiplier >= 2`` and ``jitter <= 0.5`` successive waits never shrink before the
    cap. At most ``max_attempts`` attempts are made (1 = no retry).
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be at least 1, not {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise InvalidArgument("backoffs must satisfy 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise InvalidArgument(f"multiplier must be at least 1, not {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise InvalidArgument(f"jitter must be in [0, 1), not {self.jitter}")

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after ``failures`` consecutive failures (>= 1)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (failures - 1))
        return base * (1.0 - self.jitter * rng.random())


class Transient(Exception):
    """A retryable status found inside a successful reply (a per-blob status of a batch):
    raised by an attempt so that :func:`call_with_retries` treats it as a failed call."""

    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


def rpc_status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call."""
    # A grpc.RpcError raised by a call is also a grpc.Call; one raised elsewhere (an
    # interceptor) may not be, and then all we know is that it failed.
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    status = code() if callable(code) else grpc.StatusCode.UNKNOWN
    text = details() if callable(details) else str(error)
    return status or grpc.StatusCode.UNKNOWN, text or ""


def call_with_retries(
    what: str,
    attempt: Callable[[float], T],
    deadline: float,
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    rng: random.Random,
) -> T:
    """Run ``attempt(deadline)`` until it succeeds, waiting ``policy.backoff`` (through
    ``sleep``) after each transient failure.

    ``attempt`` must be safe to run again after a failure (it keeps its own progress).
    Raises Unavailable after ``policy.max_attempts`` transient failures in a row (naming
    the last code and message), or the translated error of a non-retryable status at once.
    Errors of our own hierarchy raised by ``attempt`` pass through untouched.
    """
    failures = 0
    while True:
        try:
            return attempt(deadline)
        except grpc.RpcError as error:
            status, details = rpc_status(error)
        except Transient as transient:
            status, details = transient.status, transient.details
        failures += 1
        if status not in RETRYABLE:
            raise from_grpc(status, f"{what}: {details}") from None
        if failures >= policy.max_attempts:
            raise Unavailable(f"{what}: {status.name} after {failures} attempt(s): {details}") from None
        sleep(policy.backoff(failures, rng))
