"""The worker's configuration: one documented schema, read from TOML, overridden by flags.

Every setting is a field of :class:`WorkerConfig`; the field's :class:`Setting` metadata
holds its meaning, an example and the group of commands that take it as a flag. The
command-line flags (``--cache-dir``, ...), the TOML keys (``cache_dir``), ``reapi-worker
config --dump`` and ``deploy/worker.toml`` are all derived from that one list, so a setting
cannot be documented in one place and forgotten in another.

Sources, later wins::

    schema defaults  <  TOML file (--config FILE)  <  command-line flags

The file is one flat table of the keys below plus a ``[platform]`` table; a key the schema
does not know is refused, naming it (a typo must not silently fall back to a default).
``platform`` merges per key: a key given in the file or with ``--platform KEY=VALUE``
replaces the detected values of that key; an empty value (``KEY=`` or ``KEY = []``)
removes it.

Platform properties and matching (why only OSFamily and ISA by default): BuildGrid reads a
bot's properties only to match actions to bots, from ``worker.devices[0].properties``. Its
property sets refuse actions that carry keys they do not know (``Unregistered platform
property``), so advertising this worker's own action-level keys (``rootMode``,
``network``, which the executor reads from each action) changes nothing on a stock server
and would only suggest they are matched. An operator whose scheduler does match on them
adds them explicitly, e.g. ``rootMode = ["host-tools", "chroot"]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import platform as host_platform
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reapi_worker.host import format_bytes
from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.sandbox.errors import SandboxSetupError
from reapi_worker.sandbox.host_etc import DEFAULT_HOST_ETC, check_etc_names
from reapi_worker.sandbox.request import RootMode
from reapi_worker.sandbox.uid_pool import parse_uid_range
from reapi_worker.storage.channels import ConnectionOptions

from .bounds import ActionBounds, BoundSettings, HostFacts
from .platform_properties import PlatformPolicy

#: Groups of settings, by which commands take them as flags.
SERVER = "server"  # every command that talks to a server
EXECUTOR = "executor"  # commands that run actions on this host
BOT = "bot"  # the daemon only
LOGGING = "logging"

Platform = tuple[tuple[str, str], ...]

#: The stagers ``staging`` may name (built by :func:`~.compose.make_stager`).
STAGINGS = ("hardlink", "fuse", "auto", "cached")
FUSE_BACKENDS = ("auto", "pyfuse3", "kernel", "kernel-passthrough")  # storage/fuse/mount.py BACKENDS
#: The first uid of ``sandbox_uid_range = "auto"``: above the ids Debian gives to users
#: (below 60000), to subordinate id ranges (useradd's 100000-600100000) and to containers
#: (systemd's 524288-1879048191), below 2**31 (tools that read ids as signed numbers).
AUTO_SANDBOX_UID_BASE = 1879048192
#: What ``network_on`` may say (see its help).
NETWORK_ON = ("refuse", "nat")

_KINDS = ("str", "optional-str", "int", "optional-int", "float", "size", "free-space", "choice", "platform", "bound", "str-list")


# ------------------------------------------------------------------------------ values

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``500M``, ``10G``, ``1.5T``, ``4096`` -> bytes (binary units). Raises InvalidArgument."""
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] != "" else ""
    number = value[: len(value) - len(unit)]
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise InvalidArgument(f"invalid size {text!r}: expected e.g. 500M or 10G") from None
    if size <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be positive")
    return size


@dataclass(frozen=True, slots=True)
class FreeSpace:
    """An amount of free space: a ``fraction`` of the file system, or ``size_bytes``."""

    fraction: float | None = None
    size_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.size_bytes is None):
            raise InvalidArgument("a free-space watermark is a fraction or a size, exactly one")
        if self.fraction is not None and not 0.0 <= self.fraction < 1.0:
            raise InvalidArgument(f"free-space fraction {self.fraction} must be in [0, 1)")
        if self.size_bytes is not None and self.size_bytes < 0:
            raise InvalidArgument(f"free-space size {self.size_bytes} must not be negative")

    @classmethod
    def parse(cls, text: str) -> FreeSpace:
        """``"10%"`` -> a tenth of the file system; ``"20G"``, ``"500M"`` -> that many bytes."""
        text = str(text).strip()
        if text.endswith("%"):
            try:
                return cls(fraction=float(text[:-1]) / 100)
            except ValueError:
                raise InvalidArgument(f"invalid free-space watermark {text!r}: expected e.g. 10% or 20G") from None
        return cls(size_bytes=parse_size(text))

    def of(self, total_bytes: int) -> int:
        """This amount in bytes, on a file system of ``total_bytes``."""
        if self.fraction is not None:
            return int(total_bytes * self.fraction)
        assert self.size_bytes is not None
        return self.size_bytes

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else format_bytes(self.size_bytes or 0)


@dataclass(frozen=True, slots=True)
class Watermarks:
    """Free space to keep on a disk: below ``low`` the cache evicts, below ``critical`` the
    worker takes no work. ``critical`` must not exceed ``low`` (compared as fractions when
    both are fractions, as sizes when both are sizes; mixed kinds are checked per disk)."""

    low: FreeSpace = FreeSpace(fraction=0.10)
    critical: FreeSpace = FreeSpace(fraction=0.05)

    def __post_init__(self) -> None:
        pairs = ((self.low.fraction, self.critical.fraction), (self.low.size_bytes, self.critical.size_bytes))
        for low, critical in pairs:
            if low is not None and critical is not None and critical > low:
                raise InvalidArgument(f"critical free-space watermark {self.critical} is above the low one {self.low}")


# ------------------------------------------------------------------------------ schema


@dataclass(frozen=True, slots=True)
class Setting:
    """How one field is documented and parsed. ``kind`` is one of ``_KINDS``; ``example``
    is a TOML value; ``default_doc`` describes a default that depends on the host."""

    group: str
    help: str
    example: str
    kind: str
    choices: tuple[str, ...] = ()
    default_doc: str = ""

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, self.kind


def _setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **doc: Any) -> Any:
    return field(default=default, default_factory=factory, metadata={"setting": Setting(**doc)})


def _bound(example: str, auto: str, help: str) -> Any:
    return _setting(
        "auto", group=EXECUTOR, kind="bound", example=example, default_doc=f"auto: {auto}",
        help=help + '; "unlimited" turns it off',
    )


def detect_platform() -> Platform:
    """``OSFamily`` and ``ISA`` of this host, spelled as Bazel's and BuildGrid's examples
    spell them (``linux``, ``x86-64``)."""
    machine = host_platform.machine().lower()
    isa = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine, machine)
    return (("ISA", isa), ("OSFamily", host_platform.system().lower() or "linux"))


def _cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _existing_parent(path: str) -> str:
    """``path`` or its nearest existing parent (a cache not created yet is measured on the
    file system it will be made on)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


def default_bot_id(cache_dir: str) -> str:
    """``HOSTNAME-XXXXXXXX``: stable across restarts (a restarted bot replaces its old
    session at once, docs/buildgrid-protocol.md section 8) and distinct for two workers on one host with
    different cache directories. The hash covers the machine id (hostnames repeat across
    containers) and the absolute cache directory."""
    machine_id = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as stream:
                machine_id = stream.read().strip()
            break
        except (OSError, UnicodeDecodeError):
            continue
    token = hashlib.sha256(f"{machine_id}\0{os.path.abspath(cache_dir)}".encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{token}"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything an operator chooses, validated on construction (InvalidArgument).

    Build one with :func:`load_config`; the fields' documentation is their ``Setting``.
    """

    # -- server ---------------------------------------------------------------------------
    remote: str = _setting(
        "grpc://127.0.0.1:50051", group=SERVER, kind="str", example='"grpcs://buildgrid.example.com:443"',
        help="URL of the scheduler (Bots and Execution services) and, unless cas_remote is set, of the CAS: "
        "grpc://HOST:PORT, grpcs://HOST[:PORT], http(s)://..., unix:/PATH",
    )
    cas_remote: str | None = _setting(
        None, group=SERVER, kind="optional-str", example='"grpc://cas.example.com:50052"',
        help="URL of the CAS (and ByteStream) when it is not served by remote; default: remote",
    )
    instance_name: str = _setting(
        "", group=SERVER, kind="str", example='"main"',
        help="REAPI instance name: the bot's session parent and the instance of every CAS call",
    )
    tls_ca: str | None = _setting(
        None, group=SERVER, kind="optional-str", example='"/etc/reapi-worker/ca.pem"',
        help="PEM roots to verify the server's certificate (grpcs/https only); default: the system roots",
    )
    tls_cert: str | None = _setting(
        None, group=SERVER, kind="optional-str", example='"/etc/reapi-worker/client.pem"',
        help="PEM client certificate for mutual TLS (with tls_key)",
    )
    tls_key: str | None = _setting(
        None, group=SERVER, kind="optional-str", example='"/etc/reapi-worker/client.key"',
        help="PEM private key of tls_cert",
    )
    access_token_file: str | None = _setting(
        None, group=SERVER, kind="optional-str", example='"/run/secrets/reapi-token"',
        help="file holding a bearer token sent with every call (re-read when it changes)",
    )
    # -- executor -------------------------------------------------------------------------
    cache_dir: str = _setting(
        "/var/lib/reapi-worker/cache", group=EXECUTOR, kind="str", example='"/srv/reapi-worker/cache"',
        help="local CAS cache; on the same mount as build_root (beside it, as by default) so inputs can "
        "be hardlinked: across mounts, even of one file system, every input is copied",
    )
    cache_size: str = _setting(
        "auto", group=EXECUTOR, kind="size", example='"50G"',
        default_doc='"auto": half the size of the file system holding cache_dir',
        help="largest size of the local cache before least recently used blobs are evicted (K, M, G, T); "
        "whatever the size, the cache also evicts to keep disk_low_free free on its file system, and "
        "a write that meets a full disk evicts and retries",
    )
    build_root: str = _setting(
        "/var/lib/reapi-worker/builds", group=EXECUTOR, kind="str", example='"/var/lib/reapi-worker/builds"',
        help="where each action's input root is staged; every parent must be searchable by the sandbox uid",
    )
    build_dir_size: str = _setting(
        "auto", group=EXECUTOR, kind="size", example='"8G"',
        default_doc='"auto": with a root worker, half the host\'s memory shared among concurrency actions; '
        'else "off"',
        help="bytes each action may write: its changes to the input root plus its stdout and stderr, held "
        "on a tmpfs of its own under an overlay (memory, charged to the action; needs root). Past it the "
        "action fails RESOURCE_EXHAUSTED naming the bound; it never fills the worker's disk, so a full "
        "disk is always the worker's fault and reported UNAVAILABLE (retried elsewhere). \"off\": no "
        "bound, the action writes to the build root's disk (then only a free-space check after each run, racy)",
    )
    max_action_timeout: float = _setting(
        3600.0, group=EXECUTOR, kind="float", example="600.0",
        help="seconds; caps Action.timeout and applies to actions that give none",
    )
    sandbox_uid_range: str = _setting(
        "auto", group=EXECUTOR, kind="str", example='"1879048192-1879048255"',
        default_doc=f'"auto": concurrency uids from {AUTO_SANDBOX_UID_BASE}, or the next such block another '
        'worker of the host does not hold',
        help="host uids (FIRST-LAST, inclusive) for actions, one per action at once, each with the gid of "
        "the same number: an action's build directory is its uid's alone (0700) until it is gone. At least "
        "concurrency ids, none the worker's own, all mapped in the worker's user namespace; they should own "
        "nothing on the host. Needs a root worker (a non-root worker runs every action as itself and copies "
        "inputs)",
    )
    staging: str = _setting(
        "hardlink", group=EXECUTOR, kind="choice", choices=STAGINGS, example='"auto"',
        help="how input roots are materialised: hardlink (every blob fetched and linked from the local "
        "cache first), fuse (lazily through a FUSE mount, blobs fetched on first open; needs root), "
        "cached (an overlay over trees kept by digest in the directory cache: a root seen before, or "
        "close to one, costs about nothing; needs root) or auto (cached for roots it holds or staged "
        "before, else chosen per action: FUSE for big input trees, cached for the others)",
    )
    fuse_backend: str = _setting(
        "auto", group=EXECUTOR, kind="choice", choices=FUSE_BACKENDS, example='"pyfuse3"',
        help="what serves the FUSE mount of fuse/auto staging: kernel (the worker speaks /dev/fuse itself; "
        "no request per open, small inputs pushed into the page cache as their directory is listed, a big "
        "input's first read through the worker), kernel-passthrough (the same, with a request per open and "
        "every read by the kernel straight from the cache's file: Linux 6.9+), pyfuse3 (libfuse) or auto "
        "(kernel where it starts, else pyfuse3)",
    )
    tree_cache_size: str = _setting(
        "4G", group=EXECUTOR, kind="size", example='"20G"',
        help="bytes of files the directory cache of cached/auto staging may hold (<cache_dir>/trees; its "
        "files are hardlinks of the local cache's blobs, kept alive on disk after the cache evicts "
        "them); least recently used trees not in use are evicted past it",
    )
    # Per-action bounds (worker/bounds.py): each "auto" (derived from the host and
    # concurrency), "unlimited", or a value.
    action_memory: str = _bound(
        '"4G"', "3/4 of the host's memory / concurrency, at least 256M",
        "memory of each action, all its processes and its /tmp together (cgroups); past it the kernel "
        "OOM-kills the action and its status says so",
    )
    action_tmp_size: str = _bound(
        '"1G"', "half of action_memory",
        "size of each action's /tmp (a tmpfs, whose pages count against action_memory); a command that "
        "fails with /tmp full gets a status naming this bound (root workers)",
    )
    action_pids: str = _bound(
        "2048", "pid_max / (4 x concurrency), between 256 and 4096",
        "processes and threads each action may have at once; an action refused a fork gets a status "
        "naming this bound",
    )
    action_cpu: str = _bound(
        "2.0", "CPUs / concurrency, at least 1",
        "CPU bandwidth of each action, in cores (cgroups); a busier action is slowed, not failed",
    )
    action_stream_size: str = _bound(
        '"64M"', "256M",
        "bytes each action may write to stdout, and again to stderr; past it the stream is cut at the "
        "bound, the action killed and its status names this bound",
    )
    action_open_files: str = _bound(
        "4096", "(the worker's hard RLIMIT_NOFILE - 1024) / concurrency, between 256 and 65536",
        "RLIMIT_NOFILE of each action's processes, and how many inputs it may hold open through FUSE "
        "(EMFILE to it past that); the worker raises its own soft limit to its hard limit, above them all",
    )
    capture_timeout: str = _bound(
        "300", "600",
        "seconds to capture and upload an action's outputs; past it the action ends DEADLINE_EXCEEDED",
    )
    network_on: str = _setting(
        "refuse", group=EXECUTOR, kind="choice", choices=NETWORK_ON, example='"nat"',
        help="what an action with the platform property network=on gets: refuse (INVALID_ARGUMENT naming "
        "the property; hermetic builds) or nat (a network namespace of its own with outbound connectivity "
        "through slirp4netns; the host's loopback, abstract sockets and own addresses stay unreachable)",
    )
    host_etc: tuple[str, ...] = _setting(
        factory=lambda: DEFAULT_HOST_ETC, group=EXECUTOR, kind="str-list",
        example='["passwd", "group", "hosts", "nsswitch.conf", "ld.so.*", "localtime"]',
        default_doc="accounts, name resolution, ld.so.*, alternatives, locale and time zone, CA "
        "certificates, shell, JVM, Perl and Python system files (sandbox/host_etc.py)",
        help="entries of the host's /etc that host-tools actions see, read-only: names directly under "
        "/etc or fnmatch patterns of them; nothing else of /etc exists inside",
    )
    root_mode: str = _setting(
        RootMode.HOST_TOOLS.value, group=EXECUTOR, kind="choice", choices=tuple(m.value for m in RootMode),
        example='"chroot"',
        help="root mode of an action that sets no rootMode platform property: host-tools (the input root at "
        "/build, the host's /usr, /bin, /lib* and /etc read-only around it; Bazel) or chroot (the input root "
        "is /; BuildStream, which cannot send rootMode)",
    )
    accepted_platform_keys: str = _setting(
        "", group=EXECUTOR, kind="str", example='"Pool,gpu"',
        help="comma-separated platform property keys an action may carry besides OSFamily, ISA, rootMode, "
        "network and the keys of [platform]: keys the scheduler matches on; an action with any other key "
        "is refused, naming it",
    )
    max_output_size: str | None = _setting(
        None, group=EXECUTOR, kind="size", example='"8G"', default_doc="a quarter of cache_size",
        help="most new file content one action's outputs may store (K, M, G, T), counted before anything is "
        "stored: apparent sizes (a sparse file counts its full length), unmodified inputs free; past it the "
        "action fails with RESOURCE_EXHAUSTED naming this key",
    )
    # -- bot ------------------------------------------------------------------------------
    bot_id: str | None = _setting(
        None, group=BOT, kind="optional-str", example='"builder-7"',
        default_doc="HOSTNAME-HASH (hash of the machine id and cache_dir)",
        help="the bot's identity at the scheduler; stable across restarts, unique per live worker "
        "(two live workers with one bot_id keep closing each other's sessions)",
    )
    concurrency: int = _setting(
        factory=_cpu_count, group=BOT, kind="int", example="4", default_doc="the number of CPUs",
        help="actions run at once; advertised to the scheduler as the session's capacity",
    )
    platform: Platform = _setting(
        factory=detect_platform, group=BOT, kind="platform", example='{ OSFamily = "linux", ISA = "x86-64" }',
        default_doc="OSFamily and ISA of this host",
        help="properties advertised for matching (worker.devices[0].properties); flag: --platform KEY=VALUE, "
        "repeatable; a key may carry several values",
    )
    metrics_port: int | None = _setting(
        None, group=BOT, kind="optional-int", example="9102",
        help="port of the HTTP endpoint serving /metrics (Prometheus), /healthz (200 while the worker "
        "takes work, 503 with the reasons while it does not) and /livez; unset: not served",
    )
    metrics_host: str = _setting(
        "", group=BOT, kind="str", example='"127.0.0.1"',
        help="address the metrics endpoint binds; empty: every IPv4 address",
    )
    disk_low_free: str = _setting(
        "10%", group=BOT, kind="free-space", example='"20G"',
        help="free space to keep on the cache's and the build root's file systems: below it the cache "
        "evicts least recently used blobs (a percentage of the file system, or a size)",
    )
    disk_critical_free: str = _setting(
        "5%", group=BOT, kind="free-space", example='"5G"',
        help="free space below which, after evicting, the worker reports UNHEALTHY and takes no work "
        "until space returns; at most disk_low_free",
    )
    scheduler_grace_seconds: float = _setting(
        60.0, group=BOT, kind="float", example="120.0",
        help="how long the scheduler may stay out of reach before /healthz says unhealthy; keep it above "
        "poll_deadline_seconds",
    )
    health_interval_seconds: float = _setting(
        5.0, group=BOT, kind="float", example="10.0",
        help="seconds between health checks (disks, sandbox probe, scheduler contact)",
    )
    shutdown_grace_seconds: float = _setting(
        60.0, group=BOT, kind="float", example="300.0",
        help="after SIGTERM, how long running actions may take to finish before they are aborted "
        "and handed back",
    )
    heartbeat_seconds: float = _setting(
        1.0, group=BOT, kind="float", example="1.0",
        help="seconds between UpdateBotSession calls while actions run: how fast a cancellation is noticed",
    )
    poll_deadline_seconds: float = _setting(
        30.0, group=BOT, kind="float", example="30.0",
        help="gRPC deadline of an idle UpdateBotSession long-poll; keep it above 0.8 x the scheduler's "
        "bot-session-keepalive-timeout and above 4 s, or the scheduler answers at once",
    )
    max_backoff_seconds: float = _setting(
        5.0, group=BOT, kind="float", example="10.0",
        help="cap of the exponential backoff (with jitter) between attempts while the scheduler fails",
    )
    # -- logging --------------------------------------------------------------------------
    log_format: str = _setting(
        "text", group=LOGGING, kind="choice", choices=("text", "json"), example='"json"',
        help="text lines, or one JSON object per line",
    )

    def __post_init__(self) -> None:
        # Each check names the key, so an error in a file points at the line to fix.
        # (parse_size and ConnectionOptions do not know the key: their errors are prefixed.)
        for name, words in (("cache_size", ("auto",)), ("build_dir_size", ("auto", "off"))):
            if getattr(self, name) not in words:
                try:
                    parse_size(getattr(self, name))
                except InvalidArgument as error:
                    raise InvalidArgument(f"{name}: {error} (or {' or '.join(words)})") from None
        if self.max_output_size is not None:
            try:
                parse_size(self.max_output_size)
            except InvalidArgument as error:
                raise InvalidArgument(f"max_output_size: {error}") from None
        for key in self.extra_platform_keys:
            if not key or key != key.strip():
                raise InvalidArgument(f"accepted_platform_keys: {self.accepted_platform_keys!r} has an empty or padded key")
        try:
            parse_size(self.tree_cache_size)
        except InvalidArgument as error:
            raise InvalidArgument(f"tree_cache_size: {error}") from None
        if self.concurrency < 1:
            raise InvalidArgument(f"concurrency must be at least 1, not {self.concurrency}")
        self.sandbox_uid_candidates  # parses the range and checks it against concurrency
        self.disk_watermarks  # parses and orders both free-space settings
        self.action_bounds  # parses every bound, naming its key
        for name in (
            "max_action_timeout", "heartbeat_seconds", "poll_deadline_seconds", "max_backoff_seconds",
            "scheduler_grace_seconds", "health_interval_seconds",
        ):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be positive, not {getattr(self, name)}")
        if self.shutdown_grace_seconds < 0:
            raise InvalidArgument(f"shutdown_grace_seconds must not be negative, not {self.shutdown_grace_seconds}")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise InvalidArgument(f"metrics_port must be in 1..65535, not {self.metrics_port}")
        if self.bot_id is not None and not self.bot_id.strip():
            raise InvalidArgument("bot_id must not be empty")
        for key, value in self.platform:
            if not key or not value:
                raise InvalidArgument(f"platform: empty key or value in {key}={value}")
        # Advertise only what is allowed: a scheduler matching on network=on would send
        # actions this worker refuses.
        if self.network_on == "refuse" and ("network", "on") in self.platform:
            raise InvalidArgument('platform: network=on is advertised, but network_on = "refuse" refuses it')
        try:
            object.__setattr__(self, "host_etc", check_etc_names(self.host_etc))
        except SandboxSetupError as error:
            raise InvalidArgument(f"host_etc: {error.reason}") from None
        # URLs and TLS combinations are checked by ConnectionOptions, whose errors do not know
        # the key: name the one whose URL was being checked.
        for name in ("remote", "cas_remote"):
            url = getattr(self, name)
            if url is None:
                continue
            try:
                self.connection(url)
            except InvalidArgument as error:
                raise InvalidArgument(f"{name}: {error}") from None

    @property
    def sandbox_uid_candidates(self) -> tuple[range, ...]:
        """The ranges the worker's uid pool may claim, first free wins
        (:meth:`~reapi_worker.sandbox.uid_pool.UidPool.claim`): the one range given, or for
        ``auto`` successive blocks of ``concurrency`` ids from :data:`AUTO_SANDBOX_UID_BASE`
        (as many as fit below 2**31). InvalidArgument naming the key if the range cannot
        hold one uid per action at once."""
        if self.sandbox_uid_range == "auto":
            c = self.concurrency
            return tuple(range(base, base + c) for base in range(AUTO_SANDBOX_UID_BASE, 2**31 - c, c)[:256])
        try:
            ids = parse_uid_range(self.sandbox_uid_range)
        except ValueError as error:
            raise InvalidArgument(f"sandbox_uid_range: {error} (or auto)") from None
        if ids.start < 1 or ids.stop - 1 > 2**32 - 2:
            raise InvalidArgument(f"sandbox_uid_range: {self.sandbox_uid_range!r} must lie in 1-{2**32 - 2}")
        if len(ids) < self.concurrency:
            raise InvalidArgument(
                f"sandbox_uid_range: {self.sandbox_uid_range!r} holds {len(ids)} uid(s), fewer than "
                f"concurrency = {self.concurrency} (one uid per action at once)"
            )
        return (ids,)

    @property
    def disk_watermarks(self) -> Watermarks:
        try:
            low, critical = FreeSpace.parse(self.disk_low_free), FreeSpace.parse(self.disk_critical_free)
            return Watermarks(low=low, critical=critical)
        except InvalidArgument as error:
            raise InvalidArgument(f"disk_low_free/disk_critical_free: {error}") from None

    @property
    def action_bounds(self) -> ActionBounds:
        """Every per-action bound resolved for this host and ``concurrency``."""
        settings = BoundSettings(
            memory=self.action_memory, tmp_size=self.action_tmp_size, pids=self.action_pids,
            cpu=self.action_cpu, stream_size=self.action_stream_size, open_files=self.action_open_files,
            capture_timeout=self.capture_timeout,
        )
        return settings.resolve(self.concurrency, HostFacts.probe())

    @property
    def cache_bytes(self) -> int:
        """``cache_size`` in bytes; ``auto`` is half the size of the file system that holds
        (or will hold) ``cache_dir``: the rest is for build directories, copies and the
        free-space watermarks, which the cache keeps by itself."""
        if self.cache_size == "auto":
            st = os.statvfs(_existing_parent(self.cache_dir))
            return max(1, st.f_blocks * st.f_frsize // 2)
        return parse_size(self.cache_size)

    @property
    def output_bytes_limit(self) -> int:
        """``max_output_size`` in bytes; by default a quarter of the cache, so that one
        action's outputs never push most of its inputs and other actions' blobs out."""
        return parse_size(self.max_output_size) if self.max_output_size is not None else self.cache_bytes // 4

    @property
    def extra_platform_keys(self) -> tuple[str, ...]:
        return tuple(key for key in self.accepted_platform_keys.split(",")) if self.accepted_platform_keys else ()

    @property
    def platform_policy(self) -> PlatformPolicy:
        """The default root mode, the keys accepted besides the worker's own (the operator's
        list and every key this bot advertises: the scheduler matched on it), and whether
        ``network=on`` is allowed."""
        advertised = {key for key, _value in self.platform}
        return PlatformPolicy.of(
            RootMode(self.root_mode), advertised | set(self.extra_platform_keys), allow_network=self.network_on == "nat"
        )

    @property
    def build_dir_bytes(self) -> int | None:
        """``build_dir_size`` in bytes, None for no bound. ``auto``: half the host's memory
        divided among ``concurrency`` actions (the bound is a tmpfs, its pages memory), at
        least 64 MiB; a worker that is not root cannot mount it: no bound."""
        if self.build_dir_size == "off" or (self.build_dir_size == "auto" and os.geteuid() != 0):
            return None
        if self.build_dir_size == "auto":
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return max(64 << 20, memory // 2 // self.concurrency)
        return parse_size(self.build_dir_size)

    def cache_keep_free_bytes(self) -> int:
        """``disk_low_free`` in bytes on the cache's file system: what the cache keeps free."""
        st = os.statvfs(_existing_parent(self.cache_dir))
        return self.disk_watermarks.low.of(st.f_blocks * st.f_frsize)

    @property
    def tree_cache_bytes(self) -> int:
        return parse_size(self.tree_cache_size)

    @property
    def effective_bot_id(self) -> str:
        return self.bot_id or default_bot_id(self.cache_dir)

    def connection(self, url: str) -> ConnectionOptions:
        """How to reach ``url`` with this config's TLS and token settings."""
        return ConnectionOptions(
            url=url,
            ca_cert_file=self.tls_ca,
            client_cert_file=self.tls_cert,
            client_key_file=self.tls_key,
            access_token_file=self.access_token_file,
        )

    @property
    def bots_connection(self) -> ConnectionOptions:
        return self.connection(self.remote)

    @property
    def cas_connection(self) -> ConnectionOptions:
        return self.connection(self.cas_remote or self.remote)


def settings() -> list[tuple[str, Setting, Any]]:
    """``(name, setting, default)`` for every field, in schema order; a host-dependent
    default is computed."""
    rows = []
    for f in dataclasses.fields(WorkerConfig):
        factory = f.default_factory  # MISSING (not callable) unless the field has one
        default = factory() if callable(factory) else f.default
        rows.append((f.name, f.metadata["setting"], default))
    return rows


# ------------------------------------------------------------------------------ loading


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> WorkerConfig:
    """The effective config: defaults, then the TOML file at ``path`` (if any), then
    ``overrides`` (already typed values, e.g. from flags; ``platform`` as KEY=VALUE strings).

    Raises InvalidArgument naming the file and key for an unreadable file, a TOML syntax
    error, an unknown key or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    platform_changes: dict[str, list[str]] = {}
    if path is not None:
        file_values = _read_toml(path)
        where = f"config file {path}"
        for key, raw in file_values.items():
            if key == "platform":
                platform_changes.update(_platform_table(raw, where))
            else:
                values[key] = _coerce(key, raw, where)
    for key, value in (overrides or {}).items():
        _known(key, "command line")
        if key == "platform":
            for name, item in parse_platform_flags(value).items():
                platform_changes[name] = item
        else:
            values[key] = value
    if platform_changes:
        merged = {key: [v for k, v in detect_platform() if k == key] for key, _ in detect_platform()}
        merged.update(platform_changes)
        values["platform"] = tuple(sorted((k, v) for k, vs in merged.items() for v in vs if v))
    return WorkerConfig(**values)


def parse_platform_flags(items: Iterable[str]) -> dict[str, list[str]]:
    """``["ISA=a", "ISA=b", "OSFamily="]`` -> ``{"ISA": ["a", "b"], "OSFamily": []}``."""
    result: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--platform {item!r}: expected KEY=VALUE")
        values = result.setdefault(key, [])
        if value:
            values.append(value)
    return result


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except OSError as error:
        raise InvalidArgument(f"reading config file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidArgument(f"config file {path}: {error}") from None


def _known(key: str, where: str) -> Setting:
    fields = {f.name: f for f in dataclasses.fields(WorkerConfig)}
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidArgument(f"{where}: unknown key {key!r}{hint}")
    return fields[key].metadata["setting"]


def _coerce(key: str, raw: Any, where: str) -> Any:
    setting = _known(key, where)
    kind = setting.kind

    def wrong(expected: str) -> InvalidArgument:
        return InvalidArgument(f"{where}: {key} must be {expected}, not {raw!r}")

    if kind in ("str", "optional-str"):
        if not isinstance(raw, str):
            raise wrong("a string")
        return raw
    if kind in ("int", "optional-int"):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise wrong("an integer")
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise wrong("a number")
        return float(raw)
    if kind == "free-space":
        if not isinstance(raw, str):
            raise wrong('a percentage such as "10%" or a size such as "20G"')
        return raw
    if kind == "size":
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise wrong('a size such as "10G" or a number of bytes')
        return str(raw)
    if kind == "bound":
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise wrong('"auto", "unlimited" or a value such as "4G", 2048 or 1.5')
        return str(raw)
    if kind == "choice":
        if raw not in setting.choices:
            raise wrong("one of " + ", ".join(repr(c) for c in setting.choices))
        return raw
    if kind == "str-list":
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise wrong("a list of strings")
        return tuple(raw)
    raise AssertionError(kind)


def _platform_table(raw: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: platform must be a table of KEY = \"value\" or KEY = [\"v1\", \"v2\"]")
    result = {}
    for key, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"{where}: platform.{key} must be a string or a list of strings, not {value!r}")
        result[key] = [v for v in values if v]
    return result


# ------------------------------------------------------------------------- flags


def add_arguments(parser: argparse.ArgumentParser, groups: Iterable[str]) -> None:
    """Add ``--config FILE`` and one flag per setting of ``groups`` to ``parser``. Flags
    left out are absent from the parsed namespace (so they do not override the file);
    read the result with :func:`config_from_args`."""
    wanted = set(groups)
    parser.add_argument(
        "--config", dest="config_file", default=None, metavar="FILE",
        help="TOML config file (keys as the flags, with underscores; see deploy/worker.toml)",
    )
    for name, setting, default in settings():
        if setting.group not in wanted:
            continue
        flag = "--" + name.replace("_", "-")
        shown = setting.default_doc or ("unset" if default is None else repr(default))
        kwargs: dict[str, Any] = {
            "dest": f"cfg_{name}",
            "default": argparse.SUPPRESS,
            # argparse %-formats help texts: a literal % (as in "10%") must be doubled.
            "help": f"{setting.help} (default: {shown})".replace("%", "%%"),
        }
        if setting.kind == "platform":
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif setting.kind == "str-list":
            kwargs.update(action="append", metavar="NAME", help=kwargs["help"] + "; repeatable")
        elif setting.kind == "choice":
            kwargs.update(choices=setting.choices, metavar="|".join(setting.choices))
        elif setting.kind in ("int", "optional-int"):
            kwargs.update(type=int)
        elif setting.kind == "float":
            kwargs.update(type=float)
        kwargs.setdefault("metavar", "SECONDS" if "second" in name or "timeout" in name else name.upper().split("_")[-1])
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The effective config of a command parsed with :func:`add_arguments`."""
    overrides = {key[len("cfg_"):]: value for key, value in vars(args).items() if key.startswith("cfg_")}
    return load_config(getattr(args, "config_file", None), overrides)


# ------------------------------------------------------------------------------ dump


def dump_toml(config: WorkerConfig, *, resolve_bot_id: bool = True) -> str:
    """The config as a TOML document that :func:`load_config` reads back to an equal
    config, each key preceded by its documentation. Unset optional keys are shown
    commented out with their example. With ``resolve_bot_id`` an unset bot_id is written
    as its effective value, so the config read back has it set (the same effective id)."""
    lines = [
        "# reapi-worker configuration (reapi-worker config --dump).",
        "# Every key may also be given as a flag: cache_dir -> --cache-dir.",
        "",
    ]
    platform_setting: Setting | None = None
    for name, setting, _default in settings():
        if setting.kind == "platform":
            platform_setting = setting
            continue
        value = getattr(config, name)
        if name == "bot_id" and value is None and resolve_bot_id:
            value = config.effective_bot_id
        lines.append(f"# {setting.help[0].upper()}{setting.help[1:]}.")
        if setting.default_doc:
            lines.append(f"# Default: {setting.default_doc}.")
        if value is None:
            lines.append(f"# {name} = {setting.example}    (unset; an example)")
        else:
            lines.append(f"# Example: {name} = {setting.example}")
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    assert platform_setting is not None
    lines.append(f"# {platform_setting.help[0].upper()}{platform_setting.help[1:]}.")
    lines.append(f"# Default: {platform_setting.default_doc}. Example: platform = {platform_setting.example}")
    lines.append("[platform]")
    grouped: dict[str, list[str]] = {}
    for key, value in config.platform:
        grouped.setdefault(key, []).append(value)
    for key, values in grouped.items():
        shown = _toml_value(values[0]) if len(values) == 1 else "[" + ", ".join(map(_toml_value, values)) + "]"
        lines.append(f"{_toml_key(key)} = {shown}")
    # load_config starts from the detected properties: one this config removed must be
    # written as removed, or reading the dump back would bring it back.
    for key in dict(detect_platform()):
        if key not in grouped:
            lines.append(f"{_toml_key(key)} = []")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    raise AssertionError(value)


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, except that ensure_ascii writes a character
    # beyond U+FFFF as a surrogate pair ("\ud83d\ude00"), which TOML refuses: write
    # non-ASCII as itself, and escape DEL, the one control character JSON leaves alone.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    bare = key.replace("-", "").replace("_", "").isalnum() and key.isascii()
    return key if bare else _toml_string(key)
