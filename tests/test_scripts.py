"""The programs a node runs on its own files (mutualbackup/scripts/), as programs: they parse as POSIX sh
(or Python), and each does what its parser expects on a real borg repository and real files."""

from __future__ import annotations

import os
import py_compile
import subprocess
from pathlib import Path

import pytest

from mutualbackup import borg, scripts
from mutualbackup.plan.drill_sample import inspect_argv, parse_inspection

HERE = Path(scripts.__file__).parent
SHELL = sorted(p.name for p in HERE.glob("*.sh"))


@pytest.mark.parametrize("name", SHELL)
def test_each_shell_program_parses_as_posix_sh(name: str) -> None:
    done = subprocess.run(["sh", "-n", str(HERE / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert scripts.text(name).startswith("#!/bin/sh\n# ")  # says what it does before it does it


def test_the_host_id_program_compiles_and_prints_borgs_host_id(tmp_path: Path) -> None:
    py_compile.compile(str(HERE / "host_id.py"), cfile=str(tmp_path / "x.pyc"), doraise=True)
    done = subprocess.run(["python3", "-c", scripts.text("host_id.py")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "@" in done.stdout and done.stdout.strip().rsplit("@", 1)[1].isdigit()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "repo"
    env = {**os.environ, "BORG_PASSPHRASE": "x", "BORG_BASE_DIR": str(path.parent / "base")}
    subprocess.run([borg_path, "init", "-e", "repokey-blake2", str(path)], check=True, env=env, capture_output=True)
    data = path.parent / "data"
    data.mkdir()
    (data / "a").write_bytes(os.urandom(5000))
    subprocess.run([borg_path, "create", f"{path}::one", str(data)], check=True, env=env, capture_output=True)
    return path


def test_repository_facts_and_transactions_read_a_real_repository(repository: Path, tmp_path: Path) -> None:
    facts = subprocess.run(borg.repository_facts_argv(str(repository)), capture_output=True, timeout=30)
    assert facts.returncode == 0
    parsed = borg.parse_repository_facts(facts.stdout)
    assert parsed.segments >= 1 and parsed.bytes > 5000 and parsed.last_write
    missing = subprocess.run(borg.repository_facts_argv(str(tmp_path / "nothing")), capture_output=True)
    (tmp_path / "empty").mkdir()
    not_borg = subprocess.run(borg.repository_facts_argv(str(tmp_path / "empty")), capture_output=True)
    assert (missing.returncode, not_borg.returncode) == (borg.REPOSITORY_MISSING, borg.REPOSITORY_NOT_BORG)
    log = subprocess.run(borg.transactions_argv(str(repository)), capture_output=True, timeout=30)
    assert log.returncode == 0 and log.stdout.split(b"\n", 1)[0].isdigit()  # the host's clock first


def test_the_lock_listing_names_the_hosts_id_first(repository: Path) -> None:
    listed = subprocess.run(borg.lock_listing_argv(str(repository)), capture_output=True, timeout=30)
    assert listed.returncode == 0
    host, holders = borg.parse_lock_listing(listed.stdout)
    assert "@" in host and holders == []


def test_the_drill_inspection_reports_both_copies_of_a_file(tmp_path: Path) -> None:
    live = tmp_path / "live.txt"
    live.write_text("hello\n")
    scratch = tmp_path / "scratch"
    (scratch / str(tmp_path).lstrip("/")).mkdir(parents=True)
    (scratch / str(live).lstrip("/")).write_text("hello\n")
    path = str(live).lstrip("/")
    done = subprocess.run(inspect_argv(str(scratch), [path, "nowhere/else"]), capture_output=True, timeout=30)
    extracted, current = parse_inspection(done.stdout, [path, "nowhere/else"])
    assert extracted[path].sha256 == current[path].sha256 and extracted[path].size == 6
    assert extracted["nowhere/else"] == current["nowhere/else"]  # both missing
