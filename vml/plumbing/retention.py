"""Retention policies, as restic's ``forget`` offers them.

Entries are considered newest first.  ``keep_last`` keeps the newest N;
``keep_hourly`` (daily, weekly, monthly, yearly) keeps the newest entry of
each of the N most recent hours (days, ISO weeks, months, years) that have
entries.  Times are compared in local time, as a user thinks of "a day".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from vml.errors import UsageError
from vml.values import MAX_COUNT

K = TypeVar("K")


@dataclass
class Policy:
    """How many entries to keep by each rule (0: the rule is off)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        # A negative count once sliced the entry list from its end: `--keep-last -1`
        # removed entries.  Every rule is off (0) or a count in range.
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
                raise UsageError(
                    f"--keep-{name} takes a whole number from 1 to {MAX_COUNT}, not {value!r}",
                    "write it in digits, e.g. 7",
                )

    def empty(self) -> bool:
        """True when no rule is on."""
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly))


def _buckets() -> list[tuple[str, Callable[[datetime], object]]]:
    return [
        ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
        ("daily", lambda t: (t.year, t.month, t.day)),
        ("weekly", lambda t: t.isocalendar()[:2]),
        ("monthly", lambda t: (t.year, t.month)),
        ("yearly", lambda t: t.year),
    ]


def select(items: list[tuple[K, datetime]], policy: Policy) -> dict[K, list[str]]:
    """The items ``policy`` keeps, each with the rules that keep it.

    Items with equal times count as newer the later they come in ``items``
    (entries are passed in creation order; saves can share a second).
    """
    ranked = sorted(enumerate(items), key=lambda p: (p[1][1], p[0]), reverse=True)
    ordered = [item for _i, item in ranked]
    keep: dict[K, list[str]] = {}
    for key, _t in ordered[: policy.last]:
        keep.setdefault(key, []).append("last")
    for name, bucket in _buckets():
        want: int = getattr(policy, name)
        if want <= 0:
            continue
        last: object = None
        count = 0
        for key, t in ordered:
            b = bucket(t.astimezone())
            if b == last:
                continue
            last = b
            keep.setdefault(key, []).append(name)
            count += 1
            if count >= want:
                break
    return keep
