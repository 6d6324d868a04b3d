"""What ``pip install`` of the product carries, and what its programs import before they do their work."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_product_and_no_lab_code(tmp_path: Path):
    made_build = not (REPO / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                       check=True, capture_output=True, cwd=tmp_path)
    finally:
        if made_build:  # pip builds in the source tree: leave it as it was
            shutil.rmtree(REPO / "build", ignore_errors=True)
    [wheel] = tmp_path.glob("mutualbackup-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if n.endswith(".py")]
    assert "mutualbackup/cli.py" in code and "mutualbackup/jobs/backup.py" in code
    assert [n for n in code if not n.startswith("mutualbackup/")] == []
    shipped = {n.rsplit("/", 1)[-1] for n in names if n.startswith("mutualbackup/scripts/")}
    assert {p.name for p in (REPO / "mutualbackup" / "scripts").iterdir() if p.suffix in (".sh", ".py")} <= shipped
    texts = {n: zipfile.ZipFile(wheel).read(n).decode() for n in code}
    assert [n for n, text in texts.items() if "PermitRootLogin" in text or "/usr/sbin/sshd" in text] == []


def imported_by(code: str) -> set[str]:
    """The modules of ours a fresh interpreter holds after ``code``."""
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, check=True)
    return {name for name in done.stdout.split() if name.startswith(("mutualbackup", "paramiko", "yaml"))}


def test_the_command_line_imports_what_a_command_uses_when_it_uses_it():
    """`mutualbackup run` connects to its source before it reads the state or imports a job (cli.cmd_run): what
    every command loads first is the inventory's loader, nothing of the state, the jobs, the reports or SSH."""
    first = imported_by("import mutualbackup.cli")
    assert "mutualbackup.inventory.load" in first and "yaml" in first
    for later in ("mutualbackup.state.history", "mutualbackup.jobs.backup", "mutualbackup.report.text",
                  "mutualbackup.plan.placement", "mutualbackup.remote.ssh", "paramiko"):
        assert later not in first, later
    connecting = imported_by("import mutualbackup.cli\nfrom mutualbackup.context import ssh_connector")
    assert "mutualbackup.state.history" not in connecting and "mutualbackup.plan.placement" not in connecting


def test_a_run_handed_to_the_daemon_imports_nothing_of_the_coordinator_before_it_asks():
    """The command's side of a hand-off (mutualbackup/handoff/client.py) runs before anything else is imported:
    the daemon does the rest, so the command's cost is its Python and this."""
    asking = imported_by("from mutualbackup.handoff.client import hand_off")
    assert asking == {"mutualbackup", "mutualbackup.handoff", "mutualbackup.handoff.client"}, asking


def test_a_node_answering_a_backup_imports_no_repository_reading_nor_authorized_keys_code():
    """The borg layer's modules are imported when one of their names is first used."""
    loaded = imported_by("from mutualbackup import borg\nborg.create_argv")
    assert "mutualbackup.borg.argv" in loaded
    assert not {"mutualbackup.borg.repository_files", "mutualbackup.borg.authorized_keys", "mutualbackup.borg.output"} & loaded


def test_paramiko_is_imported_without_invoke_nor_importlib_metadata_and_says_its_real_version():
    done = subprocess.run([sys.executable, "-c", "from mutualbackup.remote.ssh import paramiko\nimport sys\n"
                           "print(paramiko.__version__, paramiko.Transport._CLIENT_ID, 'importlib.metadata' in sys.modules,"
                           " sys.modules['invoke'])"], capture_output=True, text=True, check=True)
    from importlib.metadata import version

    assert done.stdout.split() == [version("paramiko"), f"paramiko_{version('paramiko')}", "False", "None"]


def test_the_version_stand_in_goes_to_importlib_metadata_for_what_it_cannot_find_on_the_path():
    from importlib.metadata import PackageNotFoundError, version

    from mutualbackup.remote.paramiko_import import _installed_version

    assert _installed_version("pyyaml") == version("pyyaml")
    assert _installed_version("prometheus-client") == version("prometheus-client")
    real = sys.modules["importlib.metadata"]
    with pytest.raises(PackageNotFoundError):
        _installed_version("no-such-distribution-here")
    assert sys.modules["importlib.metadata"] is real
