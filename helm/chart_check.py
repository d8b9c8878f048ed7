"""Helpers of helm/check.sh.

  chart_check.py render CHART OUT_DIR RELEASE NAMESPACE KUBE_VERSION [VALUES_FILE]
      Lints (strict) and renders the chart with Helm's own SDK (helm-python-sdk), writes each
      rendered template with content to OUT_DIR (NOTES.txt included) and checks a few
      invariants that schemas cannot express. Exits non-zero on a lint warning or error, a
      render error or a broken invariant.
  chart_check.py checkov-summary REPORT_JSON OUT_DIR
      Splits one checkov JSON report over OUT_DIR/<case>/ into OUT_DIR/<case>.checkov: the
      failed checks, then the counts. Exits non-zero if any check failed.
"""

import json
import os
import sys

import helm_python as helm
import yaml

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def render(args) -> int:
    chart_dir, out_dir, release, namespace, kube_version = args[:5]
    values_file = args[5] if len(args) > 5 else None
    values = {}
    if values_file:
        with open(values_file, encoding="utf-8") as f:
            values = helm.values_from_yaml(f.read())

    # strict: warnings fail like errors.
    report = helm.lint(
        chart_dir, values, strict=True, namespace=namespace, kube_version=f"v{kube_version}"
    )
    failed = bool(report["errors"])
    for message in report["messages"]:
        severity = message["severity"]
        if severity == 1 and message["error"] == "icon is recommended":
            continue
        print(f"  lint {SEVERITY.get(severity, severity)}: {message['path']}: {message['error'].strip()}")
        failed |= severity >= 2
    # `errors` repeats the ERROR messages; print it only when they said nothing.
    if not any(m["severity"] >= 3 for m in report["messages"]):
        for error in report["errors"]:
            print(f"  lint ERROR: {error.strip()}")
    if failed:
        return 1

    # Lint runs templates in Helm's lint mode, where `fail` only logs: rendering catches it.
    try:
        with helm.Chart.load(chart_dir) as chart:
            chart.validate_schema(values)
            manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    except helm.HelmError as e:
        print(f"  render ERROR: {e}")
        return 1

    os.makedirs(out_dir, exist_ok=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if not text.strip():
            continue
        name = os.path.basename(path)
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]

    problems = check_invariants(docs, manifests)
    for problem in problems:
        print(f"  invariant: {problem}")
    kinds = {}
    for doc in docs:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"  helm lint ok; rendered {len(docs)} objects: {summary}")
    return 1 if problems else 0


def check_invariants(docs, manifests):
    """What the Rust services rely on, beyond what the Kubernetes schemas check."""
    problems = []
    if not any(p.endswith("/NOTES.txt") and t.strip() for p, t in manifests.items()):
        problems.append("NOTES.txt rendered empty")
    deployments = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] == "Deployment"
    }
    if sorted(deployments) != ["aggregator", "coordinator", "ingestor", "refiner"]:
        problems.append(f"expected four Deployments, got {sorted(deployments)}")
        return problems
    coordinator = deployments["coordinator"]
    if coordinator["spec"].get("replicas") != 1 or coordinator["spec"]["strategy"]["type"] != "Recreate":
        problems.append("the coordinator must run one replica with the Recreate strategy")
    for doc in docs:
        if doc["kind"] == "HorizontalPodAutoscaler" and doc["spec"]["scaleTargetRef"]["name"] == coordinator["metadata"]["name"]:
            problems.append("the coordinator must not have an HPA")
    for component, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {}
        for var in container.get("env", []):
            if var["name"] in env:
                problems.append(f"{component}: env {var['name']} set twice")
            env[var["name"]] = var.get("value")
        if component != "coordinator":
            lake = env.get("MEDALLION_LAKE", "")
            mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
            if lake.startswith("s3://"):
                if "lake" in mounts:
                    problems.append(f"{component}: an s3:// lake must not mount a volume")
            elif mounts.get("lake") != lake.removeprefix("file://"):
                problems.append(f"{component}: lake {lake!r} is not mounted at its path")
    return problems


def checkov_summary(args) -> int:
    """Splits one checkov report over OUT_DIR/<case>/*.yaml into OUT_DIR/<case>.checkov files."""
    report_file, out_dir = args
    with open(report_file, encoding="utf-8") as f:
        report = json.load(f)
    # A list when several frameworks ran; a bare summary when nothing was scanned.
    reports = report if isinstance(report, list) else [report]
    counts = {}
    failures = {}
    for r in reports:
        for outcome in ("passed", "failed", "skipped"):
            for check in r.get("results", {}).get(f"{outcome}_checks", []):
                case = check["file_path"].strip("/").split("/")[0]
                counts.setdefault(case, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
                if outcome == "failed":
                    failures.setdefault(case, []).append(
                        f"  checkov FAILED {check['check_id']} {check['check_name']}: "
                        f"{check['resource']} ({check['file_path']})"
                    )
    failed = False
    for case in sorted(os.listdir(out_dir)):
        if not os.path.isdir(os.path.join(out_dir, case)):
            continue
        c = counts.get(case, {"passed": 0, "failed": 0, "skipped": 0})
        # No passed check at all means checkov scanned nothing: a failure too.
        failed |= c["failed"] > 0 or c["passed"] == 0
        with open(os.path.join(out_dir, f"{case}.checkov"), "w", encoding="utf-8") as f:
            for line in failures.get(case, []):
                f.write(line + "\n")
            f.write(f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped\n")
    return 1 if failed else 0


if __name__ == "__main__":
    commands = {"render": render, "checkov-summary": checkov_summary}
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
