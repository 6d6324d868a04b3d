"""The ``drill`` request: on the source, restore a sample of an archive into scratch space and judge it.

The sample, its checksums from the archive, the extracted copies and the live files never leave
the node: the coordinator gets the verdict (counts, and what did not match).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

from mutualbackup import borg
from mutualbackup.borg import Item
from mutualbackup.inventory import value_checks
from mutualbackup.inventory.model import Node
from mutualbackup.node.requests import Args, Failed, Refused, Session, host_of, integer, request, text
from mutualbackup.node.source import paths
from mutualbackup.plan.drill_sample import (
    Observation, choose_sample, inspect_argv, parse_inspection, top_level_paths, verify_sample,
)
from mutualbackup.node.system import pidfile_path
from mutualbackup.remote.transport import Result

log = logging.getLogger("mutualbackup.node")

DRILL_TIMEOUT = 6 * 3600


@request("drill", "source")
def drill(session: Session, args: Args) -> Mapping[str, Any]:
    """Sample, hash, extract and compare (see :mod:`mutualbackup.plan.drill_sample`); Failed when the sample does not hold."""
    host = host_of(args)
    archive = text(args, "archive")
    number = integer(args, "number") or 0
    roots = args.get("paths")
    if not isinstance(roots, list) or not roots:
        raise Refused("'paths' must list the backup's paths")
    try:
        backup_paths = [value_checks.check_absolute_path(str(p)) for p in roots]
    except ValueError as exc:
        raise Refused(str(exc)) from None
    drilling = _Drilling(session, host, archive, integer(args, "run_id", optional=True))
    top, items = drilling.sample(backup_paths, number)
    on_disk, live = drilling.extract_and_inspect([item.path for item in items], number)
    verdict = verify_sample(items, on_disk, live)
    if verdict.problems:
        shown = "\n".join(verdict.problems[:10])
        more = f"\n… and {len(verdict.problems) - 10} more" if len(verdict.problems) > 10 else ""
        raise Failed(f"the sample of {drilling.where} does not match the archive:\n{shown}{more}")
    return {"top_level": "/" + top if top else None, "files": len(items),
            "bytes": sum(i.size for i in items if i.type == "-"),
            "live_checked": verdict.live_checked, "live_changed": verdict.live_changed}


@dataclasses.dataclass
class _Drilling:
    """One drill's borg commands on the source, supervised, with errors that say where and what to do."""

    session: Session
    host: Node
    archive: str
    run_id: int | None

    @property
    def where(self) -> str:
        return f"{self.archive} on {self.host.name}"

    @property
    def url(self) -> str:
        return borg.repository_url_for(self.session.config.member, self.session.config.node, self.host)

    def supervised(self, argv: Sequence[str], **options: object) -> Result:
        """A long borg command, supervised (it dies with the coordinator's session; the daemon can stop it)."""
        pidfile = pidfile_path(self.session.config.state, "drill-" + self.host.name.replace("/", "."))
        return self.session.system.run(argv, env=borg.client_env(paths(self.session)), timeout=DRILL_TIMEOUT,
                                       pidfile=pidfile, run_id=self.run_id, **options)  # type: ignore[arg-type]

    def failed(self, what: str, code: int, messages: str) -> Failed:
        return Failed(
            f"{what} exited {code}: {borg.exit_hint(code)}\n{borg.error_lines(messages)}\n"
            f"The repository of {self.session.config.name} on {self.host.name} may be damaged: run "
            f"`mutualbackup verify {self.session.config.name}`, and restore from another replica until it is repaired.")

    def sample(self, backup_paths: Sequence[str], number: int) -> tuple[str, list[Item]]:
        """The drill's sample (its first top-level path, and the items with their sha256 from the archive)."""
        catalogue = self.supervised(borg.catalogue_argv(self.session.config.borg, self.url, self.archive))
        if not borg.succeeded(catalogue.exit_code):
            raise self.failed(f"cannot list {self.where}: borg list", catalogue.exit_code,
                              catalogue.stderr.decode("utf-8", "replace"))
        roots = top_level_paths(backup_paths)
        top, sample = choose_sample(borg.parse_catalogue(catalogue.stdout), roots, number)
        if not sample:
            raise Failed(f"{self.where} holds no file to drill")
        paths = [entry.path for entry in sample]
        hashed = self.supervised(borg.hashes_argv(self.session.config.borg, self.url, self.archive, paths))
        if not borg.succeeded(hashed.exit_code):
            raise self.failed(f"borg could not read the sample's data in {self.where}: borg list", hashed.exit_code,
                              hashed.stderr.decode("utf-8", "replace"))
        wanted = set(paths)
        items = [item for item in borg.parse_items(hashed.stdout) if item.path in wanted]
        if len(items) != len(wanted):
            raise Failed(f"borg listed {len(items)} of the {len(wanted)} sampled item(s) of {self.where}")
        return top, items

    def extract_and_inspect(self, paths: list[str], number: int) -> tuple[dict[str, Observation], dict[str, Observation]]:
        """Extract ``paths`` into a scratch directory on the source; (extracted, live) facts of each; scratch removed."""
        workdir = self.session.config.state
        made = self.session.system.run(
            ("sh", "-c", 'umask 077 && mktemp -d "$1/drill-$2.XXXXXX"', "sh", workdir, f"{number}"), timeout=60
        )
        scratch = made.stdout.decode("utf-8", "replace").strip()
        if not made.ok or not scratch.startswith("/"):
            raise Failed(f"cannot create a scratch directory under {workdir}: {made.stderr_tail(3)}")
        try:
            extracted = self.supervised(
                borg.extract_argv(self.session.config.borg, self.url, self.archive, paths, progress=False, exact=True),
                cwd=scratch)
            if not borg.succeeded(extracted.exit_code):
                said = borg.parse_log(extracted.stderr)  # --log-json: the messages are JSON lines on stderr
                raise self.failed(f"borg extract of the sample of {self.where}", extracted.exit_code, said.tail(40))
            inspected = self.session.system.run(inspect_argv(scratch, paths), timeout=DRILL_TIMEOUT)
            if not inspected.ok:
                raise Failed(f"cannot inspect the extracted sample: {inspected.stderr_tail(5)}")
            return parse_inspection(inspected.stdout, paths)
        finally:
            self.session.system.remove_tree(scratch)
