"""Helpers of tests/test_deploy.py: rendering, CRD field checks, PromQL metric names, Dockerfile and
.dockerignore parsing, and a promtool unit-test file built from a real /metrics scrape."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import REPO

DEPLOY = REPO / "deploy"


# ------------------------------------------------------------------------------------------ tools
def tool(name: str) -> str:
    """Path of a CLI the deployment checks need (scripts/setup.sh installs them); fails if absent."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh")
    return path


def venv_tool(name: str) -> str:
    """Path of a CLI a test-extra package installs next to this Python (hadolint, check-jsonschema)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    return tool(name)


def run(args: list[str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize <path>``, offline, as a list of objects."""
    result = run([tool("kubectl"), "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# ------------------------------------------------------------------------------------------ CRDs
def _require(obj: dict, path: str, errors: list[str], where: str) -> Any:
    node: Any = obj
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node or node[key] in (None, "", [], {}):
            errors.append(f"{where}: missing {path}")
            return None
        node = node[key]
    return node


def crd_errors(obj: dict) -> list[str]:
    """Required fields of the custom resources (no cluster, no CRD schema here): [] when complete."""
    kind = obj.get("kind")
    where = f"{kind}/{(obj.get('metadata') or {}).get('name')}"
    errors: list[str] = []
    for field in ("apiVersion", "kind", "metadata.name", "spec"):
        _require(obj, field, errors, where)
    if kind == "ServiceMonitor":
        if obj.get("apiVersion") != "monitoring.coreos.com/v1":
            errors.append(f"{where}: apiVersion must be monitoring.coreos.com/v1")
        selector = _require(obj, "spec.selector", errors, where)
        if selector is not None and not (selector.get("matchLabels") or selector.get("matchExpressions")):
            errors.append(f"{where}: spec.selector selects nothing")
        for i, endpoint in enumerate(_require(obj, "spec.endpoints", errors, where) or []):
            if not (endpoint.get("port") or endpoint.get("targetPort")):
                errors.append(f"{where}: endpoint {i} has no port")
    elif kind == "ScaledObject":
        if obj.get("apiVersion") != "keda.sh/v1alpha1":
            errors.append(f"{where}: apiVersion must be keda.sh/v1alpha1")
        _require(obj, "spec.scaleTargetRef.name", errors, where)
        for i, trigger in enumerate(_require(obj, "spec.triggers", errors, where) or []):
            if not trigger.get("type"):
                errors.append(f"{where}: trigger {i} has no type")
            metadata = trigger.get("metadata")
            if not isinstance(metadata, dict) or not metadata:
                errors.append(f"{where}: trigger {i} has no metadata")
            elif any(not isinstance(v, str) for v in metadata.values()):
                errors.append(f"{where}: trigger {i} metadata values must be strings (KEDA's schema)")
        modifiers = ((obj.get("spec") or {}).get("advanced") or {}).get("scalingModifiers")
        if modifiers is not None:
            for field in ("formula", "target"):
                if not isinstance(modifiers.get(field), str) or not modifiers[field]:
                    errors.append(f"{where}: scalingModifiers.{field} must be a non-empty string")
            names = {t.get("name") for t in (obj.get("spec") or {}).get("triggers") or []}
            for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", modifiers.get("formula") or ""):
                if word not in names:
                    errors.append(f"{where}: formula uses {word!r}, not a trigger name")
    elif kind == "PrometheusRule":
        if obj.get("apiVersion") != "monitoring.coreos.com/v1":
            errors.append(f"{where}: apiVersion must be monitoring.coreos.com/v1")
        for group in _require(obj, "spec.groups", errors, where) or []:
            if not group.get("name") or not group.get("rules"):
                errors.append(f"{where}: group without name or rules")
            for rule in group.get("rules") or []:
                if not rule.get("expr") or not (rule.get("alert") or rule.get("record")):
                    errors.append(f"{where}: rule without expr or alert/record name")
    else:
        errors.append(f"{where}: not a known custom resource")
    return errors


# ------------------------------------------------------------------------------------------ PromQL
METRIC = re.compile(r"\bfastcache_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def exported_types(exposition: str) -> dict[str, str]:
    """``{family: type}`` from the ``# TYPE`` lines of a Prometheus text exposition."""
    types = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind.strip()
    return types


def missing_metrics(names: Iterable[str], exposition: str) -> list[str]:
    """Names a query uses that the exposition does not export (histogram series map to their family)."""
    types = exported_types(exposition)
    missing = []
    for name in sorted(set(names)):
        if name in types:
            continue
        suffix = next((s for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        family = name[: -len(suffix)] if suffix else None
        if family and (types.get(family) == "histogram" or (suffix != "_bucket" and types.get(family) == "summary")):
            continue
        missing.append(name)
    return missing


def dashboard_targets(dashboard: dict) -> list[tuple[dict, dict]]:
    """``(panel, target)`` for every query of every panel (rows included, collapsed or not)."""
    out = []

    def visit(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                out.append((panel, target))
            visit(panel.get("panels") or [])

    visit(dashboard.get("panels") or [])
    return out


def dashboard_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels") or []:
        if panel.get("type") != "row":
            out.append(panel)
        out.extend(p for p in panel.get("panels") or [] if p.get("type") != "row")
    return out


def alert_exprs(rules_file: Path) -> dict[str, str]:
    rules = yaml.safe_load(rules_file.read_text())
    return {
        rule.get("alert") or rule.get("record"): rule["expr"] for group in rules["groups"] for rule in group["rules"]
    }


# Grafana's interpolation of the dashboard's variables with every variable on "All"
GRAFANA_ALL = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "10m",
    "${model}": ".*",
    "$model": ".*",
    "${pod}": ".*",
    "$pod": ".*",
}


def interpolate(expr: str) -> str:
    for key in sorted(GRAFANA_ALL, key=len, reverse=True):
        expr = expr.replace(key, GRAFANA_ALL[key])
    return expr


def _samples(exposition: str) -> list[tuple[str, str, float]]:
    """``(name, label-text, value)`` per sample line."""
    out = []
    for line in exposition.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        out.append((name, labels.rstrip("}"), float(value)))
    return out


def promtool_data_test(
    exposition: str, exprs: list[str], target_labels: dict[str, str], extra_statuses: tuple[str, ...] = ()
) -> dict:
    """A ``promtool test rules`` file: the scraped samples held constant for 10 minutes (15 s apart)
    with the labels a Kubernetes scrape adds, and one test per query that it returns at least one
    series. Samples with ``status="200"`` are repeated with each of ``extra_statuses``."""
    series = []
    added = ",".join(f'{k}="{v}"' for k, v in target_labels.items())
    for name, labels, value in _samples(exposition):
        if name.endswith("_created"):
            continue
        variants = [labels]
        if 'status="200"' in labels:
            variants += [labels.replace('status="200"', f'status="{s}"') for s in extra_statuses]
        for variant in variants:
            text = f"{name}{{{variant + ',' if variant else ''}{added}}}"
            series.append({"series": text, "values": " ".join([repr(value)] * 41)})
    tests = [
        {"expr": f"clamp_max(count({expr}), 1)", "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]}
        for expr in exprs
    ]
    return {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{"interval": "15s", "input_series": series, "promql_expr_test": tests}],
    }


# ------------------------------------------------------------------------------------------ Docker
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _ignore_regex(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_excludes(ignore_file: Path, path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out of the build context: the last
    matching pattern wins, ``!`` re-includes, a pattern matching a parent directory matches too."""
    rules = []
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        if pattern.startswith("./"):
            pattern = pattern[2:]
        rules.append((negate, _ignore_regex(pattern)))
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded
