"""storage/build_root.py: a worker's part of a shared build root, and the sweep of dead
workers' parts — never a live one's.

"Dead" is a real process that held its owner lock and was killed with SIGKILL; "live" is
a real process that holds one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from reapi_worker.storage.build_root import BuildRoot
from reapi_worker.storage.staging import TreeRemover

HOLD = textwrap.dedent(
    """
    import os, sys, time
    from reapi_worker.storage.build_root import BuildRoot
    part = BuildRoot.claim(sys.argv[1])
    os.makedirs(os.path.join(part.path, "0123456789abcdef0123456789abcdef", "src"))
    os.makedirs(os.path.join(part.path, "streams-x"))
    print(part.path, flush=True)
    time.sleep(600)
    """
)


def start_holder(root: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", HOLD, root], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def test_a_killed_workers_part_is_swept_and_a_live_ones_is_kept(tmp_path):
    root = str(tmp_path / "builds")
    dead, dead_part = start_holder(root)
    live, live_part = start_holder(root)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        part = BuildRoot.claim(root)
        remover = TreeRemover(part.trash)
        remover.drain()
        assert part.swept == [dead_part]
        assert not os.path.exists(dead_part)
        assert os.path.isdir(os.path.join(live_part, "0123456789abcdef0123456789abcdef", "src"))
        assert sorted(os.listdir(os.path.join(root, ".owners"))) == sorted(
            [os.path.basename(live_part)[2:], part.token]
        )
        part.close()
        assert sorted(os.listdir(root)) == sorted([".owners", os.path.basename(live_part)])
    finally:
        live.kill()
        live.wait()


def test_the_older_layouts_leftovers_are_swept_when_no_other_worker_lives(tmp_path):
    root = tmp_path / "builds"
    for name in ("0123456789abcdef0123456789abcdef/deep/er", "streams-abc", ".trash/x", ".fuse"):
        (root / name).mkdir(parents=True)
    (root / "operator-notes").mkdir()  # not ours: never touched
    part = BuildRoot.claim(str(root))
    TreeRemover(part.trash).drain()
    assert sorted(os.listdir(root)) == sorted([".owners", "operator-notes", os.path.basename(part.path)])
    part.close()


def test_the_older_layouts_leftovers_are_kept_while_another_worker_lives(tmp_path):
    root = str(tmp_path / "builds")
    live, _ = start_holder(root)
    try:
        os.mkdir(os.path.join(root, "streams-abc"))
        part = BuildRoot.claim(root)
        assert part.swept == []
        assert os.path.isdir(os.path.join(root, "streams-abc"))
        part.close()
    finally:
        live.kill()
        live.wait()


def test_a_part_is_removed_on_close_and_its_owner_file_with_it(tmp_path):
    root = tmp_path / "builds"
    part = BuildRoot.claim(str(root))
    assert os.stat(part.path).st_mode & 0o777 == 0o755
    part.close()
    part.close()
    assert os.listdir(root) == [".owners"] and os.listdir(root / ".owners") == []
