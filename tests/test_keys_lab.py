"""The recovery kit and disaster recovery, end to end.

coopcycle/web1 is backed up onto ouvaton/mail1 and picasoft/store1; its member exports the
recovery kit (sealed on web1 for coopcycle's admins: the coordinator only holds ciphertext);
then web1 is destroyed (its sshd killed, its lab directory and keys deleted, its entry removed
from the inventory) and its data comes back onto a brand-new node, coopcycle/web9, from the kit
opened with an admin's key. Tests run in order.
"""

from __future__ import annotations

import configparser
import shutil
import sqlite3
import json
import stat
from pathlib import Path
from typing import Iterator

import pytest

import shutil as _shutil
import subprocess

from mutualbackup.restore.kit import parse
from mutualbackup.restore.recovery_file import open_kit
from lab import federation as labfed
from lab.federation import LabFederation

from labkit import mb, mb_json
from restorekit import (
    backed_up, AWKWARD_DIR, copy_tree, node_doc, restore_lines, restored, source, storage, tree_differences,
)

pytestmark = pytest.mark.lab

SOURCE = "coopcycle/web1"
HOSTS = ("ouvaton/mail1", "picasoft/store1")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[LabFederation]:
    yield from backed_up(
        tmp_path_factory.mktemp("keys"),
        borg_path,
        {
            "coopcycle": [node_doc("web1", backup=source(["/etc", AWKWARD_DIR]))],
            "ouvaton": [node_doc("mail1", storage=storage())],
            "picasoft": [node_doc("store1", storage=storage())],
        },
        source_name=SOURCE,
    )


@pytest.fixture(scope="module")
def safe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The member's offline safe, and a copy of web1's data taken before the disaster."""
    return tmp_path_factory.mktemp("safe")


def test_keys_export_writes_a_0600_kit_that_only_an_admins_key_opens(fed: LabFederation, safe: Path) -> None:
    out = safe / "coopcycle-web1.kit"
    code, summary = mb_json(fed, "keys", "export", SOURCE, "--out", str(out))
    assert code == 0, summary
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    sealed = out.read_text()
    passphrase = (Path(fed.nodes[SOURCE].state) / "passphrase").read_text().strip()
    assert sealed.startswith("-----BEGIN AGE ENCRYPTED FILE-----") and passphrase not in sealed
    assert summary["sealed_for"] == ["admin"] and passphrase not in json.dumps(summary)
    admin = fed.lab.admin_key("coopcycle")
    recovery = open_kit(str(out), str(admin))
    assert recovery.passphrase == passphrase and recovery.source == SOURCE
    assert sorted(r.host for r in recovery.repositories) == sorted(HOSTS)
    assert all(r.key.startswith(f"BORG_KEY {r.repository_id}\n") for r in recovery.repositories)
    assert passphrase not in repr(recovery)
    assert _shutil.which("age"), "Debian's age is missing: scripts/setup installs it"
    # the member's admin needs nothing of ours: age and their SSH key
    opened = subprocess.run(["age", "-d", "-i", str(admin), str(out)], capture_output=True, check=True)
    assert parse(opened.stdout.decode()) == recovery
    assert opened.stdout.decode().startswith("# ====") and "SECRET" in opened.stdout.decode()
    stranger = subprocess.run(["age", "-d", "-i", str(fed.lab.admin_key("ouvaton")), str(out)], capture_output=True)
    assert stranger.returncode != 0  # another member's admin cannot

    code, out_text, err = mb(fed, "keys", "export", SOURCE, "--out", str(out))
    assert code == 2 and "already exists" in err  # never overwritten
    code, out_text, err = mb(fed, "keys", "export", SOURCE, "--out", str(safe / "second"))
    assert code == 0 and "sealed for admin" in err


def test_after_the_source_is_destroyed_its_data_restores_onto_a_new_node_from_the_recovery_file(
    fed: LabFederation, safe: Path
) -> None:
    for path in ("/etc", AWKWARD_DIR):
        copy_tree(fed.data_path(SOURCE, path), safe / "before" / path.strip("/"))
    web1 = fed.nodes[SOURCE]

    # The disaster: web1 is gone, with its data, its key and its passphrase.
    fed.lab.kill(web1)
    shutil.rmtree(web1.dir)
    web9 = labfed.add_node(fed, "coopcycle", {"name": "web9"}, replace=True)

    target = Path(web9.dir) / "restored"
    code, out, err = mb(fed, "restore", SOURCE, "--to", f"coopcycle/web9:{target}")
    assert code == 2 and "--recovery" in err  # without the file: nothing to open the backups with

    code, out, err = mb(fed, "restore", SOURCE, "--to", f"coopcycle/web9:{target}", "--recovery",
                        str(safe / "coopcycle-web1.kit"))
    assert code == 2 and "--identity" in err  # a kit opens only with an admin's key
    code, summary = mb_json(
        fed, "restore", SOURCE, "--to", f"coopcycle/web9:{target}", "--recovery", str(safe / "coopcycle-web1.kit"),
        "--identity", str(fed.lab.admin_key("coopcycle")),
    )
    assert code == 0, summary
    assert summary["recovery"] is True and summary["replica"] in HOSTS
    for path in ("/etc", AWKWARD_DIR):
        original = fed.data_path(SOURCE, path)  # where web1 kept it: the archive's paths
        assert tree_differences(safe / "before" / path.strip("/"), restored(target, original)) == []
    assert restore_lines(fed) == []
    assert list(Path(web9.state).glob("restore-*")) == []


def test_a_repository_whose_key_was_damaged_is_opened_with_the_exported_key(fed: LabFederation, safe: Path) -> None:
    host = fed.nodes["picasoft/store1"]
    config_path = Path(host.storage) / "coopcycle" / "web1" / "config"
    config = configparser.ConfigParser()
    config.read(config_path)
    assert config.get("repository", "key").strip()
    config.set("repository", "key", "")
    with open(config_path, "w") as handle:
        config.write(handle)

    target = Path(fed.nodes["coopcycle/web9"].dir) / "from-store1"
    code, summary = mb_json(
        fed, "restore", SOURCE, "--to", f"coopcycle/web9:{target}", "--replica", "picasoft/store1",
        "--recovery", str(safe / "coopcycle-web1.kit"), "--identity", str(fed.lab.admin_key("coopcycle")),
        "--path", str(fed.data_path(SOURCE, "/etc")),
    )
    assert code == 0, summary
    original = fed.data_path(SOURCE, "/etc")
    assert tree_differences(safe / "before" / "etc", restored(target, original)) == []
    config.read(config_path)
    assert config.get("repository", "key").strip()  # imported back
    with sqlite3.connect(fed.state / "history.sqlite3") as db:
        details = [json.loads(d) for (d,) in db.execute("SELECT detail FROM runs WHERE kind = 'restore' AND result = 'success'")]
    assert all(d["recovery"] for d in details)
