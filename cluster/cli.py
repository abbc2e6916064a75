"""The `mesh` command line."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _cmd_check(args: argparse.Namespace) -> int:
    from cluster.check import check_layers
    from experts.builtin import builtin_model_dir

    path = args.model or builtin_model_dir()
    print(f"model: {path}")
    worst = 0.0
    for layer, err in check_layers(path, num_tokens=args.tokens):
        print(f"  layer {layer:3d}: max|MoELayer - transformers| / max|transformers| = {err:.2e}")
        worst = max(worst, err)
    ok = worst <= 1e-5
    print(f"{'OK' if ok else 'MISMATCH'}: worst relative error {worst:.2e} (tolerance 1e-5, fp32)")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="expert-mesh: serve MoE expert layers on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run every MoE layer in-process and compare with transformers")
    check.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    check.add_argument("--tokens", type=int, default=32, help="tokens per check (default 32)")
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
