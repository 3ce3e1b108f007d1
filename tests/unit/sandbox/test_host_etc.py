"""The /etc allow-list of HOST_TOOLS sandboxes, on a fake host tree."""

from __future__ import annotations

import socket

import pytest

from reapi_worker.sandbox import SandboxSetupError
from reapi_worker.sandbox.bwrap_args import HostEntry, HostLayout
from reapi_worker.sandbox.host_etc import DEFAULT_HOST_ETC, allow_pattern, allowed_etc_entries, check_etc_names, scan_etc


@pytest.fixture
def host(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "ld.so.cache", "ld.so.conf", "shadow", "machine-id"):
        (etc / name).write_text(name + "\n")
    for name in ("ld.so.conf.d", "reapi-worker", "ssh", "ssl"):
        (etc / name).mkdir()
    (etc / "reapi-worker" / "worker.toml").write_text("access_token_file = '/run/secrets/token'\n")
    (etc / "localtime").symlink_to("/usr/share/zoneinfo/Etc/UTC")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(etc / "hosts"))  # not a file: never shown, even when allowed
        yield tmp_path


def test_attack_the_workers_config_and_the_hosts_secrets_are_not_in_the_sandboxs_etc(host):
    shown = dict(allowed_etc_entries(DEFAULT_HOST_ETC, str(host)))
    assert sorted(shown) == [
        "/etc/group", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
        "/etc/passwd", "/etc/ssl",
    ]
    assert shown["/etc/localtime"] == "/usr/share/zoneinfo/Etc/UTC"  # recreated as a link
    assert shown["/etc/passwd"] is None  # bound


def test_the_operator_chooses_the_list_with_patterns(host):
    assert allowed_etc_entries(["pass*", "ssh"], str(host)) == [("/etc/passwd", None), ("/etc/ssh", None)]
    assert allowed_etc_entries([], str(host)) == []


@pytest.mark.parametrize("name", ["", ".", "..", "../root", "ssh/sshd_config", "/etc/passwd", "a\0b"])
def test_attack_an_allow_list_entry_cannot_climb_out_of_etc(name):
    with pytest.raises(SandboxSetupError, match="directly under /etc"):
        check_etc_names([name])


def test_the_layout_shows_the_allowed_entries_after_the_top_level_ones(host):
    (host / "usr").mkdir()
    layout = HostLayout.probe(str(host), etc_allow=("passwd", "localtime"))
    assert layout.entries == (
        HostEntry("/usr"), HostEntry("/etc/localtime", "/usr/share/zoneinfo/Etc/UTC"), HostEntry("/etc/passwd"),
    )


def test_a_scan_tells_a_replaced_entry_from_one_rewritten_in_place(host):
    allow = allow_pattern(DEFAULT_HOST_ETC)
    before = scan_etc(allow, str(host / "etc"))
    (host / "etc" / "passwd").write_text("rewritten in place\n")  # same inode: a bind shows it live
    assert scan_etc(allow, str(host / "etc")) == before
    fresh = host / "etc" / "group.new"
    fresh.write_text("renamed over\n")
    fresh.rename(host / "etc" / "group")  # a new inode: a bind of the old one would be stale
    after = scan_etc(allow, str(host / "etc"))
    assert [e.name for e in after] == [e.name for e in before]
    assert [e.name for e in after if e not in before] == ["group"]


def test_the_compiled_allow_list_matches_as_fnmatch_does():
    allow = allow_pattern(["ld.so.*", "java-*", "passwd"])
    assert [n for n in ("ld.so.cache", "ld.so", "java-17", "java", "passwd", "passwd-", "xpasswd") if allow.match(n)] == [
        "ld.so.cache", "java-17", "passwd"]
    assert not allow_pattern([]).match("passwd")
