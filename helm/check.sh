#!/usr/bin/env bash
# Validates the Helm chart offline, for the default values, every medallion/values-*.yaml and
# every medallion/ci/*-values.yaml: helm lint --strict, render (both with Helm's own v4 SDK,
# from helm-python-sdk), kubernetes-validate --strict against pinned Kubernetes versions, and
# checkov on the rendered manifests. Needs python3 with venv; PyPI only on the first run.
set -euo pipefail
cd "$(dirname "$0")"

chart=medallion
release=medallion
namespace=medallion
# The oldest version Chart.yaml's kubeVersion admits, and a current one; lint uses the last.
kube_versions=(1.27.0 1.33.0)

# checkov checks that do not apply here, each with its reason. CKV_K8S_35 (secrets as env) is
# skipped per Deployment by a checkov.io/skip annotation, only where a secret is in env.
skip_checks=(
  # CPU limits: they throttle polars' thread pool mid-query; requests size scheduling and the HPA.
  CKV_K8S_11
  # Pull policy Always: release tags are immutable, and Always breaks images loaded into kind.
  CKV_K8S_15
  # Image digest: the release tag pins the image by default; image.digest pins it by digest.
  CKV_K8S_43
)

venv=${MEDALLION_PY_VENV:-$HOME/.cache/medallion/venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Installs only when requirements.txt changed since the last install into this venv.
stamp="$venv/.medallion-helm-requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] \
  || [ ! -x "$venv/bin/checkov" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  echo "$want" >"$stamp"
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir "$out/cases"

values_files=("")
for f in "$chart"/values-*.yaml "$chart"/ci/*-values.yaml; do
  [ -e "$f" ] && values_files+=("$f")
done

# Lint, render and validate each values file into its own folder of manifests.
labels=() cases=() objects=() failures=()
for values in "${values_files[@]}"; do
  label=${values:-$chart/values.yaml}
  case=$(echo "$label" | tr '/' '_')
  labels+=("$label") cases+=("$case")
  echo "== $label"
  why=""
  if "$venv/bin/python" chart_check.py render "$chart" "$out/cases/$case" "$release" "$namespace" \
    "${kube_versions[-1]}" ${values:+"$values"} >"$out/render.log" 2>&1; then
    cat "$out/render.log"
    objects+=("$(sed -n 's/.*rendered \([0-9]*\) objects.*/\1/p' "$out/render.log")")
    for kv in "${kube_versions[@]}"; do
      "$venv/bin/kubernetes-validate" --strict --quiet -k "$kv" "$out/cases/$case"/*.yaml \
        || why="kubernetes-validate"
    done
    [ -z "$why" ] && echo "  kubernetes-validate --strict ok: ${kube_versions[*]}"
  else
    cat "$out/render.log"
    rm -rf "${out:?}/cases/$case"
    objects+=(0)
    why="lint or render"
  fi
  failures+=("$why")
done

# One checkov run over every case (its start-up dominates), split per case afterwards.
echo "== checkov: one run over the manifests of every values file"
# checkov exits non-zero on findings; checkov-summary decides from the report.
"$venv/bin/checkov" --framework kubernetes -d "$out/cases" --skip-download -o json \
  --skip-check "$(IFS=,; echo "${skip_checks[*]}")" >"$out/checkov.json" 2>"$out/checkov.err" || true
if ! "$venv/bin/python" chart_check.py checkov-summary "$out/checkov.json" "$out/cases"; then
  cat "$out/checkov.err"
fi

echo
echo "helm/check.sh summary:"
failed=0
for i in "${!labels[@]}"; do
  report="$out/cases/${cases[$i]}.checkov"
  why=${failures[$i]}
  counts="not run"
  if [ -f "$report" ]; then
    sed '$d' "$report"
    counts=$(tail -n1 "$report")
    # Failed checks, or no passed check at all (nothing scanned), fail the case.
    case $counts in
      0\ passed,*) why="${why:+$why, }checkov" ;;
      *\ 0\ failed,*) ;;
      *) why="${why:+$why, }checkov" ;;
    esac
  elif [ -z "$why" ]; then
    why="checkov did not run"
  fi
  if [ -z "$why" ]; then
    echo "  ok     ${labels[$i]}: ${objects[$i]} objects; lint, kubernetes-validate, checkov ($counts)"
  else
    echo "  FAILED ${labels[$i]}: $why (checkov: $counts)"
    failed=$((failed + 1))
  fi
done
if [ "$failed" -gt 0 ]; then
  echo "helm/check.sh: $failed of ${#labels[@]} values files failed"
  exit 1
fi
echo "helm/check.sh: all ${#labels[@]} values files passed"
