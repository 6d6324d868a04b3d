"""The PromQL of monitoring/: every dashboard query and every alerting rule, as text.

Used by tests/test_monitoring_rules.py (which parses each expression with promtool)
and by the end-to-end tests (which send each one to a real Prometheus). Nothing
here starts a process or touches the network.

    dashboard_queries(path, variables) -> [(panel title, expr), ...]
    rule_expressions(path)             -> [(alert or record name, expr), ...]
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

# Values for Grafana's built-in variables, as Grafana would interpolate them.
GRAFANA_BUILTINS: dict[str, str] = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "datasource": "prometheus",
}

# $name, ${name}, ${name:format} and [[name]] — the forms Grafana interpolates.
# ($1 and the like, as in label_replace replacements, are not variables.)
_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\[\[([A-Za-z_]\w*)\]\]|\$([A-Za-z_]\w*)")


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana template variables in ``expr`` with their values.

    ``variables`` is merged over :data:`GRAFANA_BUILTINS`. Raises ``KeyError``
    naming the variable when one has no value, so that a query is never sent to
    Prometheus with a ``$`` left in it.
    """
    values = {**GRAFANA_BUILTINS, **variables}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(path: str | Path, variables: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) for every Prometheus target of every panel of a dashboard.

    ``variables`` gives the dashboard's own template variables (e.g.
    ``{"member": "coopcycle"}`` or ``{"host": "zourit/store1"}``); Grafana's
    built-ins ($__rate_interval=5m, $__interval=1m, $__range=1h, $datasource) have
    defaults that ``variables`` may override. Hidden targets are skipped.
    Raises ``KeyError`` when a variable used by a query has no value.
    """
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    queries: list[tuple[str, str]] = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr or target.get("hide"):
                continue
            queries.append((panel.get("title", ""), substitute(expr, variables or {})))
    return queries


def dashboard_variables(path: str | Path) -> dict[str, str]:
    """Template variable name -> its query (as text) for the query variables of a dashboard."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        found[variable["name"]] = query or variable.get("definition", "")
    return found


def rule_expressions(path: str | Path) -> list[tuple[str, str]]:
    """(alert name, expr) for every rule of a Prometheus rules file, in file order.

    Recording rules are listed under their record name. An alert defined by
    several rules appears once per rule.
    """
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    expressions: list[tuple[str, str]] = []
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            expressions.append((name, rule["expr"].strip()))
    return expressions
