#!/usr/bin/env python3
"""Write prometheusrule.yaml (the PrometheusRule of the Kubernetes install) from alerts.yml.

alerts.yml is the one source of truth of the alert rules: docker compose's Prometheus loads it
directly; the Prometheus Operator needs it wrapped in a PrometheusRule. Run after editing alerts.yml:

    python deploy/prometheus/sync_prometheusrule.py          # rewrite prometheusrule.yaml
    python deploy/prometheus/sync_prometheusrule.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yml"
TARGET = HERE / "prometheusrule.yaml"
HEADER = (
    "# GENERATED from alerts.yml by sync_prometheusrule.py - do not edit; edit alerts.yml and rerun.\n"
    "# The Prometheus Operator selects rules by label; kube-prometheus-stack's default selector is\n"
    "# `release: <helm release>` (see deploy/README.md).\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "fastcache-alerts",
            "labels": {"app.kubernetes.io/component": "monitoring", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that prometheusrule.yaml is current")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
