"""Output paths as REAPI defines them, resolved to checked components below the input root.

REAPI: an output path is relative to the working directory, uses ``/``, has no leading
and no trailing slash; ``..`` is not forbidden, and clients rely on it — BuildStream asks
for ``["." , "../../../buildstream-install"]`` from a working directory three levels
down, i.e. the working directory itself and a sibling tree of the input root. The empty
path (and ``.``) name the working directory itself.

So a path is resolved *lexically* against the working directory: ``..`` drops the last
component. Lexical resolution is exact here because the paths are resolved against the
tree the worker staged, before the command runs, and capture never follows a symlink
(:mod:`.outputs`): ``a/../b`` means ``b`` whatever ``a`` becomes. Refused, with
InvalidArgument naming the field and the path: absolute paths, a trailing ``/``, paths
that climb above the input root, and components that no Linux file system can hold
(longer than 255 bytes). A path that resolves to the input root itself is allowed.

Duplicates (REAPI: output paths MUST be deduplicated; a legacy output file cannot be
duplicated nor share a path with an output directory): an exact repetition within one
field is reported once; one path listed both as a legacy file and a legacy directory is
refused. Two different spellings of one location (``a`` and ``./a``) are distinct
requests and each is reported under its own spelling.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from reapi_worker.protos.errors import InvalidArgument
from reapi_worker.storage.paths import RelPath

#: Longest file name Linux file systems hold (NAME_MAX), in bytes.
NAME_MAX = 255


class OutputKind(enum.Enum):
    """Which REAPI field an output path came from; it decides how it is reported."""

    PATH = "output_paths"  # v2.1: file, directory or symlink, whatever is found
    FILE = "output_files"  # legacy
    DIRECTORY = "output_directories"  # legacy


@dataclass(frozen=True, slots=True)
class OutputSpec:
    path: str  # as the client wrote it, relative to the working directory: reported back
    components: RelPath  # relative to the input root, checked; () is the input root itself
    kind: OutputKind


def resolve_output_path(working_directory: RelPath, path: str, what: str) -> RelPath:
    """``path`` (relative to ``working_directory``) as checked components below the input
    root. ``what`` names the field in errors (``command.output_paths entry``)."""
    if "\0" in path:
        raise InvalidArgument(f"{what} {path!r} contains NUL")
    if path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} is absolute")
    if path.endswith("/"):
        raise InvalidArgument(f"{what} {path!r} ends in '/'")
    parts = list(working_directory)
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidArgument(f"{what} {path!r} leaves the input root")
            parts.pop()
            continue
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise InvalidArgument(f"{what} {path!r} has a component longer than {NAME_MAX} bytes")
        parts.append(part)
    return tuple(parts)


def output_specs(
    working_directory: RelPath,
    output_paths: Iterable[str],
    output_files: Iterable[str],
    output_directories: Iterable[str],
) -> tuple[OutputSpec, ...]:
    """Every requested output, resolved (see the module docstring).

    REAPI v2.1: when ``output_paths`` is used, ``output_files`` and ``output_directories``
    are ignored.
    """
    paths = list(output_paths)
    if paths:
        return tuple(_resolved(working_directory, OutputKind.PATH, paths))
    files = list(_resolved(working_directory, OutputKind.FILE, output_files))
    directories = list(_resolved(working_directory, OutputKind.DIRECTORY, output_directories))
    both = sorted({o.path for o in files} & {o.path for o in directories})
    if both:
        raise InvalidArgument(f"command.output_files and command.output_directories both list {both[0]!r}")
    for output in files:
        if output.components in ((), working_directory):
            raise InvalidArgument(f"command.output_files entry {output.path!r} names a directory of the input root")
    return tuple(files + directories)


def _resolved(working_directory: RelPath, kind: OutputKind, paths: Iterable[str]) -> Iterable[OutputSpec]:
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            continue  # REAPI asks clients to deduplicate; a repetition is reported once
        seen.add(path)
        components = resolve_output_path(working_directory, path, f"command.{kind.value} entry")
        yield OutputSpec(path=path, components=components, kind=kind)
