"""The pure parts of mount handling: reading mountinfo, and option-string safety."""

from __future__ import annotations

import pytest

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.storage.fuse import kernel_mounts

MOUNTINFO = """\
22 1 8:1 / / rw,relatime - ext4 /dev/vda rw
40 22 0:39 / /srv/builds/.fuse ro,nosuid,nodev - fuse.reapi reapi-worker-inputs ro,user_id=0
41 22 0:40 / /srv/builds/abc/root rw,relatime - overlay overlay rw,lowerdir=/srv/builds/.fuse/t1
42 22 0:41 / /srv/builds/with\\040space/root rw - overlay overlay rw
43 22 0:42 / /srv/buildsX/other rw - tmpfs tmpfs rw
44 41 0:43 / /srv/builds/abc/root/proc rw - proc proc rw
"""


def test_mounts_under_a_directory_deepest_first_with_escapes_decoded(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    # Deepest first; at one depth the later mount first (reverse mount order is always a
    # safe unmount order).
    assert kernel_mounts.mounts_under("/srv/builds", str(info)) == [
        "/srv/builds/abc/root/proc",
        "/srv/builds/with space/root",
        "/srv/builds/abc/root",
        "/srv/builds/.fuse",
    ]


def test_a_sibling_whose_name_extends_the_prefix_is_not_under_it(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert "/srv/buildsX/other" not in kernel_mounts.mounts_under("/srv/builds", str(info))


@pytest.mark.parametrize("path", ["/srv/a,upperdir=/etc", "/srv/a:/etc", "/srv/a\\,b", "relative/path", "/srv/a\nb"])
def test_a_build_root_that_could_inject_overlay_options_is_refused(path):
    with pytest.raises(InvalidArgument):
        kernel_mounts.check_mountable_path(path, "build root")
