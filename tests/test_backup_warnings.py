"""Files borg could not read: counted from its JSON log, recorded with the run, shown by status
and exported as a metric; borg's other messages reach the run's error as plain lines."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from mutualbackup import borg
from mutualbackup.jobs.backup import run_backup
from mutualbackup.report.metrics import FederationMetrics, MetricsSource
from mutualbackup.report.prometheus_text import render_text
from mutualbackup.report.status import compute_status
from mutualbackup.remote.transport import Result

from fake import Harness, make_federation

START = dt.datetime(2025, 6, 2, 12, 0, tzinfo=dt.timezone.utc).timestamp()


def log_line(message: str, level: str = "WARNING", msgid: str = "") -> bytes:
    event = {"type": "log_message", "time": START, "message": message, "levelname": level, "name": "borg.archiver"}
    if msgid:
        event["msgid"] = msgid
    return json.dumps(event).encode() + b"\n"


SKIPPED = (
    log_line("/etc/shadow: open: [Errno 13] Permission denied: 'shadow'", msgid="BackupPermissionError")
    + log_line("/srv/gone: stat: [Errno 2] No such file or directory: 'gone'", msgid="BackupFileNotFoundError")
    + log_line("/srv/log: file changed while we backed it up", msgid="FileChangedWarning")
    + b"a line that is not JSON\n"
)


def test_the_log_gives_plain_messages_and_the_paths_of_unreadable_files():
    said = borg.parse_log(SKIPPED + log_line("Remote: done", level="INFO") + b'{"type": "progress_percent"}\n')
    assert said.unreadable == ("/etc/shadow", "/srv/gone")
    assert said.messages == (
        "WARNING: /etc/shadow: open: [Errno 13] Permission denied: 'shadow'",
        "WARNING: /srv/gone: stat: [Errno 2] No such file or directory: 'gone'",
        "WARNING: /srv/log: file changed while we backed it up",
        "a line that is not JSON",
        "Remote: done",
    )
    assert said.tail(1) == "Remote: done"


def test_create_logs_json_so_that_skipped_files_can_be_counted():
    source = make_federation(2, 1).node("coop0/src0")
    assert source.backup is not None
    argv = borg.create_argv("borg", "ssh://h/r", "src0-x", source.backup)
    assert argv[:4] == ("borg", "create", "--json", "--log-json")


def harness_with_skipped_files(tmp_path: Path) -> tuple[Harness, str, str]:
    h = Harness(make_federation(2, 1), str(tmp_path / "state"), START)
    source, target = "coop0/src0", h.placement["coop0/src0"][0]
    h.world.duration = lambda _source, _target: 0.0  # no daemon steps the fake clock here
    plain = h.world._borg_create

    def create(node, argv, world):  # noqa: ANN001
        if node.name == source and "create" in argv:
            made = plain(node, argv, None)
            return Result(argv, 105, made.stdout, SKIPPED)
        return None

    h.world.script(create)
    return h, source, target


def test_a_backup_that_skipped_files_is_a_warning_with_their_count_in_status_and_metrics(tmp_path: Path):
    h, source, target = harness_with_skipped_files(tmp_path)
    outcome = run_backup(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    assert outcome.result == "warning" and outcome.ok
    assert "Permission denied" in (outcome.error or "") and '"type"' not in (outcome.error or "")
    [row] = [r for r in compute_status(h.federation, h.placement, h.history, h.clock.time()) if r.target == target
             and r.source == source]
    assert (row.state, row.unreadable_files, row.unreadable_paths) == ("ok", 2, ("/etc/shadow", "/srv/gone"))
    text = render_text(FederationMetrics(MetricsSource(h.history, h.federation, placement=lambda: h.placement,
                                                       clock=h.clock.time)).families()).decode()
    assert f'mutualbackup_backup_unreadable_files{{source="{source}",target="{target}"}} 2' in text


def test_status_prints_the_count_and_the_first_paths(tmp_path: Path, capsys):
    from mutualbackup.report import text

    h, source, target = harness_with_skipped_files(tmp_path)
    run_backup(h.ctx, h.federation.node(source), h.federation.node(target), clock=h.clock.time)
    rows = compute_status(h.federation, h.placement, h.history, h.clock.time())
    text.print_status(rows, h.clock.time())
    out = capsys.readouterr().out
    assert "2 file(s) could not be read and are not in the archive: /etc/shadow, /srv/gone" in out
