"""How fast ``flockctl simulate`` replays traffic: one hour at 5 requests per second (the issue
asks for under 10 s), through qlrm and request-rate, timed in this process.

    python bench/simulate_speed.py [--rate 5] [--seconds 3600] [--seed 0]

Prints one JSON object: wall seconds per run, requests, and simulated seconds per wall second.
"""

from __future__ import annotations

import argparse
import json
import time

from flockctl.server.simulate.service import ServiceModel
from flockctl.server.simulate.sim import simulate
from flockctl.server.simulate.trace import synthetic
from flockctl.server.spec_file import resolve

RUNS = {
    "qlrm": {"max_workers": 8},
    "request-rate": {"max_workers": 8, "target_qps_per_replica": 1.0},
    "fixed": {"replicas": 6},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5)
    parser.add_argument("--seconds", type=float, default=3600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    trace = synthetic(f"poisson:{args.rate}:{args.seconds}", args.seed)
    rows = {}
    for name, flags in RUNS.items():
        cfg = resolve(None, flags)
        start = time.perf_counter()
        raw = simulate(trace, cfg, ServiceModel(), args.seed)
        wall = time.perf_counter() - start
        rows[name] = {
            "wall_s": round(wall, 3),
            "simulated_s": round(raw.duration, 1),
            "speedup": round(raw.duration / wall, 1),
            "served": len(raw.served),
        }
    print(
        json.dumps(
            {
                "trace": f"poisson:{args.rate}:{args.seconds}",
                "requests": len(trace.requests),
                "runs": rows,
                "target_wall_s": 10,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
