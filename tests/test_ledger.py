"""The ledger: a pure function of the inventory, the placement and measured sizes, and
`mutualbackup ledger [--json]`, which shows the numbers the metrics export."""

from __future__ import annotations

from pathlib import Path

import pytest

from mutualbackup.report.prometheus_text import render_text
from mutualbackup.state.history import History
from mutualbackup.inventory.load import load_inventory
from mutualbackup.report.ledger import HostUsage, MemberLedger, compute_ledger
from mutualbackup.report.metrics import FederationMetrics, MetricsSource
from mutualbackup.inventory.model import Backup, Coordinator, Federation, Member, Node, Storage
from mutualbackup.plan.placement import place

from labkit import mb, mb_json
from test_metrics import samples

GiB = 1024**3
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHf3I6KmEdPmDyJ0sTdsvYyXaSnmOd8L5N7IEHFL8KFq"
VALID = Path(__file__).parent / "inventories" / "three-members"


def node(member: str, slug: str, *, source: bool = False, host: int | None = None) -> Node:
    return Node(member=member, slug=slug, address="127.0.0.1", port=22, user="mb", host_key=KEY,
                backup=Backup(paths=("/srv",)) if source else None,
                storage=Storage(path="/srv/mb", capacity=host * GiB) if host else None)


def federation(*nodes: Node) -> Federation:
    members: dict[str, list[Node]] = {}
    for n in nodes:
        members.setdefault(n.member, []).append(n)
    return Federation("f", Coordinator("/k", "/s"), tuple(Member(m, "", m, tuple(ns)) for m, ns in members.items()))


# a lends two hosts and has a source; b lends one host and has a source; c only has a source.
FED = federation(
    node("a", "web", source=True, host=100), node("a", "st", host=50),
    node("b", "mail", source=True, host=200),
    node("c", "app", source=True),
)

CASES = [
    pytest.param(
        {}, {},
        {"a": (150, 0, 0), "b": (200, 0, 0), "c": (0, 0, 0)},
        {"a/web": 0, "a/st": 0, "b/mail": 0},
        id="nothing placed: only capacities",
    ),
    pytest.param(
        {"c/app": ("a/web", "b/mail"), "a/web": ("b/mail",), "b/mail": ("a/st",)},
        {("c/app", "a/web"): 3, ("c/app", "b/mail"): 4, ("a/web", "b/mail"): 5, ("b/mail", "a/st"): 7},
        {"a": (150, 3 + 7, 5), "b": (200, 4 + 5, 7), "c": (0, 0, 3 + 4)},
        {"a/web": 3, "a/st": 7, "b/mail": 9},
        id="each member lends what others keep on its hosts and consumes what it keeps elsewhere",
    ),
    pytest.param(
        {"c/app": ("a/web", "b/mail")},
        {("c/app", "a/web"): 3},
        {"a": (150, 3, 0), "b": (200, 0, 0), "c": (0, 0, 3)},
        {"a/web": 3, "a/st": 0, "b/mail": 0},
        id="a replica never measured counts 0 bytes",
    ),
    pytest.param(
        {"a/web": ("a/st",)},
        {("a/web", "a/st"): 11},
        {"a": (150, 0, 0), "b": (200, 0, 0), "c": (0, 0, 0)},
        {"a/web": 0, "a/st": 11, "b/mail": 0},
        id="a member's own repository on its own host fills the host but is neither lent nor consumed",
    ),
    pytest.param(
        {"gone/app": ("a/web",), "c/app": ("gone/st", "b/mail")},
        {("gone/app", "a/web"): 5, ("c/app", "gone/st"): 6, ("c/app", "b/mail"): 1},
        {"a": (150, 0, 0), "b": (200, 1, 0), "c": (0, 0, 1)},
        {"a/web": 0, "a/st": 0, "b/mail": 1},
        id="replicas of nodes gone from the inventory are ignored",
    ),
]


@pytest.mark.parametrize("placement, sizes, members, hosts", CASES)
def test_ledger(placement, sizes, members, hosts):
    ledger = compute_ledger(FED, placement, {pair: size * GiB for pair, size in sizes.items()})
    assert {m.member: (m.capacity_bytes // GiB, m.lent_bytes // GiB, m.consumed_bytes // GiB)
            for m in ledger.members} == members
    assert {h.host: h.used_bytes // GiB for h in ledger.hosts} == hosts


def test_ledger_lists_members_and_hosts_in_inventory_order_with_a_balance():
    ledger = compute_ledger(FED, {"c/app": ("a/web",)}, {("c/app", "a/web"): 3})
    assert [m.member for m in ledger.members] == ["a", "b", "c"]
    assert ledger.members[0] == MemberLedger("a", 150 * GiB, 3, 0) and ledger.members[0].balance_bytes == 3
    assert ledger.members[2].balance_bytes == -3
    assert ledger.hosts[0] == HostUsage("a/web", "a", 100 * GiB, 3, 1)
    assert ledger.to_json()["members"][2] == {"member": "c", "capacity_bytes": 0, "lent_bytes": 0,
                                              "consumed_bytes": 3, "balance_bytes": -3}


# --------------------------------------------------------------------------- the command
@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state for tests/inventories/three-members: its placement, and measured sizes."""
    fed = load_inventory(VALID)
    history = History(tmp_path / "state")
    replicas = place(fed).replicas
    history.set_placement(replicas)
    for index, (source, hosts) in enumerate(sorted(replicas.items())):
        for position, host in enumerate(hosts):
            run = history.start_run("backup", source, host, started=1_750_000_000.0)
            history.finish_run(run, "success", ended=1_750_000_060.0, repository_bytes=(index + 1) * 10**9 + position)
    history.close()
    return tmp_path / "state"


def test_the_ledger_command_prints_the_numbers_of_the_metrics(state: Path):
    code, document = mb_json(VALID, "ledger", "--state", str(state))
    assert code == 0
    fed = load_inventory(VALID)
    history = History(state)
    text = render_text(FederationMetrics(MetricsSource(history, fed, placement=history.placement)).families()).decode()
    history.close()
    exported = samples(text)
    assert [m["member"] for m in document["members"]] == [m.name for m in fed.members]
    for m in document["members"]:
        assert exported[("mutualbackup_member_lent_bytes", (("member", m["member"]),))] == m["lent_bytes"]
        assert exported[("mutualbackup_member_consumed_bytes", (("member", m["member"]),))] == m["consumed_bytes"]
        assert m["capacity_bytes"] == sum(n.storage.capacity for n in fed.member(m["member"]).nodes if n.storage)
    for h in document["hosts"]:
        assert exported[("mutualbackup_storage_used_bytes", (("host", h["host"]), ("member", h["member"])))] == h["used_bytes"]
    assert sum(m["lent_bytes"] for m in document["members"]) == sum(m["consumed_bytes"] for m in document["members"]) > 0


def test_the_ledger_command_prints_one_aligned_line_per_member(state: Path):
    code, out, err = mb(VALID, "ledger", "--state", str(state))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["member", "capacity", "lent", "used", "by", "others", "used", "elsewhere", "balance"]
    assert [line.split()[0] for line in lines[1:]] == ["coopcycle", "framasoft", "libre-hosting"]
    assert len({len(line) for line in lines}) == 1, "columns are right-aligned to the same width"
    assert all(line.split()[-2][0] in "+-0" for line in lines[1:]), "a balance shows its sign"
