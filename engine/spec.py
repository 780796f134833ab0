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
- How deep each job drafts (and whether it drafts at all) is :mod:`flockctl.engine.spec_policy`'s
  to decide.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flockctl.engine.job import SamplingParams
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
