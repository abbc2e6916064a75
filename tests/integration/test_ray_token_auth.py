"""The mesh with Ray's token authentication on (RAY_AUTH_MODE=token, Ray 2.60): a cluster of its
own, started in a child process with a token, serves the right answers; a driver with another
token, or none, cannot even connect to that cluster, so it can call none of the mesh's actors."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _child() -> None:
    """Runs under RAY_AUTH_MODE=token: cluster, mesh, one Forward against MoELayer, two outsiders."""
    import tempfile

    import ray
    import torch

    from cluster.local import start_local_cluster, start_mesh
    from experts import MoELayer
    from experts.builtin import build_model, save_checkpoint
    from mesh.config import MeshConfig
    from mesh.controller import NAMESPACE
    from router_service import MeshClient

    path = save_checkpoint(build_model("mixtral", seed=3), Path(tempfile.mkdtemp()) / "model")
    layer = MoELayer.from_pretrained(path, layer=0)
    cluster = start_local_cluster(num_nodes=2)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    mesh = start_mesh(MeshConfig(name="token-auth", router={"port": 0}), path)
    x = torch.randn(5, layer.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with MeshClient(mesh.address) as client:
        error = ((client.forward(0, x) - layer(x)).abs().max() / layer(x).abs().max()).item()
    outsiders = {}
    probe = (f"import ray; ray.init(address={cluster.address!r}); "
             f"print(ray.get(ray.get_actor('token-auth/controller', namespace={NAMESPACE!r}).snapshot.remote())[:8])")
    for who, token in (("wrong token", "not-the-token"), ("no token", None)):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        if token:
            env["RAY_AUTH_TOKEN"] = token
        else:
            env["RAY_AUTH_TOKEN_PATH"] = str(Path(tempfile.mkdtemp()) / "none")  # an unreadable token file
        run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        outsiders[who] = {"rc": run.returncode, "refused": "Failed to connect" in run.stderr
                          or "uthenticat" in run.stderr or "token" in run.stderr.lower()}
    mesh.stop()
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps({"error": error, "outsiders": outsiders}))


def test_the_mesh_serves_under_ray_token_auth_and_outsiders_cannot_reach_its_actors():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["error"] <= 1e-5, result
    for who, outcome in result["outsiders"].items():
        assert outcome["rc"] != 0 and outcome["refused"], (who, outcome)


if __name__ == "__main__":
    _child()
