"""Lints and renders the chart with Helm's own SDK (helm-python-sdk), for helm/check.sh.

usage: render.py CHART OUT_DIR RELEASE NAMESPACE KUBE_VERSION [VALUES_FILE]

Writes each rendered template with content to OUT_DIR (one file per template, NOTES.txt
included) and checks a few invariants that schemas cannot express. Exits non-zero on a lint
warning or error, a render error or a broken invariant.
"""

import os
import sys

import helm_python as helm
import yaml

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def main() -> int:
    chart_dir, out_dir, release, namespace, kube_version = sys.argv[1:6]
    values_file = sys.argv[6] if len(sys.argv) > 6 else None
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
        print(f"  lint {SEVERITY.get(severity, severity)}: {message['path']}: {message['error']}")
        failed |= severity >= 2
    for error in report["errors"]:
        print(f"  lint ERROR: {error}")
    if failed:
        return 1

    with helm.Chart.load(chart_dir) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)

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
    print(f"  lint ok; rendered {len(docs)} objects: {summary}")
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


if __name__ == "__main__":
    sys.exit(main())
