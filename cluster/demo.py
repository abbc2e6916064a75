"""`make demo`: the main job on the embedded default (the built-in model)."""

from __future__ import annotations

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main(["check", *sys.argv[1:]]))
