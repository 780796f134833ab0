"""Decode attention on a CPU: one query token a row, each row read to its own history's length.

``scaled_dot_product_attention``'s CPU kernel is built for blocks of queries. With one query a
row it makes a few small matrix products per (row, head), and at batch 32 it ran at a quarter
to a third of one core's memory bandwidth on the demo model; every row also reads as far as the
batch's longest history (the rest masked). :func:`decode_attention` reads each row's keys and
values once, to that row's own length, in one compiled loop (numba) that lets the GIL go.

Its sums run in another order than SDPA's, so the last bits of the logits differ from
transformers' (as any other attention kernel's do; the relative difference is about 1e-7).
The runner uses it for decode steps over its dense rows when the engine serves with
``--attention fast``; ``--attention exact`` keeps transformers' arithmetic bit for bit.

The kernel is a registered torch operator, ``torch.ops.flockctl.decode_attention``, so the
served model's TorchScript forward can call it.
"""

import torch

try:  # numba is in the engine extra; without it the exact attention runs
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - an install without numba
    numba = None  # type: ignore[assignment]


def available() -> bool:
    """Whether the compiled kernel is there (numba imports)."""
    return numba is not None


#: numba's fastmath flags for the engine's compiled loops: reassociation and contraction let
#: the inner loops run in vector lanes; no "nnan"/"ninf": running maxima start at -inf
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

if numba is not None:

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=False)
    def _kernel(q, keys, values, lengths, groups, scale, out):
        # every scalar float32 (a float64 one would turn the loops into double arithmetic)
        batch, heads, dim = q.shape
        scores = np.empty(keys.shape[2], dtype=np.float32)
        acc = np.empty(dim, dtype=np.float32)
        zero = np.float32(0.0)
        for b in range(batch):
            length = lengths[b]
            for h in range(heads):
                kv = h // groups
                query, k, v = q[b, h], keys[b, kv], values[b, kv]
                top = np.float32(-np.inf)
                for t in range(length):
                    s = zero
                    for d in range(dim):
                        s += query[d] * k[t, d]
                    s *= scale
                    scores[t] = s
                    if s > top:
                        top = s
                total = zero
                for t in range(length):
                    e = np.exp(scores[t] - top)
                    scores[t] = e
                    total += e
                for d in range(dim):
                    acc[d] = zero
                for t in range(length):
                    p = scores[t]
                    for d in range(dim):
                        acc[d] += p * v[t, d]
                inv = np.float32(1.0) / total
                for d in range(dim):
                    out[b, h, d] = acc[d] * inv


def _decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    groups: int,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query`` ``[batch, heads, 1, dim]`` (float32) over dense rows ``keys`` and
    ``values`` ``[rows >= batch, kv_heads, width, dim]`` (contiguous), row ``b`` over its first
    ``lengths[b]`` slots; query head ``h`` reads key/value head ``h // groups``. Returns
    ``[batch, heads, 1, dim]``."""
    batch, heads, _, dim = query.shape
    out = torch.empty((batch, heads, dim), dtype=query.dtype)
    _kernel(
        query[:, :, 0].contiguous().numpy(),
        keys.numpy(),
        values.numpy(),
        lengths.numpy(),
        groups,
        np.float32(scale),
        out.numpy(),
    )
    return out.view(batch, heads, 1, dim)


# A plain operator definition: torch.library.custom_op's wrapper cost about 15 us more a call
# (a call through this one: about 12 us around the compiled kernel's 0.5)
_library = torch.library.Library("flockctl", "DEF")
_library.define(
    "decode_attention(Tensor query, Tensor keys, Tensor values, Tensor lengths, int groups,"
    " float scale) -> Tensor"
)
if numba is not None:
    _library.impl("decode_attention", _decode_attention, "CPU")


def usable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernel serves a model of ``dtype`` on ``device``: float32 on a CPU."""
    return available() and device.type == "cpu" and dtype == torch.float32


def warm_up() -> None:
    """Compile the kernel now (a fraction of a second) rather than in the first request."""
    if not available():
        return
    q = torch.zeros((1, 1, 1, 4))
    rows = torch.zeros((1, 1, 2, 4))
    torch.ops.flockctl.decode_attention(q, rows, rows, torch.ones(1, dtype=torch.long), 1, 0.5)
