"""Settings every test needs: Ray on loopback, no usage stats, no token auth."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tests.checkpoints import zoo  # noqa: E402,F401  (session fixture)
