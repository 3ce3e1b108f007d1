"""Names and relative paths, checked where they enter.

A path inside a Directory is never a raw string past this module: it is a tuple of
components each of which is non-empty, not ``.`` or ``..``, and free of ``/`` and NUL.
Symlink targets are strings (they are data, not paths we follow) but are checked
against a :class:`SymlinkPolicy` when they are imported.
"""

from __future__ import annotations

import enum
import posixpath

from reapi_worker.protos.errors import InvalidArgument

RelPath = tuple[str, ...]


def check_name(name: str, where: str = "") -> str:
    """Return ``name`` if it is a valid single path component, else raise InvalidArgument."""
    problem = _name_problem(name)
    if problem:
        at = f" in {where}" if where else ""
        raise InvalidArgument(f"invalid name {name!r}{at}: {problem}")
    return name


def _name_problem(name: str) -> str:
    if not isinstance(name, str):
        return "not a string"
    if name == "":
        return "empty"
    if name in (".", ".."):
        return "is a relative reference"
    if "/" in name:
        return "contains '/'"
    if "\0" in name:
        return "contains NUL"
    return ""


def split_relative(path: str, what: str = "path") -> RelPath:
    """Split a relative POSIX path into checked components.

    ``""`` and ``"."`` give the empty tuple (the directory itself). Repeated and trailing
    slashes are tolerated; ``.`` components are dropped; absolute paths and any ``..``
    are refused, because a path that leaves its root is an attack, not a typo.
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"{what} {path!r} is not a string")
    if "\0" in path:
        raise InvalidArgument(f"{what} {path!r} contains NUL")
    if path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} is absolute")
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidArgument(f"{what} {path!r} contains '..'")
        parts.append(part)
    return tuple(parts)


def join(parts: RelPath) -> str:
    return "/".join(parts)


class SymlinkPolicy(enum.Enum):
    """Which symlink targets a Directory accepts.

    ``ANY``: any target string (it is only data until someone follows it).
    ``RELATIVE_INSIDE``: relative targets that stay inside the tree from where the link
    sits (REAPI's ``symlink_absolute_path_strategy = DISALLOWED`` plus no escape by ``..``).
    ``RELATIVE``: relative targets only, ``..`` allowed to leave the tree.
    """

    ANY = "any"
    RELATIVE = "relative"
    RELATIVE_INSIDE = "relative-inside"

    def check(self, link_path: RelPath, target: str) -> str:
        """Return ``target`` if the policy allows a link at ``link_path`` pointing to it."""
        where = join(link_path) or "."
        if "\0" in target:
            raise InvalidArgument(f"symlink {where}: target contains NUL")
        if target == "":
            raise InvalidArgument(f"symlink {where}: empty target")
        if self is SymlinkPolicy.ANY:
            return target
        if target.startswith("/"):
            raise InvalidArgument(f"symlink {where} -> {target!r}: absolute target not allowed")
        if self is SymlinkPolicy.RELATIVE_INSIDE and escapes(link_path[:-1], target):
            raise InvalidArgument(f"symlink {where} -> {target!r}: target escapes the tree")
        return target


def escapes(link_dir: RelPath, target: str) -> bool:
    """True if relative ``target``, resolved lexically from ``link_dir``, leaves the root.

    Lexical resolution is the right check because every intermediate symlink inside the
    tree is itself checked the same way when it enters.
    """
    depth = len(link_dir)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        else:
            depth += 1
    return False


def normalize_target(target: str) -> str:
    """The lexical normal form of a symlink target, for comparisons in tests and logs."""
    return posixpath.normpath(target)
