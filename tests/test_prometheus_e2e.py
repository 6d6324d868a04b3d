"""The monitoring proven against a real Prometheus.

One lab federation (three members, five nodes, real sshd and borg) gets a round of
backups; the real daemon serves its /metrics; a real Prometheus (Debian's
/usr/bin/prometheus) scrapes it every second with a copy of monitoring/alerts.yml
whose `for:` are shortened. Then every dashboard query must return data and every
rule must evaluate; finally a host is stopped and the degraded replica must show
up within one scrape, and its alert in Prometheus. The test that stops a host runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from lab import federation as labfed
from mutualbackup.inventory.load import load_inventory
from lab.nodes import Lab
from lab.federation import LabFederation, free_port

from labkit import AWKWARD_PATH, mb, three_members, wait_for
from tests.promql import dashboard_queries, dashboard_variables, rule_expressions

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PROMETHEUS = "/usr/bin/prometheus"
SHORT_FOR = "2s"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class World:
    fed: LabFederation
    lab: Lab
    prometheus: str  # base URL
    daemon: subprocess.Popen[bytes]


def get(url: str, timeout: float = 10.0) -> bytes:
    with OPENER.open(url, timeout=timeout) as response:
        return response.read()


def api(world: World, path: str, **params: str) -> dict[str, Any]:
    """GET /api/v1/PATH?params from Prometheus; the decoded JSON (errors come back as JSON too)."""
    url = f"{world.prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        return json.loads(get(url))
    except urllib.error.HTTPError as error:  # 400/422: a query that does not parse or evaluate
        return json.loads(error.read())


def query(world: World, expr: str) -> dict[str, Any]:
    return api(world, "query", query=expr)


def poll(what: str, check, timeout: float = 30.0, every: float = 0.2):
    """Call ``check`` until it returns something true; that value. Fails after ``timeout`` seconds."""
    return wait_for(check, seconds=timeout, what=what, step=every)


def scrape_daemon(fed: LabFederation) -> str:
    return get(f"http://127.0.0.1:{fed.metrics_port}/metrics").decode()


def shortened_rules(directory: Path) -> Path:
    """A copy of monitoring/alerts.yml whose every `for:` is SHORT_FOR."""
    document = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    path = directory / "alerts.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def start_prometheus(directory: Path, metrics_port: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    rules = shortened_rules(directory)
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": "mutualbackup", "scrape_interval": "1s", "scrape_timeout": "1s",
            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
        }],
    }))
    log = directory / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}", log


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM the process we started (by its PID), SIGKILL it if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def ready(url: str) -> bool:
    try:
        get(url, timeout=2)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, borg_path: str) -> Iterator[World]:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("lab tests need root and /usr/sbin/sshd")
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} is not installed (apt-get install prometheus)")
    root = tmp_path_factory.mktemp("prometheus-e2e")
    lab = Lab(root / "lab", borg=borg_path)
    fed_doc, members = three_members()
    fed = labfed.build(lab, fed_doc, members, root)
    for source, path in (("coopcycle/web1", "/etc"), ("coopcycle/web1", AWKWARD_PATH),
                         ("ouvaton/mail1", "/var/mail"), ("picasoft/app1", "/srv/app")):
        (fed.data_path(source, path) / "small.txt").write_text(f"{source} {path}\n")
    with lab:
        code, out, err = mb(fed, "apply")
        assert code == 0, out + err
        code, out, err = mb(fed, "run")
        assert code == 0, out + err
        daemon_log = root / "daemon.log"
        with open(daemon_log, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "mutualbackup.cli", "--inventory", str(fed.inventory), "daemon", "--tick", "3600"],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        prometheus = None
        try:
            poll("the daemon's /metrics", lambda: daemon.poll() is None and ready(
                f"http://127.0.0.1:{fed.metrics_port}/metrics") or _died(daemon, daemon_log), timeout=30)
            prometheus, url, prometheus_log = start_prometheus(root, fed.metrics_port)
            poll("Prometheus to be ready", lambda: ready(f"{url}/-/ready") or _died(prometheus, prometheus_log), timeout=60)
            world = World(fed, lab, url, daemon)
            # enough successful scrapes for increase() and predict_linear() windows
            poll("3 successful scrapes of the daemon", lambda: _values(
                query(world, 'sum_over_time(up{job="mutualbackup"}[1m]) >= 3')), timeout=60)
            yield world
        finally:
            if prometheus is not None:
                stop(prometheus)
            assert stop(daemon, timeout=90) == 0, daemon_log.read_text()[-2000:]


def _died(process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"{process.args[0]} exited {process.returncode}:\n{log.read_text()[-3000:]}")
    return False


def _values(response: dict[str, Any]) -> list[float]:
    assert response.get("status") == "success", response
    return [float(r["value"][1]) for r in response["data"]["result"]]


def _sources_and_hosts(fed: LabFederation) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """The placement, the members and the hosts of the lab federation."""
    placement = json.loads(mb(fed, "plan", "--json")[1])["replicas"]
    federation = load_inventory(fed.inventory)
    return placement, sorted(m.name for m in federation.members), sorted(h.name for h in federation.hosts())


# --------------------------------------------------------------------------- dashboards
def test_the_dashboard_variables_list_every_member_and_host(world: World):
    _placement, members, hosts = _sources_and_hosts(world.fed)
    expected = {"member": members, "host": hosts}
    for path in sorted((MONITORING / "dashboards").glob("*.json")):
        for variable, definition in dashboard_variables(path).items():
            metric, label = definition.removeprefix("label_values(").removesuffix(")").split(", ")
            response = api(world, f"label/{label}/values", **{"match[]": metric})
            assert response["status"] == "success", response
            assert sorted(response["data"]) == expected[variable], f"{path.name} ${variable}"


def test_every_dashboard_query_parses_and_returns_data(world: World):
    _placement, members, hosts = _sources_and_hosts(world.fed)
    runs: list[tuple[str, dict[str, str]]] = [("federation-overview.json", {})]
    runs += [("member.json", {"member": member}) for member in members]
    runs += [("host.json", {"host": host}) for host in hosts]
    problems, count = [], 0
    for name, variables in runs:
        for title, expr in dashboard_queries(MONITORING / "dashboards" / name, variables):
            count += 1
            response = query(world, expr)
            if response.get("status") != "success":
                problems.append(f"{name} {variables} / {title}: {response.get('error')}\n    {expr}")
            elif not response["data"]["result"]:
                problems.append(f"{name} {variables} / {title}: no data\n    {expr}")
    assert problems == [], "\n".join(problems)
    assert count > 100


def test_every_alert_rule_parses_and_evaluates_in_prometheus(world: World):
    rules = rule_expressions(MONITORING / "alerts.yml")
    problems = []
    for name, expr in rules:
        response = query(world, expr)
        if response.get("status") != "success":
            problems.append(f"{name}: {response.get('error')}")
    assert problems == [], "\n".join(problems)
    loaded = poll("the rules to be evaluated", lambda: [
        rule for group in api(world, "rules")["data"]["groups"] for rule in group["rules"]
        if rule.get("lastEvaluation", "").startswith("20")] or None)
    assert len(loaded) == len(rules)
    assert [(r["name"], r["lastError"]) for r in loaded if r["health"] != "ok"] == []


def test_in_a_healthy_federation_no_alert_is_pending(world: World):
    assert _values(query(world, "sum(mutualbackup_replicas_healthy)")) == [6.0]
    assert [a["labels"] for a in api(world, "alerts")["data"]["alerts"]] == []


# --------------------------------------------------------------------------- secrets
def test_the_metrics_endpoint_exposes_no_passphrase_key_or_path(world: World):
    text = scrape_daemon(world.fed)
    secrets = []
    for node in world.fed.nodes.values():
        for name in ("passphrase", "id_ed25519", "identity"):
            path = node.state / name
            if path.exists():
                secrets.append(path.read_text().strip())
        secrets.append(node.host_key.split()[1])
    secrets.append(world.lab.coordinator_key.read_text().strip())
    assert len(secrets) > 8
    assert [s[:12] for s in secrets if s in text] == []
    assert str(world.lab.root) not in text and "/srv" not in text and "/etc" not in text
    assert "mutualbackup_replicas_healthy" in text


# --------------------------------------------------------------------------- a host goes down (last)
def test_a_stopped_host_degrades_its_replicas_within_one_scrape_and_the_alert_fires(world: World):
    fed = world.fed
    placement, _members, _hosts = _sources_and_hosts(fed)
    source, host = next((s, h) for s, targets in sorted(placement.items()) for h in targets if h.startswith("picasoft/"))
    selector = f'source="{source}"'
    assert _gauge(scrape_daemon(fed), "mutualbackup_replicas_healthy", source) == 2

    world.lab.stop(fed.nodes[host])
    code, out, err = mb(fed, "run", source, "--replica", host)
    assert code == 1, out + err
    assert f"{source} → {host}  FAILED" in err

    # the very next scrape of the daemon shows it
    assert _gauge(scrape_daemon(fed), "mutualbackup_replicas_healthy", source) == 1
    # ... and so does Prometheus, one scrape (1s) later
    started = time.monotonic()
    poll("Prometheus to see healthy < desired", lambda: query(
        world, f"mutualbackup_replicas_healthy{{{selector}}} < mutualbackup_replicas_desired{{{selector}}}")["data"]["result"],
        timeout=15)
    seen_after = time.monotonic() - started

    def degraded_alert() -> str | None:
        for alert in api(world, "alerts")["data"]["alerts"]:
            if alert["labels"]["alertname"] == "MutualbackupReplicasDegraded" and alert["labels"]["source"] == source:
                return alert["state"]
        return None

    first = poll("the ReplicasDegraded alert to be pending", degraded_alert, timeout=15)
    assert first in ("pending", "firing")
    assert poll("the ReplicasDegraded alert to fire", lambda: degraded_alert() == "firing", timeout=20)
    print(f"healthy < desired seen by Prometheus {seen_after:.1f}s after the failed run; alert {first}, then firing")


def _gauge(text: str, name: str, source: str) -> float:
    prefix = f'{name}{{source="{source}",'
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])
