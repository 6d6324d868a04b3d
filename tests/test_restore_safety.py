"""What a restore refuses before touching any node, and how it copes with a changed inventory.

Fast: a fake federation (tests/fake.py), no lab. ``coop0/src0`` has its replicas on
``coop1/store`` and ``coop2/store``; ``coop3`` holds none of them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import pytest

from fake import admin_identity_file, FakeClock, FakeWorld, make_federation
from mutualbackup import borg
from mutualbackup.restore import recovery_file
from mutualbackup.cli import main
from mutualbackup.context import Context
from mutualbackup.errors import OperationFailed, UsageError
from mutualbackup.state.history import History
from mutualbackup.restore.kit import FORMAT, RecoveryFile, RecoveryRepository
from mutualbackup.restore.recovery_file import export_keys, open_kit
from mutualbackup.inventory.model import Federation, Node
from mutualbackup.restore.extract import restore
from mutualbackup.restore.replicas import choose_replica, list_archives
from mutualbackup.remote.transport import Result

SOURCE = "coop0/src0"
REPLICAS = ("coop1/store", "coop2/store")
KEY_ID = "e4ab17b9008f422cea378131e97051073b96449e800405fe204f6181310071cb"
ATTACKER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIATTACKERATTACKERATTACKERATTACKERATTACKER x"


class Reached(Exception):
    """Raised by the connector: the restore got past every check and tried to reach a node."""


def without(federation: Federation, *names: str) -> Federation:
    """``federation`` minus the nodes ``names`` (``MEMBER/NODE``)."""
    members = tuple(
        dataclasses.replace(m, nodes=tuple(n for n in m.nodes if n.name not in names)) for m in federation.members
    )
    return dataclasses.replace(federation, members=members)


def changed(federation: Federation, name: str, **changes: object) -> Federation:
    """``federation`` with the node ``name`` changed so."""
    members = tuple(
        dataclasses.replace(m, nodes=tuple(dataclasses.replace(n, **changes) if n.name == name else n for n in m.nodes))
        for m in federation.members
    )
    return dataclasses.replace(federation, members=members)


def context(tmp_path: Path, federation: Federation | None = None, connector=None) -> Context:  # noqa: ANN001
    """coop0..coop3, ``SOURCE`` recorded on ``REPLICAS``; the connector records who was reached, then raises."""
    federation = federation or make_federation(4)
    history = History(tmp_path / "state")
    history.set_placement({SOURCE: REPLICAS}, now=0)
    reached: list[str] = []

    def refuse(node: Node):  # noqa: ANN202
        reached.append(node.name)
        raise Reached(node.name)

    ctx = Context(federation, history, connector or refuse)
    ctx.reached = reached  # type: ignore[attr-defined]
    return ctx


def recovery(paths: dict[str, str] | None = None, source: str = SOURCE) -> RecoveryFile:
    paths = paths if paths is not None else {h: f"/srv/mutualbackup/{source}" for h in REPLICAS}
    return RecoveryFile(
        source=source, federation="fake-federation", exported="2026-03-01T12:00:00Z", passphrase="s3cret",
        repositories=tuple(RecoveryRepository(h, p, "", KEY_ID, f"BORG_KEY {KEY_ID}\n") for h, p in paths.items()),
    )


# --- 1. the recovery file never chooses the repository path --------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/srv/mutualbackup/coop0/src0\n{ATTACKER}\n#",  # a second, unrestricted authorized_keys line
        "/srv/mutualbackup/coop3/src0",  # another member's repository
        "/srv/mutualbackup/coop0/src0/../../coop3/src0",
        "/srv/mutualbackup/coop0/src0/",
    ],
)
def test_a_recovery_file_path_other_than_the_inventorys_is_refused_before_any_node_is_reached(
    tmp_path: Path, path: str
) -> None:
    ctx = context(tmp_path)
    destination = ctx.node("coop0/store")
    with pytest.raises(UsageError) as error:
        restore(ctx, SOURCE, destination, "/restore", recovery=recovery({"coop1/store": path, "coop2/store": path}))
    assert error.value.exit_code == 2
    assert "never chooses the path" in str(error.value) and "/srv/mutualbackup/coop0/src0" in str(error.value)
    assert f"\n{ATTACKER}" not in str(error.value)  # quoted: the newline is escaped
    assert ctx.reached == []


def test_a_recovery_file_naming_a_node_that_is_not_a_host_is_refused(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    file = recovery({"coop3/src0": "/srv/mutualbackup/coop0/src0", "coop1/store": "/srv/mutualbackup/coop0/src0"})
    with pytest.raises(UsageError) as error:
        restore(ctx, SOURCE, ctx.node("coop0/store"), "/restore", recovery=file)
    assert "coop3/src0" in str(error.value) and "not a host" in str(error.value)
    assert ctx.reached == []


def test_with_a_recovery_file_the_repository_path_is_computed_from_the_inventory(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    source, host = ctx.node(SOURCE), ctx.node("coop1/store")
    assert recovery_file.repository_path(SOURCE, host) == borg.repository_path(source, host) == "/srv/mutualbackup/coop0/src0"
    assert recovery_file.usable_hosts(recovery(), ctx.federation) == (REPLICAS, ())
    with pytest.raises(Reached):  # every check passed: the restore goes on, to the destination
        restore(ctx, SOURCE, ctx.node("coop0/store"), "/restore", recovery=recovery())
    assert "coop0/store" in ctx.reached and set(ctx.reached) <= {"coop0/store", "coop1/store"}  # and its first host


def test_a_recovery_host_gone_from_the_inventory_is_skipped_and_none_left_is_refused(tmp_path: Path) -> None:
    ctx = context(tmp_path, without(make_federation(4), "coop1/store"))
    assert recovery_file.usable_hosts(recovery(), ctx.federation) == (("coop2/store",), ("coop1/store",))
    gone = context(tmp_path, without(make_federation(4), *REPLICAS))
    with pytest.raises(UsageError) as error:
        restore(gone, SOURCE, gone.node("coop0/store"), "/restore", recovery=recovery())
    assert "none of the hosts in the recovery file" in str(error.value) and gone.reached == []


# --- 3. a damaged recovery file on the command line: a message and exit 2, no traceback ------


@pytest.mark.parametrize(
    "content",
    [
        b"format: mutualbackup-recovery 1\nsource: coop0/src0\npassphrase: \xff\xfe\n",
        f"format: {FORMAT}\nsource: coop0/src0\npassphrase: p\nrepositories: 5\n".encode(),
        f"format: {FORMAT}\nsource: coop0/src0\npassphrase: p\nrepositories: [{{host: 5, path: 6, key: 7}}]\n".encode(),
    ],
    ids=["not UTF-8", "repositories: 5", "fields of the wrong type"],
)
def test_restore_with_a_damaged_recovery_file_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "safe.recovery"
    path.write_bytes(content)
    code = main(["--inventory", str(tmp_path / "absent"), "restore", SOURCE, "--to", "coop0/store:/r", "--recovery", str(path),
                 "--identity", str(tmp_path / "key")])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "Traceback" not in err


# --- 5. a replica host removed from the inventory since apply --------------------------------


def fake_context(tmp_path: Path, federation: Federation) -> tuple[Context, FakeWorld]:
    world = FakeWorld(federation, FakeClock(1_700_000_000))
    ctx = context(tmp_path, federation, connector=world.connect)
    return ctx, world


def test_a_recorded_replica_gone_from_the_inventory_is_skipped_with_a_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx, _ = fake_context(tmp_path, without(make_federation(4), "coop1/store"))
    with caplog.at_level(logging.WARNING):
        assert [h.name for h in choose_replica(ctx, ctx.node(SOURCE), None)] == ["coop2/store"]  # restore and drill
    assert "coop1/store is no longer a host in the inventory" in caplog.text
    host, archives = list_archives(ctx, ctx.node(SOURCE))  # archives
    assert host.name == "coop2/store" and archives == []
    with pytest.raises(UsageError) as error:
        choose_replica(ctx, ctx.node(SOURCE), "coop1/store")
    assert "no longer a host in the inventory" in str(error.value)


def test_a_recorded_replica_that_is_no_longer_a_host_is_skipped(tmp_path: Path) -> None:
    ctx, _ = fake_context(tmp_path, changed(make_federation(4), "coop1/store", storage=None))
    assert [h.name for h in choose_replica(ctx, SOURCE, None)] == ["coop2/store"]


def test_keys_export_uses_the_remaining_replicas(tmp_path: Path) -> None:
    ctx, world = fake_context(tmp_path, without(make_federation(4), "coop1/store"))

    def answer(node: Node, argv: Sequence[str], _world: FakeWorld) -> Result | None:
        if tuple(argv[:3]) == ("borg", "key", "export"):
            return Result(tuple(argv), 0, f"BORG_KEY {KEY_ID}\nhqlh\n".encode(), b"")
        return None

    world.script(answer)
    world.files[(SOURCE, "/home/fake/.mutualbackup/passphrase")] = b"s3cret"
    out = tmp_path / "safe.kit"
    summary = export_keys(ctx, ctx.node(SOURCE), str(out))
    assert summary.admins == ("admin",) and [r["host"] for r in summary.repositories] == ["coop2/store"]
    assert b"s3cret" not in out.read_bytes() and out.read_bytes().startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")
    opened = open_kit(str(out), str(admin_identity_file(tmp_path)))
    assert [r.host for r in opened.repositories] == ["coop2/store"] and opened.passphrase == "s3cret"


def test_when_no_recorded_replica_is_left_in_the_inventory_the_message_says_so(tmp_path: Path) -> None:
    ctx, _ = fake_context(tmp_path, without(make_federation(4), *REPLICAS))
    for attempt in (lambda: choose_replica(ctx, SOURCE, None), lambda: export_keys(ctx, ctx.node(SOURCE), str(tmp_path / "o"))):
        with pytest.raises(OperationFailed) as error:
            attempt()
        assert "none of the recorded replicas" in str(error.value)
    assert not (tmp_path / "o").exists()


# --- 6. another member's node: the passphrase unlocks the repository key for good ------------


@pytest.mark.parametrize("allow", [False, True])
def test_a_member_hosting_a_replica_of_the_source_never_gets_the_restore(tmp_path: Path, allow: bool) -> None:
    ctx = context(tmp_path)
    with pytest.raises(UsageError) as error:
        restore(ctx, ctx.node(SOURCE), ctx.node("coop1/src0"), "/restore", allow_other_member=allow)
    message = str(error.value)
    assert error.value.exit_code == 2 and "coop1 hosts a replica of coop0/src0 (coop1/store)" in message
    assert "decrypt every archive" in message and "rotating the passphrase does not undo it" in message
    assert "--allow-other-member does not lift this" in message
    assert ctx.reached == []


def test_a_member_holding_a_replica_only_in_the_recovery_file_or_the_plan_is_refused_too(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    file = recovery({"coop1/store": "/srv/mutualbackup/coop0/src0", "coop3/store": "/srv/mutualbackup/coop0/src0"})
    with pytest.raises(UsageError, match="coop3 hosts a replica"):
        restore(ctx, SOURCE, ctx.node("coop3/src0"), "/restore", allow_other_member=True, recovery=file)
    planned = context(tmp_path / "planned")
    planned.history.set_placement({SOURCE: ("coop1/store",)}, now=0)  # apply has not placed the second one yet
    [future] = set(planned.placement.replicas[SOURCE]) - {"coop1/store"}
    member = future.split("/")[0]
    with pytest.raises(UsageError, match=f"{member} hosts a replica"):
        restore(planned, planned.node(SOURCE), planned.node(f"{member}/src0"), "/restore", allow_other_member=True)
    assert ctx.reached == planned.reached == []


def test_without_the_flag_the_refusal_says_the_other_member_could_decrypt_everything_for_good(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    with pytest.raises(UsageError) as error:
        restore(ctx, ctx.node(SOURCE), ctx.node("coop3/src0"), "/restore")
    message = str(error.value)
    assert "--allow-other-member" in message and "plaintext" in message
    assert "coop3 could decrypt every archive of coop0/src0" in message
    assert "rotating the passphrase does not undo it" in message
    assert ctx.reached == []


def test_with_the_flag_a_member_holding_no_replica_gets_the_restore_and_a_plain_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = context(tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(Reached):
        restore(ctx, ctx.node(SOURCE), ctx.node("coop3/src0"), "/restore", allow_other_member=True, recovery=recovery())
    assert "coop3/src0" in ctx.reached and set(ctx.reached) <= {"coop3/src0", "coop1/store"}  # and its first host
    assert "coop3 could decrypt every archive of coop0/src0" in caplog.text
    assert "rotating the passphrase does not undo it" in caplog.text


def test_another_members_node_gets_a_restore_only_from_a_kit_and_the_refusal_says_what_to_bring(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    with pytest.raises(UsageError) as error:
        restore(ctx, ctx.node(SOURCE), ctx.node("coop3/src0"), "/restore", allow_other_member=True)
    message = str(error.value)
    assert "recovery kit" in message and "--recovery KIT --identity KEY" in message
    assert ctx.reached == []


def test_a_destination_that_refuses_before_its_key_is_what_the_operator_hears_even_when_the_source_is_down(
    tmp_path: Path,
) -> None:
    """The seal is asked at the restore's start; when the destination ends before it needs the passphrase (its
    target is not empty), its own refusal is the answer, not the seal's failure (which would send the operator
    to the recovery kit for nothing)."""
    from fake import FakeClock, FakeWorld

    federation = make_federation(4)
    world = FakeWorld(federation, FakeClock(1_000_000.0))
    ctx = context(tmp_path, federation, world.connect)
    world.unreachable.add(SOURCE)
    world.files[("coop0/store", "/restore/already-here")] = b"x"
    with pytest.raises(UsageError) as refused:
        restore(ctx, ctx.node(SOURCE), ctx.node("coop0/store"), "/restore")
    assert "not empty" in str(refused.value) and "recovery" not in str(refused.value)
    assert not [r for r in world.requests if r[1] == "grant"]  # no host line was asked for


def test_a_restore_onto_a_node_without_node_key_is_refused_before_any_node_is_reached(tmp_path: Path) -> None:
    import threading

    ctx = context(tmp_path, changed(make_federation(4), "coop0/store", node_key=None))
    with pytest.raises(UsageError, match="coop0/store has no node_key in the inventory"):
        restore(ctx, ctx.node(SOURCE), ctx.node("coop0/store"), "/restore")
    threading.Event().wait(0.2)  # a session started in the background would have reached its node by now
    assert ctx.reached == []
