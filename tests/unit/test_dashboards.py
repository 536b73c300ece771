"""dashboards/: the Grafana dashboard queries only metrics zray declares, and shows all of them.

`dashboard_expressions` gives every panel query with the Grafana variables filled in for one
run, so that a real Prometheus can evaluate each (the Prometheus integration test imports it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from zray.metrics.registry import BY_NAME, METRICS, Kind, Source

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "zray.json"
PROVISIONING = ROOT / "dashboards" / "provisioning"

METRIC_NAME = re.compile(r"\bzray_[a-z0-9_]+\b")
# A metric and its label matchers: zray_x{a="b", c=~"d"}.
SELECTOR = re.compile(r"\b(zray_[a-z0-9_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
AGGREGATION = re.compile(r"^\s*(sum|avg|max|min|count|stddev|stdvar)\b\s*(?:by\s*\(([^)]*)\))?")
RANGE_FUNCTIONS = re.compile(r"\b(rate|irate|increase|delta|deriv)\s*\(\s*(zray_[a-z0-9_]+)")
RANGE = re.compile(r"\[([^\]]*)\]")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")

RUN_MATCHER = ("run", "=~", "$run")
RANK_MATCHER = ("rank", "=~", "$rank")
RATE_WINDOW = "$__rate_interval"
PANEL_TYPES = {"row", "timeseries", "stat"}
DATASOURCE_REFS = {"$datasource", "${datasource}"}

# The values `dashboard_expressions` puts in for Grafana's variables.
RANK_ALL = ".*"
RATE_INTERVAL = "1m"


# ---- reading the dashboard ------------------------------------------------------------------


def _load(path: str | os.PathLike[str] = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query target of every panel."""
    return [(p, t) for p in _panels(dashboard) for t in p.get("targets", [])]


def _promql_regex_literal(value: str) -> str:
    """`value` as a regex matching exactly it, written inside a PromQL double-quoted string.

    Regex metacharacters are escaped (RE2 syntax), then backslashes and quotes for the string.
    """
    regex = re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", value)
    return regex.replace("\\", "\\\\").replace('"', '\\"')


def dashboard_expressions(
    path: str | os.PathLike[str] = DASHBOARD, run: str | None = None
) -> list[str]:
    """Every PromQL expression of the dashboard at `path`, ready for Prometheus' HTTP API.

    Grafana's variables are filled in for one run: `$run` -> `run` (matched literally; None:
    `.*`, every run), `$rank` -> `.*` (all ranks), `$__rate_interval` -> `1m`. Raises if an
    expression still holds a variable this does not know.
    """
    run_value = ".*" if run is None else _promql_regex_literal(run)
    out = []
    for panel, target in _targets(_load(path)):
        expr = target.get("expr", "")
        if not expr.strip():
            continue
        for names, value in (
            (("${__rate_interval}", "$__rate_interval"), RATE_INTERVAL),
            (("${run}", "$run"), run_value),
            (("${rank}", "$rank"), RANK_ALL),
        ):
            for name in names:
                expr = expr.replace(name, value)
        if "$" in expr:
            raise ValueError(
                f"panel {panel.get('title')!r}: expression {expr!r} holds a Grafana variable "
                "dashboard_expressions does not fill in"
            )
        out.append(expr)
    return out


def _matchers(selector: str | None) -> set[tuple[str, str, str]]:
    if not selector:
        return set()
    body = selector[1:-1]
    found = MATCHER.findall(body)
    assert MATCHER.sub("", body).strip() == "", f"unparsed label matchers in {selector!r}"
    return set(found)


DASH = _load()
TARGETS = _targets(DASH)
TARGET_IDS = [f"{p['id']}:{p.get('title')}:{t.get('refId')}" for p, t in TARGETS]


# ---- tests ----------------------------------------------------------------------------------


def test_dashboard_loads_with_the_expected_shape() -> None:
    assert DASH["title"] and DASH["uid"]
    assert isinstance(DASH["schemaVersion"], int) and DASH["schemaVersion"] >= 27
    panels = _panels(DASH)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    for p in panels:
        assert p["type"] in PANEL_TYPES, f"panel {p['id']} {p.get('title')!r}: type {p['type']}"
        assert p.get("title"), f"panel {p['id']} has no title"


def test_every_panel_has_a_query_on_the_datasource_variable() -> None:
    for p in _panels(DASH):
        if p["type"] == "row":
            continue
        targets = p.get("targets", [])
        assert targets, f"panel {p['id']} {p['title']!r} has no target"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"panel {p['title']!r}: refIds repeat {refs}"
        for obj in (p, *targets):
            ds = obj.get("datasource")
            uid = ds.get("uid") if isinstance(ds, dict) else ds
            assert uid in DATASOURCE_REFS, f"panel {p['title']!r}: datasource {ds!r}"
        assert all(t.get("expr", "").strip() for t in targets), f"{p['title']!r}: empty query"


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for p in DASH["panels"]:  # top level: the rows' own children are laid out when expanded
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{p['title']!r} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = p["title"]


def test_variables_datasource_run_and_rank() -> None:
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert {"datasource", "run", "rank"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    run, rank = variables["run"], variables["rank"]
    for v in (run, rank):
        assert v["type"] == "query"
        assert v["datasource"] in DATASOURCE_REFS
        assert v["definition"] == v["query"]["query"]
    assert re.fullmatch(r"label_values\(zray_step(\{[^}]*\})?, run\)", run["definition"])
    assert re.fullmatch(r'label_values\(zray_step\{run=~"\$run"\}, rank\)', rank["definition"])
    assert rank["multi"] is True and rank["includeAll"] is True
    assert rank.get("allValue") == ".*", 'All must be a regex, for rank=~"$rank"'
    for v in (run, rank):  # the variables' own queries name declared metrics too
        for name in METRIC_NAME.findall(v["definition"]):
            assert name in BY_NAME, f"variable {v['name']}: unknown metric {name}"


@pytest.mark.parametrize(("panel", "target"), TARGETS, ids=TARGET_IDS)
def test_query_uses_declared_metrics_filtered_by_run_and_rank(
    panel: dict[str, Any], target: dict[str, Any]
) -> None:
    expr, title = target["expr"], panel["title"]
    names = METRIC_NAME.findall(expr)
    assert names, f"{title!r}: {expr!r} names no zray metric"
    for name, selector in SELECTOR.findall(expr):
        assert name in BY_NAME, f"{title!r}: {name} is not in zray.metrics.registry.METRICS"
        matchers = _matchers(selector or None)
        assert RUN_MATCHER in matchers, f'{title!r}: {name} lacks run=~"$run" in {expr!r}'
        if BY_NAME[name].source is Source.WORKER:
            assert RANK_MATCHER in matchers, f'{title!r}: {name} lacks rank=~"$rank"'
        else:  # controller metrics have no rank label: filtering on it would empty the panel
            assert not any(m[0] == "rank" for m in matchers), f"{title!r}: {name} has no rank"
        for label, _, _ in matchers:
            assert label in BY_NAME[name].labels, f"{title!r}: {name} has no label {label!r}"


@pytest.mark.parametrize(("panel", "target"), TARGETS, ids=TARGET_IDS)
def test_query_rates_counters_over_the_rate_interval(
    panel: dict[str, Any], target: dict[str, Any]
) -> None:
    expr, title = target["expr"], panel["title"]
    for fn, name in RANGE_FUNCTIONS.findall(expr):
        assert BY_NAME[name].kind is Kind.COUNTER, f"{title!r}: {fn}() of gauge {name}"
    windows = RANGE.findall(expr)
    assert all(w == RATE_WINDOW for w in windows), (
        f"{title!r}: windows {windows}; use [{RATE_WINDOW}]"
    )
    assert len(windows) == len(RANGE_FUNCTIONS.findall(expr)), f"{title!r}: a range outside rate()"


@pytest.mark.parametrize(("panel", "target"), TARGETS, ids=TARGET_IDS)
def test_query_groups_and_legends_by_labels_that_exist(
    panel: dict[str, Any], target: dict[str, Any]
) -> None:
    expr, title = target["expr"], panel["title"]
    specs = [BY_NAME[n] for n in METRIC_NAME.findall(expr)]
    labels = set.intersection(*(set(s.labels) for s in specs))
    for group in GROUPING.findall(expr):
        grouped = {g.strip() for g in group.split(",") if g.strip()}
        assert grouped <= labels, f"{title!r}: groups by {grouped - labels}, which {expr!r} lacks"
    top = AGGREGATION.match(expr)
    if top:  # an outer aggregation keeps only its `by` labels
        labels = {g.strip() for g in (top.group(2) or "").split(",") if g.strip()}
    legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
    assert legend <= labels, f"{title!r}: legend uses {legend - labels}, absent from the result"


def test_every_declared_metric_has_a_panel() -> None:
    shown = {n for _, t in TARGETS for n in METRIC_NAME.findall(t["expr"])}
    missing = [m.name for m in METRICS if m.name not in shown]
    assert not missing, f"metrics declared in zray/metrics/registry.py with no panel: {missing}"


def test_dashboard_expressions_fill_in_the_variables() -> None:
    exprs = dashboard_expressions(DASHBOARD, run="gpt-1.3b+x")
    assert len(exprs) == len(TARGETS)
    for expr in exprs:
        assert "$" not in expr
        assert 'run=~"gpt-1\\\\.3b\\\\+x"' in expr, expr
        assert "rank" not in expr or f'rank=~"{RANK_ALL}"' in expr or "by (rank)" in expr
    assert any(f"[{RATE_INTERVAL}]" in e for e in exprs)
    assert all('run=~".*"' in e for e in dashboard_expressions(DASHBOARD))


def test_provisioning_loads_this_folder_and_a_prometheus() -> None:
    dashboards = yaml.safe_load((PROVISIONING / "dashboards.yaml").read_text())
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    sources = yaml.safe_load((PROVISIONING / "datasources.yaml").read_text())
    (prom,) = sources["datasources"]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    readme = (ROOT / "dashboards" / "README.md").read_text()
    assert provider["options"]["path"] in readme, "dashboards/README.md shows where to mount it"
