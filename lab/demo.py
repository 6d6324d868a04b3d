"""The demo federation: ``inventory/`` on real sshd nodes on loopback, end to end.

check → plan → apply → run → status → restore of one file into a new directory,
then the daemon with /metrics, a `run` it runs for the command, until Ctrl-C (or, with ``--once``, a scrape
and that run, and exit).
Every step is the real ``mutualbackup`` command, printed before it runs.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lab.nodes import Lab
from lab.federation import LabFederation, build, load_docs

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", default=str(REPO / "inventory"), help="federation layout to run (default: inventory/)")
    parser.add_argument("--root", default=str(REPO / ".lab" / "demo"), help="lab directory (wiped first)")
    parser.add_argument("--once", action="store_true", help="scrape /metrics once and stop instead of waiting for Ctrl-C")
    args = parser.parse_args(argv)

    root = Path(args.root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    borg = shutil.which("borg") or str(Path(sys.executable).parent / "borg")
    federation_doc, member_docs = load_docs(Path(args.inventory))
    with Lab(root / "lab", borg=borg) as lab:
        step(f"starting {sum(len(m.get('nodes', [])) for m in member_docs.values())} nodes as sshd daemons on 127.0.0.1, "
             "each joined by its member's admin: mutualbackup-node join --node MEMBER/NODE --member-file … "
             "--coordinator-key …")
        fed = build(lab, federation_doc, member_docs, root)
        for name, node in sorted(fed.nodes.items()):
            print(f"  {name:<20} 127.0.0.1:{node.port}  login {node.user}  node_key {node.node_key[:16]}…")
        seed_data(fed)
        for command in (["check"], ["plan"], ["apply"], ["apply"], ["run"], ["status"]):
            mb(fed, *command)
        source = sorted(n for n, node in fed.nodes.items() if _is_source(fed, n))[0]
        restored = root / "restored"
        original = _first_file(fed, source)
        archive_path = str(original)  # in the lab, inventory paths live under the node's data directory
        mb(fed, "archives", source)
        mb(fed, "restore", source, "--to", f"{source}:{restored}", "--path", archive_path)
        copy = Path(str(restored) + str(original))
        same = copy.exists() and filecmp.cmp(original, copy, shallow=False)
        print(f"  {copy}\n  byte-identical to the original: {'yes' if same else 'NO'}")
        if not same:
            return 1
        return run_daemon(fed, source, once=args.once)


def run_daemon(fed: LabFederation, source: str, *, once: bool) -> int:
    url = f"http://127.0.0.1:{fed.metrics_port}/metrics"
    step("mutualbackup daemon")
    daemon = subprocess.Popen(_mb_argv(fed, "daemon"), env=_env())
    try:
        body = _wait_for_metrics(url, daemon)
        healthy = [line for line in body.splitlines() if line.startswith("mutualbackup_replicas_healthy")]
        print("\n".join(f"  {line}" for line in healthy))
        _handed_to_the_daemon(fed, source, daemon)
        if once:
            return 0
        print(f"\nThe daemon is running. Metrics: {url}")
        print(f"Inventory: {fed.inventory}   state: {fed.state}")
        print(f"Try: MUTUALBACKUP_INVENTORY={fed.inventory} .venv/bin/mutualbackup status")
        print("Ctrl-C stops the daemon and the lab.")
        try:
            daemon.wait()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=90)


def _handed_to_the_daemon(fed: LabFederation, source: str, daemon: subprocess.Popen[bytes]) -> None:
    """``mutualbackup run`` while the daemon runs: the daemon runs the backup, the command prints its lines."""
    from mutualbackup.state.history import History

    history = History(fed.state)
    deadline = time.monotonic() + 120
    while history.runs(result="running") and time.monotonic() < deadline:  # its first jobs (drills) end first
        time.sleep(0.5)
    mb(fed, "run", source)
    [run] = history.runs(kind="backup", source=source, limit=1)
    who = "the daemon" if run.pid == daemon.pid else f"the command itself (process {run.pid})"
    print(f"  run by {who}: `mutualbackup run` hands its backups to the daemon of its state directory")


def seed_data(fed: LabFederation) -> None:
    """Some files on every source: text, a binary blob, awkward names."""
    for name, node in fed.nodes.items():
        if not _is_source(fed, name):
            continue
        for i, path in enumerate(sorted(_source_paths(fed, name))):
            p = Path(path)
            (p / "README.txt").write_text(f"{name}: demo data {i}\n")
            (p / "it's a \"quoted\" file — été.txt").write_text("names with spaces, quotes and accents survive\n")
            (p / "blob.bin").write_bytes(os.urandom(256 * 1024))


def mb(fed: LabFederation, *args: str) -> None:
    step("mutualbackup " + " ".join(_show(a) for a in args))
    result = subprocess.run(_mb_argv(fed, *args), env=_env(), text=True, capture_output=True)
    out = (result.stdout + result.stderr).rstrip()
    if out:
        print("\n".join(f"  {line}" for line in out.splitlines()))
    if result.returncode != 0 and args[0] != "status":
        raise SystemExit(f"demo: `mutualbackup {' '.join(args)}` exited {result.returncode}")


def step(text: str) -> None:
    print(f"\n\033[1m$ {text}\033[0m" if sys.stdout.isatty() else f"\n$ {text}", flush=True)


def _mb_argv(fed: LabFederation, *args: str) -> list[str]:
    return [sys.executable, "-m", "mutualbackup", "--inventory", str(fed.inventory), *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _show(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_/.:=" for c in arg) else repr(arg)


def _is_source(fed: LabFederation, name: str) -> bool:
    return bool(_source_paths(fed, name))


def _source_paths(fed: LabFederation, name: str) -> list[str]:
    import yaml

    member, slug = name.split("/")
    for path in (fed.inventory / "members").glob("*.yml"):
        doc = yaml.safe_load(path.read_text())
        if doc.get("member") != member:
            continue
        for node in doc.get("nodes", []):
            if node.get("name") == slug and "backup" in node:
                return list(node["backup"]["paths"])
    return []


def _first_file(fed: LabFederation, source: str) -> Path:
    for path in sorted(_source_paths(fed, source)):
        for candidate in sorted(Path(path).iterdir()):
            if candidate.is_file() and "quoted" in candidate.name:
                return candidate
    raise SystemExit(f"demo: no file to restore on {source}")


def _wait_for_metrics(url: str, daemon: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"demo: the daemon exited with {daemon.returncode}")
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
            with opener.open(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"demo: {url} did not answer within {timeout:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
