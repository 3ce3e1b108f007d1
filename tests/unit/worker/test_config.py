"""The worker's configuration schema (``worker/config.py``).

Sources, later wins: schema defaults < TOML file (``--config FILE``) < flags. Every error is
an InvalidArgument that names what to fix: the key (and the file, for what is read from a
file). ``dump_toml`` writes a document that ``load_config`` reads back to an equal config.
The tests read files from ``tmp_path`` and pin the host (ISA, OSFamily, CPUs, hostname,
machine id) with ``monkeypatch`` where a result depends on it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import tomllib
from pathlib import Path

import pytest

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.worker import cli, config
from reapi_worker.worker.config import (
    AUTO_SANDBOX_UID_BASE,
    FreeSpace,
    Watermarks,
    WorkerConfig,
    config_from_args,
    default_bot_id,
    detect_platform,
    dump_toml,
    load_config,
    parse_platform_flags,
    settings,
)

DETECTED = (("ISA", "x86-64"), ("OSFamily", "linux"))


@pytest.fixture
def x86_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host is an x86_64 Linux machine, whatever the test runs on."""
    monkeypatch.setattr(config.host_platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(config.host_platform, "system", lambda: "Linux")


def write(tmp_path: Path, text: str, name: str = "worker.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def flags(*argv: str) -> WorkerConfig:
    """The config of ``reapi-worker config ARGV``, as the CLI builds it."""
    return config_from_args(cli.build_parser().parse_args(["config", *argv]))


# ------------------------------------------------------------------------------ defaults


def test_no_file_and_no_flags_give_the_schema_defaults(x86_linux):
    cfg = load_config()
    assert cfg == WorkerConfig()
    assert cfg.remote == "grpc://127.0.0.1:50051"
    assert cfg.cas_remote is None and cfg.cas_connection.url == cfg.remote
    # Derived from the cache's file system: half of it (the rest for builds and headroom).
    st = os.statvfs("/")
    assert cfg.cache_size == "auto" and cfg.cache_bytes == st.f_blocks * st.f_frsize // 2
    assert cfg.build_dir_size == "auto"
    assert cfg.staging == "hardlink"
    assert cfg.log_format == "text"
    assert cfg.bot_id is None and cfg.metrics_port is None
    assert cfg.disk_watermarks == Watermarks(low=FreeSpace(fraction=0.10), critical=FreeSpace(fraction=0.05))
    assert cfg.platform == DETECTED


def test_concurrency_defaults_to_the_cpus_this_process_may_run_on(monkeypatch):
    # Affinity, not os.cpu_count(): in a container limited to 3 of 64 CPUs, 3.
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 5, 9})
    assert WorkerConfig().concurrency == 3
    assert dict((name, default) for name, _s, default in settings())["concurrency"] == 3


@pytest.mark.parametrize(
    "machine, system, expected",
    [
        ("x86_64", "Linux", (("ISA", "x86-64"), ("OSFamily", "linux"))),
        ("AMD64", "Linux", (("ISA", "x86-64"), ("OSFamily", "linux"))),
        ("aarch64", "Linux", (("ISA", "aarch64"), ("OSFamily", "linux"))),
        ("arm64", "Darwin", (("ISA", "aarch64"), ("OSFamily", "darwin"))),
        ("riscv64", "Linux", (("ISA", "riscv64"), ("OSFamily", "linux"))),  # unknown: as reported
        ("x86_64", "", (("ISA", "x86-64"), ("OSFamily", "linux"))),  # system unknown
    ],
)
def test_detected_platform_is_spelled_as_bazel_and_buildgrid_spell_it(monkeypatch, machine, system, expected):
    monkeypatch.setattr(config.host_platform, "machine", lambda: machine)
    monkeypatch.setattr(config.host_platform, "system", lambda: system)
    assert detect_platform() == expected
    assert WorkerConfig().platform == expected


def test_settings_lists_every_field_in_schema_order_with_host_defaults_computed(x86_linux):
    rows = settings()
    assert [name for name, _s, _d in rows] == [f.name for f in dataclasses.fields(WorkerConfig)]
    defaults = {name: default for name, _s, default in rows}
    assert defaults["platform"] == DETECTED  # a value, not the factory
    assert isinstance(defaults["concurrency"], int) and defaults["concurrency"] >= 1
    assert defaults["cache_size"] == "auto"
    # A host-dependent default says so in words (shown by --help and the dump).
    documented = {name for name, setting, _d in rows if setting.default_doc}
    assert {"concurrency", "platform", "bot_id"} <= documented


def test_a_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        WorkerConfig().concurrency = 2  # type: ignore[misc]


# ---------------------------------------------------------------------- precedence


def test_a_file_overrides_the_defaults_and_leaves_the_rest(tmp_path):
    path = write(tmp_path, """
remote = "grpcs://buildgrid.example.com:443"
cache_size = "50G"
concurrency = 3
staging = "auto"
max_action_timeout = 600
""")
    cfg = load_config(path)
    assert cfg.remote == "grpcs://buildgrid.example.com:443"
    assert cfg.cache_bytes == 50 * 2**30
    assert cfg.concurrency == 3
    assert cfg.staging == "auto"
    assert cfg.max_action_timeout == 600.0 and isinstance(cfg.max_action_timeout, float)
    assert cfg.cache_dir == WorkerConfig().cache_dir  # not in the file: the default


def test_flags_override_the_file_and_absent_flags_do_not(tmp_path):
    path = write(tmp_path, 'remote = "grpc://file.example.com:1"\nconcurrency = 3\ncache_dir = "/from/file"\n')
    cfg = flags("--config", path, "--concurrency", "7", "--cache-dir", "/from/flag", "--heartbeat-seconds", "2.5")
    assert cfg.concurrency == 7
    assert cfg.cache_dir == "/from/flag"
    assert cfg.heartbeat_seconds == 2.5
    assert cfg.remote == "grpc://file.example.com:1"  # no --remote: the file's value stands


def test_flags_without_a_file_override_the_defaults():
    cfg = flags("--staging", "fuse", "--metrics-port", "9102", "--log-format", "json")
    assert (cfg.staging, cfg.metrics_port, cfg.log_format) == ("fuse", 9102, "json")


def test_a_flag_left_out_is_absent_from_the_namespace():
    # argparse.SUPPRESS: were it present with its default, it would override the file.
    args = cli.build_parser().parse_args(["config", "--concurrency", "2"])
    given = {key for key in vars(args) if key.startswith("cfg_")}
    assert given == {"cfg_concurrency"}


# ---------------------------------------------------------------------- unknown keys


def test_an_unknown_key_in_a_file_is_refused_naming_it_the_file_and_the_likely_key(tmp_path):
    path = write(tmp_path, 'cache_dri = "/srv/cache"\n')
    with pytest.raises(InvalidArgument) as error:
        load_config(path)
    message = str(error.value)
    assert "'cache_dri'" in message
    assert path in message
    assert "did you mean 'cache_dir'?" in message


def test_an_unknown_key_with_no_close_match_gets_no_suggestion(tmp_path):
    path = write(tmp_path, "zzqqxx = 1\n")
    with pytest.raises(InvalidArgument, match="unknown key 'zzqqxx'") as error:
        load_config(path)
    assert "did you mean" not in str(error.value)


def test_an_unknown_table_is_an_unknown_key(tmp_path):
    # A sectioned file ([server] remote = ...) must not be silently ignored.
    path = write(tmp_path, '[server]\nremote = "grpc://h:1"\n')
    with pytest.raises(InvalidArgument, match="unknown key 'server'"):
        load_config(path)


def test_an_unknown_override_key_is_refused_naming_the_command_line():
    with pytest.raises(InvalidArgument) as error:
        load_config(overrides={"concurency": 2})
    message = str(error.value)
    assert "command line" in message and "'concurency'" in message
    assert "did you mean 'concurrency'?" in message


# ---------------------------------------------------------------------- wrong types

STRING = "a string"
INTEGER = "an integer"
NUMBER = "a number"
SIZE = 'a size such as "10G" or a number of bytes'
FREE_SPACE = 'a percentage such as "10%" or a size such as "20G"'


@pytest.mark.parametrize(
    "line, key, expected",
    [
        ("remote = 5", "remote", STRING),
        ('cache_dir = ["/a"]', "cache_dir", STRING),
        ("bot_id = 7", "bot_id", STRING),  # optional-str
        ('concurrency = "4"', "concurrency", INTEGER),
        ("concurrency = 4.0", "concurrency", INTEGER),
        ("metrics_port = 9102.5", "metrics_port", INTEGER),  # optional-int
        ('max_action_timeout = "600"', "max_action_timeout", NUMBER),
        ("cache_size = 1.5", "cache_size", SIZE),
        ("cache_size = [1]", "cache_size", SIZE),
        ("disk_low_free = 10", "disk_low_free", FREE_SPACE),
        ('staging = "copy"', "staging", "one of 'hardlink', 'fuse', 'auto', 'cached'"),
        ('log_format = "JSON"', "log_format", "one of 'text', 'json'"),
        ("staging = 1", "staging", "one of 'hardlink', 'fuse', 'auto', 'cached'"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_the_expected_type_and_the_file(tmp_path, line, key, expected):
    path = write(tmp_path, line + "\n")
    with pytest.raises(InvalidArgument) as error:
        load_config(path)
    message = str(error.value)
    assert f"{key} must be {expected}, not " in message
    assert path in message


@pytest.mark.parametrize(
    "key, expected",
    [
        ("concurrency", INTEGER),
        ("sandbox_uid_range", STRING),
        ("metrics_port", INTEGER),
        ("max_action_timeout", NUMBER),
        ("cache_size", SIZE),
        ("instance_name", STRING),
    ],
)
def test_a_bool_is_not_an_integer_nor_a_number(tmp_path, key, expected):
    # In Python True == 1: without the check, `concurrency = true` would run one action.
    path = write(tmp_path, f"{key} = true\n")
    with pytest.raises(InvalidArgument, match=re.escape(f"{key} must be {expected}, not True")):
        load_config(path)


def test_an_integer_is_accepted_where_a_number_or_a_size_is(tmp_path):
    cfg = load_config(write(tmp_path, "poll_deadline_seconds = 45\ncache_size = 1048576\n"))
    assert cfg.poll_deadline_seconds == 45.0 and isinstance(cfg.poll_deadline_seconds, float)
    assert cfg.cache_size == "1048576" and cfg.cache_bytes == 2**20


# ---------------------------------------------------------------------- invalid values


@pytest.mark.parametrize(
    "values, named",
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -4}, "concurrency"),
        ({"shutdown_grace_seconds": -1.0}, "shutdown_grace_seconds"),
        ({"max_action_timeout": 0.0}, "max_action_timeout"),
        ({"heartbeat_seconds": 0.0}, "heartbeat_seconds"),
        ({"poll_deadline_seconds": -1.0}, "poll_deadline_seconds"),
        ({"max_backoff_seconds": 0.0}, "max_backoff_seconds"),
        ({"scheduler_grace_seconds": 0.0}, "scheduler_grace_seconds"),
        ({"health_interval_seconds": -5.0}, "health_interval_seconds"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"metrics_port": 0}, "metrics_port"),
        ({"metrics_port": 65536}, "metrics_port"),
        ({"cache_size": "10Q"}, "cache_size"),
        ({"cache_size": "0"}, "cache_size"),
        ({"tree_cache_size": "0"}, "tree_cache_size"),
        ({"disk_low_free": "abc"}, "disk_low_free"),
        ({"disk_critical_free": "abc"}, "disk_critical_free"),
        ({"disk_low_free": "150%"}, "disk_low_free"),
        ({"disk_low_free": "5%", "disk_critical_free": "10%"}, "disk_critical_free"),
        ({"disk_low_free": "5G", "disk_critical_free": "10G"}, "disk_critical_free"),
        ({"bot_id": ""}, "bot_id"),
        ({"bot_id": "   "}, "bot_id"),
        ({"remote": "ftp://buildgrid.example.com"}, "remote"),
        ({"remote": "buildgrid.example.com:50051"}, "remote"),
        ({"remote": ""}, "remote"),
        ({"cas_remote": "unix:relative/socket"}, "cas_remote"),
        ({"remote": "grpc://h:1", "tls_ca": "/etc/ca.pem"}, "remote"),  # TLS files need a TLS URL
        ({"remote": "grpcs://h", "tls_cert": "/c.pem"}, "remote"),  # a cert needs its key
        ({"platform": (("", "v"),)}, "platform"),
        ({"platform": (("ISA", ""),)}, "platform"),
        ({"sandbox_uid_range": "200000"}, "sandbox_uid_range"),
        ({"sandbox_uid_range": "200063-200000"}, "sandbox_uid_range"),
        ({"sandbox_uid_range": "0-63"}, "sandbox_uid_range"),  # uid 0: the cache's owner
        ({"sandbox_uid_range": "4294967290-4294967295"}, "sandbox_uid_range"),  # past the last id
    ],
)
def test_an_invalid_value_is_refused_naming_the_key(values, named):
    with pytest.raises(InvalidArgument, match=re.escape(named)):
        WorkerConfig(**values)


def test_an_invalid_value_from_a_file_is_refused_naming_the_key(tmp_path):
    path = write(tmp_path, 'disk_low_free = "5%"\ndisk_critical_free = "10%"\n')
    with pytest.raises(InvalidArgument, match="disk_low_free/disk_critical_free: critical .* 10% is above .* 5%"):
        load_config(path)


def test_an_invalid_value_from_a_flag_is_refused_naming_the_key():
    with pytest.raises(InvalidArgument, match="concurrency must be at least 1, not 0"):
        flags("--concurrency", "0")


@pytest.mark.parametrize(
    "values",
    [
        {"shutdown_grace_seconds": 0.0},  # abort at once on SIGTERM: allowed
        {"metrics_port": 1},
        {"metrics_port": 65535},
        {"disk_low_free": "10%", "disk_critical_free": "10%"},  # equal is not above
        {"disk_low_free": "20G", "disk_critical_free": "5%"},  # mixed kinds: checked per disk
        {"remote": "grpcs://h", "tls_ca": "/ca.pem", "tls_cert": "/c.pem", "tls_key": "/c.key"},
        {"remote": "unix:/run/bgd.sock", "cas_remote": "grpc://cas:50052"},
    ],
)
def test_boundary_values_are_accepted(values):
    cfg = WorkerConfig(**values)
    for key, value in values.items():
        assert getattr(cfg, key) == value


def test_a_sandbox_uid_range_smaller_than_concurrency_is_refused():
    # One uid per action at once: 4 actions cannot share 3 uids.
    with pytest.raises(InvalidArgument, match=r"sandbox_uid_range: '200000-200002' holds 3 uid\(s\), fewer than concurrency = 4"):
        WorkerConfig(sandbox_uid_range="200000-200002", concurrency=4)
    assert WorkerConfig(sandbox_uid_range="200000-200003", concurrency=4).sandbox_uid_candidates == (range(200000, 200004),)


def test_auto_sandbox_uids_are_blocks_of_concurrency_ids_below_2_to_the_31():
    candidates = WorkerConfig(concurrency=4).sandbox_uid_candidates
    assert candidates[0] == range(AUTO_SANDBOX_UID_BASE, AUTO_SANDBOX_UID_BASE + 4)
    assert candidates[1] == range(AUTO_SANDBOX_UID_BASE + 4, AUTO_SANDBOX_UID_BASE + 8)
    assert all(len(block) == 4 and block.stop <= 2**31 for block in candidates)


# ------------------------------------------------------------------- reading the file


def test_a_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, 'remote = "grpc://unterminated\n')
    with pytest.raises(InvalidArgument) as error:
        load_config(path)
    assert str(error.value).startswith(f"config file {path}: ")
    assert "line 1" in str(error.value)  # tomllib's position, kept


def test_a_duplicate_key_is_a_syntax_error_naming_the_file(tmp_path):
    path = write(tmp_path, "concurrency = 2\nconcurrency = 3\n")
    with pytest.raises(InvalidArgument, match=re.escape(f"config file {path}: ")):
        load_config(path)


def test_a_missing_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(InvalidArgument) as error:
        load_config(path)
    assert str(error.value) == f"reading config file {path}: No such file or directory"


def test_a_directory_given_as_the_file_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidArgument, match=re.escape(f"reading config file {tmp_path}: ")):
        load_config(str(tmp_path))


def test_an_empty_file_gives_the_defaults(tmp_path, x86_linux):
    assert load_config(write(tmp_path, "# nothing but a comment\n")) == WorkerConfig()


# ------------------------------------------------------------------------- platform


def test_a_platform_key_in_the_file_replaces_the_detected_values_of_that_key_only(tmp_path, x86_linux):
    cfg = load_config(write(tmp_path, '[platform]\nISA = "aarch64"\n'))
    assert cfg.platform == (("ISA", "aarch64"), ("OSFamily", "linux"))


@pytest.mark.parametrize("removal", ['OSFamily = ""', "OSFamily = []", 'OSFamily = [""]'])
def test_an_empty_platform_value_removes_the_key(tmp_path, x86_linux, removal):
    cfg = load_config(write(tmp_path, f"[platform]\n{removal}\n"))
    assert cfg.platform == (("ISA", "x86-64"),)


def test_a_list_gives_a_platform_key_several_values_and_new_keys_are_added(tmp_path, x86_linux):
    cfg = load_config(write(tmp_path, '[platform]\nrootMode = ["host-tools", "chroot"]\nISA = ["x86-64", "i386"]\n'))
    assert cfg.platform == (
        ("ISA", "i386"), ("ISA", "x86-64"), ("OSFamily", "linux"), ("rootMode", "chroot"), ("rootMode", "host-tools"),
    )


def test_platform_flags_are_repeatable_and_can_remove_a_key(x86_linux):
    cfg = flags("--platform", "ISA=a", "--platform", "ISA=b", "--platform", "OSFamily=", "--platform", "pool=big")
    assert cfg.platform == (("ISA", "a"), ("ISA", "b"), ("pool", "big"))


def test_a_platform_flag_replaces_the_file_per_key(tmp_path, x86_linux):
    path = write(tmp_path, '[platform]\nISA = "from-file"\nrootMode = "chroot"\n')
    cfg = flags("--config", path, "--platform", "ISA=from-flag")
    assert cfg.platform == (("ISA", "from-flag"), ("OSFamily", "linux"), ("rootMode", "chroot"))


def test_a_platform_flag_value_may_contain_an_equals_sign(x86_linux):
    cfg = flags("--platform", "label=a=b")
    assert ("label", "a=b") in cfg.platform


def test_parse_platform_flags_groups_values_per_key():
    assert parse_platform_flags(["ISA=a", "ISA=b", "OSFamily="]) == {"ISA": ["a", "b"], "OSFamily": []}


@pytest.mark.parametrize("item", ["ISA", "=x86-64", ""])
def test_a_platform_flag_without_a_key_and_an_equals_sign_is_refused(item):
    with pytest.raises(InvalidArgument, match=re.escape(f"--platform {item!r}: expected KEY=VALUE")):
        flags("--platform", item)


@pytest.mark.parametrize(
    "text, named",
    [
        ('platform = "linux"', "platform must be a table"),
        ("[platform]\nISA = 64", "platform.ISA must be a string or a list of strings"),
        ('[platform]\nISA = ["a", 1]', "platform.ISA must be a string or a list of strings"),
        ("[platform]\nISA = { arch = \"x\" }", "platform.ISA must be a string or a list of strings"),
    ],
)
def test_a_platform_table_of_the_wrong_shape_is_refused_naming_the_key_and_file(tmp_path, text, named):
    path = write(tmp_path, text + "\n")
    with pytest.raises(InvalidArgument) as error:
        load_config(path)
    assert named in str(error.value) and path in str(error.value)


# ----------------------------------------------------------------------------- dump


def reload(tmp_path: Path, text: str) -> WorkerConfig:
    return load_config(write(tmp_path, text, "dumped.toml"))


def test_the_dump_of_the_defaults_loads_back_equal(tmp_path, x86_linux):
    original = load_config()
    assert reload(tmp_path, dump_toml(original, resolve_bot_id=False)) == original


def test_the_dump_of_a_config_with_every_setting_changed_loads_back_equal(tmp_path, x86_linux):
    changed = {
        "remote": "grpcs://buildgrid.example.com:443",
        "cas_remote": "grpcs://cas.example.com:8443",
        "instance_name": 'main/"quoted"\\back\tslash',
        "tls_ca": "/etc/ca.pem",
        "tls_cert": "/etc/client.pem",
        "tls_key": "/etc/client.key",
        "access_token_file": "/run/secrets/token",
        "cache_dir": "/srv/cache ü",
        "cache_size": "1.5T",
        "build_dir_size": "3G",
        "build_root": "/srv/builds",
        "max_action_timeout": 0.25,
        "sandbox_uid_range": "300000-300063",
        "staging": "auto",
        "fuse_backend": "pyfuse3",
        "action_memory": "2G",
        "action_tmp_size": "unlimited",
        "action_pids": "100",
        "action_cpu": "1.5",
        "action_stream_size": "64M",
        "action_open_files": "300",
        "capture_timeout": "120",
        "network_on": "nat",
        "host_etc": ("passwd", "ld.so.*", "quoted \"name\""),
        "root_mode": "chroot",
        "accepted_platform_keys": "Pool,gpu",
        "max_output_size": "3G",
        "tree_cache_size": "20G",
        "bot_id": "builder-7",
        "concurrency": 13,
        "platform": (("ISA", "x86-32"), ("ISA", "x86-64"), ("OSFamily", "linux"), ("network", "on")),
        "metrics_port": 9102,
        "metrics_host": "::1",
        "disk_low_free": "20G",
        "disk_critical_free": "5G",
        "scheduler_grace_seconds": 1e6,
        "health_interval_seconds": 10.0,
        "shutdown_grace_seconds": 0.0,
        "heartbeat_seconds": 1.5,
        "poll_deadline_seconds": 31.0,
        "max_backoff_seconds": 12.0,
        "log_format": "json",
    }
    assert set(changed) == {f.name for f in dataclasses.fields(WorkerConfig)}  # none forgotten
    original = WorkerConfig(**changed)
    for name, value in changed.items():
        assert getattr(original, name) != getattr(WorkerConfig(), name) or name == "platform", name
    assert reload(tmp_path, dump_toml(original)) == original


def test_platform_keys_and_values_needing_quoting_round_trip(tmp_path, x86_linux):
    platform = tuple(sorted([
        ("ISA", "x86-64"),
        ("OSFamily", "linux"),
        ("my key", "a value"),
        ("a.b", "dotted"),  # bare, this would be a nested table
        ("ü", "non-ASCII key"),
        ('say "hi"', "back\\slash"),
        ("gpu", "🎮"),  # beyond U+FFFF: JSON's surrogate pair escape is not valid TOML
        ("ctl", "del\x7fnl\ntab\t"),  # control characters TOML wants escaped
        ("pool", "a"), ("pool", "b"), ("pool", "c"),
    ]))
    original = WorkerConfig(platform=platform, bot_id="b")
    text = dump_toml(original)
    assert tomllib.loads(text)["platform"]["pool"] == ["a", "b", "c"]
    assert reload(tmp_path, text) == original


def test_a_removed_detected_platform_key_stays_removed_in_the_dump(tmp_path, x86_linux):
    # load_config starts from the detected properties: the dump must say OSFamily is gone.
    original = load_config(write(tmp_path, "[platform]\nOSFamily = []\n"))
    assert original.platform == (("ISA", "x86-64"),)
    text = dump_toml(original, resolve_bot_id=False)
    assert "\nOSFamily = []\n" in text
    assert reload(tmp_path, text) == original


def test_the_dump_resolves_an_unset_bot_id_to_the_effective_one(tmp_path, x86_linux):
    original = load_config()
    text = dump_toml(original)
    assert f"\nbot_id = {original.effective_bot_id!r}".replace("'", '"') in text
    loaded = reload(tmp_path, text)
    assert loaded.bot_id == original.effective_bot_id
    assert dataclasses.replace(loaded, bot_id=None) == original


def test_unset_optional_keys_are_dumped_commented_out_with_their_example(tmp_path):
    text = dump_toml(WorkerConfig(), resolve_bot_id=False)
    for name in ("cas_remote", "tls_ca", "tls_cert", "tls_key", "access_token_file", "metrics_port", "bot_id"):
        assert not re.search(rf"^{name} =", text, re.M), name
        assert re.search(rf"^# {name} = .*\(unset; an example\)$", text, re.M), name
    assert "cas_remote" not in tomllib.loads(text)


@pytest.mark.parametrize("optional_set", [False, True], ids=["optional-unset", "optional-set"])
def test_every_setting_appears_in_the_dump_with_its_help_text(x86_linux, optional_set):
    cfg = WorkerConfig(
        remote="grpcs://h", cas_remote="grpcs://cas", tls_ca="/ca", tls_cert="/c", tls_key="/k",
        access_token_file="/t", metrics_port=9102, bot_id="b",
    ) if optional_set else WorkerConfig()
    text = dump_toml(cfg, resolve_bot_id=False)
    document = tomllib.loads(text)
    for name, setting, _default in settings():
        help_line = f"# {setting.help[0].upper()}{setting.help[1:]}."
        assert help_line in text, name
        if setting.default_doc:
            assert f"Default: {setting.default_doc}." in text, name
        if setting.kind == "platform":
            assert re.search(rf"{re.escape(help_line)}\n#.*\n\[platform\]\n", text)
            assert document["platform"] == {"ISA": "x86-64", "OSFamily": "linux"}
        elif getattr(cfg, name) is None:
            # Shown commented out right after its own documentation.
            assert re.search(rf"{re.escape(help_line)}\n(#.*\n)*# {name} = {re.escape(setting.example)} ", text), name
            assert name not in document, name
        else:
            # The key follows its own documentation, not another key's.
            assert re.search(rf"{re.escape(help_line)}\n(#.*\n)*{name} = ", text), name
            value = getattr(cfg, name)
            assert document[name] == (list(value) if isinstance(value, tuple) else value), name  # TOML arrays


def test_the_dump_of_the_sample_file_loads_back_equal(tmp_path):
    sample = load_config(str(Path(__file__).resolve().parents[3] / "deploy" / "worker.toml"))
    assert reload(tmp_path, dump_toml(sample, resolve_bot_id=False)) == sample


# ------------------------------------------------------------------------------ CLI


def test_config_dump_prints_the_effective_config_and_returns_0(capsys, x86_linux):
    assert cli.main(["config", "--dump"]) == 0
    out = capsys.readouterr().out
    assert out == dump_toml(load_config())
    assert tomllib.loads(out)["remote"] == "grpc://127.0.0.1:50051"


def test_config_dump_applies_the_file_and_the_flags(tmp_path, capsys):
    path = write(tmp_path, 'remote = "grpc://file.example.com:1"\nconcurrency = 3\n')
    assert cli.main(["config", "--dump", "--config", path, "--concurrency", "9"]) == 0
    document = tomllib.loads(capsys.readouterr().out)
    assert document["remote"] == "grpc://file.example.com:1"
    assert document["concurrency"] == 9


@pytest.mark.parametrize(
    "text, extra, named",
    [
        ("concurency = 2\n", [], "'concurency'"),
        ('cache_size = "10Q"\n', [], "cache_size"),
        ("", ["--metrics-port", "70000"], "metrics_port"),
        ("", ["--remote", "ftp://h"], "remote"),
    ],
)
def test_a_bad_config_makes_the_cli_return_2_with_an_error_naming_the_key(tmp_path, capsys, text, extra, named):
    path = write(tmp_path, text)
    assert cli.main(["config", "--dump", "--config", path, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("reapi-worker: error: ")
    assert named in captured.err


def test_a_missing_config_file_makes_the_cli_return_2_naming_the_file(tmp_path, capsys):
    path = str(tmp_path / "nope.toml")
    assert cli.main(["config", "--config", path]) == 2
    assert f"reading config file {path}: No such file or directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- bot id


def test_the_default_bot_id_is_stable_for_one_cache_dir_and_differs_for_another(monkeypatch, tmp_path):
    monkeypatch.setattr(config.socket, "gethostname", lambda: "builder")
    first = default_bot_id(str(tmp_path / "a"))
    assert re.fullmatch(r"builder-[0-9a-f]{8}", first)
    assert default_bot_id(str(tmp_path / "a")) == first
    assert default_bot_id(str(tmp_path / "b")) != first
    monkeypatch.chdir(tmp_path)
    assert default_bot_id("a") == first  # relative or absolute: one directory, one id


def fake_machine_ids(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    """``open`` in config.py sees only ``files``; any other path is absent."""

    def fake_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(config, "open", fake_open, raising=False)


def test_the_default_bot_id_differs_between_machines_with_one_hostname(monkeypatch):
    # Containers repeat hostnames: the machine id tells two of them apart.
    monkeypatch.setattr(config.socket, "gethostname", lambda: "worker-0")
    fake_machine_ids(monkeypatch, {"/etc/machine-id": "1111\n"})
    one = default_bot_id("/cache")
    fake_machine_ids(monkeypatch, {"/etc/machine-id": "2222\n"})
    other = default_bot_id("/cache")
    assert one != other
    # Without /etc/machine-id, D-Bus's copy of the same id gives the same bot id.
    fake_machine_ids(monkeypatch, {"/var/lib/dbus/machine-id": "1111"})
    assert default_bot_id("/cache") == one
    fake_machine_ids(monkeypatch, {})
    assert re.fullmatch(r"worker-0-[0-9a-f]{8}", default_bot_id("/cache"))


def test_the_effective_bot_id_is_the_configured_one_or_the_default_of_the_cache_dir():
    assert WorkerConfig(bot_id="builder-7").effective_bot_id == "builder-7"
    cfg = WorkerConfig(cache_dir="/srv/cache")
    assert cfg.effective_bot_id == default_bot_id("/srv/cache")


def test_bounds_are_on_by_default_and_take_values_auto_or_unlimited(tmp_path):
    bounds = WorkerConfig(concurrency=2).action_bounds
    assert all(getattr(bounds.limits, name) is not None for name in bounds.limits.__dataclass_fields__)
    assert bounds.capture_timeout is not None
    config_file = tmp_path / "bounds.toml"
    config_file.write_text('action_pids = 64\naction_memory = "1G"\naction_cpu = 0.5\naction_stream_size = "unlimited"\n')
    loaded = load_config(str(config_file)).action_bounds.limits
    assert (loaded.max_pids, loaded.memory_bytes, loaded.cpu_cores, loaded.stream_bytes) == (64, 1 << 30, 0.5, None)
    assert loaded.tmp_bytes == 512 << 20  # auto: half the memory bound
    with pytest.raises(InvalidArgument, match="action_pids"):
        WorkerConfig(action_pids="many")
    config_file.write_text("action_memory = true\n")
    with pytest.raises(InvalidArgument, match="action_memory"):
        load_config(str(config_file))


# ----------------------------------------------------------------- network and /etc


def test_network_on_is_refused_by_default_and_never_advertised_while_refused(x86_linux):
    assert WorkerConfig().network_on == "refuse"
    with pytest.raises(InvalidArgument, match='network=on is advertised, but network_on = "refuse"'):
        WorkerConfig(platform=(("network", "off"), ("network", "on")))
    assert WorkerConfig(network_on="nat", platform=(("network", "on"),)).platform == (("network", "on"),)


def test_the_etc_allow_list_comes_from_the_file_or_repeated_flags(tmp_path, x86_linux):
    path = write(tmp_path, 'host_etc = ["passwd", "ld.so.*"]\n')
    assert load_config(path).host_etc == ("passwd", "ld.so.*")
    assert load_config(path, {"host_etc": ["group"]}).host_etc == ("group",)


@pytest.mark.parametrize("entry", ["..", "reapi-worker/worker.toml", ""])
def test_attack_an_etc_allow_list_entry_leaving_etc_is_refused_naming_the_key(tmp_path, x86_linux, entry):
    with pytest.raises(InvalidArgument, match="host_etc: .*directly under /etc"):
        load_config(write(tmp_path, f"host_etc = [{entry!r}]\n".replace("'", '"')))
