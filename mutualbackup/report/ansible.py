"""The federation's nodes as an Ansible inventory (the script-inventory protocol: ``--list`` prints the
groups and ``_meta.hostvars``; ``--host NAME`` one host's variables), so that a two-line executable in the
federation's repository is an inventory, and one command prepares every node of a member:
``ansible-playbook -i <that script> playbooks/join.yml --limit coopcycle``.

Hosts are named ``NODE.MEMBER`` (slugs have no dot: the names are unique and readable). Groups: one per
member (its name, ``-`` written ``_`` as Ansible wants), ``mutualbackup_sources`` and ``mutualbackup_hosts``.
No ``ansible_user``: the admin who prepares a node logs in as themselves, never as the coordinator's login,
which only runs ``mutualbackup-node serve``.
"""

from __future__ import annotations

import os
from typing import Any

from mutualbackup.inventory.model import Federation, Node


def host_name(node: Node) -> str:
    return f"{node.slug}.{node.member}"


def group_name(member: str) -> str:
    return member.replace("-", "_")


def host_vars(federation: Federation, node: Node) -> dict[str, Any]:
    variables: dict[str, Any] = {
        "ansible_host": node.address, "ansible_port": node.port,
        "mutualbackup_node": node.name, "mutualbackup_user": node.user,
        "mutualbackup_member_file": os.path.abspath(os.path.join(federation.directory, "members",
                                                                 f"{node.member}.yml")),
    }
    if node.storage is not None:
        variables["mutualbackup_storage_path"] = node.storage.path
    pubkey = _coordinator_pubkey(federation)
    if pubkey:  # a host variable: it wins over the playbook's defaults (group_vars/all.yml)
        variables["mutualbackup_coordinator_pubkey"] = pubkey
    return variables


def _coordinator_pubkey(federation: Federation) -> str:
    """The coordinator's public key, when this machine has it (else the playbook asks for it with -e)."""
    try:
        with open(os.path.expanduser(federation.coordinator.ssh_key) + ".pub", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def ansible_inventory(federation: Federation) -> dict[str, Any]:
    """``--list``: every group with its hosts, and every host's variables under ``_meta``."""
    groups: dict[str, Any] = {"all": {"children": ["ungrouped"]}}
    hostvars: dict[str, Any] = {}
    for member in federation.members:
        groups[group_name(member.name)] = {"hosts": [host_name(n) for n in member.nodes]}
        groups["all"]["children"].append(group_name(member.name))
    groups["mutualbackup_sources"] = {"hosts": [host_name(n) for n in federation.sources()]}
    groups["mutualbackup_hosts"] = {"hosts": [host_name(n) for n in federation.hosts()]}
    groups["all"]["children"] += ["mutualbackup_sources", "mutualbackup_hosts"]
    for node in federation.nodes():
        hostvars[host_name(node)] = host_vars(federation, node)
    groups["_meta"] = {"hostvars": hostvars}
    return groups
