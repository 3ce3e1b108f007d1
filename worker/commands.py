"""The CLI's subcommands (the parser lives in :mod:`.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from google.protobuf import json_format

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.probe import probe_host
from reapi_worker.storage.channels import ConnectionOptions
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.directory.filesystem import FileSystemDirectory

from .compose import ExecutorSettings, open_executor, parse_size


def capabilities(args: argparse.Namespace) -> int:
    caps = probe_host()
    facts = {
        key: sorted(value) if isinstance(value, frozenset) else value
        for key, value in dataclasses.asdict(caps).items()
    }
    facts["root_modes"] = [mode.value for mode in caps.root_modes]
    if args.json:
        print(json.dumps(facts, indent=2, sort_keys=True))
    else:
        width = max(len(key) for key in facts)
        for key, value in facts.items():
            print(f"{key:<{width}}  {value}")
    return 0 if caps.bwrap_path and caps.user_namespaces else 1


def _settings(args: argparse.Namespace) -> ExecutorSettings:
    return ExecutorSettings(
        cas=ConnectionOptions(url=args.remote),
        instance_name=args.instance_name,
        cache_dir=args.cache_dir,
        cache_bytes=parse_size(args.cache_size),
        build_root=args.build_root,
        max_action_timeout=args.max_action_timeout,
        sandbox_uid=args.sandbox_uid,
        sandbox_gid=args.sandbox_gid,
    )


def run_action(args: argparse.Namespace) -> int:
    digest = Digest.parse(args.action)
    with open_executor(_settings(args)) as (executor, _store):
        outcome = executor.execute(digest)
    _print_outcome(outcome.status, outcome.result, args.json)
    return 0 if outcome.ok else 1


def execute(args: argparse.Namespace) -> int:
    """Upload a local input root and a Command, run it here, print and download the result."""
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise InvalidArgument("give the command after --")
    with open_executor(_settings(args)) as (executor, store):
        root = CasDirectory.empty(store)
        if args.input_root:
            root.import_files(args.input_root)
        command = re_pb2.Command(
            arguments=argv,
            working_directory=args.working_directory,
            output_paths=args.output_path,
            environment_variables=[
                re_pb2.Command.EnvironmentVariable(name=name, value=value)
                for name, value in sorted(_pairs(args.env, "--env").items())
            ],
        )
        action = re_pb2.Action(
            command_digest=store.write(serialize(command)).to_proto(),
            input_root_digest=root.digest().to_proto(),
            do_not_cache=True,
        )
        if args.platform:
            action.platform.properties.extend(
                re_pb2.Platform.Property(name=k, value=v) for k, v in sorted(_pairs(args.platform, "--platform").items())
            )
        if args.timeout:
            action.timeout.FromNanoseconds(int(args.timeout * 1e9))
        action_digest = store.write(serialize(action))
        blobs = {action_digest, Digest.from_proto(action.command_digest)}
        blobs |= {digest for digest, _ in root.file_digests()} | {digest for digest, _ in root.directory_protos()}
        store.upload_missing(blobs)
        outcome = executor.execute(action_digest)
        if args.download and outcome.ok:
            _download(store, outcome.result, args.download)
    _print_outcome(outcome.status, outcome.result, args.json)
    return 0 if outcome.ok and outcome.result.exit_code == 0 else 1


def _download(store, result: re_pb2.ActionResult, dest: str) -> None:  # type: ignore[no-untyped-def]
    """Write outputs under ``dest`` (paths relative to the working directory)."""
    os.makedirs(dest, exist_ok=True)
    target = FileSystemDirectory(os.path.abspath(dest))
    for out in result.output_files:
        parent = os.path.dirname(out.path)
        if parent:
            target.mkdir(parent)
        target.write_bytes(out.path, store.read(Digest.from_proto(out.digest)), executable=out.is_executable)
    for link in list(result.output_symlinks) + list(result.output_file_symlinks) + list(result.output_directory_symlinks):
        target.symlink(link.path, link.target)
    for out in result.output_directories:
        tree = re_pb2.Tree.FromString(store.read(Digest.from_proto(out.tree_digest)))
        target.descend(out.path, create=True).import_files(CasDirectory.from_tree(store, tree))


def _print_outcome(status, result: re_pb2.ActionResult, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    response = re_pb2.ExecuteResponse(status=status, result=result)
    if as_json:
        print(json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True), indent=2, sort_keys=True))
    else:
        print(response)
    if status.code != code_pb2.OK:
        print(f"reapi-worker: action failed: {code_pb2.Code.Name(status.code)}: {status.message}", file=sys.stderr)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidArgument(f"{flag} {item!r}: expected NAME=VALUE")
        pairs[name] = value
    return pairs
