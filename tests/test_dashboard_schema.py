"""The dashboards against Grafana's published schema: ``@grafana/schema`` (the TypeScript types Grafana
generates from its own schema) checked by the TypeScript compiler, both pinned in ``tests/grafana-schema``
and installed by ``scripts/setup``.

Each dashboard becomes a TypeScript constant of type ``Dashboard``, and each panel's ``options`` and
``fieldConfig.defaults.custom`` constants of that panel type's own ``Options`` and ``FieldConfig``: a key
Grafana does not know, a value of the wrong type, a misspelled mode — each is a compile error naming the
dashboard and the panel. JSON has no enums, so the types are read with each string enum as the union of
its values (``JSONOf``). A panel's options may leave out what its plugin gives a default for (Grafana
merges them when it loads the panel), so those are checked as ``Loose``: every key given must exist and
hold the right type, none is required.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "monitoring" / "dashboards"
SCHEMA = ROOT / "tests" / "grafana-schema"
MODULES = SCHEMA / "node_modules"
COMPOSABLE = MODULES / "@grafana" / "schema" / "dist" / "types" / "raw" / "composable"

# Panel types the dashboards use, with the option types Grafana publishes for each: (Options, FieldConfig).
PANEL_TYPES: dict[str, tuple[str, str | None]] = {
    "stat": ("Options", None),
    "gauge": ("Options", None),
    "bargauge": ("Options", None),
    "timeseries": ("Options", "FieldConfig"),
    "table": ("Options", "FieldConfig"),
}

PRELUDE = """\
// JSON has no enums: a string enum of the schema is any of its values here.
type JSONOf<T> = T extends string ? `${T}`
  : T extends number | boolean | null | undefined ? T
  : T extends ReadonlyArray<infer U> ? JSONOf<U>[]
  : T extends object ? { [K in keyof T]: JSONOf<T[K]> }
  : T;
// A panel's options: what is given must be right; what is left out takes the plugin's default.
type Loose<T> = T extends string ? `${T}`
  : T extends number | boolean | null | undefined ? T
  : T extends ReadonlyArray<infer U> ? Loose<U>[]
  : T extends object ? { [K in keyof T]?: Loose<T[K]> }
  : T;
"""


def tsc() -> list[str]:
    compiler = MODULES / "typescript" / "bin" / "tsc"
    if not compiler.exists():
        pytest.fail(f"{compiler} is missing: run scripts/setup (it installs Grafana's schema and TypeScript "
                    "from tests/grafana-schema/package-lock.json)")
    return ["node", str(compiler)]


def typescript_of(name: str, dashboard: dict[str, Any]) -> str:
    """The TypeScript that holds ``dashboard`` to Grafana's types; each constant is named after its place."""
    dashboard_types = MODULES / "@grafana" / "schema" / "dist" / "types" / "raw" / "dashboard" / "x" / "types.gen"
    lines = [PRELUDE, f'import type {{ Dashboard }} from "{dashboard_types}";']
    for kind in PANEL_TYPES:
        lines.append(f'import type * as {kind}_ from "{COMPOSABLE / kind / "panelcfg" / "x" / "types.gen"}";')
    lines.append(f"// {name}")
    lines.append(f"export const dashboard: JSONOf<Dashboard> = {json.dumps(dashboard, indent=2)};")
    for panel in panels_of(dashboard):
        kind, where = panel.get("type"), f"panel_{panel.get('id')}"
        if kind not in PANEL_TYPES:
            continue
        options, field_config = PANEL_TYPES[kind]
        lines.append(f"// {where}: {panel.get('title')!r} ({kind})")
        lines.append(f"export const {where}_options: Loose<{kind}_.{options}> = {json.dumps(panel.get('options', {}))};")
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom")
        if field_config is not None and custom is not None:
            lines.append(f"export const {where}_custom: Loose<{kind}_.{field_config}> = {json.dumps(custom)};")
    return "\n".join(lines) + "\n"


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those folded in rows included."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def check(tmp_path: Path, dashboards: dict[str, dict[str, Any]]) -> tuple[int, str]:
    """tsc over the dashboards: its exit status, and its errors with each file's name as the dashboard's."""
    files = []
    for name, dashboard in dashboards.items():
        path = tmp_path / f"{Path(name).stem}.ts"
        path.write_text(typescript_of(name, dashboard), encoding="utf-8")
        files.append(path.name)
    (tmp_path / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "target": "es2022", "module": "esnext",
                            "moduleResolution": "bundler", "skipLibCheck": True, "types": []},
        "files": files,
    }))
    done = subprocess.run([*tsc(), "-p", str(tmp_path)], capture_output=True, text=True, timeout=300)
    return done.returncode, explained(tmp_path, done.stdout + done.stderr)


def explained(directory: Path, output: str) -> str:
    """tsc's errors, each followed by the constant (dashboard or panel) of the line it points at."""
    lines = []
    for line in output.splitlines():
        lines.append(line)
        found = re.search(r"([\w.-]+\.ts)\((\d+),", line)
        if found:
            source = (directory / found.group(1)).read_text(encoding="utf-8").splitlines()
            owner = next((s for s in reversed(source[:int(found.group(2))]) if s.startswith("// ")), "")
            lines.append(f"    in {found.group(1)} {owner[3:]}")
    return "\n".join(lines)


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text(encoding="utf-8")) for path in sorted(DASHBOARDS.glob("*.json"))}


def test_the_dashboards_hold_to_grafanas_published_schema(tmp_path: Path) -> None:
    shipped = dashboards()
    assert len(shipped) == 3
    status, errors = check(tmp_path, shipped)
    assert status == 0, errors


def test_the_schema_check_catches_what_grafana_would_not_read(tmp_path: Path) -> None:
    """Each broken copy fails, naming where: so a green check above means something."""
    original = dashboards()["federation-overview.json"]
    stat = next(p for p in panels_of(original) if p["type"] == "stat")
    series = next(p for p in panels_of(original) if p["type"] == "timeseries")
    breakages = {
        "a misspelled dashboard key": lambda d: d.update(refesh="1m"),
        "a grid size as a string": lambda d: panel(d, stat["id"])["gridPos"].update(h="8"),
        "a stat colour mode Grafana does not have": lambda d: panel(d, stat["id"])["options"].update(colorMode="rainbow"),
        "a stat option Grafana does not have": lambda d: panel(d, stat["id"])["options"].update(colourMode="value"),
        "a thresholds mode Grafana does not have": lambda d: panel(d, stat["id"])["fieldConfig"]["defaults"].update(
            thresholds={"mode": "relative-ish", "steps": []}),
        "a time series line width as text": lambda d: panel(d, series["id"])["fieldConfig"]["defaults"]
        .setdefault("custom", {}).update(lineWidth="thick"),
    }
    for what, breaking in breakages.items():
        broken = copy.deepcopy(original)
        breaking(broken)
        status, errors = check(tmp_path, {"federation-overview.json": broken})
        assert status != 0, f"{what} passed the schema check"
        assert "federation-overview.ts" in errors, errors


def panel(dashboard: dict[str, Any], panel_id: int) -> dict[str, Any]:
    return next(p for p in panels_of(dashboard) if p["id"] == panel_id)
