"""A small, honest subset of `kustomize build`, enough for deploy/k8s/.

Supported kustomization fields: ``resources`` (YAML files or directories holding a
kustomization), ``images`` (name -> newName/newTag) and ``patches`` (strategic-merge
patches from ``path`` or inline ``patch``, matched to a resource by kind and
metadata.name, or by an explicit ``target``). Anything else raises, so the renderer
never silently drops a field that real kustomize would apply.

Strategic merge here follows Kubernetes' rules for the fields that are patched in
this repository: maps merge recursively, ``null`` deletes a key, lists listed in
MERGE_KEYS merge element-wise by their merge key, every other list is replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "images", "patches"}

# Merge keys of the patchStrategy=merge lists in core/v1 PodSpec and Container.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """Return ``base`` with ``patch`` applied (neither argument is modified)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch or any(key.startswith("$") for key in patch):
            raise ValueError(f"strategic-merge directives are not supported: {sorted(patch)}")
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = strategic_merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def render(kustomization_dir: Path) -> list[dict]:
    """Render the kustomization in ``kustomization_dir`` to a list of manifests."""
    kustomization_dir = Path(kustomization_dir)
    spec = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    unsupported = set(spec) - SUPPORTED_FIELDS
    if unsupported:
        raise ValueError(f"{kustomization_dir}: unsupported kustomization fields {sorted(unsupported)}")

    resources: list[dict] = []
    for entry in spec.get("resources", []):
        path = kustomization_dir / entry
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)

    for entry in spec.get("patches", []):
        if "path" in entry:
            patch = yaml.safe_load((kustomization_dir / entry["path"]).read_text())
        else:
            patch = yaml.safe_load(entry["patch"])
        target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        matches = [i for i, doc in enumerate(resources) if _matches(doc, target)]
        if not matches:
            raise ValueError(f"{kustomization_dir}: patch target {target} matches no resource")
        for i in matches:
            resources[i] = strategic_merge(resources[i], patch)

    for image in spec.get("images", []):
        resources = [_set_image(doc, image) for doc in resources]
    return resources


def _matches(doc: dict, target: dict) -> bool:
    return doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]


def _set_image(doc: dict, image: dict) -> dict:
    doc = copy.deepcopy(doc)
    pod_spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        name, tag = container["image"], ""
        if ":" in name.rsplit("/", 1)[-1]:  # a tag, not a registry port
            name, _, tag = name.rpartition(":")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return doc
