"""State files of running meshes (`mesh up` writes one; `mesh status` / `mesh down` and a DirectClient with no
address read it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["is_alive", "path", "read", "remove", "write"]


def _root() -> Path:
    return Path(os.environ.get("EXPERT_MESH_STATE_DIR", Path.home() / ".cache" / "expert-mesh" / "run"))


def path(name: str) -> Path:
    return _root() / f"{name}.json"


def read(name: str) -> dict | None:
    try:
        return json.loads(path(name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write(name: str, data: dict) -> None:
    path(name).parent.mkdir(parents=True, exist_ok=True)
    tmp = path(name).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path(name))


def remove(name: str) -> None:
    path(name).unlink(missing_ok=True)


def is_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, is not alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True
