"""Sampler: greedy rows take the argmax, sampled rows follow the filtered softmax, seeds reproduce.

Distribution checks draw thousands of tokens in one batch (every row the same logits, one seeded
generator shared by all rows), so they are exact to a fixed seed and fast.
"""

from __future__ import annotations

import pytest
import torch

from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.sampling import (
    Sampler,
    adjust_logits,
    make_generator,
    sibling_seed,
    token_logprobs,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(params: SamplingParams, n: int = 20000, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    """Relative frequency of each token over ``n`` draws with a seeded generator."""
    generator = make_generator(1234, "cpu")
    tokens = Sampler().sample(logits.expand(n, -1), [params] * n, [generator] * n)
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).float() / n


def peaked_logits(steps: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits shaped like a language model's: a few likely tokens, a long flat tail."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    base = -1.2 * ranks.log()
    shuffled = torch.stack([base[torch.randperm(vocab, generator=g)] for _ in range(steps)])
    return shuffled + 0.5 * torch.randn(steps, vocab, generator=g)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=1)] * 4
    out = Sampler().sample(logits, params, [None] * 8)
    assert out == logits.argmax(dim=-1).tolist()
    assert Sampler().sample(logits.bfloat16(), params, [None] * 8) == (
        logits.bfloat16().float().argmax(dim=-1).tolist()
    )


def test_greedy_picks_as_torch_does_on_ties_nan_and_strided_rows() -> None:
    # an all-greedy float32 batch on the CPU is picked with numpy: the same first index
    logits = torch.zeros(3, 4, 6)
    logits[0, -1, [2, 4]] = 1.0  # a tie: the first of the two
    logits[1, -1, 3] = float("nan")  # torch counts NaN as the largest
    logits[2, -1, 5] = -1.0  # all zero but the last: the first zero
    last = logits[:, -1]  # each job's last position, a strided view as the runner hands it
    params = [SamplingParams(temperature=0)] * 3
    out = Sampler().sample(last, params, [None] * 3)
    assert out == last.argmax(dim=-1).tolist() == [2, 3, 0]


def test_vanishing_temperature_is_greedy() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=t, seed=1) for t in (1e-300, 1e-9, 1e-6, 1e-300)]
    out = Sampler().sample(logits, params, [make_generator(1, "cpu")] * 4)
    assert out == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.3), SamplingParams(top_p=0.99)])
def test_masked_tokens_are_never_drawn(params: SamplingParams) -> None:
    # -inf marks tokens a model must not produce (padding rows of the vocabulary, say).
    logits = torch.tensor([float("-inf"), 0.0, float("-inf"), -1.0, -2.0, float("-inf")])
    freq = draws(params, logits=logits)
    assert freq[[0, 2, 5]].sum() == 0
    assert (freq[[1, 3, 4]] > 0).all()


def test_greedy_rows_in_a_mixed_batch() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.5, seed=2),
        SamplingParams(top_k=3, seed=3),
        SamplingParams(temperature=0),
    ]
    out = Sampler().sample(logits, params, [make_generator(p.seed, "cpu") for p in params])
    for i in (0, 2, 5):
        assert out[i] == int(logits[i].argmax())
    assert out[4] in logits[4].topk(3).indices.tolist()


def test_tiny_top_p_is_greedy() -> None:
    logits = torch.randn(16, 200, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.5, top_p=1e-6, seed=s) for s in range(16)]
    out = Sampler().sample(logits, params, [make_generator(p.seed, "cpu") for p in params])
    assert out == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_follows_softmax(temperature: float) -> None:
    freq = draws(SamplingParams(temperature=temperature))
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    # 20000 draws: a standard error of at most 0.0036 per token.
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_top_k_restricts_support() -> None:
    freq = draws(SamplingParams(temperature=1.5, top_k=3))
    assert (freq[3:] == 0).all()
    expected = torch.softmax(LOGITS[:3] / 1.5, dim=-1)
    torch.testing.assert_close(freq[:3], expected, atol=0.015, rtol=0)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.softmax(LOGITS, dim=-1)  # 0.61, 0.22, 0.14, 0.08, ...
    assert probs[:2].sum() < 0.8 < probs[:3].sum()
    freq = draws(SamplingParams(top_p=0.8))
    assert (freq[3:] == 0).all()
    torch.testing.assert_close(freq[:3], probs[:3] / probs[:3].sum(), atol=0.015, rtol=0)


def test_top_k_then_top_p() -> None:
    # top_k=2 leaves 0.73/0.27; top_p=0.5 of that is the first token alone.
    freq = draws(SamplingParams(top_k=2, top_p=0.5), n=2000)
    assert freq[0] == 1


def test_wide_nucleus() -> None:
    # Nearly flat: the nucleus holds thousands of tokens, more than the candidates looked at first.
    vocab = 3000
    logits = -torch.arange(vocab, dtype=torch.float32) / 2000
    probs = torch.softmax(logits, dim=-1)
    nucleus = int((probs.cumsum(-1) - probs < 0.9).sum())
    assert nucleus > 2048
    freq = draws(SamplingParams(top_p=0.9), n=3000, logits=logits)
    # The tail left out holds a tenth of the mass: some 300 of these draws without the cut.
    assert (freq[nucleus:] == 0).all()
    expected = probs[: nucleus // 2].sum() / probs[:nucleus].sum()
    assert abs(float(freq[: nucleus // 2].sum() - expected)) < 0.03


JOBS = {
    "temperature": SamplingParams(temperature=0.8, seed=7),
    "top_k": SamplingParams(temperature=1.2, top_k=20, seed=7),
    "top_p": SamplingParams(top_p=0.9, seed=7),
    "top_k_top_p": SamplingParams(temperature=0.7, top_k=50, top_p=0.8, seed=7),
    "wide_top_p": SamplingParams(temperature=3.0, top_p=0.99, seed=7),
}
NEIGHBOURS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0),  # unseeded: the global generator
    SamplingParams(top_k=5, seed=1),
    SamplingParams(top_k=900, top_p=0.95, seed=2),  # widens the candidates of the batch
    SamplingParams(temperature=2.0, top_p=0.999, seed=3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(JOBS))
def test_seed_reproduces_tokens_in_any_batch(name: str, device: str) -> None:
    job = JOBS[name]
    steps, vocab = 12, 3000
    logits = peaked_logits(steps, vocab, seed=5).to(device)
    others = torch.randn(steps, len(NEIGHBOURS), vocab, generator=torch.Generator().manual_seed(6))
    others = others.to(device)
    sampler = Sampler()

    def run(position: int | None, neighbours: list[SamplingParams]) -> list[int]:
        g = make_generator(job.seed, device)
        gens = [make_generator(p.seed, device) for p in neighbours]
        tokens = []
        for step in range(steps):
            if position is None:
                tokens += sampler.sample(logits[step : step + 1], [job], [g])
                continue
            rows = list(others[step, : len(neighbours)])
            rows.insert(position, logits[step])
            params = [*neighbours[:position], job, *neighbours[position:]]
            out = sampler.sample(torch.stack(rows), params, [*gens[:position], g, *gens[position:]])
            tokens.append(out[position])
        return tokens

    alone = run(None, [])
    assert len(set(alone)) > 1  # really sampled, not stuck on one token
    assert run(0, NEIGHBOURS) == alone
    assert run(3, NEIGHBOURS) == alone
    assert run(1, NEIGHBOURS[::-1][:3]) == alone
    assert run(2, [NEIGHBOURS[0], NEIGHBOURS[2]]) == alone


def test_different_seeds_differ() -> None:
    logits = peaked_logits(1, 3000, seed=8).expand(2, -1)
    runs = []
    for seed in (1, 2):
        g = make_generator(seed, "cpu")
        p = SamplingParams(temperature=1.5, seed=seed)
        runs.append([Sampler().sample(logits[:1], [p], [g])[0] for _ in range(20)])
    assert runs[0] != runs[1]


def test_unseeded_rows_use_the_global_generator() -> None:
    assert make_generator(None, "cpu") is None
    logits = peaked_logits(1, 3000, seed=9)
    params = [SamplingParams(temperature=1.5)]
    torch.manual_seed(42)
    first = [Sampler().sample(logits, params, [None])[0] for _ in range(10)]
    torch.manual_seed(42)
    assert [Sampler().sample(logits, params, [None])[0] for _ in range(10)] == first


def test_low_precision_logits_are_sampled_in_float32() -> None:
    logits = peaked_logits(4, 1000, seed=10).bfloat16()
    params = [SamplingParams(top_p=0.9, seed=s) for s in range(4)]
    low = Sampler().sample(logits, params, [make_generator(p.seed, "cpu") for p in params])
    full = Sampler().sample(logits.float(), params, [make_generator(p.seed, "cpu") for p in params])
    assert low == full


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="2 rows of logits but 1 params"):
        Sampler().sample(torch.zeros(2, 5), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="batch, vocab"):
        Sampler().sample(torch.zeros(5), [SamplingParams()], [None])


# -- what a request changes in the logits, and the log-probabilities it is told -------------------


def job_with(params: SamplingParams, prompt: list[int], output: list[int]) -> Job:
    job = Job(list(prompt), params)
    job.output_ids = list(output)
    return job


def test_penalties_bias_and_min_tokens_change_exactly_their_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0, 3.0]])
    cases = [
        # repetition (vLLM's): every prompt and output token, positive divided, negative multiplied
        (SamplingParams(repetition_penalty=2.0), [1], [0, 0], [1.0, -2.0, 0.5, 1.0, 0.0, 3.0]),
        # frequency per occurrence in the output, presence once
        (SamplingParams(frequency_penalty=0.5), [3], [0, 0, 2], [1.0, -1.0, 0.0, 1.0, 0.0, 3.0]),
        (SamplingParams(presence_penalty=0.5), [3], [0, 0, 2], [1.5, -1.0, 0.0, 1.0, 0.0, 3.0]),
        (SamplingParams(logit_bias=((4, 10.0), (5, -3.0))), [1], [], [2, -1, 0.5, 1, 10, 0]),
    ]
    for params, prompt, output, expected in cases:
        got = adjust_logits(logits, [job_with(params, prompt, output)], eos_ids={9})
        assert got[0].tolist() == pytest.approx(expected), params
    # until min_tokens are out, end-of-sequence and stop_token_ids cannot be drawn
    held = SamplingParams(min_tokens=2, stop_token_ids=(3,))
    early = adjust_logits(logits, [job_with(held, [1], [0])], eos_ids={5})[0]
    assert early[3] == early[5] == float("-inf") and early[0] == 2.0
    late = adjust_logits(logits, [job_with(held, [1], [0, 0])], eos_ids={5})[0]
    assert late.tolist() == logits[0].tolist()


def test_rows_that_change_nothing_stay_as_they_are() -> None:
    logits = torch.randn(3, 8)
    plain = job_with(SamplingParams(), [1], [2])
    assert adjust_logits(logits, [plain, plain, plain], eos_ids=()) is logits
    biased = job_with(SamplingParams(logit_bias=((0, 1.0),)), [1], [2])
    got = adjust_logits(logits, [plain, biased, plain], eos_ids=())
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    assert got[1, 0] == pytest.approx(float(logits[1, 0]) + 1)


def test_token_logprobs_are_the_log_softmax_with_the_best_alternatives() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    entries = token_logprobs(logits, [0, 2], [2, 0])
    expected = torch.log_softmax(logits, dim=-1)
    assert entries[0].token == 0 and entries[0].logprob == pytest.approx(float(expected[0, 0]))
    assert [t for t, _ in entries[0].top] == [1, 2]
    assert entries[0].top[0][1] == pytest.approx(float(expected[0, 1]))
    assert entries[1].top == () and entries[1].logprob == pytest.approx(float(expected[1, 2]))


def test_sibling_seeds_differ_and_reproduce() -> None:
    assert sibling_seed(None, 3) is None
    assert sibling_seed(7, 0) == 7
    seeds = [sibling_seed(7, i) for i in range(16)]
    assert len(set(seeds)) == 16 and seeds == [sibling_seed(7, i) for i in range(16)]
    assert sibling_seed(7, 1) != sibling_seed(8, 0)  # not simply the next seed
