"""The fuzzer of tests/fuzzing.py at 10,000 cases (16 categories x 625) against a mesh on an
emulated 3-node cluster; prints the count of every (category, status code) and every failure.
Exit status 1 when any case got a code it should not (UNKNOWN and INTERNAL never may) or a wrong
answer, or the mesh stopped answering right.

    .venv/bin/python bench/fuzz_mesh.py [--cases 10000] [--seed 0]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is beside bench/

import ray  # noqa: E402

from cluster.local import start_local_cluster, start_mesh  # noqa: E402
from experts.builtin import build_model, save_checkpoint  # noqa: E402
from mesh.config import MeshConfig  # noqa: E402
from mesh.controller import NAMESPACE  # noqa: E402
from tests.fuzzing import CATEGORIES, Fuzzer, alive_check, fuzz_target, run  # noqa: E402

MAX_TOKENS = 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    per_category = -(-args.cases // len(CATEGORIES))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz_mesh-") as tmp:
        path = save_checkpoint(build_model("mixtral", seed=7), Path(tmp) / "mixtral")
        cluster = start_local_cluster(num_nodes=3)
        try:
            ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
            config = MeshConfig(name="fuzz", admin_token="fuzz-admin", read_token="fuzz-read",
                                router={"port": 0, "max_request_tokens": MAX_TOKENS,
                                        "max_queue_tokens": 64 * MAX_TOKENS})
            mesh = start_mesh(config, path)
            try:
                target = fuzz_target(mesh, path, MAX_TOKENS)
                outcome = run(Fuzzer(target, args.seed), per_category, alive_check(target), every=100,
                              progress=lambda m: print(f"[fuzz {time.perf_counter() - start:6.1f}s] {m}",
                                                       file=sys.stderr, flush=True))
            finally:
                mesh.stop()
        finally:
            ray.shutdown()
            cluster.shutdown()
    by_category = collections.defaultdict(dict)
    for (category, code), n in outcome.codes.items():
        by_category[category][code] = n
    codes = sorted({code for _, code in outcome.codes})
    print(f"{sum(outcome.codes.values())} cases, seed {args.seed}, {time.perf_counter() - start:.0f} s")
    print(f"{'category':<16} " + " ".join(f"{c:>18}" for c in codes))
    for category in CATEGORIES:
        print(f"{category:<16} " + " ".join(f"{by_category[category].get(c, 0):>18}" for c in codes))
    for failure in outcome.failures:
        print("FAILED", failure)
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
