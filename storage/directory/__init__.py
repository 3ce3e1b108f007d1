"""The Directory API: one tree interface, a filesystem backend and a CAS backend."""

from .base import Directory, FileStat, FileType, ImportFilter, ImportResult

__all__ = ["Directory", "FileStat", "FileType", "ImportFilter", "ImportResult"]
