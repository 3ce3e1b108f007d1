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

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.storage.channels import ConnectionOptions


#: Groups of settings, by which commands take them as flags.
SERVER = "server"  # every command that talks to a server
EXECUTOR = "executor"  # commands that run actions on this host
BOT = "bot"  # the daemon only
LOGGING = "logging"

Platform = tuple[tuple[str, str], ...]

#: The stagers ``staging`` may name (built by :func:`~.compose.make_stager`).
STAGINGS = ("hardlink", "fuse", "auto", "cached")

_KINDS = ("str", "optional-str", "int", "optional-int", "float", "size", "free-space", "choice", "platform")


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


def format_bytes(count: int) -> str:
    """``2147483648`` -> ``"2.0 GiB"``: sizes as people read them, in reasons and logs."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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


def detect_platform() -> Platform:
    """``OSFamily`` and ``ISA`` of this host, spelled as Bazel's and BuildGrid's examples
    spell them (``linux``, ``x86-64``)."""
    machine = host_platform.machine().lower()
    isa = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine, machine)
    return (("ISA", isa), ("OSFamily", host_platform.system().lower() or "linux"))


def _cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


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
        "10G", group=EXECUTOR, kind="size", example='"50G"',
        help="largest size of the local cache before least recently used blobs are evicted (K, M, G, T)",
    )
    build_root: str = _setting(
        "/var/lib/reapi-worker/builds", group=EXECUTOR, kind="str", example='"/var/lib/reapi-worker/builds"',
        help="where each action's input root is staged; every parent must be searchable by the sandbox uid",
    )
    max_action_timeout: float = _setting(
        3600.0, group=EXECUTOR, kind="float", example="600.0",
        help="seconds; caps Action.timeout and applies to actions that give none",
    )
    sandbox_uid: int = _setting(
        65534, group=EXECUTOR, kind="int", example="65534", help="unprivileged uid actions run as",
    )
    sandbox_gid: int = _setting(
        65534, group=EXECUTOR, kind="int", example="65534", help="gid actions run as",
    )
    staging: str = _setting(
        "hardlink", group=EXECUTOR, kind="choice", choices=STAGINGS, example='"auto"',
        help="how input roots are materialised: hardlink (every blob fetched and linked from the local "
        "cache first), fuse (lazily through a FUSE mount, blobs fetched on first open; needs root), "
        "cached (an overlay over trees kept by digest in the directory cache: a root seen before, or "
        "close to one, costs about nothing; needs root) or auto (cached for roots it holds or staged "
        "before, else chosen per action: FUSE for big input trees, cached for the others)",
    )
    tree_cache_size: str = _setting(
        "4G", group=EXECUTOR, kind="size", example='"20G"',
        help="bytes of files the directory cache of cached/auto staging may hold (<cache_dir>/trees; its "
        "files are hardlinks of the local cache's blobs, kept alive on disk after the cache evicts "
        "them); least recently used trees not in use are evicted past it",
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
        try:
            parse_size(self.cache_size)
        except InvalidArgument as error:
            raise InvalidArgument(f"cache_size: {error}") from None
        try:
            parse_size(self.tree_cache_size)
        except InvalidArgument as error:
            raise InvalidArgument(f"tree_cache_size: {error}") from None
        if self.concurrency < 1:
            raise InvalidArgument(f"concurrency must be at least 1, not {self.concurrency}")
        self.disk_watermarks  # parses and orders both free-space settings
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
    def disk_watermarks(self) -> Watermarks:
        try:
            low, critical = FreeSpace.parse(self.disk_low_free), FreeSpace.parse(self.disk_critical_free)
            return Watermarks(low=low, critical=critical)
        except InvalidArgument as error:
            raise InvalidArgument(f"disk_low_free/disk_critical_free: {error}") from None

    @property
    def cache_bytes(self) -> int:
        return parse_size(self.cache_size)

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
    if kind == "choice":
        if raw not in setting.choices:
            raise wrong("one of " + ", ".join(repr(c) for c in setting.choices))
        return raw
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
    raise AssertionError(value)


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, except that ensure_ascii writes a character
    # beyond U+FFFF as a surrogate pair ("\ud83d\ude00"), which TOML refuses: write
    # non-ASCII as itself, and escape DEL, the one control character JSON leaves alone.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    bare = key.replace("-", "").replace("_", "").isalnum() and key.isascii()
    return key if bare else _toml_string(key)
