"""Content-addressed storage and the Directory API.

Public surface:

* :mod:`.digests` — REAPI v2 digests of blobs and messages;
* :mod:`.paths` — checked names and relative paths (every component checked where it enters);
* :mod:`.content` — the ``ContentStore`` interface every CAS implements;
* :mod:`.local_cas` — the on-disk cache (atomic writes, LRU eviction, pins);
* :mod:`.remote_cas` — the gRPC client for a remote CAS;
* :mod:`.fetch_through` — local hit, else remote, verified, then cached;
* :mod:`.directory` — the ``Directory`` API with a filesystem and a CAS backend.
"""
