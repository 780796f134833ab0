"""Speculative decoding as in SpecInfer: token trees from small speculative models (SSMs), verified
by the served model (the LLM) in one forward pass.

- :class:`TokenTree`: node 0 is the root, the job's last committed token (sampled, not yet in any
  cache); every other node is a drafted token. Nodes are added parent first, so a parent's index
  is below its children's. Trees from several SSMs merge: the same token under the same parent is
  one node, and each node remembers, per SSM, which tokens it drafted there and from what
  distribution.
- Expansion: ``--spec-tree 1,1,3,1`` gives each node at depth ``d`` that many children, the SSM's
  top tokens for greedy jobs and tokens sampled without replacement for sampled jobs.
- Verification (:func:`verify_greedy`, :func:`verify_stochastic`) walks the tree from the root
  with the LLM's distribution at each node and returns the accepted path plus one token from the
  LLM (a correction where a draft was rejected, a bonus after a leaf). Both keep the LLM's output
  distribution exactly.
- :class:`SpecPolicy` decides, as the engine runs, whether speculating pays: for each job from its
  mean accepted length, and for the device from the measured cost of a speculative iteration
  against an incremental one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.sampling import is_greedy, probabilities


class TokenTree:
    """A token tree; see the module docstring."""

    def __init__(self, root: int):
        self.tokens = [root]
        self.parents = [-1]
        self.depths = [0]
        self.children: list[dict[int, int]] = [{}]
        # per node, per SSM: the tokens it drafted under the node (in draw order) and the
        # distribution they were drawn from (None for greedy drafts)
        self.drafts: list[dict[int, tuple[list[int], torch.Tensor | None]]] = [{}]

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        """The child of ``parent`` with ``token``, created if new."""
        child = self.children[parent].get(token)
        if child is None:
            child = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.children.append({})
            self.drafts.append({})
            self.children[parent][token] = child
        return child

    def ancestry(self) -> torch.Tensor:
        """Bool ``[n, n]``: ``[i, j]`` when node ``j`` is node ``i`` or one of its ancestors."""
        n = len(self.tokens)
        out = torch.zeros((n, n), dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                out[i] = out[parent]
            out[i, i] = True
        return out

    def path_tokens(self, path: Sequence[int]) -> list[int]:
        return [self.tokens[i] for i in path]


def draft_children(
    logits: torch.Tensor,
    width: int,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[tuple[list[int], torch.Tensor | None]]:
    """For each row of SSM ``logits`` ``[nodes, vocab]``, up to ``width`` distinct tokens to draft
    under that node: the top ones for a greedy job; for a sampled job a draw without replacement
    from the job's own sampling distribution, returned with it (verification needs it)."""
    if is_greedy(params):
        width = min(width, logits.shape[-1])
        return [(row, None) for row in logits.topk(width, dim=-1).indices.tolist()]
    out: list[tuple[list[int], torch.Tensor | None]] = []
    for q in probabilities(logits, params):
        n = min(width, int((q > 0).sum()))
        picks = torch.multinomial(q, n, replacement=False, generator=generator)
        out.append((picks.tolist(), q))
    return out


def verify_greedy(tree: TokenTree, choice: Sequence[int]) -> tuple[list[int], int]:
    """Follow the LLM's own pick ``choice[node]`` (its argmax at each node) down the tree.

    Returns the accepted path (node indices from the root) and the LLM's token after it.
    """
    path = [0]
    while True:
        token = choice[path[-1]]
        child = tree.children[path[-1]].get(token)
        if child is None:
            return path, token
        path.append(child)


def verify_stochastic(
    tree: TokenTree, p: torch.Tensor, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Multi-step speculative sampling over the tree; ``p`` ``[n, vocab]`` holds the LLM's
    distribution at each node.

    At a node, each drafted token ``x`` (SSM by SSM, in draw order) is accepted with probability
    ``min(1, r(x) / q(x))``, where ``r`` starts as the LLM's ``p``. A rejection leaves
    ``r = norm(max(0, r - q))``, and the SSM's next draft is judged against ``q`` without the
    rejected tokens (its draws were without replacement). Whatever the proposals, what comes out
    at each step is distributed as ``r`` was before it, so the first token out is distributed as
    ``p``; the walk then goes on from the accepted child. When nothing is accepted, one token is
    drawn from the final ``r``; past a leaf, from the leaf's ``p``.
    """
    device = p.device
    path = [0]
    while True:
        node = path[-1]
        r = p[node]
        accepted = None
        for tokens, drafted_from in tree.drafts[node].values():
            # a greedy draft proposes each token as a point mass: still a valid proposal
            q = None if drafted_from is None else drafted_from.clone()
            for token in tokens:
                qx, rx = (1.0 if q is None else float(q[token])), float(r[token])
                u = float(torch.rand((), generator=generator, device=device))
                if qx > 0 and u * qx < rx:
                    accepted = tree.children[node][token]
                    break
                if q is None:
                    rest = r.clone()
                    rest[token] = 0.0
                else:
                    rest = (r - q).clamp_(min=0)
                total = float(rest.sum())
                if total > 1e-12:  # else r and q agree: the rejection had probability zero
                    r = rest / total
                if q is not None:
                    q[token] = 0.0
                    left = float(q.sum())
                    if left <= 0:
                        break
                    q /= left
            if accepted is not None:
                break
        if accepted is None:
            return path, _draw(r, generator)
        path.append(accepted)
        if not tree.children[accepted]:
            return path, _draw(p[accepted], generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


# -- deciding when to speculate ------------------------------------------------------------------


class _Ewma:
    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.value: float | None = None
        self.count = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.count += 1


class SpecPolicy:
    """When to speculate: ``on`` always, ``off`` never, ``auto`` while it pays, measured.

    For a batch of ``b`` decoding jobs the policy keeps the seconds of a speculative iteration and
    of an incremental one, as moving averages; their ratio ``c`` is what a speculative step costs
    in incremental steps. A job whose recent steps emitted fewer than ``c`` tokens each (judged
    after its first ``min_steps``) loses by speculating and decodes incrementally, trying again
    after ``probe_every`` iterations. When the jobs left would still make fewer tokens per second
    than incremental decoding, the device stops speculating for the batch until a job's probe
    comes due. While one side of the ratio is unknown for this batch size, it is measured first.
    """

    def __init__(
        self, mode: str = "auto", probe_every: int = 32, min_samples: int = 3, min_steps: int = 4
    ):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"unknown speculation mode {mode!r}: expected auto, on or off")
        self.mode = mode
        self.probe_every = probe_every
        self.min_samples = min_samples
        self.min_steps = min_steps
        self.spec_seconds: dict[int, _Ewma] = {}
        self.inc_seconds: dict[int, _Ewma] = {}
        self.device_on = True
        self.reason = "" if mode != "off" else "--spec off"
        self._since_probe = 0

    def cost_ratio(self, batch: int) -> float | None:
        spec, inc = self.spec_seconds.get(batch), self.inc_seconds.get(batch)
        if not spec or not inc or spec.value is None or inc.value is None:
            return None
        if min(spec.count, inc.count) < self.min_samples or inc.value <= 0:
            return None
        return spec.value / inc.value

    def choose(self, jobs: Sequence[Job]) -> list[Job]:
        """The decoding ``jobs`` that speculate this iteration (each has ``job.spec``)."""
        if self.mode == "off" or not jobs:
            return []
        if self.mode == "on":
            return list(jobs)
        batch = len(jobs)
        spec, inc = self.spec_seconds.get(batch), self.inc_seconds.get(batch)
        if spec is None or spec.count < self.min_samples:
            return list(jobs)  # measure a speculative iteration at this batch size
        if inc is None or inc.count < self.min_samples:
            self._since_probe += 1
            if self._since_probe >= 2:  # interleave: learn the incremental cost too
                self._since_probe = 0
                return []
            return list(jobs)
        c = self.cost_ratio(batch)
        assert c is not None
        chosen = []
        measuring = False
        for job in jobs:
            state = job.spec
            assert state is not None
            gain = state.emitted_ewma
            # a few unlucky steps are no verdict: judge a job once it has a history
            young = gain is None or state.steps < self.min_steps
            state.enabled = young or (gain is not None and gain > c)
            due = state.skipped + 1 >= self.probe_every  # a losing job tries again now and then
            if state.enabled or due:
                chosen.append(job)
            measuring = measuring or young or (due and not state.enabled)
        if measuring:
            self.device_on, self.reason = True, "measuring what speculation yields for a job"
            return chosen
        tokens_spec = 0.0
        for job in jobs:
            gain = job.spec.emitted_ewma if job.spec else None
            tokens_spec += gain if gain is not None and job in chosen else 1.0
        if chosen and tokens_spec / c > batch:
            self.device_on, self.reason = True, f"{tokens_spec / c / batch:.2f}x incremental"
            return chosen
        self.device_on = False
        self.reason = (
            f"a speculative step costs {c:.2f} incremental steps and yields"
            f" {tokens_spec / batch:.2f} tokens a job"
        )
        return []

    def observe_iteration(self, speculative: bool, batch: int, seconds: float) -> None:
        table = self.spec_seconds if speculative else self.inc_seconds
        table.setdefault(batch, _Ewma()).add(seconds)

    @staticmethod
    def observe_job(job: Job, drafted: int, accepted: int, speculated: bool) -> None:
        state = job.spec
        assert state is not None
        if not speculated:
            state.skipped += 1
            return
        state.skipped = 0
        state.steps += 1
        state.draft_tokens += drafted
        state.accepted_tokens += accepted
        emitted = accepted + 1
        # the plain mean of a job's first 20 steps, a moving average over about 20 after that:
        # steady enough that a short run of rejections does not flip the verdict
        alpha = max(1 / state.steps, 0.05)
        previous = state.emitted_ewma if state.emitted_ewma is not None else emitted
        state.emitted_ewma = previous + alpha * (emitted - previous)

    def describe(self) -> dict[str, Any]:
        ratios = {}
        for batch in sorted(self.spec_seconds):
            c = self.cost_ratio(batch)
            if c is not None:
                ratios[str(batch)] = round(c, 3)
        return {
            "mode": self.mode,
            "active": self.mode == "on" or (self.mode == "auto" and self.device_on),
            "reason": self.reason,
            "cost_ratio_by_batch": ratios,
        }
