"""Autoscaler policies with an injected clock: thresholds, delays, bounds, scale from zero."""

from __future__ import annotations

import pytest

from flockctl.server.autoscaler import (
    Decision,
    FixedPolicy,
    Observation,
    QueueLengthRunningMean,
    RequestRate,
    demand_floor,
)


def obs(
    in_flight: int = 0, queued: int = 0, live: int = 1, target: int = 1, capacity: int = 0
) -> Observation:
    return Observation(
        in_flight=in_flight,
        queued=queued,
        live=live,
        ready=live,
        target=target,
        worker_capacity=capacity,
    )


def qlrm(**kw) -> QueueLengthRunningMean:
    args = dict(
        min_workers=1,
        max_workers=3,
        autoscale_up=7,
        autoscale_down=4,
        window=60,
        upscale_delay=10,
        downscale_delay=30,
    )
    args.update(kw)
    return QueueLengthRunningMean(**args)


def test_time_weighted_mean_weighs_each_value_by_how_long_it_lasted():
    p = qlrm()
    p.decide(obs(in_flight=10), 0)  # 10 for 1 s
    p.decide(obs(in_flight=0), 1)  # 0 for 3 s
    p.decide(obs(in_flight=0), 4)
    assert p.qlrm == 10 / 4


def test_samples_older_than_the_window_drop_out():
    p = qlrm(window=10)
    p.decide(obs(in_flight=100), 0)
    for t in range(1, 30):
        p.decide(obs(in_flight=2), t)
    assert p.qlrm == 2


def test_load_is_per_live_worker_and_counts_the_queue():
    p = qlrm()
    p.decide(obs(in_flight=8, queued=8, live=2, target=2), 0)
    assert p.qlrm == 8


def test_scale_up_only_after_the_delay_holds():
    p = qlrm(upscale_delay=10)
    d = p.decide(obs(in_flight=20), 0)
    assert d.target == 1 and "scaling up in 10s" in d.reason
    d = p.decide(obs(in_flight=20), 5)
    assert d.target == 1
    d = p.decide(obs(in_flight=20), 10)
    assert d.target == 2
    assert d.reason.startswith("qlrm 20.00 > autoscale_up 7 for 10s: scaling up to 2")


def test_a_dip_resets_the_upscale_timer():
    p = qlrm(window=1, upscale_delay=10)
    p.decide(obs(in_flight=20), 0)
    p.decide(obs(in_flight=5), 5)
    p.decide(obs(in_flight=5), 6.5)  # mean back inside the band
    d = p.decide(obs(in_flight=20), 8)
    d = p.decide(obs(in_flight=20), 12)
    assert d.target == 1, d.reason


def test_scale_down_after_its_delay_not_below_min():
    p = qlrm(downscale_delay=30, min_workers=1)
    assert p.decide(obs(live=2, target=2), 0).target == 2
    d = p.decide(obs(live=2, target=2), 30)
    assert d.target == 1 and "scaling down to 1" in d.reason
    d = p.decide(obs(live=1, target=1), 100)
    assert d.target == 1 and "at min_workers" in d.reason


def test_max_workers_caps_scaling_up():
    p = qlrm(max_workers=2, upscale_delay=0)
    d = p.decide(obs(in_flight=50, live=2, target=2), 0)
    assert d.target == 2 and "at max_workers" in d.reason


def test_scales_from_zero_on_the_first_queued_request():
    p = qlrm(min_workers=0)
    assert p.decide(obs(live=0, target=0), 0).target == 0
    d = p.decide(obs(queued=1, live=0, target=0), 1)
    assert d.target == 1
    assert "1 requests waiting and no worker: scaling from zero" in d.reason


def test_starting_workers_do_not_freeze_decisions():
    # Two live workers, none READY yet: the load still counts and scaling still moves.
    p = qlrm(upscale_delay=0)
    o = Observation(in_flight=0, queued=40, live=2, ready=0, target=2)
    assert p.decide(o, 0).target == 3


def test_out_of_bounds_target_is_forced_back():
    p = qlrm(min_workers=2, max_workers=3)
    assert p.decide(obs(target=1), 0).target == 2
    assert p.decide(obs(target=5, live=5), 1).reason.startswith("above max_workers")


def test_fixed_policy_holds_and_follows_the_operator():
    p = FixedPolicy(2)
    assert p.decide(obs(target=2), 0).reason == "fixed at 2 workers"
    assert p.decide(obs(target=1), 0).target == 2
    p.operator_target(3)
    assert p.decide(obs(target=2), 0).target == 3


@pytest.mark.parametrize(
    ("in_flight", "queued", "capacity", "floor"),
    [(0, 0, 30, 0), (1, 0, 30, 1), (0, 1, 30, 1), (0, 1, 0, 1), (30, 0, 30, 1), (31, 0, 30, 2),
     (10, 50, 30, 2), (5, 5, 1, 10)],
)  # fmt: skip
def test_the_demand_floor_is_the_workers_outstanding_requests_fill(
    in_flight, queued, capacity, floor
):
    o = obs(in_flight=in_flight, queued=queued, capacity=capacity)
    assert demand_floor(o) == floor


def test_qlrm_holds_the_worker_a_waiting_request_needs_however_low_the_mean():
    # Scaled from zero for one request, its worker still starting: one request per live worker
    # is under autoscale_down, and scaling down would strand the request.
    p = qlrm(min_workers=0, downscale_delay=0)
    d = p.decide(obs(queued=1, capacity=30), 0)
    needs = "1 request waiting needs a worker"
    assert d == Decision(1, f"holding 1: {needs} (qlrm 1.00 < autoscale_down 4)", 1, needs)
    d = p.decide(obs(in_flight=1, capacity=30), 1)
    assert d.target == 1 and d.reason.startswith("holding 1: 1 request in flight needs a worker")
    assert p.decide(obs(capacity=30), 2).target == 0


def test_qlrm_starts_the_downscale_delay_once_the_requests_are_gone():
    p = qlrm(min_workers=0, window=1, downscale_delay=10)
    for t in range(20):
        assert p.decide(obs(queued=1, capacity=30), t).target == 1
    d = p.decide(obs(capacity=30), 20)
    assert d.target == 1 and "scaling down in 10s if it holds" in d.reason
    assert p.decide(obs(capacity=30), 29).target == 1
    assert p.decide(obs(capacity=30), 30).target == 0


def test_qlrm_scales_down_to_the_workers_the_requests_fill_and_no_further():
    p = qlrm(min_workers=0, autoscale_up=100, autoscale_down=50, downscale_delay=0)
    assert p.decide(obs(in_flight=45, live=3, target=3, capacity=30), 0).target == 2
    d = p.decide(obs(in_flight=45, live=2, target=2, capacity=30), 1)
    assert d.target == 2 and d.held == 1
    assert (
        d.reason
        == "holding 2: 45 requests in flight need 2 workers (qlrm 15.00 < autoscale_down 50)"
    )


def test_the_demand_floor_never_overrides_max_workers_nor_a_fixed_number():
    p = qlrm(min_workers=0, max_workers=3)
    p.set_bounds(0, 1)
    d = p.decide(obs(in_flight=60, live=2, target=2, capacity=30), 0)
    assert d.target == 1 and d.reason.startswith("above max_workers")
    assert FixedPolicy(0).decide(obs(queued=5, live=0, target=0), 0).target == 0


def rr(**kw) -> RequestRate:
    # A one-second window makes the rate of each one-second sample the rate the policy sees, so
    # a change of traffic shows at once and the tests can time the delays to the second.
    args = dict(
        min_workers=1,
        max_workers=10,
        target_qps_per_replica=1,
        upscale_delay=20,
        downscale_delay=60,
        window=1,
    )
    args.update(kw)
    return RequestRate(**args)


class Traffic:
    """Requests arriving at a steady rate, one decision a second; the target follows each one."""

    def __init__(self, policy: RequestRate, target: int = 1) -> None:
        self.policy = policy
        self.target = target
        self.t = 0
        self.arrived = 0
        self.targets: list[int] = []
        # The first sample only sets the baseline the next one's arrivals are counted from.
        policy.decide(Observation(0, 0, target, target, target, arrived=0), 0)

    def run(self, rate: int, seconds: int) -> Decision:
        for _ in range(seconds):
            self.t += 1
            self.arrived += rate
            o = Observation(0, 0, self.target, self.target, self.target, arrived=self.arrived)
            decision = self.policy.decide(o, self.t)
            self.target = decision.target
            self.targets.append(decision.target)
        return decision


def test_request_rate_scales_up_only_after_the_delay_straight_to_the_wanted_count():
    traffic = Traffic(rr(upscale_delay=20))
    d = traffic.run(1, 5)
    assert d == Decision(
        1, "1.00 req/s over 1s wants 1 workers (target_qps_per_replica 1): holding 1"
    )
    d = traffic.run(4, 1)  # t=6: the rate wants 4 workers from now on
    assert d.target == 1
    assert d.reason == (
        "4.00 req/s over 1s wants 4 workers (target_qps_per_replica 1); scaling up in 20s if it"
        " holds"
    )
    d = traffic.run(4, 19)  # t=25: 19 s of the 20
    assert d.target == 1 and "scaling up in 1s" in d.reason
    d = traffic.run(4, 1)  # t=26: 20 s held, one step from 1 to 4
    assert d == Decision(
        4, "4.00 req/s over 1s wants 4 workers (target_qps_per_replica 1) for 20s: scaling up to 4"
    )
    assert traffic.targets == [1] * 25 + [4]


@pytest.mark.parametrize("dip", [2, 1], ids=["to-the-target", "below-the-target"])
def test_request_rate_upscale_hold_restarts_when_the_rate_dips_back(dip: int):
    traffic = Traffic(rr(upscale_delay=20), target=2)
    traffic.run(2, 5)
    traffic.run(4, 15)
    traffic.run(dip, 1)  # one second at a rate the current target covers
    d = traffic.run(4, 19)  # 35 s since the rate first rose, but only 18 s since the dip
    assert d.target == 2, d.reason
    assert traffic.run(4, 1).target == 2
    assert traffic.run(4, 1).target == 4


def test_request_rate_scales_down_after_the_downscale_delay():
    traffic = Traffic(rr(upscale_delay=0, downscale_delay=60), target=4)
    assert traffic.run(4, 10).reason.endswith("holding 4")
    d = traffic.run(2, 60)  # the first of these seconds starts the hold: 59 s held
    assert d.target == 4
    assert d.reason == (
        "2.00 req/s over 1s wants 2 workers (target_qps_per_replica 1); scaling down in 1s if it"
        " holds"
    )
    d = traffic.run(2, 1)
    assert d == Decision(
        2,
        "2.00 req/s over 1s wants 2 workers (target_qps_per_replica 1) for 60s: scaling down to 2",
    )


def test_request_rate_downscale_hold_restarts_when_the_rate_comes_back():
    traffic = Traffic(rr(downscale_delay=60), target=3)
    traffic.run(1, 40)
    traffic.run(3, 1)  # t=41: the rate wants the 3 workers again
    assert traffic.run(1, 60).target == 3  # 101 s since it first fell, 59 s since it came back
    assert traffic.run(1, 1).target == 1


def test_request_rate_never_leaves_min_and_max_workers():
    busy = Traffic(rr(max_workers=3, upscale_delay=0))
    d = busy.run(10_000, 5)
    assert busy.targets == [3] * 5
    assert d.reason == (
        "10000.00 req/s over 1s wants 3 workers (target_qps_per_replica 1): holding 3"
    )
    idle = Traffic(rr(min_workers=2, downscale_delay=0), target=2)
    d = idle.run(0, 100)
    assert idle.targets == [2] * 100
    assert d.reason.endswith("wants 2 workers (target_qps_per_replica 1): holding 2")


def test_request_rate_forces_an_out_of_bounds_target_back():
    p = rr(min_workers=2, max_workers=3)
    assert p.decide(Observation(0, 0, 5, 5, 5), 0) == Decision(3, "above max_workers: scaling to 3")
    assert p.decide(Observation(0, 0, 1, 1, 1), 1) == Decision(2, "below min_workers: scaling to 2")


def test_request_rate_a_forced_move_restarts_the_upscale_hold():
    p = rr(upscale_delay=20)
    traffic = Traffic(p)
    traffic.run(4, 4)  # the hold for 4 workers starts at t=1
    p.set_bounds(2, 10)
    assert traffic.run(4, 1) == Decision(2, "below min_workers: scaling to 2")
    assert traffic.run(4, 20).target == 2  # held again from t=6, not from t=1
    assert traffic.run(4, 1).target == 4


def test_request_rate_scales_from_zero_at_once():
    traffic = Traffic(rr(min_workers=0, upscale_delay=300), target=0)
    assert traffic.run(0, 5).target == 0
    d = traffic.run(3, 1)
    assert d == Decision(3, "3.00 req/s over 1s and no worker: scaling from zero to 3")
    # A request still queued when its arrival has left the window also wakes it up.
    p = rr(min_workers=0, window=60)
    assert p.decide(Observation(0, 0, 0, 0, 0, arrived=1), 0).target == 0
    d = p.decide(Observation(0, 1, 0, 0, 0, arrived=1), 100)
    assert d == Decision(1, "0.00 req/s over 60s and no worker: scaling from zero to 1")


def test_request_rate_wants_exactly_n_workers_at_n_times_the_target():
    # 2.1 req/s / 0.3 is 7.000000000000001 in floating point; that is 7 workers, not 8.
    p = rr(target_qps_per_replica=0.3, upscale_delay=0, window=10)
    p.decide(Observation(0, 0, 1, 1, 1, arrived=0), 0)
    assert p.decide(Observation(0, 0, 1, 1, 1, arrived=21), 10).target == 7


def test_request_rate_qps_counts_the_arrivals_of_the_last_window():
    p = RequestRate(1, 4, target_qps_per_replica=2)
    assert p.qps is None
    seen = []
    for now, arrived in [(0, 0), (30, 60), (60, 120), (90, 120), (150, 120)]:
        p.decide(Observation(0, 0, 1, 1, 1, arrived=arrived), now)
        seen.append(p.qps)
    # Always divided by the whole 60 s window; at 90 s the arrivals before 30 s are out of it.
    assert seen == [0, 1, 2, 1, 0]


def test_request_rate_thresholds_are_skyserves_defaults_unless_given():
    assert RequestRate(1, 4, 2.5).thresholds() == {
        "target_qps_per_replica": 2.5,
        "upscale_delay": 300,
        "downscale_delay": 1200,
        "qps_window": 60,
    }
    given = RequestRate(1, 4, 1, upscale_delay=5, downscale_delay=7, window=30)
    assert given.thresholds() == {
        "target_qps_per_replica": 1,
        "upscale_delay": 5,
        "downscale_delay": 7,
        "qps_window": 30,
    }
    with pytest.raises(ValueError, match="target_qps_per_replica must be above 0"):
        RequestRate(1, 4, 0)


def test_request_rate_scales_down_no_further_than_the_requests_in_flight_need():
    p = rr(min_workers=0, downscale_delay=0)
    busy = obs(in_flight=31, live=3, target=3, capacity=30)
    d = p.decide(busy, 0)  # no arrivals: the rate wants 0 workers
    assert d.target == 2
    assert "wants 0 workers (target_qps_per_replica 1), 31 requests in flight need 2" in d.reason
    d = p.decide(obs(in_flight=31, live=2, target=2, capacity=30), 1)
    assert d.target == 2 and d.held == 2
    assert d.reason.startswith("holding 2: 31 requests in flight need 2 workers (0.00 req/s")
    assert p.decide(obs(live=2, target=2, capacity=30), 2).target == 0
