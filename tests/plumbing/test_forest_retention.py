"""Retention rules (restic ``forget`` semantics) on synthetic times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from vml.plumbing.retention import Policy, select

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday


def items(hours: list[float]) -> list[tuple[int, datetime]]:
    return [(i, T0 + timedelta(hours=h)) for i, h in enumerate(hours)]


def test_keep_last_keeps_the_newest() -> None:
    kept = select(items([0, 1, 2, 3]), Policy(last=2))
    assert set(kept) == {2, 3}


def test_daily_keeps_the_newest_of_each_recent_day() -> None:
    # Two entries a day for four days.
    hours = [d * 24 + h for d in range(4) for h in (1, 5)]
    kept = select(items(hours), Policy(daily=3))
    assert set(kept) == {7, 5, 3}
    assert all(r == ["daily"] for r in kept.values())


def test_rules_add_up_and_say_why() -> None:
    hours = [d * 24 for d in range(40)]  # March 2 to April 10
    kept = select(items(hours), Policy(last=1, weekly=2, monthly=2))
    assert kept[39] == ["last", "weekly", "monthly"]
    assert "monthly" in kept[29]  # March 31: the newest of March
    assert len([k for k, r in kept.items() if "weekly" in r]) == 2
    assert len([k for k, r in kept.items() if "monthly" in r]) == 2


def test_empty_policy_keeps_nothing_and_says_so() -> None:
    assert Policy().empty()
    assert select(items([0, 1]), Policy()) == {}
