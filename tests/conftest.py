"""Settings every test needs: Ray on loopback, no usage stats, no token auth, no cloud probe.

Ray's dashboard asks the cloud metadata address (169.254.169.254, metadata.google.internal) which
cloud it runs on unless `~/ray_bootstrap_config.yaml` names the provider, whatever
RAY_USAGE_STATS_ENABLED says, and its head posts a "usage stats disabled" note to Ray's report
URL. The tests run with a HOME of their own that names the local provider and a report URL on a
closed loopback port, so every Ray process they start (it inherits both) talks to loopback only.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="expert-mesh-tests-home-"))
atexit.register(shutil.rmtree, _HOME, True)
(_HOME / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
os.environ["EXPERT_MESH_CACHE"] = os.environ.get("EXPERT_MESH_CACHE",
                                                 str(Path.home() / ".cache" / "expert-mesh"))
os.environ["HOME"] = str(_HOME)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_REPORT_URL", "http://127.0.0.1:9/")  # the discard port: nothing listens

from tests.checkpoints import zoo  # noqa: E402,F401  (session fixture)
