"""What ``pip install`` of the product carries: the product, and no lab machinery."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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
