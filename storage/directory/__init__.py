"""The Directory API: one tree interface, a filesystem backend and a CAS backend.

Public surface: :class:`Directory` and its values (``base``), the two backends
:class:`FileSystemDirectory` and :class:`CasDirectory`, and :func:`import_tar`.
Modules starting with ``_`` are internal to this package.
"""

from .base import Directory, FileStat, FileType, ImportFilter, ImportResult
from .cas import CasDirectory
from .filesystem import FileSystemDirectory
from .tar import import_tar

__all__ = [
    "CasDirectory",
    "Directory",
    "FileStat",
    "FileSystemDirectory",
    "FileType",
    "ImportFilter",
    "ImportResult",
    "import_tar",
]
