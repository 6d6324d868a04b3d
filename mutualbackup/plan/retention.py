"""Which archives ``borg prune`` keeps under a retention policy, computed independently.

Pure. The coordinator uses it to tell the deletions its own prune explains
from any other (SPEC security promise 3): after a prune, every archive that
disappeared must be one this plan deletes.

The rules are those of borg 1.4 (``borg/helpers/misc.py: prune_split`` and
``do_prune``), for the ``--keep-hourly/daily/weekly/monthly/yearly`` flags the
inventory can set, with borg run under ``TZ=UTC`` so periods are UTC periods:

* rules are applied in the order hourly, daily, weekly, monthly, yearly; each
  walks the archives newest first and keeps the first (newest) archive of each
  period it has not seen, skipping archives an earlier rule already kept, until
  it has kept its count; when the archives run out before that, it also keeps
  the oldest archive;
* checkpoint archives (``NAME.checkpoint``) are never kept by a rule; the newest
  one is kept only when it is newer than every complete archive.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable, Sequence

from mutualbackup.borg import ArchiveEntry, is_checkpoint
from mutualbackup.inventory.model import Retention

_PERIODS: tuple[tuple[str, Callable[[dt.datetime], object]], ...] = (
    ("hourly", lambda t: t.strftime("%Y-%m-%d %H")),
    ("daily", lambda t: t.strftime("%Y-%m-%d")),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: t.strftime("%Y-%m")),
    ("yearly", lambda t: t.year),
)


@dataclass(frozen=True)
class PrunePlan:
    keep: dict[str, str]  # archive name -> the rule that keeps it ("daily #2", "weekly[oldest] #1", "checkpoint")
    delete: tuple[str, ...]  # archive names, newest first

    def explains(self, removed: set[str]) -> set[str]:
        """The removed archives this plan does *not* delete (empty when all are explained)."""
        return removed - set(self.delete)


def plan_prune(archives: Sequence[ArchiveEntry], retention: Retention) -> PrunePlan:
    """What ``borg prune`` with ``retention`` does to ``archives`` (those matching the glob).

    ``archives`` in ``borg list``'s order (:func:`borg.parse_list_json` keeps it): like borg,
    a stable sort on the full-precision start time alone, so archives started in the same
    instant stay in that order (a tie-break by name would keep another one than borg).
    """
    newest_first = sorted(archives, key=lambda a: a.time, reverse=True)
    checkpoints = [a for a in newest_first if is_checkpoint(a.name)]
    complete = [a for a in newest_first if not is_checkpoint(a.name)]
    keep: dict[str, str] = {}
    if checkpoints and newest_first[0] is checkpoints[0]:
        keep[checkpoints[0].name] = "checkpoint"
    for rule, period_of in _PERIODS:
        count = getattr(retention, rule)
        if count <= 0:
            continue
        kept, last = 0, None
        archive = None
        for archive in complete:
            period = period_of(archive.time.astimezone(dt.timezone.utc))
            if period == last:
                continue
            last = period
            if archive.name not in keep:
                kept += 1
                keep[archive.name] = f"{rule} #{kept}"
                if kept == count:
                    break
        if archive is not None and kept < count and archive.name not in keep:
            kept += 1
            keep[archive.name] = f"{rule}[oldest] #{kept}"
    delete = tuple(a.name for a in newest_first if a.name not in keep)
    return PrunePlan(keep, delete)
