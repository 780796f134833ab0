"""flockctl simulate: traces, the service model, the simulation through the daemon's own classes,
and the command's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flockctl.server.autoscaler import QueueLengthRunningMean, RequestRate
from flockctl.server.controller import Controller
from flockctl.server.policies import Latency
from flockctl.server.pool import WorkerPool
from flockctl.server.simulate import report
from flockctl.server.simulate.service import (
    ServiceModel,
    ServiceModelError,
    load_service_model,
)
from flockctl.server.simulate.sim import Simulation, simulate
from flockctl.server.simulate.trace import Trace, TraceError, TraceRequest, load, synthetic
from flockctl.server.spec_file import resolve

JSON_KEYS = {
    "requests",
    "worker_seconds",
    "cost",
    "ttft_p50_s",
    "ttft_p99_s",
    "latency_p99_s",
    "slo_attainment",
    "refused",
    "max_workers",
    "scale_events",
}


def cfg(**flags):
    return resolve(None, flags)


def trace_of(*requests: tuple[float, int, int], duration: float | None = None) -> Trace:
    reqs = [TraceRequest(*r) for r in requests]
    return Trace(reqs, duration if duration is not None else reqs[-1].t, "test")


# -- traces --------------------------------------------------------------------------------------


def test_azure_csv_times_are_seconds_from_the_first_request(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    trace = load(path)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [(374, 44), (396, 109)]
    assert trace.requests[0].t == 0
    assert trace.requests[1].t == pytest.approx(4.314579, abs=1e-6)


def test_burstgpt_csv(tmp_path: Path) -> None:
    path = tmp_path / "burst.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,GPT-4,1087,0,1087,Conversation log\n"
    )
    trace = load(path)
    assert [(r.t, r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
        (0, 472, 18),
        (40, 1087, 0),
    ]


def test_json_lines_and_flockctls_request_log(tmp_path: Path) -> None:
    lines = tmp_path / "t.jsonl"
    rows = [
        {"t": 2.5, "prompt_tokens": 10, "output_tokens": 3},
        {"t": 1, "prompt_tokens": 4, "output_tokens": 1},
    ]
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r.t, r.prompt_tokens) for r in load(lines).requests] == [(0, 4), (1.5, 10)]
    log = tmp_path / "requests.jsonl"
    record = {"time": "2026-12-01T10:00:00.000Z", "path": "/v1/completions", "status": 200}
    log.write_text(
        json.dumps({**record, "prompt_tokens": 12, "completion_tokens": 7})
        + "\n"
        + json.dumps(
            {**record, "path": "/v1/models", "prompt_tokens": None, "completion_tokens": None}
        )
        + "\n"
        + json.dumps(
            {
                **record,
                "time": "2026-12-01T10:00:03.250Z",
                "prompt_tokens": 5,
                "completion_tokens": 2,
            }
        )
        + "\n"
    )
    trace = load(log)
    assert [(r.t, r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
        (0, 12, 7),
        (3.25, 5, 2),
    ]


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n4,x,5\n", ":3:2:", "ContextTokens 'x'"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n4,5\n", ":3:3:", "GeneratedTokens"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,2,3\n", ":2:1:", "TIMESTAMP"),
        (
            '{"t": 1, "prompt_tokens": 2, "output_tokens": 3}\n{"t": 2, "prompt_tokens": 2,,}\n',
            ":2:29:",
            "not JSON",
        ),
        ('{"t": 1, "prompt_tokens": 2, "output_tokens": -3}\n', ":1:30:", "output_tokens"),
        ("when,prompt,out\n1,2,3\n", ":1:", "unknown trace header"),
    ],
)
def test_a_malformed_line_names_its_line_and_column(
    tmp_path: Path, text: str, where: str, what: str
) -> None:
    path = tmp_path / "bad.trace"
    path.write_text(text)
    with pytest.raises(TraceError) as err:
        load(path)
    assert f"{path}{where}" in str(err.value)
    assert what in str(err.value)


def test_synthetic_traces_follow_their_rate_and_repeat_for_a_seed() -> None:
    poisson = synthetic("poisson:5:2000", seed=3)
    assert poisson.duration == 2000
    assert 0.95 * 10_000 < len(poisson.requests) < 1.05 * 10_000
    assert synthetic("poisson:5:2000", seed=3) == poisson
    assert synthetic("poisson:5:2000", seed=4) != poisson
    bursty = synthetic("gamma:5:4:2000", seed=3)
    gaps = [b.t - a.t for a, b in zip(bursty.requests, bursty.requests[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert 0.8 * 0.2 < mean < 1.2 * 0.2
    assert cv > 2.5  # a Poisson process has 1
    day = synthetic("diurnal:4:0.5:24", seed=3)
    night = sum(1 for r in day.requests if r.t < 3600)
    noon = sum(1 for r in day.requests if 11 * 3600 <= r.t < 12 * 3600)
    assert noon > 4 * night


@pytest.mark.parametrize("spec", ["poisson:5", "uniform:1:2", "gamma:1:x:3", "poisson:-1:10"])
def test_a_bad_synthetic_process_is_an_error_naming_it(spec: str) -> None:
    with pytest.raises(TraceError, match="--synthetic"):
        synthetic(spec)


# -- the service model ---------------------------------------------------------------------------


def test_one_request_on_an_idle_worker_takes_the_models_time() -> None:
    model = ServiceModel(prefill_tokens_per_s=1000, decode_tokens_per_s=50)
    raw = simulate(trace_of((1.0, 500, 101)), cfg(min_workers=1, max_workers=1), model)
    ((arrival, ttft, latency),) = raw.served
    assert (arrival, ttft) == (1.0, pytest.approx(0.5))
    assert latency == pytest.approx(0.5 + 100 / 50)
    assert model.alone(500, 101) == (pytest.approx(ttft), pytest.approx(latency))


def test_jobs_decoding_together_go_at_the_batching_curves_speed() -> None:
    model = ServiceModel(
        prefill_tokens_per_s=1e9, decode_tokens_per_s=100, batching=((1, 1.0), (2, 0.5))
    )
    raw = simulate(trace_of((0.0, 1, 101), (0.0, 1, 101)), cfg(min_workers=1, max_workers=1), model)
    # Two jobs at half speed each: 100 tokens take 2 s instead of 1.
    assert [round(s[2], 6) for s in raw.served] == [2.0, 2.0]


def test_jobs_past_the_batch_wait_on_the_worker() -> None:
    model = ServiceModel(prefill_tokens_per_s=1e9, decode_tokens_per_s=10, max_batch_size=1)
    raw = simulate(trace_of((0.0, 1, 11), (0.0, 1, 11)), cfg(min_workers=1, max_workers=1), model)
    assert sorted(round(s[2], 6) for s in raw.served) == [1.0, 2.0]


def test_a_service_model_file_round_trips_and_names_a_bad_field(tmp_path: Path) -> None:
    model = ServiceModel(prefill_tokens_per_s=1234, max_batch_size=4, batching=((1, 1.0), (4, 0.6)))
    path = tmp_path / "m.json"
    path.write_text(json.dumps(model.to_dict()))
    assert load_service_model(path) == model
    path.write_text(json.dumps({"decode_tokens_per_sec": 5}))
    with pytest.raises(ServiceModelError, match="unknown field 'decode_tokens_per_sec'"):
        load_service_model(path)
    path.write_text(json.dumps({"max_batch_size": 0}))
    with pytest.raises(ServiceModelError, match="max_batch_size"):
        load_service_model(path)


# -- the simulation ------------------------------------------------------------------------------


def test_it_runs_the_daemons_own_classes() -> None:
    sim = Simulation(synthetic("poisson:1:10"), cfg(max_workers=3), ServiceModel())
    assert type(sim.controller) is Controller
    assert type(sim.pool) is WorkerPool
    assert type(sim.controller.policy) is QueueLengthRunningMean
    rate = Simulation(synthetic("poisson:1:10"), cfg(target_qps_per_replica=2), ServiceModel())
    assert type(rate.controller.policy) is RequestRate


def test_the_latency_policy_takes_the_deployments_decay() -> None:
    sim = Simulation(
        synthetic("poisson:1:10"), cfg(policy="latency", latency_decay=2.5), ServiceModel()
    )
    assert isinstance(sim.pool.policy, Latency)
    assert sim.pool.policy.decay == 2.5


@pytest.mark.parametrize("workers", [1, 3, 7])
def test_a_fixed_fleet_costs_exactly_workers_times_duration(workers: int) -> None:
    model = ServiceModel(cost_per_hour=3.6)
    raw = simulate(synthetic("poisson:2:900", seed=5), cfg(replicas=workers), model, seed=5)
    assert raw.duration >= 900
    assert raw.worker_seconds == workers * raw.duration
    assert raw.cost == pytest.approx(workers * raw.duration / 1000)
    assert raw.max_workers == workers


def test_the_same_seed_gives_the_same_run() -> None:
    deployment = cfg(max_workers=6, autoscale_up=2, autoscale_down=1, policy="power-of-two")
    model = ServiceModel(spot_price_per_hour=0.3, preemptions_per_hour=2)
    runs = [
        report.summarize(simulate(synthetic("gamma:3:3:1200", seed=s), deployment, model, seed=s))
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_qlrm_scales_up_under_load_and_back_down_with_reasons() -> None:
    trace = Trace(
        [TraceRequest(i / 8, 200, 100) for i in range(8 * 600)]
        + [TraceRequest(600 + i, 200, 100) for i in range(1200)],
        1800,
        "burst then trickle",
    )
    deployment = cfg(min_workers=1, max_workers=5, downscale_delay=60)
    raw = simulate(trace, deployment, ServiceModel(cold_start_s=30))
    ups = [e for e in raw.scale_events if e.after > e.before]
    downs = [e for e in raw.scale_events if e.after < e.before]
    assert ups and ups[0].t < 120
    assert "autoscale_up" in ups[0].reason
    assert raw.max_workers == 5
    assert downs and downs[-1].after == 1 and "autoscale_down" in downs[-1].reason


def test_a_cold_start_delays_the_first_requests() -> None:
    model = ServiceModel(cold_start_s=40, provision_s=10)
    trace = trace_of((1.0, 10, 2))
    cold = simulate(trace, cfg(min_workers=1, max_workers=1), model, warm=False)
    warm = simulate(trace, cfg(min_workers=1, max_workers=1), model)
    assert cold.served[0][1] == pytest.approx(39.0 + 10 / model.prefill_tokens_per_s)
    assert warm.served[0][1] == pytest.approx(10 / model.prefill_tokens_per_s)


def test_queue_timeout_and_a_full_queue_refuse_requests() -> None:
    model = ServiceModel(prefill_tokens_per_s=1e9, decode_tokens_per_s=1)
    one = {"replicas": 1, "worker_capacity": 1}
    trace = trace_of((0.0, 1, 101), (1.0, 1, 2), (2.0, 1, 2))
    timed_out = simulate(trace, cfg(**one, queue_timeout=5), model)
    assert timed_out.refused == {429: 0, 503: 2}
    full = simulate(trace, cfg(**one, max_queue=1, queue_timeout=200), model)
    assert full.refused == {429: 1, 503: 0}
    assert len(full.served) == 2


def test_preempted_spot_workers_are_replaced() -> None:
    model = ServiceModel(spot_price_per_hour=0.25, preemptions_per_hour=6, cold_start_s=20)
    raw = simulate(synthetic("poisson:2:1800", seed=2), cfg(replicas=2), model, seed=2)
    assert raw.preempted >= 3
    assert raw.worker_seconds < 2 * raw.duration  # a preempted worker stops costing at once
    assert raw.cost == pytest.approx(raw.worker_seconds * 0.25 / 3600)


# -- report --------------------------------------------------------------------------------------


def test_pareto_front_keeps_the_points_nothing_beats_on_both() -> None:
    points = [(1.0, 9.0), (2.0, 3.0), (3.0, 3.0), (4.0, 1.0), (5.0, 2.0), (0.5, None)]
    assert report.pareto(points) == [True, True, False, True, False, False]


# -- the command ---------------------------------------------------------------------------------


def run_cli(*args: str):
    from flockctl.cli import app

    return CliRunner().invoke(app, ["simulate", *args])


def test_simulate_json_has_the_documented_keys() -> None:
    result = run_cli("--synthetic", "poisson:2:300", "--slo-ttft", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= JSON_KEYS
    assert data["requests"] > 500
    assert 0 < data["slo_attainment"] <= 1


def test_simulate_sweep_prints_every_setting_and_the_front() -> None:
    result = run_cli(
        "--synthetic", "gamma:2:3:600", "--max-workers", "4",
        "--sweep", "autoscale-up=1,8", "--sweep", "autoscale-down=0.5,1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [r["params"] for r in runs] == [
        {"autoscale_up": up, "autoscale_down": down} for up in (1, 8) for down in (0.5, 1)
    ]
    assert any(r["pareto"] for r in runs)
    table = run_cli("--synthetic", "poisson:1:120", "--sweep", "max-batch-size=2,8")
    assert table.exit_code == 0, table.output
    assert "pareto" in table.stdout and "max-batch-size" in table.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "give a trace file or --synthetic"),
        (["--synthetic", "poisson:1:10", "--sweep", "nope=1,2"], "'nope' is not a flag"),
        (
            ["--synthetic", "poisson:1:10", "--min-workers", "5", "--max-workers", "2"],
            "min_workers",
        ),
        (["--synthetic", "poisson:1:10", "--batching", "1:1,2"], "--batching"),
    ],
)
def test_simulate_usage_errors_exit_2_naming_the_problem(args: list[str], said: str) -> None:
    result = run_cli(*args)
    assert result.exit_code == 2
    assert said in result.stderr


def test_simulate_a_bad_trace_line_exits_2_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"t": 0, "prompt_tokens": 1, "output_tokens": 1}\n{"t": "soon"}\n')
    result = run_cli(str(path))
    assert result.exit_code == 2
    assert f"{path}:2:2: t must be seconds" in result.stderr


def test_engine_profile_writes_a_service_model_simulate_reads(tiny: Path, tmp_path: Path) -> None:
    from flockctl.cli import app

    out = tmp_path / "model.json"
    args = ["engine", "profile", "--model", str(tiny), "--device", "cpu", "-o", str(out)]
    short = ["--batch", "1", "--batch", "2", "--repeats", "1", "--prompt-tokens", "32"]
    result = CliRunner().invoke(app, [*args, *short, "--decode-tokens", "8"])
    assert result.exit_code == 0, result.output
    model = load_service_model(out)
    assert model.prefill_tokens_per_s > 0 and model.decode_tokens_per_s > 0
    assert [b for b, _ in model.batching] == [1, 2] and model.batching[0][1] == 1.0
    assert model.measured["model"] == str(tiny)
    sim = run_cli("--synthetic", "poisson:1:60", "--service-model", str(out), "--json")
    assert sim.exit_code == 0, sim.output
    assert json.loads(sim.stdout)["requests"] > 20
