"""Autoscaler policies with an injected clock: thresholds, delays, bounds, scale from zero."""

from __future__ import annotations

from flockctl.server.autoscaler import FixedPolicy, Observation, QueueLengthRunningMean


def obs(in_flight: int = 0, queued: int = 0, live: int = 1, target: int = 1) -> Observation:
    return Observation(in_flight=in_flight, queued=queued, live=live, ready=live, target=target)


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
