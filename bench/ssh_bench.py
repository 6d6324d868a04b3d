"""SSH round trips: mutualbackup's transport against paramiko as it comes, side by side.

Starts one lab node (a real sshd on 127.0.0.1, joined: the coordinator's key runs only
``mutualbackup-node serve``), then REPEAT rounds, each timing once, in a rotating order:

- ``paramiko``: ``paramiko.SSHClient`` with its own socket (Nagle's algorithm on),
  connect, ask the node for ``hello``, read the answer, close;
- ``mutualbackup``: :class:`mutualbackup.remote.ssh.SSHTransport`, the same four steps;
- ``openssh``, for context: ``ssh -F /dev/null …`` with the same request on its stdin;

and, on a connection kept open, one more ``hello`` through each of the first two
(the cost of each later request of a job). Prints the medians and the ratios
paramiko / mutualbackup. Needs root and /usr/sbin/sshd, like the lab. Usage::

    .venv/bin/python bench/ssh_bench.py [--repeat 30] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import paramiko

from benchkit import add_lab_arguments, run_lab_bench
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab lives beside the product
from lab.nodes import Lab, LabNode
from mutualbackup.node.protocol import encode_request
from mutualbackup.remote.ssh import SSHTransport, parse_host_key

HELLO = encode_request("hello", {"borg": False}, "bench/node1")


def plain_client(node: LabNode, key: Path) -> paramiko.SSHClient:
    """paramiko's SSHClient as its documentation shows it, pinned to the node's key."""
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[127.0.0.1]:{node.port}", *_pinned(node))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=node.port, username=node.user, key_filename=str(key), look_for_keys=False,
                   allow_agent=False, timeout=10)
    return client


def _pinned(node: LabNode) -> tuple[str, paramiko.PKey]:
    pinned = parse_host_key(node.host_key)
    return pinned.get_name(), pinned


def plain_true(client: paramiko.SSHClient) -> None:
    stdin, stdout, _ = client.exec_command("mutualbackup-node serve hello")
    stdin.write(HELLO)
    stdin.channel.shutdown_write()
    if stdout.channel.recv_exit_status() != 0:
        raise SystemExit("hello failed through paramiko")


def ours_true(transport: SSHTransport) -> None:
    if not transport.request("hello", {"borg": False}, timeout=60).ok:
        raise SystemExit("hello failed through SSHTransport")


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run(repeat: int, root: Path, borg: str) -> dict[str, Any]:
    lab = Lab(root / "lab", borg=borg)
    with lab:
        node = lab.add_node("bench", "node1")
        lab.join_alone(node)
        lab.start(node)
        key = lab.coordinator_key
        known_hosts = root / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{node.port} {node.host_key}\n")

        def plain_once() -> None:
            client = plain_client(node, key)
            try:
                plain_true(client)
            finally:
                client.close()

        def ours_once() -> None:
            with SSHTransport(node.as_node(), str(key)) as transport:
                ours_true(transport)

        def openssh_once() -> None:
            subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(key),
                 "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-p", str(node.port),
                 f"{node.user}@127.0.0.1", "mutualbackup-node serve hello"],
                check=True, input=HELLO, capture_output=True,
            )

        kept_plain = plain_client(node, key)
        kept_ours = SSHTransport(node.as_node(), str(key))
        try:
            ours_true(kept_ours)
            ways: dict[str, Callable[[], None]] = {
                "paramiko": plain_once,
                "mutualbackup": ours_once,
                "openssh": openssh_once,
                "paramiko, kept connection": lambda: plain_true(kept_plain),
                "mutualbackup, kept connection": lambda: ours_true(kept_ours),
            }
            names = list(ways)
            for name in names:  # warm-up: imports, sshd's first connection
                ways[name]()
            times: dict[str, list[float]] = {name: [] for name in ways}
            for round_ in range(repeat):
                for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                    times[name].append(timed(ways[name]))
        finally:
            kept_plain.close()
            kept_ours.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "repeat": repeat,
        "median_ms": {name: round(v * 1000, 2) for name, v in medians.items()},
        "ratio_connect_and_command": round(medians["paramiko"] / medians["mutualbackup"], 2),
        "ratio_command_on_kept_connection": round(
            medians["paramiko, kept connection"] / medians["mutualbackup, kept connection"], 2),
    }


def report(result: dict[str, Any]) -> str:
    m = result["median_ms"]
    return "\n".join([
        f"one request (hello) to a lab node on 127.0.0.1, median of {result['repeat']} run(s) each:",
        "                              paramiko as it comes   mutualbackup   ratio",
        f"  connect + hello + close     {m['paramiko']:11.1f} ms   {m['mutualbackup']:9.1f} ms   "
        f"{result['ratio_connect_and_command']:5.2f}",
        f"  hello on a kept connection  {m['paramiko, kept connection']:11.1f} ms   "
        f"{m['mutualbackup, kept connection']:9.1f} ms   {result['ratio_command_on_kept_connection']:5.2f}",
        f"  (OpenSSH's ssh, connect + hello: {m['openssh']:.1f} ms)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    add_lab_arguments(parser)
    args = parser.parse_args(argv)
    return run_lab_bench(args, "ssh-bench-", lambda root: run(args.repeat, root, args.borg), report)


if __name__ == "__main__":
    sys.exit(main())
