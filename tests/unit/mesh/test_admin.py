"""Admin auth and the typed replies of admin calls (mesh/admin.py): pure, no Ray."""

from __future__ import annotations

import pytest

from mesh.admin import AdminAuth, accepted, refused
from protos.errors import AdminError, StepUnavailableError


def test_mutating_calls_need_the_admin_token_and_none_configured_refuses_all(monkeypatch):
    monkeypatch.delenv("EXPERT_MESH_ADMIN_TOKEN", raising=False)
    with pytest.raises(AdminError, match="no admin token is configured"):
        AdminAuth(None, "r").check_admin("r")
    auth = AdminAuth("a", "r")
    auth.check_admin("a")
    for wrong in ("r", "", None, b"\xff", "a "):
        with pytest.raises(AdminError, match="missing or wrong"):
            auth.check_admin(wrong)
    monkeypatch.setenv("EXPERT_MESH_ADMIN_TOKEN", "env")  # the environment overrides the config
    auth.check_admin("env")
    with pytest.raises(AdminError):
        auth.check_admin("a")


@pytest.mark.parametrize("admin,read,allowed,denied", [
    (None, None, [None, "", "x"], []),          # no token configured: open
    ("a", None, ["a"], [None, "x"]),            # an admin token alone closes Status and Placement
    (None, "r", ["r"], [None, "a"]),
    ("a", "r", ["a", "r"], [None, "x"]),
])
def test_reading_is_open_until_a_token_is_configured_then_takes_either(monkeypatch, admin, read, allowed, denied):
    monkeypatch.delenv("EXPERT_MESH_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("EXPERT_MESH_READ_TOKEN", raising=False)
    auth = AdminAuth(admin, read)
    for token in allowed:
        auth.check_read(token)
    for token in denied:
        with pytest.raises(AdminError, match="read or admin token"):
            auth.check_read(token)


def test_replies_carry_the_status_of_their_error():
    assert accepted("done", 7, "scale-3") == {"ok": True, "message": "done", "epoch": 7, "change_id": "scale-3"}
    cases = [(AdminError("no"), "PERMISSION_DENIED", True), (ValueError("bad layer"), "INVALID_ARGUMENT", False),
             (StepUnavailableError("group gone"), "UNAVAILABLE", False)]
    for error, code, denied in cases:
        reply = refused("scale", error, 4)
        assert (reply["ok"], reply["code"], reply["denied"], reply["epoch"]) == (False, code, denied, 4)
        assert reply["message"] == f"scale refused, nothing changed: {error}"
