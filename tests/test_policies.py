"""Routing policies on content and measured speed: the prefix tree, prefix routing with its load
guard and sticky sessions, latency estimates, their decay and probes, and the request meta they
read."""

from __future__ import annotations

import json
import math
import random

import pytest

from flockctl.server.policies import (
    Latency,
    PolicySettings,
    Prefix,
    make_policy,
)
from flockctl.server.pool import WorkerPool
from flockctl.server.radix import PrefixTree
from flockctl.server.request_meta import NO_META, PROMPT_CHARS, RequestMeta, extract
from flockctl.server.workers import Worker, WorkerState


def ready(wid: str, in_flight: int = 0) -> Worker:
    w = Worker(id=wid, provisioner="static", url=f"http://127.0.0.1/{wid}")
    for state in (WorkerState.PROVISIONING, WorkerState.STARTING, WorkerState.READY):
        w.transition(state)
    w.in_flight = in_flight
    return w


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the prefix tree -------------------------------------------------------------------------


def test_the_tree_matches_the_longest_prefix_each_worker_was_sent():
    tree = PrefixTree(10_000)
    tree.insert("system: be brief\nuser: hi", "a")
    tree.insert("system: be brief\nuser: bye", "b")
    assert tree.match("system: be brief\nuser: hi there") == {"a": 25, "b": 23}
    assert tree.match("system: be brief\nuser: bye now") == {"a": 23, "b": 26}
    assert tree.match("other") == {}
    assert tree.match("sys") == {"a": 3, "b": 3}  # inside an edge: the part that matches


def test_a_longer_turn_extends_the_worker_s_match():
    tree = PrefixTree(10_000)
    turn1 = "S" * 500 + "<user>q1\n"
    turn2 = turn1 + "<assistant>a1\n<user>q2\n"
    tree.insert(turn1, "a")
    assert tree.match(turn2) == {"a": len(turn1)}
    tree.insert(turn2, "a")
    assert tree.match(turn2 + "<assistant>a2") == {"a": len(turn2)}
    assert tree.chars == {"a": len(turn2)}  # the shared part is held once


def test_the_tree_stays_within_its_bound_forgetting_least_recently_used_text_first():
    tree = PrefixTree(1000)
    texts = [chr(ord("A") + i) * 100 for i in range(11)]  # 100 characters each, no prefix shared
    for text in texts[:10]:
        tree.insert(text, "a")
    assert tree.chars["a"] == 1000  # at the bound, not past it
    tree.insert(texts[0], "a")  # the oldest becomes the newest
    tree.insert(texts[10], "a")  # past the bound: evict down to 900
    assert tree.chars["a"] <= 900
    assert tree.match(texts[0]) == {"a": 100}  # touched last: kept
    assert tree.match(texts[10]) == {"a": 100}
    assert tree.match(texts[1]) == {}  # least recently used: gone
    assert tree.match(texts[2]) == {}
    assert tree.match(texts[9]) == {"a": 100}
    assert tree.nodes() == 9


def test_one_worker_s_eviction_leaves_the_other_s_text():
    tree = PrefixTree(150)
    tree.insert("shared " + "s" * 93, "b")
    tree.insert("shared " + "s" * 93, "a")
    tree.insert("mine " + "m" * 95, "a")  # a is past 150: its older text goes
    assert tree.match("shared " + "s" * 93) == {"b": 100}
    assert tree.match("mine " + "m" * 95) == {"a": 100}
    assert tree.chars == {"a": 100, "b": 100}


def test_removing_a_worker_forgets_its_text_and_prunes_the_nodes_only_it_used():
    tree = PrefixTree(10_000)
    tree.insert("common prefix, then a", "a")
    tree.insert("common prefix, then b", "b")
    tree.insert("only a went here", "a")
    before = tree.nodes()
    tree.remove("a")
    assert tree.match("common prefix, then a") == {"b": 20}
    assert tree.match("only a went here") == {}
    assert "a" not in tree.chars
    assert tree.nodes() < before
    tree.remove("a")  # twice is harmless
    tree.remove("never-seen")


def test_a_bound_below_one_character_is_refused():
    with pytest.raises(ValueError, match="max_chars"):
        PrefixTree(0)


# -- prefix routing --------------------------------------------------------------------------


def meta(text: str | None = None, session: str | None = None) -> RequestMeta:
    return RequestMeta(model=None, prompt_text=text, session=session)


def test_prefix_sends_a_conversation_s_turns_to_the_worker_that_saw_it():
    policy = Prefix()
    a, b = ready("a"), ready("b")
    system = "You are a careful assistant. " * 40
    first = policy.choose([a, b], meta(system + "<user>q1"))
    first.in_flight += 1  # the first turn is still running: least-connection would go elsewhere
    other = b if first is a else a
    again = policy.choose([a, b], meta(system + "<user>q1<assistant>a1<user>q2"))
    assert again is first
    assert policy.decisions == {"session": 0, "prefix": 1, "load": 1}
    # A prompt that shares little goes to the least loaded worker.
    assert policy.choose([a, b], meta("unrelated " * 10)) is other


def test_a_short_match_routes_by_load():
    a, b = ready("a"), ready("b", in_flight=1)
    for tail, expected in (("z" * 11, a), ("z" * 9, b)):  # 10 of 21 < 0.5; 10 of 19 >= 0.5
        policy = Prefix(min_match=0.5)
        policy.tree.insert("abcdefghij", "b")
        assert policy.choose([a, b], meta("abcdefghij" + tail)) is expected


def test_the_balance_guard_sends_work_away_from_a_busy_worker():
    policy = Prefix(balance=2.0)
    a, b = ready("a"), ready("b")
    policy.tree.insert("the shared prompt", "b")
    b.in_flight = 1  # (1 + 1) <= 2 * (0 + 1): still b
    assert policy.choose([a, b], meta("the shared prompt!")) is b
    b.in_flight = 2  # (2 + 1) > 2 * (0 + 1): the least loaded
    assert policy.choose([a, b], meta("the shared prompt!")) is a
    assert policy.decisions["load"] == 1


def test_a_session_sticks_to_its_worker_while_it_is_ready():
    policy = Prefix()
    a, b = ready("a"), ready("b")
    first = policy.choose([a, b], meta("hello", session="alice"))
    first.in_flight = 5  # far busier, and a prompt it never saw: the session still goes there
    assert policy.choose([a, b], meta("something else", session="alice")) is first
    assert policy.decisions["session"] == 1
    # Out of READY: forgotten, and the session moves to a worker that is.
    first.transition(WorkerState.NOT_READY, "probe failed")
    policy.worker_changed(first, WorkerState.READY)
    other = b if first is a else a
    assert policy.session_worker("alice") is None
    assert policy.choose([other], meta("hello", session="alice")) is other
    assert policy.session_worker("alice") == other.id
    assert policy.tree.match("hello") == {other.id: 5}


def test_sessions_are_bounded_least_recently_used_first():
    policy = Prefix(sessions=2)
    a = ready("a")
    for s in ("s1", "s2"):
        policy.choose([a], meta(session=s))
    policy.choose([a], meta(session="s1"))  # s1 used again: s2 is now the oldest
    policy.choose([a], meta(session="s3"))
    assert policy.session_worker("s1") == "a"
    assert policy.session_worker("s2") is None
    assert policy.session_worker("s3") == "a"


def test_the_pool_tells_the_prefix_policy_when_a_worker_leaves_ready():
    policy = Prefix()
    pool = WorkerPool(policy, capacity=10, max_queue=10)
    w = Worker(id="w", provisioner="static", url="http://127.0.0.1/w")
    pool.add(w)
    for state in (WorkerState.PROVISIONING, WorkerState.STARTING, WorkerState.READY):
        pool.set_state(w, state)
    assert pool.try_acquire(meta=meta("a prompt", session="s")) is w
    assert policy.tree.match("a prompt") == {"w": 8}
    pool.set_state(w, WorkerState.NOT_READY, "probe failed")
    assert policy.tree.match("a prompt") == {}
    assert policy.session_worker("s") is None


def test_settings_reach_the_policy_by_name():
    policy = make_policy("prefix", PolicySettings(0.8, 3.0, 500))
    assert isinstance(policy, Prefix)
    assert (policy.min_match, policy.balance, policy.tree.max_chars) == (0.8, 3.0, 500)
    assert make_policy("latency").needs_meta is False
    assert policy.needs_meta is True
    with pytest.raises(ValueError, match=r"latency.*prefix"):
        make_policy("fastest")


# -- latency ---------------------------------------------------------------------------------


def test_latency_sends_work_to_the_worker_expected_to_finish_first():
    clock = Clock()
    policy = Latency(rng=random.Random(0), clock=clock)
    fast, slow = ready("fast"), ready("slow")
    policy.observe_first_byte(fast, 0.05)
    policy.observe_end(fast, 0.10, 10)
    policy.observe_first_byte(slow, 0.20)
    policy.observe_end(slow, 0.40, 10)
    assert policy.expected(fast) < policy.expected(slow)
    assert all(policy.choose([fast, slow]) is fast for _ in range(10))
    # Expected completion counts the queue: a fast worker with 4 in flight loses to an idle one.
    fast.in_flight = 4
    assert policy.expected(fast) > policy.expected(slow)
    assert policy.choose([fast, slow]) is slow


def test_a_batching_worker_is_judged_by_its_answers_at_the_load_it_had():
    """A worker answering four requests at once in 0.4 s each beats one answering one alone in
    0.6 s, even with three in flight: its samples already carry that load."""
    clock = Clock()
    policy = Latency(rng=random.Random(0), clock=clock)
    batching, lone = ready("batching"), ready("lone")
    for _ in range(4):
        batching.in_flight = 4
        policy.observe_first_byte(batching, 0.04)
        policy.observe_end(batching, 0.36, 1)
        lone.in_flight = 1
        policy.observe_first_byte(lone, 0.06)
        policy.observe_end(lone, 0.54, 1)
    batching.in_flight, lone.in_flight = 3, 0
    assert policy.expected(batching) == pytest.approx(0.4, rel=0.05)
    assert policy.expected(lone) == pytest.approx(0.6, rel=0.05)
    assert policy.choose([batching, lone]) is batching
    # With a longer queue than it was measured under, the lone worker is the better choice.
    batching.in_flight = 6
    assert policy.choose([batching, lone]) is lone


def test_a_worker_not_measured_yet_counts_as_the_mean_of_those_measured():
    """A new worker is tried, but does not draw every request until its first answer: with
    requests of its own in flight it loses to a measured worker that has fewer."""
    clock = Clock()
    policy = Latency(rng=random.Random(0), clock=clock)
    a, b, new = ready("a"), ready("b"), ready("new")
    for worker, seconds in ((a, 0.2), (b, 0.4)):
        policy.observe_first_byte(worker, 0.0)
        policy.observe_end(worker, seconds, 1)
    assert policy.expected(new) == pytest.approx(0.3)
    assert policy.choose([b, new]) is new
    new.in_flight = 2
    # A stream's head came back at once: that says nothing of how long its answers take.
    policy.observe_first_byte(new, 0.001)
    assert policy.expected(new) == pytest.approx(0.9)
    assert policy.choose([b, new]) is b
    assert Latency(clock=clock).expected(new) == 0.0  # nothing measured: all alike


def test_a_worker_with_requests_in_flight_keeps_its_estimate_until_they_answer():
    """A worker slower than the decay must not look fast again while its slow answers are still
    running: only an idle worker's estimate decays (and gets it tried again)."""
    clock = Clock()
    policy = Latency(decay=10.0, rng=random.Random(0), clock=clock)
    slow, fast = ready("slow"), ready("fast")
    slow.in_flight = 1
    policy.observe_end(slow, 5.0, 1)
    policy.observe_end(fast, 0.5, 1)
    clock.now += 30.0  # a second request has been running on it all this time
    assert policy.expected(slow) == pytest.approx(10.0)  # 5 s, for its own and the new one
    assert policy.choose([slow, fast]) is fast
    slow.in_flight = 0  # idle now: its estimate decays from its last answer
    assert policy.expected(slow) == pytest.approx(5.0 * math.exp(-3.0))


def test_a_worker_that_turns_slow_loses_traffic_at_once_and_wins_it_back_when_it_recovers():
    clock = Clock()
    policy = Latency(decay=10.0, rng=random.Random(0), clock=clock)
    a, b = ready("a"), ready("b")
    for w in (a, b):
        policy.observe_first_byte(w, 0.05)
        policy.observe_end(w, 0.05, 5)
    policy.observe_first_byte(a, 1.0)  # one slow answer is enough (peak)
    assert policy.choose([a, b]) is b
    # a gets nothing now; after a while its estimate has decayed below b's, which is kept fresh.
    seconds = 0
    while policy.choose([a, b]) is b:
        clock.now += 1.0
        seconds += 1
        policy.observe_first_byte(b, 0.05)
        policy.observe_end(b, 0.05, 5)
        assert seconds < 120, "a slow worker's estimate never decayed"
    assert 10 <= seconds <= 60
    # Its answers are fast again: within seconds it shares the load again (b busier: a), and
    # its estimate comes back beside b's.
    for _ in range(10):
        clock.now += 1.0
        for w in (a, b):
            policy.observe_first_byte(w, 0.05)
            policy.observe_end(w, 0.05, 5)
    b.in_flight = 1
    assert policy.choose([a, b]) is a
    b.in_flight = 0
    for _ in range(20):
        clock.now += 1.0
        for w in (a, b):
            policy.observe_first_byte(w, 0.05)
            policy.observe_end(w, 0.05, 5)
    assert policy.expected(a) <= policy.expected(b) * 1.1


def test_fast_answers_pull_an_estimate_down_gradually():
    clock = Clock()
    policy = Latency(decay=10.0, clock=clock)
    w = ready("w")
    policy.observe_first_byte(w, 1.0)
    policy.observe_end(w, 0.0, 1)
    clock.now += 1.0
    policy.observe_first_byte(w, 0.1)
    one = policy.expected(w)
    assert 0.1 < one < 1.0  # neither the old peak nor the new sample
    clock.now += 1.0
    policy.observe_first_byte(w, 0.1)
    assert policy.expected(w) < one


def test_two_random_workers_are_compared_so_every_worker_gets_a_chance():
    policy = Latency(rng=random.Random(3), clock=Clock())
    workers = [ready(f"w{i}") for i in range(4)]
    chosen = {policy.choose(workers).id for _ in range(100)}
    assert chosen == {w.id for w in workers}  # none measured: all equal, spread by the sampling


def test_a_worker_leaving_ready_loses_its_estimates():
    clock = Clock()
    policy = Latency(clock=clock)
    w = ready("w")
    policy.observe_first_byte(w, 5.0)
    w.transition(WorkerState.NOT_READY, "probe failed")
    policy.worker_changed(w, WorkerState.READY)
    assert policy.expected(w) == 0.0


# -- latency probes --------------------------------------------------------------------------


def probing(clock: Clock, interval: float = 1.0, decay: float = 10.0) -> Latency:
    return Latency(decay=decay, rng=random.Random(0), clock=clock, probe_interval=interval)


def answer(policy: Latency, worker: Worker, seconds: float) -> None:
    """One relayed, non-streamed answer of ``seconds``, the worker's only request."""
    worker.in_flight += 1
    policy.observe_first_byte(worker, seconds)
    policy.observe_end(worker, 0.0, 1)
    worker.in_flight -= 1


def probe(policy: Latency, clock: Clock, worker: Worker, seconds: float | None) -> None:
    policy.probe_started(worker)
    clock.now += seconds or 0.0
    policy.observe_probe(worker, seconds)


def test_settings_give_the_latency_policy_its_decay_and_probe_interval():
    policy = make_policy("latency", PolicySettings(latency_decay=3.0, latency_probe_interval=0.5))
    assert isinstance(policy, Latency)
    assert (policy.decay, policy.probe_interval) == (3.0, 0.5)
    # Only the latency policy probes; others never ask for one.
    assert make_policy("least-connection").probe_due_in(ready("w")) is None
    assert Latency(clock=Clock()).probe_due_in(ready("w")) is None  # built without probes


def test_a_worker_is_probed_when_due_one_probe_at_a_time_and_not_while_it_is_busy():
    clock = Clock()
    policy = probing(clock, interval=2.0)
    w = ready("w")
    assert policy.probe_due_in(w) == 0.0  # never measured: at once
    policy.probe_started(w)
    assert policy.probe_due_in(w) == 2.0  # one in flight: not another
    clock.now += 0.1
    policy.observe_probe(w, 0.1)
    assert policy.probe_due_in(w) == pytest.approx(2.0)
    clock.now += 1.5
    assert policy.probe_due_in(w) == pytest.approx(0.5)
    answer(policy, w, 0.2)  # a relayed answer measures it as well as a probe
    assert policy.probe_due_in(w) == pytest.approx(2.0)
    clock.now += 5.0
    assert policy.probe_due_in(w) == 0.0
    w.in_flight = 1  # its answers will report; no probe needed
    assert policy.probe_due_in(w) == 2.0


def test_an_avoided_worker_keeps_its_estimate_while_probes_say_it_is_still_slow():
    """Without probes an idle worker's estimate decays to zero and a user request is sent to
    find out; with them the estimate stands, and a slow probe confirms it."""
    clock = Clock()
    policy, old = probing(clock), Latency(decay=10.0, rng=random.Random(0), clock=clock)
    fast, slow = ready("fast"), ready("slow")
    for p in (policy, old):
        answer(p, fast, 0.05)
        answer(p, slow, 5.0)
    for _ in range(60):
        clock.now += 1.0
        for p in (policy, old):
            answer(p, fast, 0.05)
        probe(policy, clock, slow, 3.0)
    assert old.choose([fast, slow]) is slow  # decayed: a user request would wait behind it
    assert policy.choose([fast, slow]) is fast
    assert policy.expected(slow) > 2.0


def test_a_waiting_probe_counts_as_that_slow_already():
    clock = Clock()
    policy = probing(clock)
    fast, w = ready("fast"), ready("w")
    answer(policy, fast, 0.5)
    answer(policy, w, 0.1)
    assert policy.choose([fast, w]) is w
    policy.probe_started(w)
    clock.now += 2.0  # no answer yet
    assert policy.expected(w) == pytest.approx(2.0)
    assert policy.choose([fast, w]) is fast
    policy.observe_probe(w, 2.0)
    assert policy.expected(w) == pytest.approx(2.0)  # higher: taken at once (peak)


def test_fast_probes_win_a_recovered_worker_back_within_a_few_decays():
    clock = Clock()
    policy = probing(clock, interval=1.0, decay=5.0)
    fast, w = ready("fast"), ready("w")
    answer(policy, fast, 0.1)
    answer(policy, w, 4.0)
    seconds = 0
    while policy.choose([fast, w]) is fast:
        clock.now += 1.0
        seconds += 1
        answer(policy, fast, 0.1)
        probe(policy, clock, w, 0.05)
        assert seconds < 60, "fast probes never brought the estimate down"
    # Neither at once (one fast answer is not a trend) nor after many decays.
    assert 5 <= seconds <= 30


def test_a_probe_moves_both_parts_of_a_streamed_estimate_in_proportion():
    clock = Clock()
    policy = probing(clock, decay=1.0)
    w = ready("w")
    w.in_flight = 1
    policy.observe_first_byte(w, 0.0)  # a stream's head comes at once
    policy.observe_end(w, 1.0, 10)  # ten chunks in 1 s
    w.in_flight = 0
    before = policy.expected(w)
    probe(policy, clock, w, 4.0 * before)
    assert policy.expected(w) == pytest.approx(4.0 * before)
    assert policy._estimates["w"].first_byte.value == 0.0  # still all in the chunks


def test_a_worker_whose_probes_fail_decays_when_idle_instead():
    """A server without /v1/completions cannot be probed: its estimate must not stand for
    ever, or a worker once slow would never be tried again."""
    clock = Clock()
    policy = probing(clock)
    w = ready("w")
    answer(policy, w, 2.0)
    probe(policy, clock, w, None)
    clock.now += 30.0
    assert policy.expected(w) == pytest.approx(2.0 * math.exp(-3.0), rel=0.01)
    probe(policy, clock, w, 0.5)  # it answers probes again: its estimate stands again
    clock.now += 30.0
    assert policy.expected(w) > 0.5


def test_a_probe_that_ends_after_its_worker_left_ready_is_dropped():
    clock = Clock()
    policy = probing(clock)
    w = ready("w")
    policy.probe_started(w)
    w.transition(WorkerState.NOT_READY, "probe failed")
    policy.worker_changed(w, WorkerState.READY)
    policy.observe_probe(w, 9.0)
    assert policy.expected(w) == 0.0
    assert policy.probe_due_in(w) == 0.0


# -- request meta ----------------------------------------------------------------------------


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_chat_messages_are_rendered_in_order_so_turns_extend_each_other():
    one = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    two = [*one, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    m1 = extract([], body(model="m", messages=one))
    m2 = extract([], body(model="m", messages=two))
    assert m1.model == "m"
    assert m1.prompt_text and m2.prompt_text
    assert m2.prompt_text.startswith(m1.prompt_text)
    parts = [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]
    m3 = extract([], body(messages=[{"role": "system", "content": parts}]))
    assert m3.prompt_text == "<system>be brief\n"


def test_completions_generate_and_token_prompts_give_their_text():
    assert extract([], body(prompt="once upon")).prompt_text == "once upon"
    assert extract([], body(prompt=["once", " upon"])).prompt_text == "once upon"
    assert extract([], body(inputs="tgi style")).prompt_text == "tgi style"
    tokens = extract([], body(prompt=[1, 2, 3])).prompt_text
    assert tokens and tokens.startswith("1 2 3")
    assert extract([], body(model="m")).prompt_text is None


def test_the_session_comes_from_the_header_else_the_user_field():
    assert extract([(b"x-session-id", b"s1")], body(user="u", prompt="p")).session == "s1"
    assert extract([], body(user="u", prompt="p")).session == "u"
    assert extract([(b"x-session-id", b"s1")], b"not json").session == "s1"
    assert extract([], body(prompt="p")).session is None


def test_a_body_that_is_not_a_json_object_gives_nothing():
    assert extract([], b"") == NO_META
    assert extract([], b"{broken") == NO_META
    assert extract([], b"[1, 2]") == NO_META
    assert extract([], b"[" * 5000 + b"]" * 5000) == NO_META


def test_the_prompt_a_policy_sees_is_capped():
    huge = extract([], body(prompt="x" * (PROMPT_CHARS * 3)))
    assert huge.prompt_text is not None and len(huge.prompt_text) == PROMPT_CHARS
    many = [{"role": "user", "content": "y" * 4000} for _ in range(50)]
    chat = extract([], body(messages=many)).prompt_text
    assert chat is not None and len(chat) == PROMPT_CHARS
