"""borg's exit codes (BORG_EXIT_CODES=modern), classified for retries and alerts."""

from __future__ import annotations

import pytest

from mutualbackup.borg import classify_exit, exit_hint


@pytest.mark.parametrize(
    "code, verdict",
    [
        (0, "success"),
        (1, "warning"), (100, "warning"), (107, "warning"),  # a file changed or vanished: archive written
        (-1, "retry"), (73, "retry"), (80, "retry"), (87, "retry"),  # lost connection, lock timeout
        (2, "error"), (14, "error"), (20, "error"), (52, "error"), (83, "error"),
        (124, "error"), (126, "error"), (127, "error"),  # timeout / shell, not borg warnings
        (143, "error"),
    ],
)
def test_exit_codes_are_classified_as_borg_documents_them(code: int, verdict: str) -> None:
    assert classify_exit(code) == verdict


def test_hints_tell_the_operator_what_to_do_next() -> None:
    assert "not found" in exit_hint(127)
    assert "quota" in exit_hint(20)
    from mutualbackup.borg import MIN_QUOTA, QUOTA_FACTOR
    from mutualbackup.borg import replica_quota
    assert f"{QUOTA_FACTOR} times" in exit_hint(20) and f"at least {MIN_QUOTA // 1024**3} GiB" in exit_hint(20)
    assert replica_quota(0, 10**15) == MIN_QUOTA and replica_quota(MIN_QUOTA, 10**15) == QUOTA_FACTOR * MIN_QUOTA
    assert ".checkpoint" in exit_hint(20) and "capacity" in exit_hint(20)
    assert "signal 15" in exit_hint(143)
    assert "apply" in exit_hint(13)
