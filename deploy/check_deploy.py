#!/usr/bin/env python3
"""Checks of the deployment assets that helm lint and kubernetes-validate cannot make.

  check_deploy.py render RENDER.yaml   a `helm template` output:
      - custom resources (ServiceMonitor and PrometheusRule of the Prometheus Operator,
        ScaledObject and TriggerAuthentication of KEDA) against models generated from their
        CRDs (cloudcoil-models-*), with unknown fields reported (kubernetes-validate has no
        schema for them and only warns);
      - any other kind that is not one of the Kubernetes kinds the chart uses is an error
        (it would have gone unvalidated);
      - every herald.toml in a ConfigMap parses as TOML.
  check_deploy.py assets               deploy/: the RabbitMQ definitions, the Grafana dashboard
      and the alert rules parse; every herald_* metric they use is one the services export;
      the chart's files/ are the same as deploy/'s.

Exits 1 with one line per problem.
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# What kubernetes-validate checks (the chart creates no other built-in kinds).
BUILTIN_KINDS = {
    "ConfigMap", "Secret", "Service", "ServiceAccount", "Deployment", "Job",
    "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "Ingress",
}

# The metrics the services export (docs/operations.md lists them with their labels).
# Histograms are named by their base; _bucket, _sum and _count follow from it.
METRICS = {
    "herald_consumer_messages_total",
    "herald_stage_duration_seconds",
    "herald_sender_outcomes_total",
    "herald_sender_alerts_total",
    "herald_sender_retries_total",
    "herald_sender_rate_limited_total",
    "herald_sender_rate_limiter_fallback_total",
    "herald_sender_provider_call_seconds",
    "herald_rate_limit_wait_seconds",
    "herald_provider_answers_total",
    "herald_queue_depth",
    "herald_dlq_depth",
    "herald_token_fetches_total",
    "herald_token_refreshes_total",
    "herald_token_age_seconds",
    "herald_token_daily_fetches",
    "herald_token_daily_limit",
    "herald_token_account_misconfigured",
    "herald_callback_requests_total",
    "herald_breaker_open",
}
HISTOGRAMS = {"herald_stage_duration_seconds", "herald_rate_limit_wait_seconds",
              "herald_sender_provider_call_seconds"}


def custom_resource_models():
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    return {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
    }


def unknown_fields(given, kept, path=""):
    """Keys in `given` that the model dropped (pydantic ignores fields it does not know)."""
    found = []
    if isinstance(given, dict):
        for key, value in given.items():
            if not isinstance(kept, dict) or key not in kept:
                found.append(f"{path}/{key}")
            else:
                found += unknown_fields(value, kept[key], f"{path}/{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for index, (a, b) in enumerate(zip(given, kept)):
            found += unknown_fields(a, b, f"{path}/{index}")
    return found


def check_render(path):
    problems = []
    models = custom_resource_models()
    documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    if not documents:
        return [f"{path}: no objects rendered"]
    for doc in documents:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = f"{kind}/{doc.get('metadata', {}).get('name')}"
        model = models.get((api, kind))
        if model is not None:
            try:
                parsed = model.model_validate(doc)
            except Exception as error:  # pydantic.ValidationError, with every problem in it
                problems.append(f"{name}: {error}")
                continue
            kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
            for field in unknown_fields(doc, kept):
                problems.append(f"{name}: unknown field {field}")
            if kind == "PrometheusRule":
                for group in doc["spec"].get("groups", []):
                    for rule in group.get("rules", []):
                        if not str(rule.get("expr", "")).strip():
                            problems.append(f"{name}: rule {rule.get('alert')} has no expr")
        elif kind not in BUILTIN_KINDS:
            problems.append(f"{name}: {api} {kind} is validated by nothing (add it here)")
        if kind == "ConfigMap" and "herald.toml" in doc.get("data", {}):
            try:
                tomllib.loads(doc["data"]["herald.toml"])
            except tomllib.TOMLDecodeError as error:
                problems.append(f"{name}: herald.toml is not TOML: {error}")
    return problems


def metric_names(expr):
    return set(re.findall(r"\bherald_[a-z0-9_]+", expr))


def unknown_metrics(where, expr):
    problems = []
    for metric in metric_names(expr):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        if metric in METRICS and metric not in HISTOGRAMS:
            continue
        if base in HISTOGRAMS and base != metric:
            continue
        problems.append(f"{where}: unknown metric {metric}")
    return problems


def check_assets():
    problems = []
    definitions = json.loads((ROOT / "deploy/rabbitmq/definitions.json").read_text())
    for section in ("exchanges", "queues", "bindings"):
        if not definitions.get(section):
            problems.append(f"deploy/rabbitmq/definitions.json: no {section}")

    dashboard = json.loads((ROOT / "deploy/grafana/herald.json").read_text())
    ids, exprs = set(), 0
    panels = list(dashboard.get("panels", []))
    for panel in panels:
        panels.extend(panel.get("panels", []))  # rows may nest panels
    for panel in panels:
        where = f"deploy/grafana/herald.json panel {panel.get('id')} ({panel.get('title')})"
        if panel.get("id") in ids:
            problems.append(f"{where}: duplicate id")
        ids.add(panel.get("id"))
        for target in panel.get("targets", []):
            exprs += 1
            problems += unknown_metrics(where, target.get("expr", ""))
            if not metric_names(target.get("expr", "")):
                problems.append(f"{where}: target without a herald_ metric")
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        problems += unknown_metrics(f"dashboard variable {variable.get('name')}", str(query or ""))
    if exprs == 0:
        problems.append("deploy/grafana/herald.json: no queries")

    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())
    names = set()
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            alert = rule.get("alert")
            where = f"deploy/prometheus/alerts.yaml {alert}"
            if not alert or not rule.get("expr"):
                problems.append(f"{where}: needs alert and expr")
                continue
            if alert in names:
                problems.append(f"{where}: duplicate alert name")
            names.add(alert)
            if rule.get("labels", {}).get("severity") not in {"critical", "warning", "info"}:
                problems.append(f"{where}: severity must be critical, warning or info")
            for key in ("summary", "description", "runbook_url"):
                if not rule.get("annotations", {}).get(key):
                    problems.append(f"{where}: annotation {key} missing")
            problems += unknown_metrics(where, str(rule["expr"]))
    if not names:
        problems.append("deploy/prometheus/alerts.yaml: no alerts")

    for linked, source in (("alerts.yaml", "deploy/prometheus/alerts.yaml"),
                           ("herald.json", "deploy/grafana/herald.json")):
        copy = ROOT / "k8s/herald/files" / linked
        if not copy.exists() or copy.read_bytes() != (ROOT / source).read_bytes():
            problems.append(f"k8s/herald/files/{linked} is not {source} (it should link to it)")
    return problems


def main(argv):
    if len(argv) == 3 and argv[1] == "render":
        problems = check_render(argv[2])
    elif len(argv) == 2 and argv[1] == "assets":
        problems = check_assets()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"ERROR {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
