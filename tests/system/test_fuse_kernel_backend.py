"""The /dev/fuse backend on real mounts, in both modes: the page-cache mode (no OPEN,
RELEASE or OPENDIR reaches the daemon, listed files are pushed into the page cache and
read with no request, a file read once is read again with no request, the daemon holds
no descriptor for open files) and passthrough (really used, backing ids released), the
fallbacks, and requests the kernel passes on from hostile callers.

Each test opens its own FuseMount (one per process at a time: the shared one of
executor_fixtures is closed first).
"""

from __future__ import annotations

import errno
import fcntl
import gc
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

import executor_fixtures
from conftest import require, require_tool
from fakes.cas_server import FakeCasServer

from reapi_worker.protos import code_pb2, re_pb2
from reapi_worker.storage.digests import Digest, serialize
from reapi_worker.storage.directory.cas import CasDirectory
from reapi_worker.storage.fuse import FuseMount, FuseStager, kernel_mounts
from reapi_worker.storage.fuse import protocol as fuse
from reapi_worker.storage.local_cas import LocalCAS
from reapi_worker.storage.staging import TreeRemover
from reapi_worker.worker.compose import open_executor
from reapi_worker.worker.config import load_config


class Rig:
    """A FuseMount of its own with a FuseStager, over a cache holding a small tree."""

    def __init__(self, backend: str, stacked_overlays: int = 1) -> None:
        self.top = tempfile.mkdtemp(prefix="reapi-worker-kernel-fuse-", dir="/tmp")
        os.chmod(self.top, 0o755)
        self.cache = LocalCAS(os.path.join(self.top, "cache"), max_bytes=1 << 30)
        tree = CasDirectory.empty(self.cache)
        tree.mkdir("d")
        tree.mkdir("bin")
        for i in range(20):
            tree.write_bytes(f"d/f{i}", b"%d\n" % i * 1000)
        tree.write_bytes("same-1", b"same blob\n")
        tree.write_bytes("same-2", b"same blob\n")
        tree.symlink("link", "d/f1")
        with open("/bin/true", "rb") as binary:
            tree.write_bytes("bin/true", binary.read(), executable=True)  # an ELF: exec maps it
        self.tree = tree.digest()
        self.mount = FuseMount(os.path.join(self.top, "fuse"), backend=backend, stacked_overlays=stacked_overlays)
        self.mount.open()
        self.remover = TreeRemover(os.path.join(self.top, "builds", ".trash"))
        self.stager = FuseStager(self.cache, self.remover, self.mount, os.path.join(self.top, "builds"))
        self.staged: list = []

    def stage(self, name: str = "action"):  # type: ignore[no-untyped-def]
        staged = self.stager.stage(CasDirectory.from_digest(self.cache, self.tree), os.path.join(self.top, "builds", name))
        self.staged.append(staged)
        return staged

    def reads(self) -> int:
        return self.mount.request_counts().get(fuse.READ, 0)

    def count(self, opcode: int) -> int:
        return self.mount.request_counts().get(opcode, 0)

    def close(self) -> None:
        for staged in self.staged:
            staged.close()  # idempotent
        self.mount.close()
        self.remover.drain()
        self.cache.close()
        assert kernel_mounts.mounts_under(self.top) == []
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture
def rigs() -> Iterator:
    require_tool("fusermount3")
    require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE needs root and /dev/fuse")
    executor_fixtures._close_shared_mount()  # one FUSE mount per process at a time
    made: list[Rig] = []

    def make(backend: str = "kernel", stacked_overlays: int = 1) -> Rig:
        made.append(Rig(backend, stacked_overlays))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


def released(kernel) -> bool:  # type: ignore[no-untyped-def]
    """Whether every backing id is closed, waiting (bounded) for the RELEASE requests the
    kernel sends after close(2) has returned."""
    deadline = time.monotonic() + 10
    while kernel.backing_ids and time.monotonic() < deadline:
        time.sleep(0.01)
    return kernel.backing_ids == set()


def read_all(path: str) -> dict[str, bytes]:
    found = {}
    for directory, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(directory, name), "rb") as stream:
                found[os.path.relpath(os.path.join(directory, name), path)] = stream.read()
    return found


def settled(condition) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``condition`` holds within 10 s (the prefetcher pushes from its own thread)."""
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_page_cache_mode_reads_listed_files_and_files_read_before_with_no_request(rigs):
    rig = rigs("kernel")
    assert rig.mount.backend_in_use == "kernel" and not rig.mount._session.kernel.passthrough
    prefetcher = rig.mount._requests.prefetcher
    staged = rig.stage()
    f3 = os.path.join(staged.path, "d", "f3")
    reads = rig.reads()
    assert open(f3, "rb").read() == b"3\n" * 1000
    assert rig.reads() > reads  # looked up, not listed: its first read is a READ
    reads = rig.reads()
    assert open(f3, "rb").read() == b"3\n" * 1000 and rig.reads() == reads  # from the page cache
    pushed = prefetcher.pushed
    assert len(os.listdir(os.path.join(staged.path, "d"))) == 20  # READDIRPLUS: the other 19 are pushed
    assert settled(lambda: prefetcher.pushed - pushed == 19 and not prefetcher._files)
    for i in range(20):
        assert open(os.path.join(staged.path, "d", f"f{i}"), "rb").read() == b"%d\n" % i * 1000
    assert rig.reads() == reads  # not one READ for the listed files
    with open(f3, "rb") as stream:  # mmap, and exec of an ELF, through the page cache
        with mmap.mmap(stream.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[:4] == b"3\n3\n"
    subprocess.run([os.path.join(staged.path, "bin", "true")], check=True)
    assert read_all(staged.path)["same-2"] == b"same blob\n"
    # The first OPEN and OPENDIR answered ENOSYS: the kernel sent no other, and no RELEASE.
    assert rig.count(fuse.OPEN) <= 1 and rig.count(fuse.OPENDIR) <= 1
    assert rig.count(fuse.RELEASE) == rig.count(fuse.RELEASEDIR) == 0
    staged.close()


def test_the_page_cache_mode_holds_no_descriptor_for_files_actions_hold_open(rigs):
    """No OPEN, so no descriptor per open file and nothing for a quota of open files to
    count: the daemon's descriptors stay bounded however many files actions hold open."""
    rig = rigs("kernel")
    staged = rig.stage()
    blobs_dir = os.path.dirname(os.path.dirname(rig.cache.object_path(Digest.of_bytes(b""))))

    def daemon_descriptors_on_the_cache() -> int:  # the daemon runs in this process
        found = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                found += os.readlink(f"/proc/self/fd/{fd}").startswith(blobs_dir + "/")
            except OSError:
                pass
        return found

    held = [open(os.path.join(staged.path, "d", f"f{i % 20}"), "rb") for i in range(200)]
    try:
        assert all(stream.read(1) for stream in held)  # read: the daemon served them
        assert rig.mount.open_files() == rig.mount.open_descriptors() == 0
        assert daemon_descriptors_on_the_cache() == 0
    finally:
        for stream in held:
            stream.close()
    staged.close()


def test_a_big_input_is_read_through_read_requests_then_from_the_page_cache(rigs):
    rig = rigs("kernel")
    tree = CasDirectory.from_digest(rig.cache, rig.tree)
    big = bytes(range(256)) * (12 * 4096)  # 12 MiB: larger than one READ (1 MiB at most)
    tree.write_bytes("big", big)
    rig.tree = tree.digest()
    staged = rig.stage()
    path = os.path.join(staged.path, "big")
    reads = rig.reads()
    assert open(path, "rb").read() == big
    assert rig.reads() > reads
    reads = rig.reads()
    assert open(path, "rb").read() == big and rig.reads() == reads
    staged.close()


def test_passthrough_reads_go_to_the_backing_files_not_to_the_daemon(rigs):
    rig = rigs("kernel-passthrough")
    assert rig.mount.backend_in_use == "kernel-passthrough"
    staged = rig.stage()
    contents = read_all(staged.path)
    assert contents["d/f7"] == b"7\n" * 1000 and contents["same-2"] == b"same blob\n" and len(contents) == 24  # with the link
    with open(os.path.join(staged.path, "d", "f3"), "rb") as stream:  # mmap too
        with mmap.mmap(stream.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[:4] == b"3\n3\n"
    subprocess.run([os.path.join(staged.path, "bin", "true")], check=True)  # exec: mmap passthrough
    counts = rig.mount.request_counts()
    assert counts.get(fuse.OPEN, 0) >= 23 and rig.reads() == 0
    staged.close()
    assert released(rig.mount._session.kernel)  # every backing id closed with its blob
    assert rig.mount.open_files() == 0 and rig.mount.open_descriptors() == 0


def test_a_blob_held_open_keeps_one_backing_id_shared_by_its_opens(rigs):
    rig = rigs("kernel-passthrough")
    staged = rig.stage()
    kernel = rig.mount._session.kernel
    with open(os.path.join(staged.path, "same-1"), "rb") as one, open(os.path.join(staged.path, "same-2"), "rb") as two:
        assert one.read() == two.read() == b"same blob\n"
        assert len(kernel.backing_ids) == 1 and rig.mount.open_descriptors() == 1
    assert released(kernel)
    staged.close()


def test_under_two_stacked_overlays_passthrough_gives_way_to_reads(rigs):
    rig = rigs("kernel-passthrough", stacked_overlays=2)
    assert rig.mount.backend_in_use == "kernel-passthrough" and not rig.mount._session.kernel.passthrough
    staged = rig.stage()
    assert read_all(staged.path)["d/f19"] == b"19\n" * 1000
    assert rig.reads() > 0
    staged.close()


def test_auto_takes_the_page_cache_mode(rigs):
    rig = rigs("auto")
    assert rig.mount.backend_in_use == "kernel" and not rig.mount._session.kernel.passthrough


def test_the_page_cache_mode_serves_under_two_stacked_overlays(rigs):
    rig = rigs("auto", stacked_overlays=2)  # no passthrough: the mount has depth 0
    assert rig.mount.backend_in_use == "kernel"
    staged = rig.stage()
    assert read_all(staged.path)["d/f2"] == b"2\n" * 1000
    staged.close()


@pytest.mark.parametrize("backend", ["kernel", "kernel-passthrough"])
def test_requests_hostile_callers_can_make_get_errors_and_the_mount_lives_on(rigs, backend):
    rig = rigs(backend)
    staged = rig.stage()
    lower = os.path.join(rig.mount.path_of(staged._root), "d", "f1")
    with pytest.raises(OSError) as caught:
        os.open(lower, os.O_WRONLY)
    assert caught.value.errno == errno.EROFS
    for call in (lambda: os.getxattr(lower, "user.x"), lambda: os.setxattr(lower, "user.x", b"1"),
                 lambda: os.listxattr(lower), lambda: os.mkdir(lower + ".d"), lambda: os.unlink(lower),
                 lambda: os.readlink(lower), lambda: os.truncate(lower, 0), lambda: os.chmod(lower, 0o777),
                 lambda: os.lstat(os.path.join(os.path.dirname(lower), "x" * 300))):
        with pytest.raises(OSError):
            call()
    fd = os.open(lower, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            fcntl.ioctl(fd, 0x80086601, struct.pack("<q", 0))  # FS_IOC_GETFLAGS
        fcntl.flock(fd, fcntl.LOCK_EX)  # local locks: the kernel's business
        assert os.pread(fd, 2, 0) == b"1\n" and os.lseek(fd, 0, os.SEEK_END) == 2000
    finally:
        os.close(fd)
    # Through the overlay: writes go to the upper layer, never to the daemon.
    with open(os.path.join(staged.path, "d", "f1"), "ab") as stream:
        stream.write(b"more")
    assert open(os.path.join(staged.path, "d", "f1"), "rb").read().endswith(b"1\nmore")
    assert rig.mount.alive and read_all(staged.path)["d/f5"] == b"5\n" * 1000
    assert subprocess.run(["find", staged.path, "-type", "f"], capture_output=True, check=True).stdout.count(b"\n") == 23
    staged.close()


@pytest.mark.parametrize("build_dir_size", ["off", "64M"])
@pytest.mark.parametrize("backend", ["auto", "kernel-passthrough"])
def test_the_worker_takes_its_kernel_backend_with_or_without_a_bounded_build_directory(build_dir_size, backend):
    """Through the composition root: ``auto`` is the page-cache mode; with passthrough, a
    bounded build directory's overlay is the only one over the FUSE view
    (FuseStager(overlay=False)), so passthrough fits under it."""
    require_tool("bwrap")
    require(os.geteuid() == 0 and os.path.exists("/dev/fuse"), "FUSE needs root and /dev/fuse")
    executor_fixtures._close_shared_mount()  # one FUSE mount per process at a time
    top = tempfile.mkdtemp(prefix="reapi-worker-test-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        with FakeCasServer() as cas:
            cfg = load_config(None, {
                "remote": f"grpc://{cas.address}", "cache_dir": os.path.join(top, "cache"),
                "build_root": os.path.join(top, "builds"), "staging": "fuse", "build_dir_size": build_dir_size,
                "fuse_backend": backend,
            })
            blob = cas.put(b"input bytes\n")
            root = cas.put(serialize(re_pb2.Directory(files=[re_pb2.FileNode(name="in", digest=blob.to_proto())])))
            command = re_pb2.Command(arguments=["/bin/cat", "in"])
            action = re_pb2.Action(command_digest=cas.put(serialize(command)).to_proto(),
                                   input_root_digest=root.to_proto(), do_not_cache=True)
            with open_executor(cfg) as graph:
                outcome = graph.executor.execute(cas.put(serialize(action)), action)
                assert outcome.status.code == code_pb2.OK, outcome.status
                assert graph.cache.read(Digest.from_proto(outcome.result.stdout_digest)) == b"input bytes\n"
                mounts = [m for m in gc.get_objects() if isinstance(m, FuseMount) and m.mount_dir.startswith(top)]
                assert [m.backend_in_use for m in mounts] == ["kernel" if backend == "auto" else backend]
                assert mounts[0]._session.kernel.passthrough == (backend == "kernel-passthrough")
    finally:
        shutil.rmtree(top, ignore_errors=True)
