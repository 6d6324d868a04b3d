"""The one run lifecycle every job shares: recorded running at once, exactly one verdict, whatever happens."""

from __future__ import annotations

from pathlib import Path

import pytest

from mutualbackup.errors import OperationFailed
from mutualbackup.jobs.runs import RecordedRun, RunFailed, record_failure
from mutualbackup.jobs.control import JobControl
from mutualbackup.state.history import History

NOW = 1_750_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def history(tmp_path: Path):
    h = History(tmp_path / "state")
    yield h
    h.close()


def only_run(history: History):
    [run] = history.runs()
    return run


def test_a_run_is_recorded_running_as_soon_as_it_is_made(history: History):
    run = RecordedRun(history, "prune", "a/web", "b/st", clock=Clock())
    assert only_run(history).result == "running" and only_run(history).id == run.id


def test_a_successful_block_records_its_columns_and_detail(history: History):
    with RecordedRun(history, "backup", "a/web", "b/st", clock=Clock()) as run:
        run.save(planned=["x"])
        run.succeed({"kept": 3}, result="warning", exit_code=105, archive="web-1", nfiles=7, note="web-1")
    recorded = only_run(history)
    assert (recorded.result, recorded.exit_code, recorded.archive, recorded.nfiles) == ("warning", 105, "web-1", 7)
    assert run.outcome is not None and run.outcome.ok and run.outcome.detail == {"planned": ["x"], "kept": 3}
    assert run.outcome.columns == {"archive": "web-1", "nfiles": 7} and run.outcome.duration == 1


@pytest.mark.parametrize("raised, error, alerts", [
    pytest.param(RunFailed("borg exited 14", 14, alert="backup-error"), "borg exited 14", 1, id="a failed step with an alert"),
    pytest.param(RunFailed("borg exited 2", 2), "borg exited 2", 0, id="a failed step"),
    pytest.param(OperationFailed("cannot reach b/st"), "cannot reach b/st", 0, id="an operation that failed"),
    pytest.param(ValueError("borg did not print JSON"), "borg did not print JSON", 0, id="unexpected output"),
    pytest.param(KeyError("bug"), "internal error: KeyError('bug')", 0, id="a bug, which never stops the daemon"),
])
def test_whatever_the_block_raises_becomes_a_failure(history: History, raised, error, alerts):
    with RecordedRun(history, "check", "a/web", "b/st", clock=Clock()) as run:
        raise raised
    recorded = only_run(history)
    assert (recorded.result, recorded.error) == ("failure", error)
    assert len(history.alerts()) == alerts
    assert run.outcome is not None and not run.outcome.ok


def test_ctrl_c_interrupts_the_run_and_goes_on_up(history: History):
    with pytest.raises(KeyboardInterrupt):
        with RecordedRun(history, "backup", "a/web", "b/st", clock=Clock()):
            raise KeyboardInterrupt
    recorded = only_run(history)
    assert recorded.result == "interrupted" and "KeyboardInterrupt" in (recorded.error or "")


def test_a_run_the_daemon_aborted_is_interrupted_and_says_why(history: History):
    control = JobControl()
    with RecordedRun(history, "drill", "a/web", "b/st", clock=Clock(), control=control):
        control.abort("the daemon was stopped")
        raise RunFailed("borg list exited 2")
    recorded = only_run(history)
    assert recorded.result == "interrupted"
    assert recorded.error == "aborted: the daemon was stopped\nborg list exited 2"


def test_a_block_that_gives_no_verdict_is_a_failure_not_a_run_left_running(history: History):
    with RecordedRun(history, "compact", "a/web", "b/st", clock=Clock()):
        pass
    assert only_run(history).result == "failure"


def test_a_failure_that_never_started_work_is_one_finished_run(history: History):
    record_failure(history, "restore", "a/web", "", "no replica could be used", detail={"to": "a/web:/x"})
    recorded = only_run(history)
    assert (recorded.result, recorded.target, recorded.error) == ("failure", "", "no replica could be used")
