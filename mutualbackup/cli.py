"""The ``mutualbackup`` command line: parse arguments, load the inventory, call the pipeline.

Exit codes (SPEC.md): 0 success, 1 an operation failed, 2 bad usage or a bad inventory.
Every command validates the whole inventory (and the placement) first; when it is
invalid nothing runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Callable, Sequence

from mutualbackup import __version__, leave, stdout_gone
from mutualbackup.errors import InventoryError, MutualBackupError, OperationFailed, UsageError
from mutualbackup.inventory.load import load_inventory

if TYPE_CHECKING:
    import socket

    from mutualbackup.context import Connector, Context
    from mutualbackup.inventory.model import Federation
    from mutualbackup.remote.hints import Hinted
    from mutualbackup.remote.transport import Transport

# Each command imports what it uses, when it uses it: a backup's whole process is part of its cost (bench/), and
# `run` connects to its source before it reads anything else (cmd_run).

log = logging.getLogger("mutualbackup")


def main(argv: Sequence[str] | None = None, hinted: Hinted | None = None,
         handoff: Callable[[str], int | None] | None = None) -> int:
    """The command line ``argv``'s exit code. ``hinted``: the connection the executable started before it was
    parsed (``mutualbackup/__main__.py``), which ``run`` uses if the inventory names its endpoint; ``handoff``:
    how the executable hands ``run`` to the daemon of a state directory (mutualbackup/handoff), once known."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.hinted = hinted
    args.handoff = handoff
    setup_logging(getattr(args, "verbose", False), getattr(args, "log_format", "text"))
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except InventoryError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"inventory invalid: {len(exc.problems)} problem(s); nothing was done", file=sys.stderr)
        return exc.exit_code
    except MutualBackupError as exc:
        print(f"mutualbackup: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `mutualbackup plan | head`: the reader has what it wanted
        stdout_gone()
        return 0


def console(hinted: Hinted | None = None, handoff: Callable[[str], int | None] | None = None) -> None:
    """The ``mutualbackup`` executable: :func:`main`, then out at once (:func:`mutualbackup.leave`)."""
    try:
        code = main(hinted=hinted, handoff=handoff)
    finally:
        if hinted is not None:
            hinted.close()  # when no command took it
    leave(code)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--inventory", metavar="DIR", default=argparse.SUPPRESS, help="inventory directory")
    common.add_argument("--state", metavar="DIR", default=argparse.SUPPRESS, help="state directory")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="log lines as text (default; plain under systemd) or one JSON object a line")

    parser = argparse.ArgumentParser(prog="mutualbackup", description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"mutualbackup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    command("check", cmd_check, "validate the inventory")
    p = command("plan", cmd_plan, "placement of every replica and what changes")
    p.add_argument("--json", action="store_true")
    command("apply", cmd_apply, "provision keys, authorized_keys and repositories")
    p = command("run", cmd_run, "back up now, in the foreground")
    p.add_argument("sources", nargs="*", metavar="SOURCE")
    p.add_argument("--replica", metavar="HOST")
    p.add_argument("--json", action="store_true")
    p = command("daemon", cmd_daemon, "scheduler, maintenance and /metrics until SIGTERM")
    p.add_argument("--tick", type=float, default=15.0, help=argparse.SUPPRESS)
    p.add_argument("--grace", type=float, default=60.0, metavar="SECONDS",
                   help="on SIGTERM, how long running jobs may finish before they are aborted (default 60)")
    p.add_argument("--max-jobs", type=int, metavar="N",
                   help="jobs at once (default: every host's max_concurrent together, between 8 and 256)")
    p = command("verify", cmd_verify, "borg check of the repositories (on the host, and the archives from the source)")
    p.add_argument("sources", nargs="*", metavar="SOURCE")
    p = command("status", cmd_status, "state of each source × replica")
    p.add_argument("--json", action="store_true")
    p = command("archives", cmd_archives, "archives of one source")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--replica", metavar="HOST")
    p.add_argument("--json", action="store_true")
    p = command("restore", cmd_restore, "extract an archive onto a node")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--to", required=True, metavar="NODE:DIR")
    p.add_argument("--archive", metavar="NAME")
    p.add_argument("--path", action="append", default=[], metavar="P")
    p.add_argument("--replica", metavar="HOST")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--allow-other-member", action="store_true")
    p.add_argument("--recovery", metavar="KIT", help="the source's recovery kit (`keys export`)")
    p.add_argument("--identity", metavar="KEY", help="an admin's SSH private key, to open the kit")
    p.add_argument("--json", action="store_true")
    p = command("drill", cmd_drill, "restore a sample of the latest archive on the source and verify it")
    p.add_argument("sources", nargs="*", metavar="SOURCE")
    p.add_argument("--json", action="store_true")
    p = command("keys", cmd_keys, "export a source's recovery kit, sealed for the member's admins")
    p.add_argument("action", choices=["export"])
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true")
    p = command("ledger", cmd_ledger, "per member: capacity lent, used by others, used elsewhere by its own sources")
    p.add_argument("--json", action="store_true")
    p = command("sign", cmd_sign, "sign a member file as one of its admins (members/NAME.yml.sig)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", metavar="KEY", help="an admin's SSH private key (default: the ssh-agent)")
    p = command("accept-deletion", cmd_accept_deletion,
                "write the statement of a refused compaction for one of the member's admins to sign, or record "
                "it signed: the deletions it lists are then freed by the next compaction")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--replica", metavar="HOST")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--statement", metavar="FILE", help="write the statement to sign into FILE")
    given.add_argument("--signature", metavar="FILE",
                       help="the admin's signature of it (ssh-keygen -Y sign -n mutualbackup-accept-deletion)")
    p = command("ansible-inventory", cmd_ansible_inventory,
                "the nodes as an Ansible inventory (script protocol: --list, or --host NAME)")
    p.add_argument("--list", action="store_true", dest="list_all")
    p.add_argument("--host", metavar="NAME")
    p = command("doctor", cmd_doctor, "check each node: reachable, host key, versions, clock, free space on hosts")
    p.add_argument("nodes", nargs="*", metavar="NODE")
    p.add_argument("--json", action="store_true")
    return parser


def setup_logging(verbose: bool = False, log_format: str = "text") -> None:
    """Plain lines under systemd (no colours, no timestamps: the journal adds them); with ``json``, one JSON
    object a line (time, level, event, source, target, result, duration, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(log_format))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("paramiko").setLevel(logging.WARNING)


def log_formatter(log_format: str = "text", journal: bool | None = None) -> logging.Formatter:
    """How the command's log lines look on its stderr: JSON objects, plain lines when stderr is the journal's
    (``journal``; by default when ``JOURNAL_STREAM`` says so), else with their time. A run handed to the daemon
    has its job's lines formatted by this too (mutualbackup/handoff/server.py)."""
    if log_format == "json":
        return JsonLines()
    if journal if journal is not None else os.environ.get("JOURNAL_STREAM"):
        return logging.Formatter("%(levelname)s %(message)s")
    return logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")


class JsonLines(logging.Formatter):
    """One JSON object per record: what a log pipeline indexes without parsing sentences."""

    FIELDS = ("source", "target", "result", "duration", "error")

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                    timespec="milliseconds"),
                "level": record.levelname.lower(), "event": getattr(record, "event", None) or record.name,
                "message": record.getMessage()}
        line.update({key: getattr(record, key) for key in self.FIELDS if getattr(record, key, None) is not None})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(line, ensure_ascii=False)


# --- loading ------------------------------------------------------------------


def inventory_dir(args: argparse.Namespace) -> str:
    return getattr(args, "inventory", None) or os.environ.get("MUTUALBACKUP_INVENTORY") or "inventory"


def load(args: argparse.Namespace) -> Federation:
    directory = inventory_dir(args)
    if not os.path.isdir(directory):
        raise UsageError(f"no inventory directory at {directory!r}: pass --inventory DIR or set MUTUALBACKUP_INVENTORY")
    return load_inventory(directory)


def open_context(args: argparse.Namespace, federation: Federation | None = None,
                 connector: Connector | None = None) -> Context:
    """Inventory + state + SSH connector. A source the inventory cannot place (any more) fails nothing here:
    it keeps the replicas it has, and the commands that place (plan, apply, status) report it."""
    from mutualbackup.context import Context, ssh_connector
    from mutualbackup.state.history import History

    federation = federation or load(args)
    state = getattr(args, "state", None) or federation.coordinator.state
    return Context(federation, History(state), connector or ssh_connector(federation))


def report_unplaceable(ctx: Context) -> bool:
    """Each source that cannot get all its replicas, on stderr (it keeps those it has); whether there is one."""
    for problem in ctx.placement.problems:
        print(f"warning: {problem}; it keeps the replicas it has", file=sys.stderr)
    return bool(ctx.placement.problems)


# --- commands -----------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from mutualbackup.context import require_placeable
    from mutualbackup.inventory.signatures import member_signature_problems
    from mutualbackup.plan.placement import place

    federation = load(args)
    unsigned = member_signature_problems(federation)
    try:
        placement = place(federation)
        require_placeable(federation, placement)
    except InventoryError as exc:
        raise InventoryError(unsigned + list(exc.problems)) from None
    if unsigned:
        raise InventoryError(unsigned)
    print(
        f"{federation.directory}: ok — {len(federation.members)} members, {len(federation.sources())} sources, "
        f"{len(federation.hosts())} hosts, {len(placement.pairs())} replicas"
    )
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from mutualbackup.inventory.signatures import SignatureError, agent_keys, fingerprint, sign

    admins = _admins_of(args.file)
    if args.key:
        key, agent_key = args.key, None
        public = _public_of(args.key)
    else:
        held = [k for k in agent_keys() if k in admins]
        if not held:
            raise UsageError(f"the ssh-agent holds no key of {args.file}'s admins; add one (ssh-add) or give --key KEY")
        key, agent_key, public = None, held[0], held[0]
    try:
        target = sign(args.file, key, agent_key)
    except (SignatureError, OSError) as exc:
        raise OperationFailed(f"cannot sign {args.file}: {exc}") from None
    signer = admins.get(public or "", None)
    print(f"wrote {target}: signed by {signer or 'a key that is not one of its admins'} ({fingerprint(public)})"
          if public else f"wrote {target}")
    if public and signer is None:
        print(f"warning: {args.file} lists no admin with this key: `mutualbackup check` and its nodes will refuse it",
              file=sys.stderr)
        return 1
    return 0


def cmd_accept_deletion(args: argparse.Namespace) -> int:
    from mutualbackup.jobs.acceptance import NAMESPACE, accept, refusal_of

    ctx = open_context(args)
    source = ctx.source(args.source)
    if args.replica is not None and args.replica not in ctx.replicas_of(source.name):
        raise UsageError(f"{args.replica} holds no replica of {source.name} (its replicas: "
                         f"{', '.join(ctx.replicas_of(source.name)) or 'none'})")
    refusal = refusal_of(ctx, source, args.replica)
    if args.statement:
        try:
            with open(args.statement, "w", encoding="utf-8") as handle:
                handle.write(refusal.statement(ctx.federation.name))
        except OSError as exc:
            raise OperationFailed(f"cannot write {args.statement}: {exc.strerror}") from None
        print(refusal.statement(ctx.federation.name), end="")
        print(f"\nwrote {args.statement}. One of {source.member}'s admins reads it and, on their own machine, signs "
              f"it:\n  ssh-keygen -Y sign -n {NAMESPACE} -f ~/.ssh/id_ed25519 {os.path.basename(args.statement)}\n"
              f"then: mutualbackup accept-deletion {source.name} --replica {refusal.host} "
              f"--signature {args.statement}.sig")
        return 0
    try:
        with open(args.signature, "rb") as handle:
            signature = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read {args.signature}: {exc.strerror}") from None
    signer = accept(ctx, refusal, signature)
    print(f"accepted by {signer}: the next compaction of {refusal.source} on {refusal.host} frees what the statement "
          "lists for good; anything deleted beyond it is refused again")
    return 0


def _admins_of(path: str) -> dict[str, str]:
    """``TYPE BASE64`` → admin name, from the member file (read as YAML, no more)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    admins = document.get("admins") if isinstance(document, dict) else None
    return {" ".join(str(a.get("key", "")).split()[:2]): str(a.get("name")) for a in admins or [] if isinstance(a, dict)}


def _public_of(key: str) -> str | None:
    """The public key (``TYPE BASE64``) of a private key file (its .pub, else asked of ssh-keygen)."""
    try:
        with open(key + ".pub", encoding="ascii") as handle:
            return " ".join(handle.read().split()[:2])
    except OSError:
        done = subprocess.run(["ssh-keygen", "-y", "-f", key], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return " ".join(done.stdout.split()[:2]) if done.returncode == 0 else None


def cmd_plan(args: argparse.Namespace) -> int:
    from mutualbackup.plan.placement import diff
    from mutualbackup.report.text import print_moves, print_plan

    ctx = open_context(args)
    recorded = ctx.history.placement()
    changes = diff(recorded, ctx.placement.replicas)
    if args.json:
        print(json.dumps({
            "replicas": {s: list(h) for s, h in sorted(ctx.placement.replicas.items())},
            "used_bytes": ctx.placement.used,
            "changes": [{"change": c.kind, "source": c.source, "target": c.target, "previous": c.previous or None} for c in changes],
            "unplaceable": [{"source": p.source, "problem": str(p)} for p in ctx.placement.problems],
            "moves": [{k: m[k] for k in ("source", "old", "new", "reason", "started")} for m in ctx.history.moves()],
            "orphans": [{"source": o["source"], "host": o["host"], "bytes": o["bytes"]} for o in ctx.history.orphans()],
        }, indent=2))
        return 1 if report_unplaceable(ctx) else 0
    print_plan(ctx.federation, ctx.placement, changes)
    print_moves(ctx.history.moves(), ctx.history.orphans())
    return 1 if report_unplaceable(ctx) else 0


def cmd_apply(args: argparse.Namespace) -> int:
    from mutualbackup.jobs.provision import apply
    from mutualbackup.terminal import showing

    ctx = open_context(args)
    steps = step_progress()
    with showing(steps):
        report = apply(ctx, on_step=steps)
    for line in report.changes:
        print(line)
    for line in report.notes:
        print(f"note: {line}")
    for line in report.failures:
        print(f"FAILED {line}", file=sys.stderr)
    if not report.changes and not report.failures:
        print("nothing to change: the world matches the plan")
    unplaceable = report_unplaceable(ctx)
    return 1 if report.failures or unplaceable else 0


def cmd_run(args: argparse.Namespace) -> int:
    federation = load(args)
    state = getattr(args, "state", None) or federation.coordinator.state
    hinted, handoff = getattr(args, "hinted", None), getattr(args, "handoff", None)
    if hinted is not None:
        hinted.keep_state(state)  # the next run of this command line asks that directory's daemon first
    if handoff is not None:
        from mutualbackup.handoff import SOCKET

        if hinted is not None and os.path.exists(os.path.join(state, SOCKET)):
            hinted.close()  # a daemon may well run it: no session left waiting on the source meanwhile
        handed = handoff(state)  # a daemon of that state runs it (mutualbackup/handoff), when one does
        if handed is not None:
            return handed
    connector, early = _started_early(federation, args.sources[0] if args.sources else None,
                                      getattr(args, "hinted", None))
    ctx = open_context(args, federation, connector)
    if early is not None:
        ctx.start(federation.node(early.node_name), early)
    try:
        return _run(args, ctx)
    finally:
        ctx.close_started()  # when no job used it (each job closes its own connection)


def _run(args: argparse.Namespace, ctx: Context) -> int:
    from mutualbackup.jobs.foreground import back_up_now, exit_code

    outcomes = back_up_now(ctx, list(args.sources), args.replica, TerminalReport(args.json))
    if args.json:
        print(json.dumps([o.__dict__ for o in outcomes if o is not None], indent=2))
    return exit_code(outcomes)


class TerminalReport:
    """:class:`mutualbackup.jobs.foreground.Report` on this command's own terminal."""

    def __init__(self, json_out: bool) -> None:
        self.json = json_out

    def note(self, text: str) -> None:
        print(text, file=sys.stderr)

    @contextlib.contextmanager
    def backing_up(self, source: str, target: str):  # noqa: ANN201
        from mutualbackup.terminal import backup_progress, showing

        progress = backup_progress(source, target)
        with showing(progress):
            yield progress

    def outcome(self, outcome) -> None:  # noqa: ANN001
        from mutualbackup.report.text import print_backup

        if not self.json:
            print_backup(outcome)


def _started_early(federation: Federation, first: str | None,
                   hinted: Hinted | None = None) -> tuple[Connector, Transport | None]:
    """The SSH connector, and a transport to the first source named, connected and its program already
    starting, before anything else is read or imported: the node starts (about 0.1 s: sshd, sudo, Python)
    while this process reads its state and prepares the request (:meth:`Context.start`). That transport is the
    one ``hinted`` started before the command line was even parsed when the inventory names its very endpoint
    (remote/hints.py); else its TCP connection is opened before paramiko is imported, so that sshd's own start
    overlaps that import. A name that is no source is left to :meth:`Context.source` to refuse; a failed
    connection is raised by the job's request."""
    try:
        node = federation.node(first) if first else None
    except KeyError:
        node = None
    if hinted is not None and node is not None and node.is_source:
        from mutualbackup.context import coordinator_key, ssh_connector

        taken = hinted.take(node, coordinator_key(federation))
        if taken is not None:
            return ssh_connector(federation), taken
    opened: socket.socket | OSError | None = None
    if node is not None and node.is_source:
        from mutualbackup.remote.sockets import CONNECT_TIMEOUT, open_socket

        try:
            opened = open_socket(node.address, node.port, CONNECT_TIMEOUT)
        except OSError as error:
            opened = error
    from mutualbackup.context import coordinator_key, ssh_connector

    connector = ssh_connector(federation)
    if node is None or not node.is_source:
        return connector, None
    from mutualbackup.remote.ssh import SSHTransport

    transport = SSHTransport(node, coordinator_key(federation), opened=opened)
    transport.start("backup")  # here, before the rest is imported (a thread would share this process's one core
    # with it); the node starts the backup's borg on that word (node/preload.py)
    return connector, transport


def step_progress():  # noqa: ANN201 - TerminalProgress | None
    """Which step a long command is at, and for how long it has run, on an operator's terminal (else None)."""
    from mutualbackup.terminal import progress_line

    return progress_line(lambda text, seconds: f"{text}  ({seconds:.0f} s)", every=0.0)


def cmd_status(args: argparse.Namespace) -> int:
    from mutualbackup.report.text import print_moves, print_status
    from mutualbackup.report.status import compute_status

    ctx = open_context(args)
    now = time.time()
    rows = compute_status(ctx.federation, ctx.placement.replicas, ctx.history, now)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        print_status(rows, now)
        print_moves(ctx.history.moves(), ())
    failed_drill = any(r.drill_state == "failed" for r in rows)
    unplaceable = report_unplaceable(ctx)
    refused = any(r.compaction_refused for r in rows)
    return 0 if rows and all(r.state == "ok" for r in rows) and not (failed_drill or unplaceable or refused) else 1


def cmd_archives(args: argparse.Namespace) -> int:
    from mutualbackup.restore.replicas import list_archives

    ctx = open_context(args)
    source = ctx.source(args.source)
    host, archives = list_archives(ctx, source, args.replica)
    if args.json:
        print(json.dumps({"source": source.name, "replica": host.name,
                          "archives": [{"name": a.name, "time": a.time.isoformat(), "id": a.id} for a in archives]}, indent=2))
    else:
        print(f"{source.name} on {host.name}: {len(archives)} archive(s)")
        for a in archives:
            print(f"  {a.name}  {a.time:%Y-%m-%d %H:%M:%S} UTC")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from mutualbackup.report.text import print_restore
    from mutualbackup.restore.extract import restore
    from mutualbackup.restore.recovery_file import open_kit
    from mutualbackup.terminal import progress_line, requested_by, showing

    node_name, sep, directory = args.to.partition(":")
    if not sep or not node_name or not directory:
        raise UsageError(f"--to takes NODE:DIR (e.g. coopcycle/web1:/srv/restore), got {args.to!r}")
    if args.recovery and not args.identity:
        raise UsageError("--recovery KIT needs --identity KEY: the SSH private key of one of the member's admins, "
                         "who alone can open the kit")
    recovery = open_kit(args.recovery, args.identity) if args.recovery else None
    ctx = open_context(args)
    destination = ctx.node(node_name)
    if args.source in {n.name for n in ctx.federation.nodes()}:
        source = ctx.source(args.source)
    elif recovery is not None:
        source = args.source  # gone from the inventory: the recovery file says where its backups are
    else:
        raise UsageError(f"{args.source} is not in the inventory; to restore a node that is gone, "
                         "use --recovery KIT --identity KEY (the kit made by `mutualbackup keys export`, opened with "
                         "an admin's SSH key)")
    progress = progress_line()
    with showing(progress):
        result = restore(ctx, source, destination, directory, archive=args.archive, paths=args.path,
                         replica=args.replica, dry_run=args.dry_run, force=args.force,
                         allow_other_member=args.allow_other_member, recovery=recovery,
                         requested_by=requested_by(), on_progress=progress)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_restore(result)
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    from mutualbackup.report.text import print_drills
    from mutualbackup.jobs.drill import run_drill
    from mutualbackup.terminal import showing

    ctx = open_context(args)
    sources = [ctx.source(name) for name in args.sources] if args.sources else list(ctx.federation.sources())
    steps = step_progress()
    outcomes = []
    with showing(steps):
        for number, source in enumerate(sources, 1):
            if steps is not None:
                steps(f"drill {number} of {len(sources)}: {source.name}")
            outcomes.append(run_drill(ctx, source))
    if args.json:
        print(json.dumps([o.__dict__ for o in outcomes], indent=2))
    else:
        print_drills(outcomes)
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def cmd_keys(args: argparse.Namespace) -> int:
    from mutualbackup.restore.recovery_file import WARNING, export_keys

    ctx = open_context(args)
    source = ctx.source(args.source)
    kit = export_keys(ctx, source, args.out)
    print(WARNING.format(out=args.out, source=source.name, admins=", ".join(kit.admins)), file=sys.stderr)
    if args.json:
        print(json.dumps(kit.to_json(), indent=2))
    else:
        print(f"wrote {args.out} (mode 0600): the recovery kit of {source.name} ({len(kit.repositories)} repository "
              f"key(s) and the passphrase), sealed for {', '.join(kit.admins)}")
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from mutualbackup.daemon import inventory_stamp
    from mutualbackup.service import run_daemon

    read_at = inventory_stamp(inventory_dir(args))  # before it is read: an edit meanwhile is read at the first tick
    federation = load(args)
    return run_daemon(args, federation, read_at)


def cmd_verify(args: argparse.Namespace) -> int:
    from mutualbackup.report.text import print_verify
    from mutualbackup.jobs.maintenance import verify
    from mutualbackup.terminal import showing

    ctx = open_context(args)
    sources = [ctx.source(name) for name in args.sources] if args.sources else list(ctx.federation.sources())
    steps = step_progress()
    with showing(steps):
        outcomes = verify(ctx, sources, on_step=steps)
    return print_verify(outcomes)


def cmd_ansible_inventory(args: argparse.Namespace) -> int:
    from mutualbackup.report.ansible import ansible_inventory, host_name, host_vars

    federation = load(args)
    if args.host:
        found = [n for n in federation.nodes() if host_name(n) == args.host]
        print(json.dumps(host_vars(federation, found[0]) if found else {}, indent=2))
        return 0
    print(json.dumps(ansible_inventory(federation), indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mutualbackup.report.text import print_doctor
    from mutualbackup.jobs.doctor import doctor

    ctx = open_context(args)
    nodes = [ctx.node(name) for name in args.nodes] if args.nodes else list(ctx.federation.nodes())
    checkups = doctor(ctx, nodes)
    if args.json:
        print(json.dumps([c.to_json() for c in checkups], indent=2))
    else:
        print_doctor(checkups)
    return 0 if all(c.ok for c in checkups) else 1


def cmd_ledger(args: argparse.Namespace) -> int:
    from mutualbackup.report.text import print_ledger
    from mutualbackup.report.metrics import read_ledger

    ctx = open_context(args)
    ledger = read_ledger(ctx.history, ctx.federation)
    if args.json:
        print(json.dumps(ledger.to_json(), indent=2))
        return 0
    print_ledger(ledger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
