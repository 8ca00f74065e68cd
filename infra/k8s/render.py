"""A small stand-in for ``kustomize build``, for machines where the kustomize binary cannot be had.

It renders the kustomizations of ``infra/k8s`` with exactly the features they use: ``resources``
(files and folders), ``namespace``, ``labels``, ``patches`` (JSON 6902), ``replicas`` and
``images``, applied in kustomize's order. Any other field or form is refused, so a kustomization
that outgrows this file fails loudly instead of rendering something kustomize would not.
``tests/unit/test_k8s.py`` checks that both render the same objects wherever kustomize runs.

    python infra/k8s/render.py infra/k8s/overlays/local > local.yaml
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

_KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches", "replicas", "images"}
# Kinds without a namespace among those a recstack kustomization could hold.
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
}
_REPLICATED_KINDS = {"Deployment", "ReplicaSet", "ReplicationController", "StatefulSet"}

Resource = dict[str, Any]


class KustomizationError(Exception):
    """A kustomization this renderer cannot render exactly like kustomize would."""


def render(directory: str | Path) -> list[Resource]:
    """The resources of the kustomization in ``directory``, transformed, in declaration order."""
    root = Path(directory)
    spec = _load_kustomization(root)
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        path = root / entry
        if path.is_dir():
            resources.extend(render(path))
        elif path.is_file():
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
        else:
            raise KustomizationError(f"{root}: resource {entry!r} does not exist")
    for patch in spec.get("patches", []):
        _apply_patch(resources, patch, root)
    if spec.get("namespace"):
        _set_namespace(resources, spec["namespace"])
    for label in spec.get("labels", []):
        _add_labels(resources, label, root)
    for replica in spec.get("replicas", []):
        _set_replicas(resources, replica, root)
    for image in spec.get("images", []):
        _set_images(resources, image)
    _check_unique(resources, root)
    return resources


def _load_kustomization(root: Path) -> dict[str, Any]:
    for name in _KUSTOMIZATION_NAMES:
        path = root / name
        if path.is_file():
            spec = yaml.safe_load(path.read_text()) or {}
            unknown = set(spec) - _FIELDS
            if unknown:
                raise KustomizationError(f"{path}: fields {sorted(unknown)} are not supported by render.py")
            return spec
    raise KustomizationError(f"{root} has no kustomization.yaml")


# ------------------------------------------------------------------------------------- patches


def _apply_patch(resources: list[Resource], patch: dict[str, Any], root: Path) -> None:
    if "path" in patch:
        text = (root / patch["path"]).read_text()
    else:
        text = patch.get("patch", "")
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise KustomizationError(f"{root}: only JSON 6902 patches (a list of operations) are supported")
    target = patch.get("target")
    if not target:
        raise KustomizationError(f"{root}: a JSON 6902 patch needs a target")
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise KustomizationError(f"{root}: patch target fields {sorted(unknown)} are not supported")
    matched = [r for r in resources if _matches(r, target)]
    if not matched:
        raise KustomizationError(f"{root}: patch target {target} matches no resource")
    for resource in matched:
        for operation in operations:
            _json_patch(resource, operation)


def _matches(resource: Resource, target: dict[str, str]) -> bool:
    group, _, version = resource.get("apiVersion", "").rpartition("/")
    meta = resource.get("metadata", {})
    checks = {
        "group": group,
        "version": version,
        "kind": resource.get("kind", ""),
        "namespace": meta.get("namespace", ""),
    }
    for field, actual in checks.items():
        if field in target and target[field] != actual:
            return False
    # kustomize reads a target name as an anchored regular expression.
    return "name" not in target or re.fullmatch(target["name"], meta.get("name", "")) is not None


def _json_patch(document: Resource, operation: dict[str, Any]) -> None:
    op, path = operation.get("op"), operation.get("path", "")
    if op not in ("add", "replace", "remove"):
        raise KustomizationError(f"JSON patch operation {op!r} is not supported")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    if not tokens:
        raise KustomizationError(f"JSON patch path {path!r} must name a field")
    parent: Any = document
    for token in tokens[:-1]:
        parent = _child(parent, token, path)
    last = tokens[-1]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(parent, list):
        if op == "add":
            index = len(parent) if last == "-" else _index(parent, last, path, inclusive=True)
            parent.insert(index, value)
            return
        index = _index(parent, last, path, inclusive=False)
        if op == "replace":
            parent[index] = value
        else:
            del parent[index]
        return
    if not isinstance(parent, dict):
        raise KustomizationError(f"JSON patch path {path!r} goes through a scalar")
    if op in ("replace", "remove") and last not in parent:
        raise KustomizationError(f"JSON patch {op} {path!r}: the field does not exist")
    if op == "remove":
        del parent[last]
    else:
        parent[last] = value


def _child(node: Any, token: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, token, path, inclusive=False)]
    if isinstance(node, dict) and token in node:
        return node[token]
    raise KustomizationError(f"JSON patch path {path!r}: {token!r} does not exist")


def _index(items: list, token: str, path: str, inclusive: bool) -> int:
    if not token.isdigit() or int(token) > len(items) - (0 if inclusive else 1):
        raise KustomizationError(f"JSON patch path {path!r}: no list index {token!r}")
    return int(token)


# -------------------------------------------------------------------------------- transformers


def _set_namespace(resources: list[Resource], namespace: str) -> None:
    for resource in resources:
        if resource.get("kind") not in _CLUSTER_SCOPED:
            resource.setdefault("metadata", {})["namespace"] = namespace


def _add_labels(resources: list[Resource], label: dict[str, Any], root: Path) -> None:
    if label.get("includeSelectors") or label.get("includeTemplates"):
        raise KustomizationError(f"{root}: labels with includeSelectors/includeTemplates are not supported")
    for resource in resources:
        labels = resource.setdefault("metadata", {}).setdefault("labels", {})
        labels.update({key: str(value) for key, value in label.get("pairs", {}).items()})


def _set_replicas(resources: list[Resource], replica: dict[str, Any], root: Path) -> None:
    matched = [
        r
        for r in resources
        if r.get("kind") in _REPLICATED_KINDS and r.get("metadata", {}).get("name") == replica["name"]
    ]
    if not matched:
        raise KustomizationError(f"{root}: replicas for {replica['name']!r} match no workload")
    for resource in matched:
        resource.setdefault("spec", {})["replicas"] = int(replica["count"])


def _split_image(image: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``:tag``); a digest stays with ``@``."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _set_images(resources: list[Resource], entry: dict[str, Any]) -> None:
    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and isinstance(container.get("image"), str):
                            container["image"] = _new_image(container["image"], entry)
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    for resource in resources:
        visit(resource)


def _new_image(image: str, entry: dict[str, Any]) -> str:
    name, suffix = _split_image(image)
    if name != entry["name"]:
        return image
    if entry.get("digest"):
        suffix = "@" + str(entry["digest"])
    elif entry.get("newTag") is not None:
        suffix = ":" + str(entry["newTag"])
    return str(entry.get("newName") or name) + suffix


def _check_unique(resources: list[Resource], root: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for resource in resources:
        meta = resource.get("metadata", {})
        key = (
            resource.get("apiVersion", "").rpartition("/")[0],
            resource.get("kind", ""),
            meta.get("namespace", ""),
            meta.get("name", ""),
        )
        if key in seen:
            raise KustomizationError(f"{root}: {key[1]} {key[3]!r} is declared twice")
        seen.add(key)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        resources = render(argv[0])
    except (KustomizationError, OSError, yaml.YAMLError) as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(resources, sort_keys=True, default_flow_style=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
