"""The `mesh` command line.

    mesh up [--model DIR] [--config FILE] [--nodes N] [--port P] [--address ADDR] [--name NAME]
    mesh status [--json] [--name NAME]
    mesh down [--name NAME] [--address ADDR]
    mesh scale --layer L --expert E --replicas N [--token T] [--name NAME]
    mesh autoscale on|off [--token T] [--name NAME]
    mesh swap --layer L --expert E[,E...] --from DIR [--token T] [--name NAME]
    mesh check [--model DIR]
    mesh serve-config [--model DIR] [--config FILE] [--name NAME] [--port P] [--app-name A]
                      [--grpc-port P] [--http-port P] [--host H] [--proxy-location L] [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from router_service import state
from protos.errors import MeshError

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


def _load_config(args: argparse.Namespace):
    from mesh.config import load_config

    return load_config(args.config, model=args.model, name=args.name, **{"router.port": getattr(args, "port", None)})


def _cmd_up(args: argparse.Namespace) -> int:
    import ray

    from cluster.local import start_local_cluster, start_mesh
    from experts.builtin import builtin_model_dir
    from mesh.controller import NAMESPACE

    config = _load_config(args)
    running = state.read(config.name)
    if running and state.is_alive(running["pid"]):
        print(f"mesh {config.name!r} is already running (pid {running['pid']}, {running['router']}); "
              f"`mesh down --name {config.name}` first", file=sys.stderr)
        return 1
    model = config.model or str(builtin_model_dir())
    cluster = None
    if args.address:
        address = args.address
    else:
        print(f"starting a local Ray cluster of {args.nodes} nodes")
        cluster = start_local_cluster(args.nodes, dashboard=args.dashboard)
        address = cluster.address
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    mesh = None
    try:
        mesh = start_mesh(config, model, progress=print)
        state.write(config.name, {"pid": os.getpid(), "router": mesh.address, "routers": mesh.addresses,
                                  "ray_address": address, "model": model, "started": time.time()})
        if len(mesh.addresses) > 1:
            print(f"routers at {', '.join(mesh.addresses)}")
        print(f"expert-mesh ready at {mesh.address}", flush=True)
        while not stop.wait(2.0):
            try:  # watchdog: a controller that Ray restarted adopts the mesh on its first call
                ray.get(mesh.controller.ready.remote(), timeout=60)
            except Exception as exc:  # noqa: BLE001 - reported, retried on the next tick
                print(f"controller not answering: {exc}", file=sys.stderr)
        print("stopping expert-mesh")
    finally:
        start = time.perf_counter()
        if mesh is not None:
            mesh.stop()
            print(f"mesh actors stopped ({time.perf_counter() - start:.1f} s)", flush=True)
        state.remove(config.name)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
            print(f"local Ray cluster stopped ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


def _admin_stub(name: str):
    from protos import expert_mesh_pb2_grpc as pb_grpc

    running = state.read(name)
    if running is None:
        return None
    return pb_grpc.MeshAdminStub(_router_channel(running["router"]))


def _router_channel(address: str):
    """A blocking channel to the router: TLS when EXPERT_MESH_TLS_CA is set (EXPERT_MESH_TLS_CERT
    and _KEY: a client certificate, for mutual TLS; _SERVER_NAME: the name its certificate carries)."""
    from protos.serving import TLSConfig, channel

    env = {k: os.environ.get(f"EXPERT_MESH_TLS_{k.upper()}") for k in ("ca", "cert", "key", "server_name")}
    return channel(address, TLSConfig(**env) if env["ca"] else None, aio=False)


def _bearer(token: str) -> list[tuple[str, str]]:
    """The admin or read token as `authorization: Bearer` metadata (none without a token)."""
    return [("authorization", f"Bearer {token}")] if token else []


def _admin_call(args: argparse.Namespace, method: str, timeout_s: float, **fields) -> int:
    """One mutating MeshAdmin call on the running mesh, with the token; prints the reply."""
    import grpc

    from protos import expert_mesh_pb2 as pb

    stub = _admin_stub(args.name)
    if stub is None:
        print(f"no running mesh named {args.name!r}", file=sys.stderr)
        return 1
    token = args.token or os.environ.get("EXPERT_MESH_ADMIN_TOKEN", "")
    request = getattr(pb, f"{method}Request")(**fields)
    try:
        reply = getattr(stub, method)(request, timeout=timeout_s, metadata=_bearer(token))
    except grpc.RpcError as exc:
        print(f"refused: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    change = f", change {reply.change_id}" if reply.change_id else ", nothing to change"
    print(f"{reply.message} (epoch {reply.epoch}{change})")
    return 0


def _cmd_scale(args: argparse.Namespace) -> int:
    return _admin_call(args, "Scale", 300, layer=args.layer, expert=args.expert, replicas=args.replicas)


def _cmd_swap(args: argparse.Namespace) -> int:
    experts = [int(e) for e in args.expert.split(",")]
    return _admin_call(args, "Swap", 600, layer=args.layer, experts=experts,
                       source_dir=os.path.abspath(getattr(args, "from")))


def _cmd_autoscale(args: argparse.Namespace) -> int:
    return _admin_call(args, "Autoscale", 30, enabled=args.state == "on")


def _cmd_rebalance(args: argparse.Namespace) -> int:
    return _admin_call(args, "Rebalance", 600, dry_run=args.dry_run)


def _cmd_placement(args: argparse.Namespace) -> int:
    import grpc
    import msgpack

    from protos import expert_mesh_pb2 as pb

    stub = _admin_stub(args.name)
    if stub is None:
        print(f"no running mesh named {args.name!r}", file=sys.stderr)
        return 1
    print("measuring links (a probe per node echoes to every other) ...", file=sys.stderr, flush=True)
    try:
        token = os.environ.get("EXPERT_MESH_READ_TOKEN") or os.environ.get("EXPERT_MESH_ADMIN_TOKEN", "")
        reply = stub.Placement(pb.PlacementRequest(), timeout=120, metadata=_bearer(token))
        report = msgpack.unpackb(reply.report, strict_map_key=False)
    except grpc.RpcError as exc:
        print(f"failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_placement(report))
    return 0


def format_placement(report: dict) -> str:
    """`mesh placement`'s text: link matrices, groups' latency, current vs proposed placement."""
    links, short = report["links"], [n[:8] for n in report["links"]["nodes"]]
    lines = ["measured RTT ms (row: from, column: to) | bandwidth MB/s",
             f"  {'':<8} " + " ".join(f"{n:>8}" for n in short) + " | " + " ".join(f"{n:>8}" for n in short)]
    for name, rtt, mbps in zip(short, links["rtt_ms"], links["mbps"]):
        lines.append(f"  {name:<8} " + " ".join(f"{r:8.2f}" for r in rtt) + " | " + " ".join(f"{b:8.0f}" for b in mbps))
    lines.append(f"routers on nodes {', '.join(n[:8] for n in report['router_nodes'])}; load: {report['load_source']}")
    current, proposed = report["current"], report["proposed"]
    for name, group in report["groups"].items():
        now = " ".join(f"L{layer}:{','.join(map(str, e))}" for layer, e in current["assignment"][name].items())
        then = " ".join(f"L{layer}:{','.join(map(str, e))}" for layer, e in proposed["assignment"][name].items())
        lines.append(f"  {name:<16} node {group['node'][:8]} {group['latency_ms']:7.2f} ms  now {now}"
                     + ("" if now == then else f"  -> {then}"))
    lines.append(f"co-activated expert pairs ({report['pairs']} counted) with both copies on one group: current "
                 f"{100 * current['pairs_kept']:.0f}%, proposed {100 * proposed['pairs_kept']:.0f}% of their tokens "
                 f"(such copies share one visit to the group)")
    lines.append(f"expected cost (token load x latency): current {current['cost']:.1f}, proposed "
                 f"{proposed['cost']:.1f} ms x tokens/s; mean latency per token copy: current "
                 f"{current['mean_latency_ms']:.2f} ms, proposed {proposed['mean_latency_ms']:.2f} ms "
                 f"({len(report['adds'])} copies move; `mesh rebalance` applies it)")
    return "\n".join(lines)


def _snapshot(args: argparse.Namespace) -> dict | None:
    import msgpack

    from protos import expert_mesh_pb2 as pb
    from protos import expert_mesh_pb2_grpc as pb_grpc

    running = state.read(args.name)
    if running is None:
        return None
    with _router_channel(running["router"]) as channel:
        token = os.environ.get("EXPERT_MESH_READ_TOKEN") or os.environ.get("EXPERT_MESH_ADMIN_TOKEN", "")
        reply = pb_grpc.MeshAdminStub(channel).Status(pb.StatusRequest(), timeout=10, metadata=_bearer(token))
    return msgpack.unpackb(reply.snapshot, strict_map_key=False)


def format_convergence(snapshot: dict) -> str:
    """The change in progress and what has not converged yet, one line."""
    change = snapshot.get("change")
    parts = [f"change {change['id']} ({change['summary']}) at step {change['step']}" if change else "no change in progress"]
    if snapshot.get("dead_groups"):
        parts.append(f"groups being restored: {', '.join(snapshot['dead_groups'])}")
    if snapshot.get("copies_sharing_a_node"):
        shared = snapshot["copies_sharing_a_node"]
        parts.append(f"{len(shared)} experts have two copies on one node although the nodes could keep them apart "
                     f"(e.g. {', '.join(shared[:4])}): a node's loss takes both")
    if snapshot.get("suspect_groups"):
        parts.append(f"groups suspect (missed an observation, still routed): {', '.join(snapshot['suspect_groups'])}")
    if snapshot.get("routers_behind"):
        parts.append(f"routers behind epoch {snapshot['epoch']}: {', '.join(snapshot['routers_behind'])}")
    if snapshot.get("sources"):
        parts.append(f"{len(snapshot['sources'])} experts serve swapped-in weights")
    return "; ".join(parts) + ("" if len(parts) > 1 else "; converged")


def _cmd_status(args: argparse.Namespace) -> int:
    snapshot = _snapshot(args)
    if snapshot is None:
        print(f"no running mesh named {args.name!r} (no state file {state.path(args.name)})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
        return 0
    print(f"mesh {snapshot['mesh']}: {snapshot['model_type']} from {snapshot['model']}, epoch {snapshot['epoch']}, "
          f"up {snapshot['uptime_s']:.0f} s, routers {', '.join(snapshot['routers'])}")
    for client in snapshot.get("direct_clients", []):
        print(f"  direct client {client['name']} on node {client['node'][:12]}: epoch {client['epoch']}, "
              f"lease {client['lease_left_s']:.0f} s left")
    for group in snapshot["groups"]:
        experts = " ".join(f"L{layer}:{','.join(map(str, e))}" for layer, e in group["experts"].items())
        health = "SUSPECT" if group.get("suspect") else "live" if group["alive"] else "DEAD"
        held = f"{group.get('device') or '?'} {group.get('nbytes', 0) / 2**20:.1f} MiB"
        print(f"  {group['name']:<16} {health:<7} node {group['node'][:12]} "
              f"{group['endpoint']:<21} {held:<16} {experts}")
    tokens, rates, copies = snapshot["tokens_per_expert"], snapshot["tokens_per_s"], snapshot["copies"]
    print(f"  tokens routed since start: {sum(tokens.values())} over {len(tokens)} (layer, expert) pairs; "
          f"autoscale {'on' if snapshot['autoscale'] else 'off'}")
    print("  " + format_convergence(snapshot))
    hot = sorted(rates.items(), key=lambda kv: -kv[1])[:8]
    if hot:
        print("  hottest experts (tokens/s over the load window, copies): " +
              ", ".join(f"L{k.replace('/', ' E')} {r:.0f}/s x{copies.get(k, 0)}" for k, r in hot))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    running = state.read(args.name)
    if running is not None and state.is_alive(running["pid"]):
        os.kill(running["pid"], signal.SIGTERM)
        deadline = time.time() + 60
        while state.is_alive(running["pid"]) and time.time() < deadline:
            time.sleep(0.2)
        if state.is_alive(running["pid"]):
            print(f"mesh {args.name!r} (pid {running['pid']}) did not stop within 60 s", file=sys.stderr)
            return 1
        print(f"stopped mesh {args.name!r}")
        return 0
    if args.address:
        return _down_by_address(args)
    state.remove(args.name)
    print(f"nothing to stop: no running mesh named {args.name!r}", file=sys.stderr)
    return 1


def _down_by_address(args: argparse.Namespace) -> int:
    import ray

    from mesh.controller import NAMESPACE

    ray.init(address=args.address, namespace=NAMESPACE, logging_level=logging.WARNING)
    try:
        controller = ray.get_actor(f"{args.name}/controller", namespace=NAMESPACE)
    except ValueError:
        print(f"nothing to stop: no mesh {args.name!r} on the cluster at {args.address}", file=sys.stderr)
        return 1
    ray.get(controller.shutdown.remote())
    ray.kill(controller)
    print(f"stopped mesh {args.name!r} on {args.address}")
    return 0


def _cmd_serve_config(args: argparse.Namespace) -> int:
    import yaml

    from cluster.serve_app import serve_config

    config = _load_config(args)
    if config.model and not Path(config.model).is_absolute():  # the cluster does not share our cwd
        config = config.model_copy(update={"model": str(Path(config.model).resolve())})
    if config.admin_token:
        print("note: admin_token is not written into the Serve config; set EXPERT_MESH_ADMIN_TOKEN in the "
              "environment of the cluster's nodes instead", file=sys.stderr)
    text = yaml.safe_dump(serve_config(config, app_name=args.app_name, grpc_port=args.grpc_port,
                                       http_port=args.http_port, host=args.host,
                                       proxy_location=args.proxy_location), sort_keys=False)
    if not args.output:
        print(text, end="")
        return 0
    Path(args.output).write_text(text)
    print(f"wrote {args.output}: `serve deploy {args.output}` (or `serve run {args.output}`), then gRPC "
          f"ExpertMesh on port {args.grpc_port} with metadata application={args.app_name}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="expert-mesh: serve MoE expert layers on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start a mesh and serve until Ctrl-C or `mesh down`")
    up.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    up.add_argument("--config", help="YAML config (see README)")
    up.add_argument("--nodes", type=int, default=2, help="emulated nodes of the local cluster (default 2)")
    up.add_argument("--port", type=int, help="router port (default 50051)")
    up.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    up.add_argument("--name", help="mesh name (default: mesh)")
    up.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with the local cluster")
    up.set_defaults(func=_cmd_up)

    status = commands.add_parser("status", help="groups, routers and tokens per expert of a running mesh")
    status.add_argument("--json", action="store_true", help="print the full snapshot as JSON")
    status.add_argument("--name", default="mesh")
    status.set_defaults(func=_cmd_status)

    down = commands.add_parser("down", help="stop a mesh started by `mesh up`")
    down.add_argument("--name", default="mesh")
    down.add_argument("--address", help="Ray cluster address, when the mesh was not started from this machine")
    down.set_defaults(func=_cmd_down)

    scale = commands.add_parser("scale", help="set the number of copies of one expert of one layer")
    scale.add_argument("--layer", type=int, required=True)
    scale.add_argument("--expert", type=int, required=True)
    scale.add_argument("--replicas", type=int, required=True)
    scale.add_argument("--token", help="admin token (default: $EXPERT_MESH_ADMIN_TOKEN)")
    scale.add_argument("--name", default="mesh")
    scale.set_defaults(func=_cmd_scale)

    swap = commands.add_parser("swap", help="hot-swap experts' weights from another checkpoint of the same model")
    swap.add_argument("--layer", type=int, required=True)
    swap.add_argument("--expert", required=True, help="expert ids, comma-separated")
    swap.add_argument("--from", required=True, help="checkpoint folder with the new weights")
    swap.add_argument("--token", help="admin token (default: $EXPERT_MESH_ADMIN_TOKEN)")
    swap.add_argument("--name", default="mesh")
    swap.set_defaults(func=_cmd_swap)

    autoscale = commands.add_parser("autoscale", help="follow measured load with expert copies (on|off)")
    autoscale.add_argument("state", choices=["on", "off"])
    autoscale.add_argument("--token", help="admin token (default: $EXPERT_MESH_ADMIN_TOKEN)")
    autoscale.add_argument("--name", default="mesh")
    autoscale.set_defaults(func=_cmd_autoscale)

    placement = commands.add_parser("placement", help="measured links, and the current and proposed placement")
    placement.add_argument("--json", action="store_true", help="print the full report as JSON")
    placement.add_argument("--name", default="mesh")
    placement.set_defaults(func=_cmd_placement)

    rebalance = commands.add_parser("rebalance", help="apply the proposed placement live (see `mesh placement`)")
    rebalance.add_argument("--dry-run", action="store_true", help="plan and report, change nothing")
    rebalance.add_argument("--token", help="admin token (default: $EXPERT_MESH_ADMIN_TOKEN)")
    rebalance.add_argument("--name", default="mesh")
    rebalance.set_defaults(func=_cmd_rebalance)

    check = commands.add_parser("check", help="run every MoE layer in-process and compare with transformers")
    check.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    check.add_argument("--tokens", type=int, default=32, help="tokens per check (default 32)")
    check.set_defaults(func=_cmd_check)

    serve_cfg = commands.add_parser("serve-config", help="write a `serve deploy` config of the mesh as a Ray Serve app")
    serve_cfg.add_argument("--model", help="checkpoint folder as the cluster's nodes see it (default: built-in model)")
    serve_cfg.add_argument("--config", help="YAML config (see README); embedded in the Serve config")
    serve_cfg.add_argument("--name", help="mesh name (default: mesh)")
    serve_cfg.add_argument("--port", type=int, help="router port, the fast path (default 50051)")
    serve_cfg.add_argument("--app-name", default="expert-mesh", help="Serve application name (default expert-mesh)")
    serve_cfg.add_argument("--grpc-port", type=int, default=9000, help="Serve's gRPC proxy port (default 9000)")
    serve_cfg.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port (default 8000)")
    serve_cfg.add_argument("--host", default="0.0.0.0", help="Serve's HTTP proxy host (default 0.0.0.0)")
    serve_cfg.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly", "Disabled"],
                           help="where Serve runs its proxies (default EveryNode)")
    serve_cfg.add_argument("-o", "--output", help="write here instead of stdout")
    serve_cfg.set_defaults(func=_cmd_serve_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.local import RAY_ENV

    for key, value in RAY_ENV.items():  # before Ray is imported: it reads them at import time
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from protos.errors import MeshError

    try:
        return args.func(args)
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
