"""The one mountinfo parser (shared by the cgroup controllers and the FUSE stager's clean-up)."""

from __future__ import annotations

from reapi_worker.host.mountinfo import MountEntry, parse_mountinfo, read_mountinfo, unescape

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw,errors=remount-ro
35 31 0:32 /ctr /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 master:3 - cgroup cgroup rw,cpu,cpuacct
42 22 0:41 / /srv/builds/with\\040space/root rw - overlay over\\134lay rw,lowerdir=/a
not a mountinfo line
43 22 0:42 / /srv/no-separator rw tmpfs tmpfs rw
"""


def test_each_field_is_parsed_with_any_number_of_optional_fields():
    root, cgroup, overlay = parse_mountinfo(MOUNTINFO)
    assert root == MountEntry(22, 1, "/", "/", "ext4", "/dev/vda", "rw,errors=remount-ro")
    assert (cgroup.root, cgroup.mount_point, cgroup.fstype) == ("/ctr", "/sys/fs/cgroup/cpu,cpuacct", "cgroup")
    assert cgroup.super_options == "rw,cpu,cpuacct"
    assert (overlay.mount_point, overlay.source) == ("/srv/builds/with space/root", "over\\lay")


def test_escapes_are_decoded_also_at_the_end_of_a_field():
    assert unescape("/sys/fs/with\\040space\\040") == "/sys/fs/with space "
    assert unescape("/plain") == "/plain"
    assert unescape("/not\\04") == "/not\\04"  # too short to be an escape: kept as it is


def test_this_process_has_a_root_mount():
    assert "/" in {entry.mount_point for entry in read_mountinfo()}
