"""What the balancer's tracing hooks cost per request, in isolation, against the same request's
bookkeeping without them.

    python bench/tracing_hooks.py [--requests 20000] [--rounds 5] [--ratio 0.1]

``bench/balancer.py --tracing`` measures tracing on a whole daemon under load, where one round's
noise on a busy host is as large as what tracing costs. This script isolates the hooks: in one
process it runs the balancer's tracing calls for a request (start, one attempt, its end, finish)
exactly as the relay makes them, exporting to a real OTLP/HTTP receiver in a child process, and
subtracts the same request's record-keeping without tracing. CPU time of all threads
(``process_time``, so the batch export thread counts) per request, the median of ``--rounds``.

Cases: a request with no ``traceparent`` and one whose client sent an unsampled ``traceparent``,
both at ``--ratio`` sampling (parent-based trace-id ratio, as ``OTEL_TRACES_SAMPLER`` sets it), and
a request that is always sampled (ratio 1). The ``mean_at_ratio`` figure is the first case: what
an average request costs at that ratio. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"
UNSAMPLED_PARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def _request(tracing: Any | None, headers: list[tuple[bytes, bytes]]) -> None:
    """One relayed request's bookkeeping, traced when ``tracing`` is given."""
    from flockctl.server.proxy import _identify
    from flockctl.server.request_log import Attempt, RequestRecord

    rec = RequestRecord("POST", "/v1/chat/completions", "127.0.0.1", time.perf_counter())
    _identify(rec, headers)  # as the relay does with a request log or tracing on
    rec.model, rec.bytes_in = "m", 100
    if tracing is not None:
        tracing.start(rec, {"headers": headers})
    tried = Attempt("w1")
    rec.attempts.append(tried)
    if rec.span is not None:
        tracing.attempt(rec, tried)  # type: ignore[union-attr]
    tried.status, tried.ms = 200, 1.0
    if rec.span is not None:
        tracing.end_attempt(tried)  # type: ignore[union-attr]
    rec.status, rec.worker, rec.ttfb, rec.latency, rec.bytes_out = 200, "w1", 0.001, 0.002, 300
    if rec.span is not None:
        tracing.finish(rec)  # type: ignore[union-attr]


def _cost(ratio: float, headers: list[tuple[bytes, bytes]], n: int, rounds: int, endpoint: str):
    """Microseconds of CPU per request the hooks add: one median and every round's figure."""
    from flockctl import telemetry
    from flockctl.server.tracing import BalancerTracing

    os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
    os.environ["OTEL_TRACES_SAMPLER_ARG"] = str(ratio)
    sent = telemetry.setup("flockctl-balancer", endpoint)
    assert sent is not None
    tracing = BalancerTracing(sent.tracer_provider, sent)
    try:
        figures = []
        for _ in range(rounds):
            for _ in range(n // 10):
                _request(tracing, headers)
            sent.tracer_provider.force_flush()
            c0 = time.process_time()
            for _ in range(n):
                _request(tracing, headers)
            sent.tracer_provider.force_flush()
            c1 = time.process_time()
            for _ in range(n):
                _request(None, headers)
            c2 = time.process_time()
            figures.append(((c1 - c0) - (c2 - c1)) / n * 1e6)
    finally:
        tracing.shutdown()
    return round(statistics.median(figures), 2), [round(f, 2) for f in figures]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per round and case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.1, help="trace sampling ratio")
    args = parser.parse_args()
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            " from otlp_receiver import OtlpReceiver; r = OtlpReceiver().start();"
            " print(r.endpoint, flush=True); time.sleep(3600)",
            str(TESTS),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        endpoint = receiver.stdout.readline().strip()
        cases = {
            "no traceparent": (args.ratio, []),
            "client traceparent, unsampled": (args.ratio, [(b"traceparent", UNSAMPLED_PARENT)]),
            "always sampled": (1.0, []),
        }
        out: dict[str, Any] = {}
        for name, (ratio, headers) in cases.items():
            median, rounds = _cost(ratio, headers, args.requests, args.rounds, endpoint)
            out[name] = {"sample_ratio": ratio, "us_per_request": median, "rounds": rounds}
    finally:
        receiver.kill()
        receiver.wait()
    report = {
        "bench": "tracing_hooks",
        "requests_per_round": args.requests,
        "mean_at_ratio_us": out["no traceparent"]["us_per_request"],
        "target_us": 50.0,
        "cases": out,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
