"""A whole federation on loopback: an inventory rewritten to run on :mod:`lab` nodes.

Used by the demo (on ``inventory/``) and by the end-to-end tests (on inventories
they write). Every node of the inventory becomes a real sshd on 127.0.0.1; its
address, port, user, host key, workdir, authorized_keys and borg are replaced by
the lab's, every backup path ``P`` becomes ``NODE_DATA/P`` and every storage path
the node's own storage directory. The coordinator's key, state and metrics
address point into the lab too.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from lab.nodes import Lab, LabNode


@dataclass
class LabFederation:
    lab: Lab
    inventory: Path
    state: Path
    metrics_port: int
    nodes: dict[str, LabNode]

    def data_path(self, node: str, path: str) -> Path:
        """Where the absolute inventory path ``path`` of ``node`` lives in the lab."""
        return Path(str(self.nodes[node].data) + path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(
    lab: Lab,
    federation_doc: Mapping[str, Any],
    member_docs: Mapping[str, Mapping[str, Any]],
    root: Path,
    *,
    start: bool = True,
) -> LabFederation:
    """Write the rewritten inventory to ``root/inventory``, create and (optionally) start the nodes.

    ``member_docs`` maps a file stem (``coopcycle``) to the member document as loaded
    from YAML. Backup paths are created (empty) on their node so that a first run works.
    """
    inventory = root / "inventory"
    (inventory / "members").mkdir(parents=True, exist_ok=True)
    state = root / "state"
    port = free_port()
    fed = dict(federation_doc)
    coordinator = dict(fed.get("coordinator", {}))
    coordinator.update(ssh_key=str(lab.coordinator_key), state=str(state), metrics=f"127.0.0.1:{port}")
    fed["coordinator"] = coordinator
    _dump(inventory / "federation.yml", fed)

    nodes: dict[str, LabNode] = {}
    members: dict[str, dict[str, Any]] = {}
    for stem, member_doc in member_docs.items():
        member = dict(member_doc)
        names = [str(a.get("name")) for a in member.get("admins") or [{"name": "admin"}]]
        member["admins"] = [{"name": name, "key": lab.admin_public_key(member["member"], name)} for name in names]
        member["nodes"] = [_lab_node(lab, member["member"], dict(node_doc), nodes) for node_doc in member.get("nodes", [])]
        members[stem] = member
        _dump(inventory / "members" / f"{stem}.yml", member)
    for stem, member in members.items():  # each node joins as its member's admin would join it
        for node_doc in member["nodes"]:
            lab_node = nodes[f"{member['member']}/{node_doc['name']}"]
            node_doc["node_key"] = lab.join(lab_node, inventory / "members" / f"{stem}.yml")
        write_signed(lab, inventory / "members" / f"{stem}.yml", member)
    if start:
        lab.start_all()
    return LabFederation(lab=lab, inventory=inventory, state=state, metrics_port=port, nodes=nodes)


def _lab_node(lab: Lab, member: str, node_doc: dict[str, Any], nodes: dict[str, LabNode]) -> dict[str, Any]:
    """The member file's entry of a node, rewritten onto a new lab node (its data and storage directories)."""
    lab_node = lab.add_node(member, node_doc["name"])
    nodes[lab_node.name] = lab_node
    node_doc.update(lab_node.inventory_fields())
    if "backup" in node_doc:
        backup = dict(node_doc["backup"])
        backup["paths"] = [str(lab_node.data) + p for p in backup.get("paths", [])]
        backup["exclude"] = [str(lab_node.data) + p if p.startswith("/") else p for p in backup.get("exclude", [])]
        if not backup["exclude"]:
            del backup["exclude"]
        for path in backup["paths"]:
            os.makedirs(path, exist_ok=True)
        node_doc["backup"] = backup
    if "storage" in node_doc:
        storage = dict(node_doc["storage"])
        storage["path"] = str(lab_node.storage)
        node_doc["storage"] = storage
    return node_doc


def add_node(fed: LabFederation, stem: str, node_doc: dict[str, Any], *, replace: bool = False) -> LabNode:
    """A new node in the member file ``stem`` (every other node of it removed with ``replace``), joined and started."""
    path = fed.inventory / "members" / f"{stem}.yml"
    member = yaml.safe_load(path.read_text())
    entry = _lab_node(fed.lab, member["member"], dict(node_doc), fed.nodes)
    member["nodes"] = ([] if replace else list(member.get("nodes", []))) + [entry]
    _dump(path, member)
    node = fed.nodes[f"{member['member']}/{entry['name']}"]
    entry["node_key"] = fed.lab.join(node, path)
    write_signed(fed.lab, path, member)
    fed.lab.start(node)
    return node


def write_signed(lab: Lab, path: Path, member: Mapping[str, Any], admin: str | None = None) -> None:
    """Write a member file and sign it as one of its admins would (``admin``, else its first)."""
    from mutualbackup.inventory.signatures import sign

    _dump(path, member)
    name = admin or str((member.get("admins") or [{"name": "admin"}])[0]["name"])
    sign(str(path), str(lab.admin_key(str(member["member"]), name)))


def load_docs(directory: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The raw YAML documents of an inventory directory (federation, members by file stem)."""
    federation = yaml.safe_load((directory / "federation.yml").read_text())
    members = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((directory / "members").glob("*.yml"))}
    return federation, members


def _dump(path: Path, doc: Mapping[str, Any]) -> None:
    path.write_text(yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True))
