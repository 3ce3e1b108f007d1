"""Checks on the client-controlled parts of an Action and Command."""

import pytest
from google.protobuf.duration_pb2 import Duration

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument, MissingBlobs
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.protos.unbound_fields import OutputDirectoryFormat, set_output_directory_format
from reapi_worker.worker.action import OutputKind, PlatformPolicy, RootMode, check_action, load_action


def _store_action(store, command, **action_fields):
    command_digest = store.write(serialize(command))
    root_digest = store.write(serialize(re_pb2.Directory()))
    action = re_pb2.Action(command_digest=command_digest.to_proto(), input_root_digest=root_digest.to_proto(), **action_fields)
    return store.write(serialize(action))


def test_outputs_are_relative_to_the_working_directory():
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"], working_directory="src/pkg", output_paths=["out/a", "b"])
    spec = load_action(store, _store_action(store, command))
    assert [(o.path, o.components, o.kind) for o in spec.outputs] == [
        ("out/a", ("src", "pkg", "out", "a"), OutputKind.PATH),
        ("b", ("src", "pkg", "b"), OutputKind.PATH),
    ]
    assert spec.working_directory == ("src", "pkg")
    legacy = re_pb2.Command(arguments=["true"], working_directory="src/pkg", output_files=["c"], output_directories=["d"])
    spec = load_action(store, _store_action(store, legacy))
    assert [(o.path, o.components, o.kind) for o in spec.outputs] == [
        ("c", ("src", "pkg", "c"), OutputKind.FILE),
        ("d", ("src", "pkg", "d"), OutputKind.DIRECTORY),
    ]


def test_output_paths_make_the_legacy_fields_ignored():
    # REAPI v2.1: "If output_paths is used, output_files and output_directories will be ignored!"
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"], output_paths=["a"], output_files=["b"], output_directories=["c"])
    assert [o.path for o in load_action(store, _store_action(store, command)).outputs] == ["a"]


@pytest.mark.parametrize("field", ["output_paths", "output_files", "output_directories"])
@pytest.mark.parametrize("path", ["../escape", "a/../../b", "/etc/passwd", "out/"])
def test_output_path_escaping_the_root_is_refused(field, path):
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"], **{field: [path]})
    with pytest.raises(InvalidArgument, match=field):
        load_action(store, _store_action(store, command))


@pytest.mark.parametrize("workdir", ["..", "/abs", "a/../.."])
def test_working_directory_outside_the_root_is_refused(workdir):
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"], working_directory=workdir)
    with pytest.raises(InvalidArgument, match="working_directory"):
        load_action(store, _store_action(store, command))


def test_empty_arguments_are_refused():
    store = MemoryStore()
    with pytest.raises(InvalidArgument, match="arguments"):
        load_action(store, _store_action(store, re_pb2.Command()))


def test_malformed_command_bytes_name_the_digest():
    store = MemoryStore()
    bogus = store.write(b"\xff\xff\xff\xff not a proto")
    root = store.write(serialize(re_pb2.Directory()))
    action = re_pb2.Action(command_digest=bogus.to_proto(), input_root_digest=root.to_proto())
    with pytest.raises(InvalidArgument, match=bogus.hash):
        load_action(store, store.write(serialize(action)))


def test_missing_command_is_reported_as_missing_blob():
    store = MemoryStore()
    absent = Digest.of_bytes(b"never stored")
    root = store.write(serialize(re_pb2.Directory()))
    action = re_pb2.Action(command_digest=absent.to_proto(), input_root_digest=root.to_proto())
    with pytest.raises(MissingBlobs) as raised:
        load_action(store, store.write(serialize(action)))
    assert raised.value.digests == [absent]


def test_platform_properties_choose_root_mode_and_network():
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"])
    platform = re_pb2.Platform(properties=[
        re_pb2.Platform.Property(name="network", value="on"),
        re_pb2.Platform.Property(name="rootMode", value="chroot"),
    ])
    spec = load_action(store, _store_action(store, command, platform=platform, timeout=Duration(seconds=7)))
    assert spec.root_mode is RootMode.CHROOT
    assert spec.network is True
    assert spec.timeout == 7.0


def test_unknown_root_mode_is_refused():
    store = MemoryStore()
    platform = re_pb2.Platform(properties=[re_pb2.Platform.Property(name="rootMode", value="vm")])
    with pytest.raises(InvalidArgument, match="rootMode"):
        load_action(store, _store_action(store, re_pb2.Command(arguments=["x"]), platform=platform))


def test_defaults_are_host_tools_without_network_or_timeout():
    store = MemoryStore()
    spec = load_action(store, _store_action(store, re_pb2.Command(arguments=["x"], environment_variables=[
        re_pb2.Command.EnvironmentVariable(name="A", value="1")])))
    assert (spec.root_mode, spec.network, spec.timeout, spec.environment) == (RootMode.HOST_TOOLS, False, None, {"A": "1"})


def test_a_field_from_a_newer_reapi_is_refused_naming_its_number():
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"])
    command.MergeFromString(bytes([(15 << 3) | 0, 1]))  # field 15, varint 1: unknown to this worker
    with pytest.raises(InvalidArgument, match="command sets field number 15"):
        load_action(store, _store_action(store, command))
    action = re_pb2.Action()
    action.MergeFromString(bytes([(14 << 3) | 0, 1]))
    with pytest.raises(InvalidArgument, match="action sets field number 14"):
        check_action(Digest.of_bytes(b""), action, re_pb2.Command(arguments=["true"]), Digest.of_bytes(b""))


@pytest.mark.parametrize("value", list(OutputDirectoryFormat))
def test_output_directory_format_is_read_though_the_bindings_predate_it(value):
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"], output_paths=["."])
    set_output_directory_format(command, value)
    spec = load_action(store, _store_action(store, command))
    assert spec.output_directory_format is value


def test_an_unknown_output_directory_format_is_refused():
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"])
    set_output_directory_format(command, 7)
    with pytest.raises(InvalidArgument, match="output_directory_format 7"):
        load_action(store, _store_action(store, command))


def test_an_unknown_output_node_property_is_refused_naming_it():
    store = MemoryStore()
    command = re_pb2.Command(arguments=["true"], output_node_properties=["mtime", "owner"])
    with pytest.raises(InvalidArgument, match="output_node_properties: unsupported 'owner'"):
        load_action(store, _store_action(store, command))


def test_an_unknown_platform_key_is_refused_and_an_operator_may_accept_it():
    store = MemoryStore()
    platform = re_pb2.Platform(properties=[re_pb2.Platform.Property(name="Pool", value="big")])
    digest = _store_action(store, re_pb2.Command(arguments=["x"]), platform=platform)
    with pytest.raises(InvalidArgument, match="action.platform: unsupported property 'Pool'"):
        load_action(store, digest)
    policy = PlatformPolicy.of(RootMode.CHROOT, ["Pool"])
    assert load_action(store, digest, policy=policy).root_mode is RootMode.CHROOT


def test_the_command_platform_is_read_when_the_action_has_none():
    store = MemoryStore()
    command = re_pb2.Command(arguments=["x"], platform=re_pb2.Platform(properties=[
        re_pb2.Platform.Property(name="network", value="on")]))
    assert load_action(store, _store_action(store, command)).network is True
