"""What the sandbox needs of an input root: mount points that are directories (chroot), read-only
subtrees, and the ids the command sees. Named after what a hostile or broken root does."""

from __future__ import annotations

import pytest

from fakes.marked_trees import MARK, store_marked_tree

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.request import Bind, RootMode, SubtreeAccess
from reapi_worker.storage.content import MemoryStore
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.worker.sandbox_ids import SANDBOX_ID_KEYS, sandbox_ids
from reapi_worker.worker.sandbox_tree import InputRootRules, check_mount_points


def tree(spec: dict) -> CasDirectory:
    store = MemoryStore()
    root = CasDirectory.empty(store)
    for path, value in spec.items():
        if "/" in path and value is not None:
            root.mkdir(path.rpartition("/")[0])
        if isinstance(value, str):
            root.symlink(path, value)
        elif isinstance(value, bytes):
            root.write_bytes(path, value)
        else:
            root.mkdir(path)
    return CasDirectory.from_digest(store, root.digest())


# -- chroot mount points -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["proc", "dev", "tmp"])
@pytest.mark.parametrize("entry, kind", [
    (b"not a directory\n", "a regular file"),
    ("LOOP", "a symlink (to '{name}')"),  # a link to itself: ELOOP for bubblewrap
    ("missing/target", "a symlink (to 'missing/target')"),  # dangling
    ("/", "a symlink (to '/')"),  # absolute: bwrap would mount over the root itself
    ("../../etc", "a symlink (to '../../etc')"),
])
def test_chroot_mount_point_that_is_not_a_directory_is_invalid_argument_naming_it(name, entry, kind):
    entry = name if entry == "LOOP" else entry
    root = tree({name: entry})
    with pytest.raises(InvalidArgument) as raised:
        check_mount_points(root, RootMode.CHROOT)
    message = str(raised.value)
    assert f"input root entry '{name}' is {kind.format(name=name)}" in message
    assert f"mounts /{name} there" in message


def test_chroot_mount_points_that_are_directories_or_absent_are_fine():
    check_mount_points(tree({"proc": None, "dev/pts": None}), RootMode.CHROOT)
    check_mount_points(tree({"src/a": b"x"}), RootMode.CHROOT)


def test_host_tools_mode_mounts_nothing_over_the_input_root():
    check_mount_points(tree({"proc": b"file", "tmp": "/"}), RootMode.HOST_TOOLS)


def test_a_symlink_on_the_way_to_an_operator_bind_target_is_refused():
    binds = (Bind("/srv/sdk", "/opt/sdk"),)
    with pytest.raises(InvalidArgument, match=r"'opt' is a symlink \(to '/usr'\).*/opt/sdk"):
        check_mount_points(tree({"opt": "/usr"}), RootMode.CHROOT, binds)
    with pytest.raises(InvalidArgument, match="'opt/sdk' is a symlink"):
        check_mount_points(tree({"opt/sdk": "elsewhere"}), RootMode.CHROOT, binds)


def test_an_operator_bind_of_a_file_may_land_on_a_regular_file():
    check_mount_points(tree({"etc/resolv.conf": b"x"}), RootMode.CHROOT, (Bind("/etc/resolv.conf", "/etc/resolv.conf"),))


def test_a_regular_file_on_the_way_to_a_bind_target_is_refused():
    with pytest.raises(InvalidArgument, match="'etc' is a regular file"):
        check_mount_points(tree({"etc": b"x"}), RootMode.CHROOT, (Bind("/etc/resolv.conf", "/etc/resolv.conf"),))


# -- read-only subtrees into the request ----------------------------------------------------------


def test_markings_become_the_requests_subtree_access_nearest_winning():
    store = MemoryStore()
    spec = {MARK: "true", "b": {"e.bst": {MARK: "false"}}, "usr": {MARK: "true"}, "tmp": {MARK: "false"}}
    root = CasDirectory.from_digest(store, store_marked_tree(store, spec))
    assert InputRootRules().subtree_access(root, RootMode.CHROOT) == (
        SubtreeAccess("", True), SubtreeAccess("b/e.bst", False), SubtreeAccess("tmp", False),
    )


def test_an_unmarked_tree_gets_no_subtree_access():
    assert InputRootRules().subtree_access(tree({"a/b": b"x"}), RootMode.HOST_TOOLS) == ()


def test_input_root_rules_check_the_mount_points_first():
    with pytest.raises(InvalidArgument, match="'tmp' is a regular file"):
        InputRootRules().subtree_access(tree({"tmp": b"x"}), RootMode.CHROOT)


# -- unixUID / unixGID ------------------------------------------------------------------------------


def test_ids_default_to_root_inside_the_sandbox():
    assert sandbox_ids({}) == (0, 0)
    assert sandbox_ids({"unixUID": "1000", "unixGID": "100"}) == (1000, 100)
    assert SANDBOX_ID_KEYS == ("unixUID", "unixGID")


@pytest.mark.parametrize("value", ["", "-1", "1e3", " 5", "0x10", "٣", "4294967295"])
def test_an_id_that_is_not_a_decimal_in_range_is_invalid_argument_naming_the_property(value):
    with pytest.raises(InvalidArgument, match=f"platform property unixGID={value!r}"):
        sandbox_ids({"unixGID": value})
