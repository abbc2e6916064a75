"""The deployment files in cluster/deploy/: the KubeRay RayService carries exactly what
`mesh serve-config` writes for cluster/deploy/mesh.yaml, valid for Ray Serve's own schema; the
cluster-launcher YAML is valid for the ray-schema.json that ships with Ray; both pin the expert
groups by the node label mesh.yaml asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from mesh.config import load_config

DEPLOY = Path(__file__).resolve().parents[3] / "cluster" / "deploy"
LABEL = "expert-mesh.io/role=experts"


def _manifest() -> dict:
    return yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())


def test_the_rayservice_serves_what_mesh_serve_config_writes():
    written = subprocess.run([sys.executable, "-m", "cluster.cli", "serve-config", "--config",
                              str(DEPLOY / "mesh.yaml"), "--name", "mesh"], check=True, capture_output=True,
                             text=True, cwd=DEPLOY.parents[1]).stdout
    embedded = _manifest()["spec"]["serveConfigV2"]
    assert yaml.safe_load(embedded) == yaml.safe_load(written)
    schema = ServeDeploySchema.model_validate(yaml.safe_load(embedded))
    (app,) = schema.applications
    assert app.import_path == "cluster.serve_app:build_app"
    assert app.args["config"]["groups"]["node_labels"] == {"expert-mesh.io/role": "experts"}


def test_the_rayservice_has_a_head_gpu_workers_labels_and_secrets():
    cluster = _manifest()["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (workers,) = cluster["workerGroupSpecs"]
    params = workers["rayStartParams"]
    assert params["num-gpus"] == "1" and params["labels"] == LABEL
    worker = workers["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for pod in (head, worker):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["EXPERT_MESH_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "expert-mesh-admin"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "expert-mesh-tls"
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        config = load_config(DEPLOY / "mesh.yaml")
        assert Path(config.internal_tls.cert).parent == Path(mounts["tls"])
        assert config.model.startswith(mounts["models"])


def test_the_launcher_yaml_is_valid_for_rays_schema_and_labels_the_expert_nodes():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((DEPLOY / "launcher.yaml").read_text())
    jsonschema.validate(launcher, schema)
    experts = launcher["available_node_types"]["experts"]
    assert experts["resources"]["GPU"] == 1
    assert experts["labels"] == load_config(DEPLOY / "mesh.yaml").groups.node_labels
