"""Run one simulated federation in this process through Flower's simulation engine.

    python -m simulation.run --num-supernodes 10 --run-config "defense='rlr' num-server-rounds=5"

The same ServerApp and ClientApp as ``flwr run .``, without a SuperLink: what tests, grids and
quick experiments use. Run-config values are TOML, as in ``flwr run --run-config``.
"""

from __future__ import annotations

import argparse
import tomllib


def parse_run_config(text: str) -> dict:
    """'k1=v1 k2=v2' with TOML values, as ``flwr run --run-config`` accepts."""
    if not text.strip():
        return {}
    import shlex

    return tomllib.loads("\n".join(shlex.split(text, posix=False)))


def run(overrides: dict, num_supernodes: int = 10, num_cpus: float = 1, num_gpus: float = 0.0) -> None:
    from flwr.client import ClientApp
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    import client_app.app as ca
    import server_app.app as sa

    def server_fn(context):
        return sa.build_components({**context.run_config, **overrides}, num_nodes=num_supernodes)

    def client_fn(context):
        return ca.build_client({**context.run_config, **overrides}, context.node_config)

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=num_supernodes,
                   backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="", help="TOML key=value pairs, space separated")
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per virtual client")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="share of a GPU per virtual client")
    args = parser.parse_args()
    run(parse_run_config(args.run_config), args.num_supernodes, args.num_cpus, args.num_gpus)


if __name__ == "__main__":
    main()
