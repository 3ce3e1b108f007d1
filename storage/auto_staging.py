"""``AutoStager``: choose, per action, between eager (hardlink) and lazy (FUSE) staging.

What each costs (``bench/bench_staging.py``, whole actions on tmpfs, 2 vCPUs; n files in
the tree, r of them read by the action):

* eager: ~25 ms + ~9 µs per file staged (warm) or ~85 µs per file fetched in batches
  (cold), then ~15 µs per file read;
* lazy: ~8 ms, nearly flat in n (a 10k tree: 20 ms), then ~150 µs per file read (three
  round trips into the Python FUSE daemon: open, read, release) when warm, ~1 ms per file
  when cold (each first open fetches its blob alone).

So lazy wins when the action reads less than ~6% of its tree — warm (9/(150-15)) and cold
(70/(1000-15)) alike: being cold raises the stakes on both sides but barely moves the
break-even, which is why the rule does not look at the cache. What an action will read is
not known in advance; the rule bets on the tree's size: an action reads a bounded number
of files (a compile: its sources and a few hundred headers), so the bigger the tree, the
smaller the fraction. The threshold sits high, at 20,000 files, because guessing wrong
costs lazy staging ~17x more per file than it costs eager staging (135 µs against 9 µs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from reapi_worker.protos.errors import ReapiError

from .directory.cas import CasDirectory
from .paths import RelPath
from .staging import Owner, StagedInput, Stager
from .tree_facts import TreeFacts, TreeSize

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StagingRule:
    """Stage lazily when the input root has at least ``lazy_min_files`` files (see the
    module docstring for where the default comes from). 0 always stages lazily."""

    lazy_min_files: int = 20_000

    def lazy(self, size: TreeSize) -> bool:
        return size.files >= self.lazy_min_files


class AutoStager(Stager):
    """Delegates each ``stage`` to ``eager`` or ``lazy`` as ``rule`` decides. ``facts`` is
    shared with the lazy stager, so a tree is measured once and only new subtrees are ever
    read to measure it. Thread-safe if the two stagers are. Closes nothing: the stagers'
    owner does."""

    def __init__(self, eager: Stager, lazy: Stager, rule: StagingRule, facts: TreeFacts) -> None:
        self._eager = eager
        self._lazy = lazy
        self.rule = rule
        self._facts = facts

    def choose(self, root: CasDirectory) -> Stager:
        """The stager the rule picks for ``root`` (reads the Directory protos not measured
        before: MissingBlobs, InvalidArgument)."""
        size = self._facts.size(root)
        lazy = self.rule.lazy(size)
        log.debug("input root %s: %d files, %s staging", root.digest(), size.files, "lazy" if lazy else "eager")
        return self._lazy if lazy else self._eager

    def stage(
        self, root: CasDirectory, build_dir: str, directories: Iterable[RelPath] = (), owner: Owner | None = None
    ) -> StagedInput:
        try:
            chosen = self.choose(root)
        except ReapiError as error:
            raise error.within("staging input root") from None
        return chosen.stage(root, build_dir, directories, owner)
