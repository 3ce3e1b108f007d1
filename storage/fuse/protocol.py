"""The FUSE kernel protocol, as much of it as a read-only file system with passthrough
speaks: opcodes, flag bits, and the byte layouts of the messages on ``/dev/fuse``.

Facts from the Linux uapi header ``include/uapi/linux/fuse.h`` (protocol 7.40, kernel
6.9+, the first with passthrough); all little-endian, naturally aligned structs.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
#: The minor version this module speaks (passthrough: 7.40). The reply to INIT says the
#: smaller of this and the kernel's.
KERNEL_MINOR = 40
ROOT_ID = 1

# -- opcodes ---------------------------------------------------------------------------
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, BMAP, DESTROY = 31, 32, 33, 34, 35, 36, 37, 38
IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 39, 40, 41, 42, 43, 44
RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING, SYNCFS, TMPFILE, STATX = (
    45, 46, 47, 48, 49, 50, 51, 52)

#: Requests that would change the file system: EROFS, whatever their arguments.
WRITE_OPCODES = frozenset({SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR,
                           REMOVEXATTR, CREATE, FALLOCATE, RENAME2, COPY_FILE_RANGE, TMPFILE})
#: Requests the kernel expects no answer to.
NO_REPLY_OPCODES = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# -- INIT flags (flags, and flags2 for bits 32..63) ------------------------------------
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

# -- OPEN reply flags ------------------------------------------------------------------
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5  # no FLUSH on close: nothing to flush
FOPEN_PASSTHROUGH = 1 << 7

NOTIFY_INVAL_ENTRY = 3
#: Puts bytes into a file inode's page cache without a request (see kernel_prefetch.py).
NOTIFY_STORE = 4

# -- /dev/fuse ioctls: _IOW(229, nr, size) ---------------------------------------------
BACKING_OPEN = (1 << 30) | (16 << 16) | (229 << 8) | 1  # struct fuse_backing_map (16 bytes)
BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2  # uint32_t backing id

# -- layouts ---------------------------------------------------------------------------
#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: fuse_out_header: len, error (negative errno), unique.
OUT_HEADER = struct.Struct("<IiQ")
#: fuse_init_in up to flags2: major, minor, max_readahead, flags, flags2 (older kernels
#: send only the first four).
INIT_IN = struct.Struct("<IIIII")
#: fuse_init_out: major, minor, max_readahead, flags, max_background,
#: congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2,
#: max_stack_depth, then unused to 64 bytes.
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
#: fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
#: mode, nlink, uid, gid, rdev, blksize, flags.
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
#: fuse_entry_out before its fuse_attr: nodeid, generation, entry_valid, attr_valid,
#: entry_valid_nsec, attr_valid_nsec.
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
#: fuse_attr_out before its fuse_attr: attr_valid, attr_valid_nsec, dummy.
ATTR_OUT_HEAD = struct.Struct("<QII")
#: fuse_open_in: flags, open_flags.
OPEN_IN = struct.Struct("<II")
#: fuse_open_out: fh, open_flags, backing_id.
OPEN_OUT = struct.Struct("<QIi")
#: fuse_read_in: fh, offset, size (the rest unused here).
READ_IN = struct.Struct("<QQI")
#: fuse_release_in: fh (the rest unused here).
RELEASE_IN = struct.Struct("<Q")
#: fuse_forget_in: nlookup.
FORGET_IN = struct.Struct("<Q")
#: fuse_batch_forget_in: count, dummy; followed by count fuse_forget_one (nodeid, nlookup).
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
#: fuse_getxattr_in / fuse_getxattr_out: size, padding.
XATTR_SIZE = struct.Struct("<II")
#: fuse_dirent before its name: ino, off, namelen, type.
DIRENT_HEAD = struct.Struct("<QQII")
#: fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6].
KSTATFS = struct.Struct("<QQQQQIIII24x")
#: fuse_notify_inval_entry_out: parent, namelen, flags (then the name and a NUL).
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")
#: fuse_backing_map: fd, flags, padding.
#: fuse_notify_store_out: nodeid, offset, size, padding (then the bytes).
NOTIFY_STORE_OUT = struct.Struct("<QQII")
BACKING_MAP = struct.Struct("<iIQ")
BACKING_ID = struct.Struct("<I")


def dirent_size(head: int, namelen: int) -> int:
    """A directory entry's bytes in a READDIR(PLUS) reply: padded to 8 bytes."""
    return (head + namelen + 7) & ~7
