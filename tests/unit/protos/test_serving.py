"""How servers take calls: the byte budget of request bytes in flight."""

from __future__ import annotations

import pytest


def test_the_byte_budget_refuses_what_would_pass_it_but_never_a_lone_request():
    from experts.errors import ResourceExhaustedError
    from protos.serving import ByteBudget

    budget = ByteBudget(100)
    with budget.hold(1000):  # alone: taken
        with pytest.raises(ResourceExhaustedError, match="1000 request bytes in flight; 1 more"):
            with budget.hold(1):
                pass
    with budget.hold(60), budget.hold(40):
        assert budget.in_use == 100
    assert budget.in_use == 0
