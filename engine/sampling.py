"""Choosing each job's next token from the batch's logits.

One call handles a whole batch. Greedy rows take one ``argmax``; sampled rows are scaled, filtered
(top-k, top-p) and turned into cumulative weights together, and each then draws one uniform number
from its own generator and picks the token where that number falls (inverse CDF). One number per
token means a seeded job's generator advances the same way whatever else is in the batch, and a
row's weights depend only on that row, so a seed reproduces its tokens in any batch, at any
position.

Before the draw, :func:`adjust_logits` applies what OpenAI and vLLM let a request change in the
model's logits (``logit_bias``, presence, frequency and repetition penalties, ``min_tokens``),
row by row. :func:`token_logprobs` reports the log-probabilities of the model's own distribution,
before any of that and before temperature, top-k and top-p (vLLM's default, "raw" log-probs):
what a token costs the model, whatever the request did to pick it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from .job import Job, SamplingParams, TokenLogprob

# Candidates a top-p row without top-k looks at first, and the wider sets it falls back to when its
# nucleus does not fit. Sorting a 32k vocabulary costs about 3 ms a row on a CPU core; the top 128
# about 0.1 ms, and a peaked distribution's nucleus is usually far smaller than that.
_NUCLEUS_WIDTHS = (128, 2048)

# exp() below about -87 gives subnormal floats or underflows, which a CPU computes some 15 times
# slower: a cold sampling temperature pushes most of a vocabulary there. Such a token weighs under
# 1e-37 of the best one, far below what a float32 draw can reach, so its weight is exp(-87).
_MIN_LOG_WEIGHT = -87.0

# Temperatures this close to zero sample the argmax anyway, and dividing by them could overflow.
_GREEDY_BELOW = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    """Whether ``params`` pick the argmax (temperature 0 or near it, or top-k 1)."""
    return params.greedy or params.temperature < _GREEDY_BELOW


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for a seeded job, on the device its logits live on; None draws from torch's own.

    Jobs without a seed share the global generator: reproducibility was not asked for, and a
    generator per job would cost a device allocation for nothing. The engine seeds that one from
    the OS at start (unless ``--seed``), so two engines never draw the same numbers.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed % 2**64)
    return generator


def sibling_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request with ``seed`` and ``n`` > 1: the request's own
    for the first, and for the others numbers far from it, so choices differ yet reproduce."""
    if seed is None or index == 0:
        return seed
    # splitmix64's step: neighbouring seeds give unrelated streams
    z = (seed + index * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def adjust_logits(
    logits: torch.Tensor, jobs: Sequence[Job], eos_ids: Collection[int]
) -> torch.Tensor:
    """``logits`` ([batch, vocab], one row per job) with each job's logit changes applied:
    repetition penalty (vLLM's: positive logits divided, negative multiplied, for every token of
    prompt and output), frequency and presence penalties (OpenAI's: per occurrence and once, over
    the output), ``logit_bias``, and end-of-sequence and ``stop_token_ids`` masked until
    ``min_tokens`` are out. Rows of jobs that change nothing are left as they are (no copy when
    none does)."""
    rows = [i for i, job in enumerate(jobs) if job.params.adjusts_logits]
    if not rows:
        return logits
    out = logits.float().clone()
    vocab = out.shape[-1]
    device = out.device
    for i in rows:
        job, p, x = jobs[i], jobs[i].params, out[i]
        if p.repetition_penalty != 1:
            seen = torch.tensor(job.prompt_ids + job.output_ids, device=device).unique()
            seen = seen[seen < vocab]
            values = x[seen]
            x[seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if (p.frequency_penalty or p.presence_penalty) and job.output_ids:
            counts = torch.bincount(torch.tensor(job.output_ids, device=device), minlength=vocab)[
                :vocab
            ].to(x.dtype)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
        for token, bias in p.logit_bias:
            if token < vocab:
                x[token] += bias
        if len(job.output_ids) < p.min_tokens:
            banned = [t for t in (*eos_ids, *p.stop_token_ids) if t < vocab]
            if banned:
                x[banned] = float("-inf")
    return out


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]
) -> list[TokenLogprob]:
    """For each row of ``logits`` ([rows, vocab], the model's own), the log-probability of
    ``tokens[row]`` and the ``top[row]`` most likely tokens with theirs (best first)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])
    k = max(top, default=0)
    best_values, best_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    out = []
    for row, (token, lp) in enumerate(zip(tokens, chosen.squeeze(-1).tolist(), strict=True)):
        alternatives: tuple[tuple[int, float], ...] = ()
        if top[row] and best_ids is not None and best_values is not None:
            ids = best_ids[row, : top[row]].tolist()
            values = best_values[row, : top[row]].tolist()
            alternatives = tuple(zip(ids, values, strict=True))
        out.append(TokenLogprob(token, lp, alternatives))
    return out


class Sampler:
    """Greedy, temperature, top-k and top-p sampling for a batch of jobs with their own settings.

    Work is in float32 whatever the logits' dtype: bf16 keeps under three significant digits, too
    few for cumulative sums over a vocabulary, which both the nucleus cut and the draw rely on.
    """

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> list[int]:
        """One token id per row of ``logits`` ([batch, vocab], each job's last position)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch = logits.shape[0]
        if len(params) != batch or len(generators) != batch:
            raise ValueError(
                f"{batch} rows of logits but {len(params)} params and {len(generators)} generators"
            )
        # Rows are grouped by the work they need, not all sorted because one asked for top-p:
        # a row's token must not depend on its neighbours' settings.
        greedy: list[int] = []
        plain: list[int] = []
        filtered: list[int] = []
        for i, p in enumerate(params):
            if is_greedy(p):
                greedy.append(i)
            elif p.top_k > 0 or p.top_p < 1:
                filtered.append(i)
            else:
                plain.append(i)
        if len(greedy) == batch:
            cpu = logits.device.type == "cpu" and not logits.requires_grad
            if cpu and logits.dtype == torch.float32:
                # numpy's argmax, the same first-index rule as torch's: after a forward has
                # swept the caches, torch's argmax cost a step of 8 jobs several times as much
                picks: list[int] = logits.numpy().argmax(axis=-1).tolist()
                return picks
            return logits.argmax(dim=-1).tolist()

        out = [0] * batch
        if greedy:
            self._put(out, greedy, logits[greedy].argmax(dim=-1))
        if plain:
            self._put(out, plain, self._draw_plain(logits, plain, params, generators))
        if filtered:
            self._draw_filtered(out, logits, filtered, params, generators)
        return out

    def _draw_plain(
        self,
        logits: torch.Tensor,
        rows: list[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Temperature only: the whole vocabulary, in vocabulary order."""
        x = self._scaled(logits, rows, params)
        cdf = _weights(x - x.amax(dim=-1, keepdim=True)).cumsum(dim=-1)
        return self._invert(cdf, cdf[:, -1], [generators[i] for i in rows])

    def _draw_filtered(
        self,
        out: list[int],
        logits: torch.Tensor,
        rows: list[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> None:
        """Top-k and/or top-p, over the most likely candidates, widening them only where needed."""
        x = self._scaled(logits, rows, params)
        vocab = x.shape[-1]
        top_k = [min(params[i].top_k, vocab) for i in rows]
        top_p = [params[i].top_p for i in rows]
        pending = list(range(len(rows)))
        for level in (*_NUCLEUS_WIDTHS, vocab):
            ks = [top_k[j] for j in pending]
            # A top-k row's candidates are its k best; only rows without top-k need the level.
            unlimited = not all(ks)
            width = min(max(*ks, level if unlimited else 0), vocab)
            sub = x if len(pending) == len(rows) else x[pending]
            ids, cdf, total, fits = self._candidates(
                sub,
                torch.tensor(ks, device=x.device),
                torch.tensor([top_p[j] for j in pending], device=x.device),
                width,
                unlimited,
            )
            fit = fits.tolist() if width < vocab else [True] * len(pending)
            if all(fit):
                done = pending
            else:
                mask = torch.tensor(fit, device=x.device)
                done = [j for j, f in zip(pending, fit, strict=True) if f]
                ids, cdf, total = ids[mask], cdf[mask], total[mask]
            if done:
                choice = self._invert(cdf, total, [generators[rows[j]] for j in done])
                self._put(out, [rows[j] for j in done], ids.gather(-1, choice[:, None]))
            pending = [j for j, f in zip(pending, fit, strict=True) if not f]
            if not pending:
                return

    @staticmethod
    def _candidates(
        x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int, unlimited: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best ``width`` candidates of each row: ids, cumulative weights, the mass to draw
        from, and whether the row's nucleus fits among them (at full width it always does).

        Weights are not normalized: a row's cumulative sums over its own candidates then come out
        the same however many candidates the batch carries, which a softmax would not promise.
        """
        vocab = x.shape[-1]
        if width < vocab:
            values, ids = x.topk(width, dim=-1)
        else:
            values, ids = x.sort(dim=-1, descending=True)
        weights = _weights(values - values[:, :1])
        position = torch.arange(values.shape[-1], device=x.device)
        limited = top_k > 0
        weights = weights.masked_fill(limited[:, None] & (position >= top_k[:, None]), 0.0)
        cdf = weights.cumsum(dim=-1)
        # Top-k rows draw from their k candidates; the others from the whole vocabulary.
        total = cdf[:, -1]
        if unlimited:
            total = torch.where(limited, total, _weights(x - values[:, :1]).sum(dim=-1))
        # Nucleus: keep a candidate while the mass before it is below top_p of the total, i.e. the
        # smallest prefix holding at least top_p; the first candidate always stays.
        before = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=-1)
        limit = top_p * total
        kept = (before < limit[:, None]).sum(dim=-1).clamp_(min=1)
        nucleus = cdf.gather(-1, (kept - 1)[:, None]).squeeze(-1)
        total = torch.where(top_p < 1, nucleus, total)
        fits = limited | (cdf[:, -1] >= limit)
        return ids, cdf, total, fits

    @staticmethod
    def _scaled(
        logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams]
    ) -> torch.Tensor:
        x = logits[rows].float()
        temperature = [params[i].temperature for i in rows]
        if any(t != 1 for t in temperature):
            x = x / torch.tensor(temperature, device=x.device)[:, None]
        return x

    @staticmethod
    def _invert(
        cdf: torch.Tensor, total: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        """Inverse-CDF draw: the first candidate whose cumulative weight reaches u * total.

        u is in (0, 1], so the target is above zero (a weightless first candidate is never hit)
        and at most the total (the draw never runs past the last candidate kept).
        """
        device = cdf.device
        u = 1.0 - torch.stack([torch.rand((), generator=g, device=device) for g in generators])
        choice = torch.searchsorted(cdf, (u * total)[:, None]).squeeze(-1)
        return choice.clamp_(max=cdf.shape[-1] - 1)

    @staticmethod
    def _put(out: list[int], rows: list[int], tokens: torch.Tensor) -> None:
        for i, token in zip(rows, tokens.flatten().tolist(), strict=True):
            out[i] = token


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution :class:`Sampler` draws from for ``params``, as float32 probabilities
    ``[rows, vocab]`` (one-hot on the argmax for greedy settings).

    Speculative sampling needs the whole distribution, not one draw: it accepts a drafted token
    with probability ``min(1, p/q)`` and otherwise samples from what is left of ``p``.
    """
    x = logits.float()
    if is_greedy(params):
        out = torch.zeros_like(x)
        return out.scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
    if params.temperature != 1:
        x = x / params.temperature
    values, ids = x.sort(dim=-1, descending=True)
    weights = _weights(values - values[:, :1])
    if params.top_k > 0:
        weights[:, params.top_k :] = 0.0
    if params.top_p < 1:
        cdf = weights.cumsum(dim=-1)
        before = cdf - weights
        limit = params.top_p * cdf[:, -1:]
        # the same nucleus as the sampler: every candidate whose preceding mass is below the limit
        weights = torch.where(before < limit, weights, 0.0)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.zeros_like(x).scatter_(-1, ids, weights)


def _weights(log_weights: torch.Tensor) -> torch.Tensor:
    """Unnormalized probabilities from logits less their maximum."""
    return torch.exp(log_weights.clamp(min=_MIN_LOG_WEIGHT))
