"""The kustomize subset used to render deploy/k8s behaves like kustomize on what it supports."""

import pytest
import yaml

from k8s_render import render, strategic_merge


def test_maps_merge_and_null_deletes():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert strategic_merge(base, {"a": {"c": 5, "e": 6}, "d": None}) == {"a": {"b": 1, "c": 5, "e": 6}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_lists_with_merge_key_merge_by_key_and_others_are_replaced():
    base = {"containers": [{"name": "a", "image": "x", "args": ["1", "2"]}, {"name": "b", "image": "y"}],
            "tolerations": [{"key": "t1"}]}
    patch = {"containers": [{"name": "b", "image": "z"}, {"name": "c", "image": "w"}, {"name": "a", "args": ["3"]}],
             "tolerations": [{"key": "t2"}]}
    merged = strategic_merge(base, patch)
    assert merged["containers"] == [{"name": "a", "image": "x", "args": ["3"]}, {"name": "b", "image": "z"},
                                    {"name": "c", "image": "w"}]
    assert merged["tolerations"] == [{"key": "t2"}]


def test_volume_mounts_merge_by_mount_path():
    base = {"volumeMounts": [{"name": "m", "mountPath": "/models"}]}
    merged = strategic_merge(base, {"volumeMounts": [{"name": "m", "mountPath": "/models", "readOnly": True}]})
    assert merged == {"volumeMounts": [{"name": "m", "mountPath": "/models", "readOnly": True}]}


def test_patch_directives_are_refused():
    with pytest.raises(ValueError, match="directives"):
        strategic_merge({"a": 1}, {"$patch": "replace"})


def _write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(doc) if isinstance(doc, list) else yaml.safe_dump(doc))


def _deployment(image):
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": image}]}}}}


def test_overlay_applies_patches_and_images(tmp_path):
    _write(tmp_path / "base" / "kustomization.yaml", {"resources": ["all.yaml"]})
    _write(tmp_path / "base" / "all.yaml", [_deployment("web"), {"apiVersion": "v1", "kind": "ConfigMap",
                                                                 "metadata": {"name": "web"}, "data": {"A": "1"}}])
    _write(tmp_path / "over" / "kustomization.yaml", {
        "resources": ["../base"],
        "images": [{"name": "web", "newName": "registry:5000/team/web", "newTag": "v2"}],
        "patches": [{"path": "cm.yaml"},
                    {"patch": yaml.safe_dump({"spec": {"replicas": 3}}), "target": {"kind": "Deployment", "name": "web"}}],
    })
    _write(tmp_path / "over" / "cm.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web"},
                                           "data": {"B": "2"}})
    deployment, config_map = render(tmp_path / "over")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry:5000/team/web:v2"
    assert config_map["data"] == {"A": "1", "B": "2"}


def test_image_override_keeps_an_existing_tag_and_a_registry_port(tmp_path):
    _write(tmp_path / "kustomization.yaml", {"resources": ["d.yaml"], "images": [{"name": "host:5000/web", "newName": "other/web"}]})
    _write(tmp_path / "d.yaml", _deployment("host:5000/web:1.2"))
    (deployment,) = render(tmp_path)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "other/web:1.2"


def test_unsupported_fields_and_dangling_patches_raise(tmp_path):
    _write(tmp_path / "a" / "kustomization.yaml", {"resources": [], "namePrefix": "x-"})
    with pytest.raises(ValueError, match="namePrefix"):
        render(tmp_path / "a")
    _write(tmp_path / "b" / "kustomization.yaml", {"resources": ["d.yaml"], "patches": [{"path": "p.yaml"}]})
    _write(tmp_path / "b" / "d.yaml", _deployment("web"))
    _write(tmp_path / "b" / "p.yaml", {"kind": "Deployment", "metadata": {"name": "other"}})
    with pytest.raises(ValueError, match="matches no resource"):
        render(tmp_path / "b")
