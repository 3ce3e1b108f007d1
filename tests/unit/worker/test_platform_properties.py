"""Platform properties are checked strictly: each key is interpreted, matched by the
scheduler, or refused by name."""

import pytest

from reapi_worker.protos import re_pb2
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.request import RootMode
from reapi_worker.worker.platform_properties import ActionPlatform, PlatformPolicy, check_platform


def _platform(*pairs):
    return re_pb2.Platform(properties=[re_pb2.Platform.Property(name=k, value=v) for k, v in pairs])


def test_what_buildstream_sends_runs_in_the_farms_default_root_mode():
    platform = _platform(("ISA", "x86-64"), ("OSFamily", "linux"))
    assert check_platform(platform, PlatformPolicy()) == ActionPlatform(RootMode.HOST_TOOLS, network=False)
    chroot_farm = PlatformPolicy.of(RootMode.CHROOT)
    assert check_platform(platform, chroot_farm) == ActionPlatform(RootMode.CHROOT, network=False)


def test_an_actions_root_mode_overrides_the_farm_default():
    platform = _platform(("rootMode", "host-tools"))
    assert check_platform(platform, PlatformPolicy.of(RootMode.CHROOT)).root_mode is RootMode.HOST_TOOLS


def test_unknown_keys_are_refused_naming_each_of_them():
    platform = _platform(("OSFamily", "linux"), ("rootmode", "chroot"), ("dockerImage", "a"), ("dockerImage", "b"))
    with pytest.raises(InvalidArgument) as raised:
        check_platform(platform, PlatformPolicy(), "action.platform")
    message = str(raised.value)
    assert message.startswith("action.platform: unsupported properties 'rootmode', 'dockerImage' (")
    assert "rootMode" in message and "unixUID" in message  # what the worker does understand


def test_unix_ids_are_interpreted():
    platform = check_platform(_platform(("unixUID", "1000"), ("unixGID", "100")), PlatformPolicy())
    assert (platform.uid, platform.gid) == (1000, 100)
    with pytest.raises(InvalidArgument, match="unixUID"):
        check_platform(_platform(("unixUID", "1000"), ("unixUID", "1001")), PlatformPolicy())


def test_an_operator_allow_listed_key_is_accepted_and_not_interpreted():
    platform = _platform(("Pool", "big"), ("Pool", "fast"), ("network", "on"))
    assert check_platform(platform, PlatformPolicy.of(RootMode.HOST_TOOLS, ["Pool"], allow_network=True)).network is True
    with pytest.raises(InvalidArgument, match="'Pool'"):
        check_platform(platform, PlatformPolicy())


def test_a_matched_key_may_carry_several_values():
    assert check_platform(_platform(("ISA", "x86-32"), ("ISA", "x86-64")), PlatformPolicy()).network is False


@pytest.mark.parametrize(("key", "values"), [("network", ("off", "on")), ("rootMode", ("chroot", "host-tools"))])
def test_conflicting_values_of_an_interpreted_key_are_refused(key, values):
    with pytest.raises(InvalidArgument) as raised:
        check_platform(_platform(*[(key, v) for v in values]), PlatformPolicy())
    assert f"{key} is given twice with different values ({values[0]!r} and {values[1]!r})" in str(raised.value)


def test_the_same_value_twice_is_harmless():
    assert check_platform(_platform(("network", "on"), ("network", "on")), PlatformPolicy(allow_network=True)).network is True


@pytest.mark.parametrize(("key", "value"), [("network", "yes"), ("rootMode", "vm")])
def test_a_value_outside_the_choices_is_refused_naming_it(key, value):
    with pytest.raises(InvalidArgument, match=f"{key}={value!r}"):
        check_platform(_platform((key, value)), PlatformPolicy())


def test_attack_network_on_is_refused_unless_the_operator_allows_it_naming_the_property():
    with pytest.raises(InvalidArgument, match="network=on: this worker refuses actions with network"):
        check_platform(_platform(("network", "on")), PlatformPolicy(), "action.platform")
    assert check_platform(_platform(("network", "off")), PlatformPolicy()).network is False
