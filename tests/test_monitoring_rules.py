"""monitoring/: alerting rules, their promtool unit tests, and the Grafana dashboards.

Everything is checked without starting a server: promtool parses and unit-tests
the rules, and parses every dashboard query by wrapping it in a recording rule.
Names are checked against the "Metrics" table of SPEC.md, kept here as a constant.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.promql import dashboard_queries, dashboard_variables, rule_expressions, substitute

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"
DASHBOARDS = MONITORING / "dashboards"
SPEC = ROOT.parent / "shared" / "SPEC.md"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The "Metrics" table of SPEC.md: metric name -> its labels (histogram series expanded).
_REPLICA = ("source", "target", "source_member", "target_member")
SPEC_METRICS: dict[str, tuple[str, ...]] = {
    "mutualbackup_last_success_timestamp_seconds": _REPLICA,
    "mutualbackup_last_attempt_timestamp_seconds": _REPLICA,
    "mutualbackup_backup_runs_total": _REPLICA + ("result",),
    "mutualbackup_backup_duration_seconds_bucket": ("source", "target", "le"),
    "mutualbackup_backup_duration_seconds_sum": ("source", "target"),
    "mutualbackup_backup_duration_seconds_count": ("source", "target"),
    "mutualbackup_archive_original_bytes": ("source", "target"),
    "mutualbackup_archive_compressed_bytes": ("source", "target"),
    "mutualbackup_archive_deduplicated_bytes": ("source", "target"),
    "mutualbackup_repository_size_bytes": _REPLICA,
    "mutualbackup_rpo_seconds": ("source",),
    "mutualbackup_replicas_desired": ("source", "source_member"),
    "mutualbackup_replicas_healthy": ("source", "source_member"),
    "mutualbackup_last_check_success_timestamp_seconds": ("source", "target"),
    "mutualbackup_last_drill_success_timestamp_seconds": ("source",),
    "mutualbackup_storage_capacity_bytes": ("host", "member"),
    "mutualbackup_storage_used_bytes": ("host", "member"),
    "mutualbackup_member_lent_bytes": ("member",),
    "mutualbackup_member_consumed_bytes": ("member",),
    "mutualbackup_jobs_running": ("host",),
    "mutualbackup_inventory_valid": (),
    "mutualbackup_backup_unreadable_files": ("source", "target"),
    "mutualbackup_compaction_blocked": ("source", "target"),
    "mutualbackup_host_last_contact_timestamp_seconds": ("host", "member"),
    "mutualbackup_sources_unplaceable": (),
    "mutualbackup_replica_moves_in_progress": (),
}
# Labels Prometheus adds to every scraped series, and its own `up` series.
TARGET_LABELS = ("job", "instance")
OTHER_METRICS = {"up": ()}
# Labels the rules add themselves (label_replace, absent()).
DERIVED_LABELS = {"source_member", "target_member", "job"}

# What the brief asks for, with the severity each one carries.
EXPECTED_ALERTS = {
    "MutualbackupBackupLate": {"page"},
    "MutualbackupBackupFailing": {"ticket"},
    "MutualbackupReplicasDegraded": {"ticket"},
    "MutualbackupHostAlmostFull": {"ticket"},
    "MutualbackupRepositoryCheckOverdue": {"ticket"},
    "MutualbackupRepositoryCheckFailing": {"ticket"},
    "MutualbackupRestoreDrillOverdue": {"ticket"},
    "MutualbackupCoordinatorDown": {"page"},
    "MutualbackupInventoryInvalid": {"ticket"},
    "MutualbackupSourcesUnplaceable": {"ticket"},
    "MutualbackupCompactionBlocked": {"page"},
    "MutualbackupHostUnreachable": {"ticket"},
}
EXPECTED_DASHBOARDS = {
    "federation-overview.json": ("mutualbackup-overview", {}),
    "member.json": ("mutualbackup-member", {"member": "label_values(mutualbackup_replicas_desired, source_member)"}),
    "host.json": ("mutualbackup-host", {"host": "label_values(mutualbackup_storage_capacity_bytes, host)"}),
}
# Values for the dashboards' own variables when their queries are parsed.
SAMPLE_VARIABLES = {"member": "coopcycle", "host": "zourit/store1"}


# ----------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (Debian ships promtool with it)")
    return path


def run_promtool(promtool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def all_queries() -> list[tuple[str, str, str]]:
    """(where, title, expr) of every dashboard query and every rule."""
    found = [(path.name, title, expr)
             for path in dashboard_files()
             for title, expr in dashboard_queries(path, SAMPLE_VARIABLES)]
    found += [(ALERTS.name, name, expr) for name, expr in rule_expressions(ALERTS)]
    return found


def walk(node, path=""):
    """Yield (path, key, value) for every key of every dict in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def metric_names(expr: str) -> set[str]:
    """mutualbackup_* names and selectors `name{...}` of a PromQL expression."""
    names = set(re.findall(r"\bmutualbackup_[A-Za-z0-9_]+", _STRING.sub('""', expr)))
    names |= set(re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\s*\{", expr))
    return names


def selector_labels(expr: str) -> list[tuple[str, str]]:
    """(metric, label) for every label matcher written in a `metric{...}` selector."""
    pairs = []
    for metric, body in re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", body):
            pairs.append((metric, label))
    return pairs


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring/group_left/group_right clauses."""
    found: set[str] = set()
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", expr):
        found |= {label.strip() for label in body.split(",") if label.strip()}
    return found


# ----------------------------------------------------------------- rules
def test_promtool_accepts_the_alerting_rules(promtool):
    result = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass(promtool):
    result = run_promtool(promtool, "test", "rules", str(ALERT_TESTS), cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_prometheus_config_and_its_rules_are_valid(promtool):
    result = run_promtool(promtool, "check", "config", str(MONITORING / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "mutualbackup"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9468"]
    assert job.get("scrape_interval", config["global"].get("scrape_interval")) == "30s"
    assert config["rule_files"] == ["alerts.yml"]


def test_every_expected_alert_exists_with_its_severity():
    rules = alert_rules()
    severities: dict[str, set[str]] = {}
    for rule in rules:
        severities.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    assert severities == EXPECTED_ALERTS
    assert {rule["name"] for rule in yaml.safe_load(ALERTS.read_text())["groups"]} == {"mutualbackup"}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_waits_and_tells_a_member_what_to_do(rule):
    assert re.fullmatch(r"\d+[smhd]", rule.get("for", "")), "every alert needs a for: duration"
    assert rule["labels"]["severity"] in {"page", "ticket"}
    summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
    assert summary.strip() and "\n" not in summary.strip()
    assert "What to do" in description
    assert not re.search(r"https?://", summary + description), "annotations must not need a link"


def test_rules_of_one_alert_differ_by_a_reason_label():
    seen: dict[tuple, str] = {}
    for rule in alert_rules():
        key = (rule["alert"], tuple(sorted(rule["labels"].items())))
        assert key not in seen, f"{rule['alert']}: two rules with the same labels would be one alert"
        seen[key] = rule["expr"]


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not():
    fired: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert set(EXPECTED_ALERTS) - fired == set(), "alerts never fired by a unit test"
    assert set(EXPECTED_ALERTS) - quiet == set(), "alerts never checked to stay quiet"


def test_every_rule_of_an_alert_fires_in_some_unit_test():
    """Alerts defined by several rules (label reason) have each rule fired."""
    wanted = {(rule["alert"], rule["labels"].get("reason")) for rule in alert_rules()}
    fired = set()
    for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                fired.add((case["alertname"], alert.get("exp_labels", {}).get("reason")))
    assert wanted - fired == set()


# ----------------------------------------------------------------- dashboards
def test_the_expected_dashboards_are_there():
    assert {path.name for path in dashboard_files()} == set(EXPECTED_DASHBOARDS)


@pytest.mark.parametrize("name", sorted(EXPECTED_DASHBOARDS))
def test_dashboard_is_tidy_json_with_a_stable_uid(name):
    text = (DASHBOARDS / name).read_text(encoding="utf-8")
    dashboard = json.loads(text)
    assert text == json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n", "keep JSON indented by 2"
    assert dashboard["uid"] == EXPECTED_DASHBOARDS[name][0]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["id"] is None, "a fixed id breaks import into another Grafana"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["title"] and panel.get("description"), f"panel {panel['id']} needs a title and a description"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])


@pytest.mark.parametrize("name", sorted(EXPECTED_DASHBOARDS))
def test_dashboard_uses_only_the_datasource_variable(name):
    dashboard = json.loads((DASHBOARDS / name).read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for path, key, value in walk(dashboard):
        if key == "datasource" and not path.endswith("templating.list[0]"):
            assert value == DATASOURCE, f"{name}{path}: hard-coded datasource {value!r}"
        if key == "uid" and path:
            assert value == "${datasource}", f"{name}{path}: hard-coded uid {value!r}"


@pytest.mark.parametrize("name", sorted(EXPECTED_DASHBOARDS))
def test_dashboard_variables_are_the_agreed_queries(name):
    dashboard = json.loads((DASHBOARDS / name).read_text())
    assert dashboard_variables(DASHBOARDS / name) == EXPECTED_DASHBOARDS[name][1]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE


# ----------------------------------------------------------------- names and labels
def test_every_metric_named_by_a_query_or_rule_is_in_the_spec():
    allowed = set(SPEC_METRICS) | set(OTHER_METRICS)
    problems = [f"{where} / {title}: {name}"
                for where, title, expr in all_queries()
                for name in metric_names(expr) - allowed]
    for path in dashboard_files():
        for variable, query in dashboard_variables(path).items():
            problems += [f"{path.name} / ${variable}: {name}" for name in metric_names(query) - allowed]
    for rule in alert_rules():
        for text in rule["annotations"].values():
            for query in re.findall(r'printf "((?:[^"\\]|\\.)*)"', text):
                problems += [f"alerts.yml / {rule['alert']} annotation: {name}"
                             for name in metric_names(query.replace('\\"', '"')) - allowed]
    assert problems == []


def test_every_label_matcher_names_a_label_its_metric_has():
    known = {**SPEC_METRICS, **OTHER_METRICS}
    problems = []
    for where, title, expr in all_queries():
        for metric, label in selector_labels(expr):
            if metric in known and label not in known[metric] + TARGET_LABELS:
                problems.append(f"{where} / {title}: {metric}{{{label}=...}}")
    assert problems == []


def test_every_grouping_label_is_a_label_of_some_metric():
    labels = {label for names in SPEC_METRICS.values() for label in names} | set(TARGET_LABELS)
    problems = [f"{where} / {title}: {label}"
                for where, title, expr in all_queries()
                for label in grouping_labels(expr) - labels]
    assert problems == []


def test_every_dashboard_query_parses_with_the_real_promql_parser(promtool, tmp_path):
    rules = []
    for path in dashboard_files():
        for index, (title, expr) in enumerate(dashboard_queries(path, SAMPLE_VARIABLES)):
            assert "$" not in expr.replace("$1", ""), f"{path.name} / {title}: unsubstituted variable"
            record = f"dashboard:{path.stem.replace('-', '_')}:q{index}"
            rules.append({"record": record, "expr": expr})
    assert len(rules) > 30
    rules_file = tmp_path / "dashboard-queries.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
    result = run_promtool(promtool, "check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_spec_constant_matches_the_spec_metrics_table():
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is not beside the repository")
    metrics: dict[str, tuple[str, ...]] = {}
    previous: tuple[str, ...] = ()
    for line in SPEC.read_text().splitlines():
        if not line.startswith("| `mutualbackup_"):
            continue
        names_cell, kind, labels_cell = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", names_cell)
        first = names[0]
        full = [first] + [name if name.startswith("mutualbackup_")
                          else "_".join(first.split("_")[: -len(name.strip("_").split("_"))]) + name
                          for name in names[1:]]
        if labels_cell.startswith("same"):
            labels = previous + tuple(re.findall(r"`(\w+)`", labels_cell.split("(")[0]))
        elif labels_cell in {"—", "-", ""}:
            labels = ()
        else:
            labels = tuple(label.strip() for label in labels_cell.split(","))
        previous = labels
        for name in full:
            if kind.startswith("histogram"):
                metrics[f"{name}_bucket"] = labels + ("le",)
                metrics[f"{name}_sum"] = labels
                metrics[f"{name}_count"] = labels
            else:
                metrics[name] = labels
    assert metrics == SPEC_METRICS


# ----------------------------------------------------------------- tests/promql.py itself
def test_substitute_fills_grafana_variables_and_leaves_regex_groups():
    expr = 'label_replace(increase(x{host="$host",m="${member}"}[$__rate_interval]), "a", "$1", "b", "(.*)")'
    assert substitute(expr, {"host": "zourit/store1", "member": "coopcycle"}) == (
        'label_replace(increase(x{host="zourit/store1",m="coopcycle"}[5m]), "a", "$1", "b", "(.*)")')
    assert substitute("x[$__range] [[member]] ${member:raw}", {"member": "m"}) == "x[1h] m m"


def test_substitute_refuses_a_variable_without_value():
    with pytest.raises(KeyError, match="member"):
        substitute('x{source_member="$member"}', {})


def test_queries_and_rules_are_listed_with_their_titles():
    queries = dashboard_queries(DASHBOARDS / "member.json", {"member": "coopcycle"})
    assert ("Sources", 'count(mutualbackup_replicas_desired{source_member="coopcycle"})') in queries
    names = [name for name, _ in rule_expressions(ALERTS)]
    assert set(names) == set(EXPECTED_ALERTS)
    assert names.count("MutualbackupBackupLate") == 2


# ----------------------------------------------------------------- README
def test_readme_describes_every_alert_and_every_panel():
    readme = (MONITORING / "README.md").read_text()
    missing = [alert for alert in EXPECTED_ALERTS if alert not in readme]
    for path in dashboard_files():
        missing += [f"{path.name}: {panel['title']}" for panel in json.loads(path.read_text())["panels"]
                    if panel["title"] not in readme]
    assert missing == []
