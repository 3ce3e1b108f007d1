"""A REAPI Execution client: build an Action from a local directory and a command, upload
it, run it through a scheduler's Execution service, follow the Operation, fetch outputs.

This is ``reapi-worker execute`` (a person submitting a command by hand, the local farm's
sample action) and what the system tests and the benchmark submit with.

* :func:`build_action` writes the Command, the input tree and the Action into a store
  and returns every digest the server must hold;
* :class:`ExecutionClient` calls ``Execute`` and streams the Operation until it is done;
  a stream broken by a restarting server is resumed with ``WaitExecution``, with capped
  backoff; ``cancel`` is ``Operations.CancelOperation``;
* :func:`download_outputs` writes an ActionResult's outputs under a local directory.

gRPC errors of the Execution and Operations services are translated here, once, into
:mod:`reapi_worker.protos.errors`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from reapi_worker.protos import operations_pb2, operations_pb2_grpc, re_grpc, re_pb2, status_pb2
from reapi_worker.protos.errors import Internal, InvalidArgument, ReapiError, Unavailable, from_grpc
from reapi_worker.storage.content import ContentStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.directory.filesystem import FileSystemDirectory
from reapi_worker.storage.retry import RetryPolicy, rpc_status

#: Codes after which a broken Execute/WaitExecution stream is resumed: the server went
#: away (restart, network) but the operation lives on in its database.
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What to run: the Command's and the Action's fields in plain terms.

    ``platform`` lands in ``Action.platform`` (and ``Command.platform``, for servers that
    still read it there); ``timeout`` in seconds; ``do_not_cache`` keeps the result out of
    the action cache and stops identical in-flight actions from being merged into one job.
    ``salt`` makes otherwise identical actions distinct.
    """

    arguments: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()
    output_paths: tuple[str, ...] = ()
    working_directory: str = ""
    platform: tuple[tuple[str, str], ...] = ()
    timeout: float | None = None
    do_not_cache: bool = True
    salt: bytes = b""

    def __post_init__(self) -> None:
        if not self.arguments:
            raise InvalidArgument("the command is empty")


def build_action(store: ContentStore, spec: CommandSpec, input_root: str | None = None) -> tuple[Digest, set[Digest]]:
    """Store the Action for ``spec`` (with ``input_root``, a local directory, as its input
    root; empty if None) in ``store``. Returns the Action's digest and every digest it
    needs (Action, Command, Directories, files): what must be uploaded before Execute."""
    root = CasDirectory.empty(store)
    if input_root is not None:
        root.import_files(input_root)
    properties = [re_pb2.Platform.Property(name=k, value=v) for k, v in sorted(spec.platform)]
    command = re_pb2.Command(
        arguments=spec.arguments,
        working_directory=spec.working_directory,
        output_paths=sorted(spec.output_paths),
        environment_variables=[
            re_pb2.Command.EnvironmentVariable(name=name, value=value) for name, value in sorted(spec.environment)
        ],
    )
    if properties:
        command.platform.properties.extend(properties)
    action = re_pb2.Action(
        command_digest=store.write(serialize(command)).to_proto(),
        input_root_digest=root.digest().to_proto(),
        do_not_cache=spec.do_not_cache,
        salt=spec.salt,
    )
    if properties:
        action.platform.properties.extend(properties)
    if spec.timeout:
        action.timeout.FromNanoseconds(int(spec.timeout * 1e9))
    action_digest = store.write(serialize(action))
    blobs = {action_digest, Digest.from_proto(action.command_digest)}
    blobs |= {digest for digest, _ in root.file_digests()}
    blobs |= {digest for digest, _ in root.directory_protos()}
    return action_digest, blobs


@dataclass(frozen=True, slots=True)
class Execution:
    """A finished execution: the operation's name and the server's ExecuteResponse (whose
    ``status`` says whether the action ran; ``result.exit_code`` how it ended)."""

    operation_name: str
    response: re_pb2.ExecuteResponse

    @property
    def ok(self) -> bool:
        return self.response.status.code == 0


class ExecutionClient:
    """Execute and follow actions on ``channel`` (the caller owns and closes it).

    Thread-safe: several executions may be followed at once from different threads.
    ``sleep`` and ``rng`` pace resumption after a broken stream (tests pass fakes).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        instance_name: str = "",
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._execution = re_grpc.ExecutionStub(channel)
        self._operations = operations_pb2_grpc.OperationsStub(channel)
        self._instance = instance_name
        # A restarting scheduler (PostgreSQL, migrations, start-up) takes ~10-20 s here.
        self._retry = retry or RetryPolicy(max_attempts=30, initial_backoff=0.2, max_backoff=2.0)
        self._sleep = sleep
        self._rng = rng or random.Random()

    def execute(
        self,
        action_digest: Digest,
        *,
        skip_cache_lookup: bool = True,
        on_operation: Callable[[operations_pb2.Operation], None] | None = None,
    ) -> Execution:
        """Run the Action and wait for it. ``on_operation`` sees every Operation update (the
        first one carries the operation's name, e.g. for :meth:`cancel`).

        Raises FailedPrecondition, InvalidArgument, ... when the server refuses the request
        (e.g. a platform property it does not know), Unavailable when it cannot be reached
        for longer than the retry policy allows. A job that ran and failed is a normal
        Execution whose response carries the status."""
        request = re_pb2.ExecuteRequest(
            instance_name=self._instance, action_digest=action_digest.to_proto(), skip_cache_lookup=skip_cache_lookup
        )
        name = ""
        failures = 0
        stream: Iterator[operations_pb2.Operation] = self._execution.Execute(request)
        while True:
            try:
                for operation in stream:
                    name = operation.name or name
                    failures = 0
                    if on_operation is not None:
                        on_operation(operation)
                    if operation.done:
                        return Execution(name, _response_of(operation))
            except grpc.RpcError as error:
                code = error.code()
                if not name or code not in _RESUMABLE:
                    raise _translate(error, f"executing {action_digest}") from None
                failures += 1
                if failures >= self._retry.max_attempts:
                    raise Unavailable(f"following operation {name}: {code.name}: {error.details()}") from None
                self._sleep(self._retry.backoff(failures, self._rng))
            # The stream ended (or broke) before the operation was done: resume it.
            if not name:
                raise Internal(f"executing {action_digest}: the server ended the stream without an operation")
            stream = self._execution.WaitExecution(re_pb2.WaitExecutionRequest(name=name))

    def cancel(self, operation_name: str) -> None:
        """Ask the server to cancel the operation (the bot learns it at its next heartbeat)."""
        try:
            self._operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation_name), timeout=30)
        except grpc.RpcError as error:
            raise _translate(error, f"cancelling {operation_name}") from None


def _response_of(operation: operations_pb2.Operation) -> re_pb2.ExecuteResponse:
    response = re_pb2.ExecuteResponse()
    if operation.HasField("error"):
        response.status.CopyFrom(operation.error)
    elif not operation.response.Unpack(response):
        response.status.CopyFrom(
            status_pb2.Status(code=13, message=f"operation response is {operation.response.type_url}")
        )
    return response


def _translate(error: grpc.RpcError, context: str) -> ReapiError:
    status, details = rpc_status(error)
    return from_grpc(status, f"{context}: {details}")


def download_outputs(store: ContentStore, result: re_pb2.ActionResult, dest: str) -> list[str]:
    """Write the outputs of ``result`` under ``dest`` (paths as the Command named them,
    relative to its working directory); returns the paths written. Output paths are
    checked by the Directory API, so a hostile result cannot write outside ``dest``."""
    os.makedirs(dest, exist_ok=True)
    target = FileSystemDirectory(os.path.abspath(dest))
    written = []
    for out in result.output_files:
        parent = os.path.dirname(out.path)
        if parent:
            target.mkdir(parent)
        target.write_bytes(out.path, store.read(Digest.from_proto(out.digest)), executable=out.is_executable)
        written.append(out.path)
    for link in [*result.output_symlinks, *result.output_file_symlinks, *result.output_directory_symlinks]:
        target.symlink(link.path, link.target)
        written.append(link.path)
    for out in result.output_directories:
        tree = re_pb2.Tree.FromString(store.read(Digest.from_proto(out.tree_digest)))
        target.descend(out.path, create=True).import_files(CasDirectory.from_tree(store, tree))
        written.append(out.path)
    return written
