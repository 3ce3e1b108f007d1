"""The bubblewrap argument list, checked on the pure function's output."""

from __future__ import annotations

import pytest

from reapi_worker.sandbox import Bind, ResourceLimits, RootMode, SandboxRequest
from reapi_worker.sandbox.bwrap_args import ControlFds, HostEntry, HostLayout, bwrap_arguments, uses_env_shim

MERGED_USR = HostLayout(
    entries=(
        HostEntry("/usr"),
        HostEntry("/bin", "usr/bin"),
        HostEntry("/lib", "usr/lib"),
        HostEntry("/lib64", "usr/lib64"),
        HostEntry("/etc"),
    ),
    env_shim="/usr/bin/env",
)
FDS = ControlFds(info_fd=11, status_fd=12, block_fd=13)


def request(*arguments: str, **kw) -> SandboxRequest:
    kw.setdefault("environment", {"PATH": "/usr/bin:/bin"})
    return SandboxRequest(
        arguments=arguments or ("true",), input_root="/var/builds/b1",
        stdout_path="/var/builds/b1.out", stderr_path="/var/builds/b1.err", **kw,
    )


def pairs(options: tuple[str, ...], flag: str) -> list[tuple[str, ...]]:
    """Every occurrence of ``flag`` with the arguments it takes."""
    arity = {"--setenv": 2, "--ro-bind": 2, "--bind": 2, "--symlink": 2}.get(flag, 1)
    return [tuple(options[i + 1 : i + 1 + arity]) for i, o in enumerate(options) if o == flag]


def test_every_namespace_is_unshared_and_the_network_too_by_default():
    options = bwrap_arguments(request(), MERGED_USR, FDS).options
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                 "--unshare-cgroup", "--unshare-net", "--die-with-parent", "--new-session"):
        assert flag in options
    assert pairs(options, "--cap-drop") == [("ALL",)]
    assert pairs(options, "--hostname") == [("localhost",)]
    assert "--share-net" not in options


def test_network_true_leaves_the_network_namespace_to_the_runner():
    """The runner starts bubblewrap in a namespace of its own with the NAT attached
    (sandbox/network.py); bubblewrap must not replace it with an empty one."""
    options = bwrap_arguments(request(network=True), MERGED_USR, FDS).options
    assert "--unshare-net" not in options


def test_environment_is_cleared_then_set_exactly_in_sorted_order():
    env = {"ZED": "1", "PATH": "/x", "EMPTY": "", "SPACES": "a b  c", "DASHES": "--"}
    options = bwrap_arguments(request(environment=env), MERGED_USR, FDS).options
    assert pairs(options, "--setenv") == sorted(env.items())
    assert options.index("--clearenv") < options.index("--setenv")


def test_host_tools_shows_host_dirs_read_only_links_as_links_and_the_root_at_build():
    options = bwrap_arguments(request(), MERGED_USR, FDS).options
    assert pairs(options, "--ro-bind") == [("/usr", "/usr"), ("/etc", "/etc")]
    assert pairs(options, "--symlink") == [("usr/bin", "/bin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64")]
    assert pairs(options, "--bind") == [("/var/builds/b1", "/build")]
    assert pairs(options, "--remount-ro") == [("/",)]
    for mount, target in (("--proc", "/proc"), ("--dev", "/dev"), ("--tmpfs", "/tmp")):
        assert pairs(options, mount) == [(target,)]


def test_attack_host_tools_binds_nothing_but_the_layout_and_the_input_root():
    """The worker's cache, /root, /home and other builds stay invisible: no other source."""
    options = bwrap_arguments(request(), MERGED_USR, FDS).options
    sources = {args[0] for flag in ("--ro-bind", "--bind") for args in pairs(options, flag)}
    assert sources == {"/usr", "/etc", "/var/builds/b1"}
    assert "--dev-bind" not in options


def test_chroot_makes_the_input_root_slash_and_shows_nothing_of_the_host():
    options = bwrap_arguments(request(root_mode=RootMode.CHROOT), MERGED_USR, FDS).options
    assert pairs(options, "--bind") == [("/var/builds/b1", "/")]
    assert pairs(options, "--ro-bind") == []
    assert pairs(options, "--symlink") == []
    assert "--remount-ro" not in options


def test_operator_binds_come_after_the_standard_mounts():
    binds = (Bind("/opt/toolchain", "/opt/toolchain"), Bind("/srv/usr", "/usr"))
    options = bwrap_arguments(request(root_mode=RootMode.CHROOT, extra_ro_binds=binds), MERGED_USR, FDS).options
    assert pairs(options, "--ro-bind") == [("/opt/toolchain", "/opt/toolchain"), ("/srv/usr", "/usr")]
    assert options.index("--tmpfs") < options.index("--ro-bind")


@pytest.mark.parametrize(
    ("mode", "working_directory", "expected"),
    [
        (RootMode.HOST_TOOLS, "", "/build"),
        (RootMode.HOST_TOOLS, "a/b", "/build/a/b"),
        (RootMode.HOST_TOOLS, "./a//b/", "/build/a/b"),
        (RootMode.CHROOT, "", "/"),
        (RootMode.CHROOT, "src", "/src"),
    ],
)
def test_chdir_is_the_working_directory_inside_the_sandbox(mode, working_directory, expected):
    options = bwrap_arguments(request(root_mode=mode, working_directory=working_directory), MERGED_USR, FDS).options
    assert pairs(options, "--chdir") == [(expected,)]


def test_control_fds_and_sandbox_ids_are_passed():
    options = bwrap_arguments(request(uid=1000, gid=100), MERGED_USR, FDS).options
    assert pairs(options, "--info-fd") == [("11",)]
    assert pairs(options, "--json-status-fd") == [("12",)]
    assert pairs(options, "--block-fd") == [("13",)]
    assert pairs(options, "--uid") == [("1000",)]
    assert pairs(options, "--gid") == [("100",)]


def test_host_tools_command_goes_through_env_to_drop_bwraps_pwd():
    args = bwrap_arguments(request("cc", "-c", "x.c"), MERGED_USR, FDS)
    assert args.command == ("/usr/bin/env", "-u", "PWD", "--", "cc", "-c", "x.c")
    assert args.argv()[-8:] == ["--", "/usr/bin/env", "-u", "PWD", "--", "cc", "-c", "x.c"]


def test_a_pwd_sent_by_the_client_is_restored_exactly():
    args = bwrap_arguments(request("pwd", environment={"PWD": "/somewhere"}), MERGED_USR, FDS)
    assert args.command == ("/usr/bin/env", "-u", "PWD", "--", "PWD=/somewhere", "pwd")


def test_a_client_pwd_equal_to_the_working_directory_needs_no_shim():
    # bubblewrap sets PWD to the --chdir path: the very value the client sent.
    exact = request("pwd", environment={"PWD": "/build/sub"}, working_directory="sub")
    assert not uses_env_shim(exact, MERGED_USR)
    assert bwrap_arguments(exact, MERGED_USR, FDS).command == ("pwd",)
    assert pairs(bwrap_arguments(exact, MERGED_USR, FDS).options, "--chdir") == [("/build/sub",)]
    # Anything else, a trailing slash included, still goes through env.
    for pwd in ("/build/sub/", "/build", "/elsewhere"):
        other = request("pwd", environment={"PWD": pwd}, working_directory="sub")
        assert bwrap_arguments(other, MERGED_USR, FDS).command[:5] == ("/usr/bin/env", "-u", "PWD", "--", f"PWD={pwd}")


def test_attack_a_command_named_like_an_assignment_is_not_swallowed_by_env():
    req = request("./FOO=bar")
    assert not uses_env_shim(req, MERGED_USR)
    assert bwrap_arguments(req, MERGED_USR, FDS).command == ("./FOO=bar",)


def test_attack_arguments_that_look_like_bwrap_options_stay_the_commands():
    args = bwrap_arguments(request("--bind", "/", "/"), MERGED_USR, FDS)
    assert args.command[-3:] == ("--bind", "/", "/")
    assert pairs(args.options, "--bind") == [("/var/builds/b1", "/build")]


def test_chroot_and_hosts_without_env_run_the_command_directly():
    assert bwrap_arguments(request("make", root_mode=RootMode.CHROOT), MERGED_USR, FDS).command == ("make",)
    bare = HostLayout(entries=MERGED_USR.entries, env_shim=None)
    assert bwrap_arguments(request("make"), bare, FDS).command == ("make",)


def test_limits_do_not_change_the_arguments():
    limited = request(limits=ResourceLimits(memory_bytes=1 << 30, max_pids=10, cpu_cores=2))
    assert bwrap_arguments(limited, MERGED_USR, FDS) == bwrap_arguments(request(), MERGED_USR, FDS)


def test_layout_probe_reproduces_links_and_directories(tmp_path):
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "env").write_text("#!/bin/sh\n")
    (tmp_path / "usr" / "bin" / "env").chmod(0o755)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "lib32").mkdir()
    layout = HostLayout.probe(str(tmp_path))
    assert layout.entries == (
        HostEntry("/usr"), HostEntry("/bin", "usr/bin"), HostEntry("/lib32"), HostEntry("/etc/passwd"),
    )
    assert layout.env_shim == "/usr/bin/env"
    (tmp_path / "usr" / "bin" / "env").unlink()
    assert HostLayout.probe(str(tmp_path)).env_shim is None


# -- read-only subtrees (SubtreeReadOnly) --------------------------------------------------------


def _mount_ops(options: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The mount-table operations, in order: binds, sandbox mounts and remounts."""
    ops = []
    for i, option in enumerate(options):
        if option in ("--bind", "--ro-bind"):
            ops.append((option, options[i + 1], options[i + 2]))
        elif option in ("--proc", "--dev", "--tmpfs", "--remount-ro"):
            ops.append((option, options[i + 1]))
    return ops


def test_no_subtree_access_gives_exactly_todays_mounts():
    for mode in RootMode:
        options = bwrap_arguments(request(root_mode=mode), MERGED_USR, FDS).options
        assert [op for op in _mount_ops(options) if op[0] == "--remount-ro"] == (
            [("--remount-ro", "/")] if mode is RootMode.HOST_TOOLS else [])


def test_read_only_subtrees_are_bound_onto_themselves_first_and_remounted_read_only_last():
    from reapi_worker.sandbox.request import SubtreeAccess

    access = (SubtreeAccess("", True), SubtreeAccess("src/gen", False), SubtreeAccess("src", True))
    options = bwrap_arguments(request(root_mode=RootMode.CHROOT, subtree_access=access), MERGED_USR, FDS).options
    assert _mount_ops(options) == [
        ("--bind", "/var/builds/b1", "/"),
        ("--bind", "/var/builds/b1/src", "/src"),  # shallowest first: a mount lands on its parent's
        ("--bind", "/var/builds/b1/src/gen", "/src/gen"),
        ("--proc", "/proc"), ("--dev", "/dev"), ("--tmpfs", "/tmp"),
        ("--remount-ro", "/"),  # not recursive: /src/gen, /proc, /dev, /tmp keep their own access
        ("--remount-ro", "/src"),
    ]


def test_read_only_subtrees_in_host_tools_mode_land_under_build():
    from reapi_worker.sandbox.request import SubtreeAccess

    access = (SubtreeAccess("", True), SubtreeAccess("out", False))
    options = bwrap_arguments(request(subtree_access=access), MERGED_USR, FDS).options
    ops = _mount_ops(options)
    assert ("--bind", "/var/builds/b1/out", "/build/out") in ops
    assert ops[-2:] == [("--remount-ro", "/build"), ("--remount-ro", "/")]


def test_a_marked_subtree_the_sandbox_mounts_over_keeps_the_sandboxs_own_mount():
    # BuildStream marks tmp, proc and dev; a tmpfs /tmp must stay writable whatever tmp says.
    from reapi_worker.sandbox.request import SubtreeAccess

    access = (SubtreeAccess("tmp", True), SubtreeAccess("proc/x", True), SubtreeAccess("opt/tool", True))
    binds = (Bind("/srv/tool", "/opt/tool"),)
    options = bwrap_arguments(
        request(root_mode=RootMode.CHROOT, subtree_access=access, extra_ro_binds=binds), MERGED_USR, FDS
    ).options
    assert _mount_ops(options) == [
        ("--bind", "/var/builds/b1", "/"),
        ("--proc", "/proc"), ("--dev", "/dev"), ("--tmpfs", "/tmp"),
        ("--ro-bind", "/srv/tool", "/opt/tool"),
    ]


@pytest.mark.parametrize("path", ["/abs", "a/../b", "..", "../up", "a//b", "a/", "./a"])
def test_subtree_access_path_that_is_not_a_normalised_relative_path_is_refused(path):
    from reapi_worker.protos.errors import InvalidArgument
    from reapi_worker.sandbox.request import SubtreeAccess

    with pytest.raises(InvalidArgument, match="read-only subtree"):
        SubtreeAccess(path, True)


def test_subtree_access_listed_twice_is_refused():
    from reapi_worker.protos.errors import InvalidArgument
    from reapi_worker.sandbox.request import SubtreeAccess

    with pytest.raises(InvalidArgument, match="twice"):
        request(subtree_access=(SubtreeAccess("a", True), SubtreeAccess("a", False)))
