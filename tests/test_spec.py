"""Speculative decoding: token trees, lossless verification (greedy and stochastic), and the
engine's speculative iterations on tiny real models (the depth policy: test_spec_policy.py)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import until
from tinymodel import build_near_model, build_tiny_model, greedy_continuations
from transformers import AutoTokenizer

from flockctl.engine import fused_forward, fused_spec
from flockctl.engine.config import EngineConfig, EngineLoadError
from flockctl.engine.engine import Engine
from flockctl.engine.job import FinishReason, Job, SamplingParams
from flockctl.engine.loader import load_engine
from flockctl.engine.spec import TokenTree, draft_children, verify_greedy, verify_stochastic
from flockctl.engine.spec_policy import SpecPolicy, StepCosts
from flockctl.engine.speculator import Speculator
from flockctl.engine.tree import default_tree, parse_tree, tree_nodes

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [
    "the quick brown fox",
    "hello",
    "tokens stream out one by one and the scheduler picks jobs from queues",
    "memory holds keys and values for every sequence until the job is done",
    "a flock of birds",
]

# -- tree shapes and trees ----------------------------------------------------------------------


def test_parse_tree() -> None:
    assert parse_tree("1,1,3,1") == (1, 1, 3, 1)
    assert parse_tree(" 2, 2 ") == (2, 2)
    assert tree_nodes((1, 1, 3, 1)) == 1 + 1 + 1 + 3 + 3
    assert parse_tree("auto") is None  # the device's: wide on CUDA, a chain on a CPU
    assert default_tree("cuda") == (1, 1, 3, 1, 1, 1, 1, 1) and default_tree("cpu") == (1, 1, 1, 1)
    assert default_tree("cpu", adaptive=True) == (1,) * 8  # --spec auto cuts it where it pays
    for bad, words in (
        ("", "comma-separated"),
        ("1,x", "comma-separated"),
        ("1,0", "at least 1"),
        (",".join(["1"] * 17), "at most 16 levels"),
        ("8,8,8", "nodes"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_tree(bad)


def test_tree_merges_and_knows_ancestors() -> None:
    tree = TokenTree(7)
    a = tree.add(0, 1)
    b = tree.add(0, 2)
    assert tree.add(0, 1) == a  # the same token under the same parent is one node
    c = tree.add(a, 3)
    assert (len(tree), tree.depths[c], tree.parents[c]) == (4, 2, a)
    anc = tree.ancestry()
    assert anc[c].tolist() == [True, True, False, True]
    assert anc[b].tolist() == [True, False, True, False]
    assert tree.path_tokens([0, a, c]) == [7, 1, 3]


def test_greedy_verification_follows_the_llm_and_adds_its_token() -> None:
    tree = TokenTree(0)
    one = tree.add(0, 1)
    tree.add(0, 2)
    three = tree.add(one, 3)
    choice = {0: 1, one: 3, three: 9}
    picks = [choice.get(i, 5) for i in range(len(tree))]
    assert verify_greedy(tree, picks) == ([0, one, three], 9)  # whole path plus a bonus
    picks[one] = 4
    assert verify_greedy(tree, picks) == ([0, one], 4)  # rejected below: the LLM's correction
    picks[0] = 6
    assert verify_greedy(tree, picks) == ([0], 6)


# -- stochastic verification keeps the LLM's distribution ---------------------------------------

V = 5
P_ROOT = torch.tensor([0.35, 0.25, 0.2, 0.15, 0.05])


def _after(token: int) -> torch.Tensor:
    w = torch.arange(1, V + 1, dtype=torch.float).roll(token) ** 2
    return w / w.sum()


P_AFTER = [_after(token) for token in range(V)]  # the 'LLM' after a first token (each differs)


# Two 'SSMs' that disagree with the LLM and with each other
Q = [torch.tensor([0.05, 0.1, 0.2, 0.3, 0.35]), torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])]
SAMPLED = SamplingParams(max_tokens=8, temperature=1.0)

# chi-square critical values at p = 0.001
CHI2_DF4 = 18.47
CHI2_DF20 = 45.31


def chi_square(observed: Counter, expected: dict) -> float:
    return sum((observed.get(k, 0) - e) ** 2 / e for k, e in expected.items() if e > 0)


def draw_tree(generator: torch.Generator) -> TokenTree:
    """SSM 0 drafts two distinct tokens at the root, SSM 1 one; each child gets one more."""
    tree = TokenTree(0)
    for ssm, width in ((0, 2), (1, 1)):
        ((tokens, q),) = draft_children(Q[ssm].log()[None], width, SAMPLED, generator)
        tree.drafts[0][ssm] = (tokens, q)
        for token in tokens:
            child = tree.add(0, token)
            ((below, q2),) = draft_children(Q[1 - ssm].log()[None], 1, SAMPLED, generator)
            tree.drafts[child][ssm] = (below, q2)
            tree.add(child, below[0])
    return tree


def llm_distributions(tree: TokenTree) -> torch.Tensor:
    rows = []
    for node in range(len(tree)):
        depth = tree.depths[node]
        rows.append(P_ROOT if depth == 0 else P_AFTER[tree.path_tokens([node])[0]])
    return torch.stack(rows)


def test_stochastic_verification_preserves_the_llm_distribution() -> None:
    generator = torch.Generator().manual_seed(1234)
    n = 4000
    first: Counter = Counter()
    pairs: Counter = Counter()
    drafted_first: Counter = Counter()
    for _ in range(n):
        tree = draw_tree(generator)
        path, token = verify_stochastic(tree, llm_distributions(tree), generator)
        out = [*tree.path_tokens(path[1:]), token]
        first[out[0]] += 1
        drafted_first[tree.drafts[0][0][0][0]] += 1
        if len(out) >= 2:
            pairs[(out[0], out[1])] += 1
    expected = {x: n * float(P_ROOT[x]) for x in range(V)}
    assert chi_square(first, expected) < CHI2_DF4
    # given the first token, the second follows the LLM's distribution after it
    seen = Counter()
    for (x, _y), count in pairs.items():
        seen[x] += count
    expected_pairs = {
        (x, y): seen[x] * float(P_AFTER[x][y]) for x in range(V) for y in range(V) if seen[x]
    }
    assert chi_square(pairs, expected_pairs) < CHI2_DF20
    # the same statistic does fail on a distribution that is not the LLM's: the drafts'
    assert chi_square(drafted_first, expected) > 10 * CHI2_DF4


def test_greedy_drafts_are_lossless_for_sampled_jobs_too() -> None:
    """A top-k draft proposes point masses; verification must still give the LLM's p."""
    generator = torch.Generator().manual_seed(99)
    n = 3000
    first: Counter = Counter()
    for _ in range(n):
        tree = TokenTree(0)
        tree.drafts[0][0] = ([0, 4], None)
        tree.add(0, 0)
        tree.add(0, 4)
        path, token = verify_stochastic(tree, llm_distributions(tree), generator)
        first[[*tree.path_tokens(path[1:]), token][0]] += 1
    assert chi_square(first, {x: n * float(P_ROOT[x]) for x in range(V)}) < CHI2_DF4


# -- the engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def near(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A draft close to the model: its weights with noise, so some drafts are rejected."""
    return build_near_model(tiny, tmp_path_factory.mktemp("near"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same tokenizer, unrelated random weights: its drafts are almost never accepted."""
    return build_tiny_model(tmp_path_factory.mktemp("other"), seed=1)


@pytest.fixture(scope="module")
def prompts(tiny: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(tiny: Path, prompts: list[list[int]]) -> list[list[int]]:
    return greedy_continuations(tiny, prompts, GREEDY.max_tokens)


def make_engine(tiny: Path, drafts: list[Path], **kw: object) -> Iterator[Engine]:
    config = EngineConfig(
        model=str(tiny), device="cpu", draft_models=tuple(str(d) for d in drafts), **kw
    )
    engine = load_engine(config, progress=False)
    try:
        yield engine
    finally:
        engine.close()


async def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY):
    handle = engine.submit(prompt, params)
    ids = []
    async for delta in handle:
        ids.extend(delta.token_ids)
    return ids, handle.job


@pytest.mark.parametrize(
    ("tree", "which", "kw"),
    [
        ((1, 1, 1), ["near"], {}),
        ((2, 2, 1), ["near"], {}),
        ((1, 1, 3, 1, 1, 1, 1, 1), ["near", "tiny"], {}),
        ((3,), ["other", "near"], {}),
        ((1, 2, 1), ["tiny"], {"kv_budget": 160, "scheduler": "mlfq", "host_kv_budget": 0}),
        ((1, 1, 1), ["near"], {"fused_threads": 2}),
    ],
    ids=["chain", "wide", "specinfer-2ssm", "shallow-2ssm", "kv-pressure", "chain-2threads"],
)
async def test_greedy_speculative_output_equals_incremental(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    tree: tuple[int, ...],
    which: list[str],
    kw: dict,
) -> None:
    drafts = [request.getfixturevalue(name) for name in which]
    chains: list[int] = []
    chain = fused_forward._chain
    chain_steps: list[int] = []  # the deepest draft of each chain step
    chain_step = Speculator._chain_step

    def counted(spec: Speculator, jobs: list, drafting: list, *a: Any) -> Any:
        chain_steps.append(max(spec.depth[j.id] for j in drafting))
        return chain_step(spec, jobs, drafting, *a)

    verifying: set[str] = set()  # the threads the chains' verification ran on
    verify = fused_spec._verify
    # a lone job's pipelined runs would verify in one compiled call: a step at a time here
    for engine in make_engine(
        tiny, drafts, spec_tree=tree, spec="on", max_batch_size=4, num_scheduler_steps=1, **kw
    ):
        # patched once the start compiled every compiled call that calls these (compiling
        # one after, numba would find a Python function where it calls them)
        monkeypatch.setattr(fused_forward, "_chain", lambda *a: chains.append(1) or chain(*a))
        monkeypatch.setattr(Speculator, "_chain_step", counted)
        monkeypatch.setattr(
            fused_spec,
            "_verify",
            lambda *a: verifying.add(threading.current_thread().name) or verify(*a),
        )
        results = await asyncio.gather(*(run(engine, p) for p in prompts))
        assert [ids for ids, _ in results] == reference
        spec = engine.stats()["speculation"]
        assert spec["num_drafts"] > 0
        # one torch thread: greedy chains are drafted by one compiled call a step (the chain
        # step's, which also catches the draft up, or the tree path's)
        assert engine.runner.fused is not None
        assert chains or chain_steps or set(tree) != {1}
        # one SSM drafting chains: no token trees, the chains fed as runs of tokens; a tree
        # with branches only where every job's draft stops before the first branch (short of
        # KV blocks, a job drafts less deep), never with two SSMs
        if len(drafts) > 1:
            assert not chain_steps
        elif set(tree) == {1}:
            assert chain_steps
            # with two threads, each half of the jobs drafts and verifies on its own
            assert len(verifying) == kw.get("fused_threads", 1), verifying
        else:
            chain_prefix = next(i for i, width in enumerate(tree) if width > 1)
            assert all(deepest <= chain_prefix for deepest in chain_steps), chain_steps
        if "tiny" in which:  # a draft identical to the model: every drafted chain is accepted
            assert spec["num_accepted_tokens"] > 0
            assert spec["num_accepted_tokens_per_pos"][len(tree) - 1] > 0
        jobs = [job for _, job in results]
        assert sum(job.spec.steps for job in jobs) == spec["num_drafts"]  # type: ignore[union-attr]
        assert engine.pool.used_tokens == 0  # every block came back
        assert all(not d.pool.tables for d in engine.drafters)


@pytest.mark.parametrize("which", ["tiny", "near"])
async def test_a_lone_job_drafts_its_next_chain_while_the_model_verifies(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    which: str,
) -> None:
    """With two fused threads and one job, the draft goes on past each chain on the second
    thread while the model verifies it; a chain accepted whole, with the model's next token the
    draft's first pick, makes the rest the next step's chain (no drafting call that step).
    Greedy output stays the model's, whether the draft agrees always (the model itself) or not."""
    drafts: list[int] = []
    draft = fused_spec._draft
    monkeypatch.setattr(fused_spec, "_draft", lambda *a: drafts.append(1) or draft(*a))
    chain_steps: list[int] = []
    chain_step = Speculator._chain_step
    monkeypatch.setattr(
        Speculator, "_chain_step", lambda *a: chain_steps.append(1) or chain_step(*a)
    )
    for engine in make_engine(
        tiny, [request.getfixturevalue(which)], spec_tree=(1, 1, 1), spec="on",
        max_batch_size=1, fused_threads=2, num_scheduler_steps=1,  # a step an iteration
    ):  # fmt: skip
        assert not engine.spec_policy.overlapped  # no runs: the drafting is a step's cost
        drafts.clear()
        results = [await run(engine, p) for p in prompts]
        assert [ids for ids, _ in results] == reference
        assert engine.pool.used_tokens == 0 and all(not d.pool.tables for d in engine.drafters)
    assert chain_steps
    if which == "tiny":  # every chain holds: after a job's first step, each comes drafted
        assert len(drafts) == len(prompts), (len(drafts), len(chain_steps))


@pytest.mark.parametrize("which", ["tiny", "near"])
async def test_a_lone_jobs_speculative_steps_run_pipelined(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    which: str,
) -> None:
    """One job at a time: its greedy chains take several steps a call, the model verifying each
    on the model loop's thread while the draft drafts the next on the second thread. Greedy
    output stays the model's whether the draft always agrees (the model itself) or not, every
    step is counted, a run starts from the chain the one before drafted last where its guess
    held, and both pools are empty after."""
    threads: dict[str, set[str]] = {"_target_loop": set(), "_draft_loop": set()}
    given: list[int] = []  # each run's first chain: drafted by the run before (1) or not (0)

    def recorded(name: str) -> Any:
        original = getattr(fused_spec, name)

        def recording(*a: Any) -> Any:
            threads[name].add(threading.current_thread().name)
            if name == "_draft_loop":
                given.append(len(a[6]))
            return original(*a)

        return recording

    for name in threads:
        monkeypatch.setattr(fused_spec, name, recorded(name))
    for engine in make_engine(
        tiny, [request.getfixturevalue(which)], spec_tree=(1, 1, 1), spec="on",
        max_batch_size=1, fused_threads=2, num_scheduler_steps=2,  # several runs a job
    ):  # fmt: skip
        for seen in threads.values():
            seen.clear()  # the start compiled both loops on this thread
        given.clear()
        # --spec auto would take a lone job's step cost as its verification's alone
        assert engine.spec_policy.overlapped == {1}
        results = [await run(engine, p) for p in prompts]
        assert [ids for ids, _ in results] == reference
        spec = engine.stats()["speculation"]
        runs = spec["pipelined_runs"]
        # up to two steps a run (one where the first makes the job's last tokens)
        assert runs["runs"] > 0 and runs["runs"] < runs["steps"] <= 2 * runs["runs"]
        assert runs["steps"] <= spec["num_drafts"]  # each run's steps are counted as steps
        assert sum(job.spec.steps for _, job in results) == spec["num_drafts"]  # type: ignore[union-attr]
        if which == "tiny":  # the model drafting for itself: every draft accepted
            assert spec["num_accepted_tokens"] == spec["num_draft_tokens"]
            # and every guess held: a job's runs after its first start with the chain the one
            # before drafted last, which they verify first (no catch-up, no drafting first)
            assert given.count(0) == len(prompts) and given.count(1) == runs["runs"] - len(prompts)
            assert runs["runs"] > len(prompts)
        assert engine.pool.used_tokens == 0
        assert all(not d.pool.tables for d in engine.drafters)
    assert threads["_target_loop"] == {"flockctl-engine"}
    assert len(threads["_draft_loop"]) == 1 and threads["_draft_loop"] != {"flockctl-engine"}


async def test_a_stop_token_ends_a_pipelined_run_where_single_steps_end(
    tiny: Path, near: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    """A stop token the model makes mid-run ends the job there, as it does a step at a time,
    and no pipelined run goes past a job's ``max_tokens``."""
    stop = reference[0][9]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=(stop,))
    out: dict[int, list[int]] = {}
    for steps in (1, 16):
        for engine in make_engine(
            tiny, [near], spec_tree=(1, 1, 1), spec="on", max_batch_size=1, fused_threads=2,
            num_scheduler_steps=steps,
        ):  # fmt: skip
            out[steps] = (await run(engine, prompts[0], params))[0]
            long = (await run(engine, prompts[1]))[0]
            assert long == reference[1] and len(long) == GREEDY.max_tokens
            runs = engine.stats()["speculation"]["pipelined_runs"]["runs"]
            assert (runs > 0) == (steps > 1)
    assert out[1] == out[16] == reference[0][: reference[0].index(stop) + 1]


async def test_a_request_posted_during_a_pipelined_run_ends_it_after_one_step(
    tiny: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request posted while a lone job's pipelined run is under way ends the run after its
    current step (the loop's interrupt); then both jobs keep their greedy tokens."""
    decoding, go = threading.Event(), threading.Event()
    ran: list[int] = []
    target_loop = fused_spec._target_loop

    def held(*a: Any) -> Any:
        if not go.is_set():
            decoding.set()
            go.wait(30)
        made, steps = target_loop(*a)
        ran.append(steps)
        return made, steps

    for engine in make_engine(
        tiny, [tiny], spec_tree=(1, 1, 1), spec="on", max_batch_size=2, fused_threads=2
    ):
        monkeypatch.setattr(fused_spec, "_target_loop", held)  # after the start's warm-up
        first = asyncio.ensure_future(run(engine, prompts[2]))
        await until(decoding.is_set, "the first job's run")
        second = asyncio.ensure_future(run(engine, prompts[3]))
        await until(lambda e=engine: len(e.model_loop._inbox) == 1, "the second job")
        go.set()
        assert (await first)[0] == reference[2]
        assert (await second)[0] == reference[3]
        assert ran[0] == 1


@pytest.mark.parametrize("side", ["_draft_loop", "_target_loop"])
async def test_a_pipelined_run_that_fails_on_either_thread_fails_its_job_not_the_engine(
    tiny: Path,
    near: Path,
    prompts: list[list[int]],
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
    side: str,
) -> None:
    """Either loop of a pipelined run raising ends the run (the other does not wait for it in
    vain): the job ends with the error, its blocks come back, and the engine serves on."""
    for engine in make_engine(
        tiny, [near], spec_tree=(1, 1, 1), spec="on", max_batch_size=1, fused_threads=2
    ):
        original = getattr(fused_spec, side)

        def failing(*a: Any) -> Any:
            raise RuntimeError(f"{side} failed")

        monkeypatch.setattr(fused_spec, side, failing)  # after the start's warm-up
        handle = engine.submit(prompts[0], GREEDY)
        deltas = [delta async for delta in handle]
        assert deltas[-1].error is not None and f"{side} failed" in deltas[-1].error
        assert handle.job.finish_reason == FinishReason.ABORT
        assert engine.pool.used_tokens == 0
        assert all(not d.pool.tables for d in engine.drafters)
        monkeypatch.setattr(fused_spec, side, original)
        assert (await run(engine, prompts[1]))[0] == reference[1]
        assert engine.stats()["speculation"]["pipelined_runs"]["runs"] > 0


def test_the_drafts_cache_is_made_at_start(tiny: Path, near: Path) -> None:
    """Each SSM's cache exists once the engine has started, as the model's does (made by its
    first forward, it cost the first speculative request half a second on the demo pair), and
    no job holds a block of it."""
    for engine in make_engine(tiny, [near], spec="on"):
        for drafter in engine.drafters:
            assert all(layer is not None for layer in drafter.pool.keys)
            assert all(layer is not None for layer in drafter.pool.values)
            assert not drafter.pool.tables and drafter.pool.used_tokens == 0


class FixedCosts(StepCosts):
    """Step costs as if measured at every batch size up to 8 (an incremental step 10 ms, a draft
    forward 1 ms, verification 10 ms plus 1 ms a tree token), deaf to the clock."""

    def __init__(self) -> None:
        super().__init__()
        for batch in range(1, 9):
            for _ in range(5):
                super().add_incremental(batch, 0.010)
                for tokens in (2, 7):
                    super().add_speculative(batch, 1, 0.001, tokens, 0.010 + 0.001 * (tokens - 1))

    def add_incremental(self, batch: int, seconds: float) -> None:
        pass

    def add_speculative(
        self, batch: int, forwards: int, draft_seconds: float, tokens: int, verify_seconds: float
    ) -> None:
        pass


async def test_auto_drafts_each_job_as_deep_as_pays_and_keeps_greedy_output(
    tiny: Path, near: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    for engine in make_engine(tiny, [near], spec="auto", spec_tree=(1,) * 6, max_batch_size=4):
        policy = engine.spec_policy
        policy.costs = FixedCosts()
        chosen: list[int] = []

        def recording(
            jobs: list[Job], choose: Any = policy.choose, chosen: list[int] = chosen
        ) -> dict[str, int]:
            depths = choose(jobs)
            chosen.extend(depths.values())
            return depths

        policy.choose = recording  # type: ignore[method-assign]
        results = await asyncio.gather(*(run(engine, p) for p in prompts))
        assert [ids for ids, _ in results] == reference  # whatever depth each step drafted
        assert chosen and all(1 <= d <= 6 for d in chosen)
        spec = engine.stats()["speculation"]
        assert spec["num_drafts"] > 0 and spec["max_depth"] == 6
        assert set(spec["depth_by_batch"]) <= {"1", "2", "3", "4"}
        assert len(spec["acceptance_by_pos"]) == 6
        assert engine.pool.used_tokens == 0
        assert all(not d.pool.tables for d in engine.drafters)


async def test_sampled_jobs_speculate_and_respect_limits(
    tiny: Path, near: Path, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    for engine in make_engine(tiny, [tiny, near], spec="on", spec_tree=(2, 1, 1)):
        ids, job = await run(engine, prompts[0], params)
        assert len(ids) == 30  # a tree never runs past max_tokens
        assert job.spec.steps > 0 and job.spec.accepted_tokens > 0  # type: ignore[union-attr]
        again, _ = await run(engine, prompts[0], params)
        assert again == ids  # a seed reproduces a job run alone
        detail = engine.job_info(job.id)
        assert detail is not None and detail["speculation"]["mean_accepted_length"] > 1
        assert detail["speculation"]["depth"] == 3  # --spec on drafts the whole tree
        text = engine.metrics.render()[0].decode()
        assert "flockctl_spec_decode_num_drafts_total" in text
        assert 'flockctl_spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in text


def fixed_costs(policy: SpecPolicy) -> None:
    """Fixed step costs in place of the clock's, so a busy machine cannot decide a test: a
    depth-1 step costs 1.4 incremental ones (as measured on a quiet 2-core host), more than the
    1.2 tokens at most that a draft accepted under a fifth of the time yields."""
    incremental, speculative = policy.observe_incremental, policy.observe_speculative

    def timed_incremental(batch: int, seconds: float) -> None:
        incremental(batch, 1.0)

    def timed_speculative(
        batch: int, forwards: int, draft: float, tokens: int, verify: float, catchup: int = 1
    ) -> None:
        speculative(batch, forwards, 0.3 * forwards, tokens, 1.0 + 0.05 * tokens, catchup)

    policy.observe_incremental = timed_incremental  # type: ignore[method-assign]
    policy.observe_speculative = timed_speculative  # type: ignore[method-assign]


async def test_auto_stops_speculating_with_a_useless_draft(
    tiny: Path, other: Path, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    for engine in make_engine(tiny, [other], spec="auto", max_model_len=256):
        policy = engine.spec_policy
        # no probe (nor timing of an incremental step) may be the last decision seen below
        policy.probe_every = 1000
        fixed_costs(policy)
        ids, job = await run(engine, prompts[1], params)
        assert len(ids) == 120
        spec = engine.stats()["speculation"]
        assert spec["mode"] == "auto"
        assert spec["acceptance_by_pos"][0] < 0.2
        # it measured, then decoded incrementally
        assert job.spec.steps < 20  # type: ignore[union-attr]
        assert engine.job_info(job.id)["speculation"]["depth"] == 0  # type: ignore[index]


def test_a_draft_with_another_tokenizer_is_refused(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    foreign = build_tiny_model(tmp_path_factory.mktemp("foreign"), vocab_size=300)
    with pytest.raises(EngineLoadError, match="same tokenizer as the model"):
        load_engine(
            EngineConfig(model=str(tiny), device="cpu", draft_models=(str(foreign),)),
            progress=False,
        )


def test_spec_on_needs_a_draft() -> None:
    with pytest.raises(ValueError, match="--spec on needs at least one --draft-model"):
        EngineConfig(model="x", spec="on")


def test_the_pipelined_loops_spin_with_the_machines_wait_hint() -> None:
    """The spin-wait hint the two loops of a pipelined run wait with is in the machine code: x86's
    ``pause``, Arm's ``yield``, none on another instruction set."""
    if not fused_forward.available():
        pytest.skip("numba is not installed")
    import numba

    @numba.njit
    def spin(times: int) -> None:
        for _ in range(times):
            fused_spec._spin_pause()

    spin(3)
    asm = "\n".join(spin.inspect_asm().values())
    hint = fused_spec._SPIN_HINT
    expected = {"llvm.x86.sse2.pause": "pause", "llvm.aarch64.hint": "yield"}
    instructions = {line.split()[0] for line in asm.splitlines() if line.strip()}
    if hint is None:
        assert not instructions & set(expected.values())
    else:
        assert expected[hint[0]] in instructions
