"""A Llama forward for a few token rows in one compiled call, over the paged KV cache, on a CPU.

At the sizes a CPU serves, a step of one to a dozen tokens is not the model's arithmetic: on the
demo's sixteen-layer model a decode step of one job ran about 550 tensor operations, and their
dispatch cost about as much as their matrix products (1.93 ms a step, 0.69 ms of it in 113
products). MKL's products are also at their worst with two to four rows, where a speculative
step verifies its drafts: the same 113 products took 0.97 ms with 2 rows and 1.17 with 3.

:func:`_forward` runs the whole forward of ``rows`` tokens in one numba loop that lets the GIL
go: embedding, each layer's norms, its query/key/value, output, gate, up and down products,
rotary embeddings, attention and residuals, then the final norm and the LM head for the rows
whose logits are asked for. Its products read each weight row once for all of up to four token
rows (in blocks of four by four above that), so a small step is about one pass over the weights
(the demo model: 11.5 MB, about 0.5 ms here, with 2 and 3 rows 0.56 and 0.65). Attention reads
each row's history straight from the pool's blocks through the job's block table, to its own
length: no gather and no dense copy, and a
token tree's nodes see the committed prefix and their ancestors (``tree``).

Each token row's keys and values are written to its slot first, layer by layer, so a row sees
the rows of its own job fed before it (a prefill chunk, a draft chain, a token tree) as the
batched forward's mask lets it.

Its sums run in another order than transformers' (as :mod:`flockctl.engine.decode_attention`'s
do), so logits differ in the last bits; the runner takes it with ``--attention fast`` for
forwards of at most ``FUSED_MAX_ROWS`` token rows when torch runs on one thread (the loop runs
on one core; with more threads MKL's products share the work). Larger forwards keep the
TorchScript forward and MKL.

The weights it reads are the model's own: :class:`FusedLlama` moves each kind of layer weight
into one stacked tensor and points the model's parameters at their slices (no second copy), so
transformers' forward and the lean forward read the same memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from flockctl.engine.decode_attention import FASTMATH, available
from flockctl.engine.lean_forward import layer_weights, plain_llama

T = TypeVar("T")

if available():  # numba is in the engine extra; without it the TorchScript forward runs
    import numba
    from llvmlite import ir as llvm_ir
    from llvmlite.binding import llvm_version_info
    from numba.core import cgutils
    from numba.extending import intrinsic

    from flockctl.engine.jit_cache import share_stamp

    #: whether the compiled loops are cached on disk (see flockctl.engine.jit_cache): they are
    #: stamped with every engine file they are built from, and compile at each start only where
    #: no directory can be written
    CACHE = share_stamp()

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _products(w, x, out):  # pragma: no cover - compiled
        # out[r, n] = dot(w[n], x[r]), in blocks of four weight rows by two token rows: eight
        # sums in flight, each weight row read once for all token rows. One weight row by one
        # token row at a time made a chain of sums ending in a horizontal sum that kept the
        # core waiting: the demo's products of one token row took 0.123 -> 0.101 ms, of two
        # 0.181 -> 0.116, of three 0.261 -> 0.151 (a speculative step's verification); and
        # blocks of four by four rows were no faster from four rows up (32: 1.116 -> 1.120)
        rows, width = x.shape
        n = 0
        while n + 4 <= w.shape[0]:
            w0, w1, w2, w3 = w[n], w[n + 1], w[n + 2], w[n + 3]
            r = 0
            while r + 2 <= rows:
                x0, x1 = x[r], x[r + 1]
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                for k in range(width):
                    p0, p1, p2, p3 = w0[k], w1[k], w2[k], w3[k]
                    u = x0[k]
                    a0 += p0 * u
                    a1 += p1 * u
                    a2 += p2 * u
                    a3 += p3 * u
                    u = x1[k]
                    b0 += p0 * u
                    b1 += p1 * u
                    b2 += p2 * u
                    b3 += p3 * u
                out[r, n], out[r, n + 1], out[r, n + 2], out[r, n + 3] = a0, a1, a2, a3
                out[r + 1, n], out[r + 1, n + 1], out[r + 1, n + 2], out[r + 1, n + 3] = (
                    b0,
                    b1,
                    b2,
                    b3,
                )
                r += 2
            while r < rows:  # the last token row of an odd count
                xr = x[r]
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for k in range(width):
                    u = xr[k]
                    a0 += w0[k] * u
                    a1 += w1[k] * u
                    a2 += w2[k] * u
                    a3 += w3[k] * u
                out[r, n], out[r, n + 1], out[r, n + 2], out[r, n + 3] = a0, a1, a2, a3
                r += 1
            n += 4
        while n < w.shape[0]:  # the last weight rows of a count not divisible by four
            wn = w[n]
            for r in range(rows):
                xr = x[r]
                s = np.float32(0.0)
                for k in range(width):
                    s += wn[k] * xr[k]
                out[r, n] = s
            n += 1

    # exp(x) as 2^n * e^r (Cephes' expf polynomial, within 3 ulp), in two loops that run
    # in vector lanes: libm's scalar expf was a seventh of a 32-row step (SiLU and softmax)
    _LOG2E = np.float32(1.4426950408889634)
    _LN2_HI = np.float32(0.693359375)
    _LN2_LO = np.float32(-2.12194440e-4)

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _exp(buf, count, bits):  # pragma: no cover - compiled
        # buf[:count] = exp(buf[:count]); bits: int32 scratch of at least count
        twos = bits.view(np.float32)
        for i in range(count):
            x = min(max(buf[i], np.float32(-87.0)), np.float32(88.0))
            n = np.floor(x * _LOG2E + np.float32(0.5))
            r = x - n * _LN2_HI - n * _LN2_LO
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            buf[i] = p * r * r + r + np.float32(1.0)
            bits[i] = (np.int32(n) + np.int32(127)) << np.int32(23)
        for i in range(count):
            buf[i] *= twos[i]

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _rms(x, weight, eps, out):  # pragma: no cover - compiled
        rows, width = x.shape
        for r in range(rows):
            total = np.float32(0.0)
            for k in range(width):
                total += x[r, k] * x[r, k]
            scale = np.float32(1.0) / np.sqrt(total / np.float32(width) + eps)
            for k in range(width):
                out[r, k] = weight[k] * (x[r, k] * scale)

    # llvm.prefetch is overloaded on its pointer type: LLVM spells it p0 with opaque pointers
    # (every LLVM from 17), p0i8 with the typed pointers of the older ones numba has shipped
    _PREFETCH = "llvm.prefetch.p0" if llvm_version_info[0] >= 17 else "llvm.prefetch.p0i8"

    def item_pointer(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        """In an intrinsic's code: the address of ``array[index]``, its first two arguments (a
        1-D array and an index)."""
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        return cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)

    @intrinsic
    def _prefetch(typingctx, array, index):  # pragma: no cover - compiled
        """Ask for the cache line of ``array[index]`` (1-D) ahead of its read: a hint that
        never faults, whatever the index."""
        sig = numba.types.void(array, index)

        def codegen(context, builder, signature, args):
            ptr = item_pointer(context, builder, signature, args)
            byte = llvm_ir.IntType(8).as_pointer()
            word = llvm_ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module,
                llvm_ir.FunctionType(llvm_ir.VoidType(), [byte, word, word, word]),
                _PREFETCH,
            )
            # a read (0), kept in every cache level (3), of data (1)
            hint = [word(0), word(3), word(1)]
            builder.call(fn, [builder.bitcast(ptr, byte), *hint])
            return context.get_dummy_value()

        return sig, codegen

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _fetch(flat, start, count):  # pragma: no cover - compiled
        # prefetch flat[start : start + count], a 64-byte line (16 float32) at a time
        for i in range(start, start + count, 16):
            _prefetch(flat, i)

    #: Slots ahead of the one being read whose keys (or values) are prefetched: a batch's
    #: histories outgrow the caches (a megabyte a job on the demo model), and at 32 jobs the
    #: loop waited on memory at each slot (a 32-row decode step 11.3 ms, 10.3 with this)
    AHEAD = 8

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _attend(  # pragma: no cover - compiled
        q, keys, values, where, seen, groups, scaling, scores, totals, bits, out
    ):
        # out[h * dim : (h + 1) * dim] = softmax(q_h . k_t * scaling) @ v_t over the slots
        # where[:seen] of one layer's keys and values [slots, kv_heads, dim]: every head in one
        # pass over each slot's keys, then one over its values
        heads = scores.shape[0]
        dim = keys.shape[2]
        width = keys.shape[1] * dim
        kflat = keys.reshape(-1)
        vflat = values.reshape(-1)
        for t in range(min(AHEAD, seen)):
            _fetch(kflat, where[t] * width, width)
        t = 0
        # four slots at a time, in both passes: four independent sums in flight rather than one
        # chain (each row's sums come out bit for bit as one slot at a time made them); 64 rows
        # of one job after 448 tokens 24.0 -> 20.2 ms, 8 rows after 200 2.02 -> 1.79 ms. A
        # decode step's rows, each reading its own history from memory, gain nothing
        while t + 4 <= seen:
            for a in range(t + AHEAD, t + AHEAD + 4):
                if a < seen:
                    _fetch(kflat, where[a] * width, width)
                elif a - seen < seen:  # the first values, read next
                    _fetch(vflat, where[a - seen] * width, width)
            s0, s1, s2, s3 = where[t], where[t + 1], where[t + 2], where[t + 3]
            for hd in range(heads):
                kv = hd // groups
                k0, k1, k2, k3 = keys[s0, kv], keys[s1, kv], keys[s2, kv], keys[s3, kv]
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for d in range(dim):
                    u = q[hd * dim + d]
                    a0 += u * k0[d]
                    a1 += u * k1[d]
                    a2 += u * k2[d]
                    a3 += u * k3[d]
                scores[hd, t] = a0 * scaling
                scores[hd, t + 1] = a1 * scaling
                scores[hd, t + 2] = a2 * scaling
                scores[hd, t + 3] = a3 * scaling
            t += 4
        while t < seen:
            ahead = t + AHEAD
            if ahead < seen:
                _fetch(kflat, where[ahead] * width, width)
            elif ahead - seen < seen:  # the first values, read next
                _fetch(vflat, where[ahead - seen] * width, width)
            slot = where[t]
            for hd in range(heads):
                k = keys[slot, hd // groups]
                s = np.float32(0.0)
                for d in range(dim):
                    s += q[hd * dim + d] * k[d]
                scores[hd, t] = s * scaling
            t += 1
        for hd in range(heads):
            row = scores[hd]
            top = np.float32(-np.inf)
            for t in range(seen):
                if row[t] > top:
                    top = row[t]
            for t in range(seen):
                row[t] -= top
            _exp(row, seen, bits)
            total = np.float32(0.0)
            for t in range(seen):
                total += row[t]
            totals[hd] = total
        for i in range(heads * dim):
            out[i] = np.float32(0.0)
        t = 0
        while t + 4 <= seen:
            for a in range(t + AHEAD, min(t + AHEAD + 4, seen)):
                _fetch(vflat, where[a] * width, width)
            s0, s1, s2, s3 = where[t], where[t + 1], where[t + 2], where[t + 3]
            for hd in range(heads):
                kv = hd // groups
                v0, v1, v2, v3 = values[s0, kv], values[s1, kv], values[s2, kv], values[s3, kv]
                e0, e1 = scores[hd, t], scores[hd, t + 1]
                e2, e3 = scores[hd, t + 2], scores[hd, t + 3]
                for d in range(dim):
                    out[hd * dim + d] += (e0 * v0[d] + e1 * v1[d]) + (e2 * v2[d] + e3 * v3[d])
            t += 4
        while t < seen:
            if t + AHEAD < seen:
                _fetch(vflat, where[t + AHEAD] * width, width)
            slot = where[t]
            for hd in range(heads):
                v = values[slot, hd // groups]
                e = scores[hd, t]
                for d in range(dim):
                    out[hd * dim + d] += e * v[d]
            t += 1
        for hd in range(heads):
            inv = np.float32(1.0) / totals[hd]
            for d in range(dim):
                out[hd * dim + d] *= inv

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _forward(  # pragma: no cover - compiled
        ids, positions, slots, jobs, limits, tree_base, tree, tables, block_size, keep,
        embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
        inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, logits,
    ):  # fmt: skip
        rows = ids.shape[0]
        hidden = embed.shape[1]
        layers = wqkv.shape[0]
        dim = keys.shape[3]
        half = dim // 2
        groups = heads // kv_heads
        q_width = heads * dim
        inter = wd.shape[2]
        x = np.empty((rows, hidden), dtype=np.float32)
        h = np.empty((rows, hidden), dtype=np.float32)
        qkv = np.empty((rows, wqkv.shape[1]), dtype=np.float32)
        attn = np.empty((rows, q_width), dtype=np.float32)
        gu = np.empty((rows, 2 * inter), dtype=np.float32)
        act = np.empty((rows, inter), dtype=np.float32)
        out = np.empty((rows, hidden), dtype=np.float32)
        cos = np.empty((rows, half), dtype=np.float32)
        sin = np.empty((rows, half), dtype=np.float32)
        longest = 0
        for r in range(rows):
            longest = max(longest, limits[r] + 1 + tree.shape[1])
        scores = np.empty(max(longest, inter), dtype=np.float32)
        head_scores = np.empty((heads, longest), dtype=np.float32)
        totals = np.empty(heads, dtype=np.float32)
        bits = np.empty(scores.shape[0], dtype=np.int32)
        # the slots each row sees, the same in every layer: its job's positions 0 .. limit, then
        # its tree's nodes
        where = np.empty((rows, longest), dtype=np.int64)
        seen = np.empty(rows, dtype=np.int64)
        for r in range(rows):
            table = tables[jobs[r]]
            n = 0
            for position in range(limits[r] + 1):
                block, offset = divmod(position, block_size)
                where[r, n] = table[block] * block_size + offset
                n += 1
            for t in range(tree.shape[1]):
                if tree[r, t]:
                    block, offset = divmod(tree_base[r] + t, block_size)
                    where[r, n] = table[block] * block_size + offset
                    n += 1
            seen[r] = n
        for r in range(rows):
            x[r] = embed[ids[r]]
            p = np.float32(positions[r])
            for i in range(half):
                angle = p * inv_freq[i]
                cos[r, i] = np.cos(angle) * rope_scaling
                sin[r, i] = np.sin(angle) * rope_scaling
        for layer in range(layers):
            _rms(x, norm1[layer], eps1[layer], h)
            _products(wqkv[layer], h, qkv)
            # rotary embeddings on the queries and keys, in place; then each row's key and value
            # to its slot, before any row attends (a row sees the rows of its job fed before it)
            for r in range(rows):
                for head_start in range(0, q_width + kv_heads * dim, dim):
                    for i in range(half):
                        a = qkv[r, head_start + i]
                        b = qkv[r, head_start + half + i]
                        qkv[r, head_start + i] = a * cos[r, i] - b * sin[r, i]
                        qkv[r, head_start + half + i] = b * cos[r, i] + a * sin[r, i]
                slot = slots[r]
                for kv in range(kv_heads):
                    base = q_width + kv * dim
                    for d in range(dim):
                        keys[layer, slot, kv, d] = qkv[r, base + d]
                        values[layer, slot, kv, d] = qkv[r, base + kv_heads * dim + d]
            for r in range(rows):
                _attend(
                    qkv[r], keys[layer], values[layer], where[r], seen[r], groups, scaling,
                    head_scores, totals, bits, attn[r],
                )  # fmt: skip
            _products(wo[layer], attn, out)
            for r in range(rows):
                for k in range(hidden):
                    x[r, k] += out[r, k]
            _rms(x, norm2[layer], eps2[layer], h)
            _products(wgu[layer], h, gu)
            for r in range(rows):  # SiLU(gate) * up
                for k in range(inter):
                    scores[k] = -gu[r, k]
                _exp(scores, inter, bits)
                for k in range(inter):
                    act[r, k] = gu[r, k] / (np.float32(1.0) + scores[k]) * gu[r, inter + k]
            _products(wd[layer], act, out)
            for r in range(rows):
                for k in range(hidden):
                    x[r, k] += out[r, k]
        kept = 0
        for r in range(rows):
            if keep[r] >= 0:
                kept += 1
        last = np.empty((kept, hidden), dtype=np.float32)
        to = np.empty(kept, dtype=np.int64)
        i = 0
        for r in range(rows):
            if keep[r] >= 0:
                last[i] = x[r]
                to[i] = keep[r]
                i += 1
        normed = np.empty((kept, hidden), dtype=np.float32)
        _rms(last, final_norm, final_eps, normed)
        scores_out = np.empty((kept, head.shape[0]), dtype=np.float32)
        _products(head, normed, scores_out)
        for i in range(kept):
            logits[to[i]] = scores_out[i]

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _argmax(row, vocab):  # pragma: no cover - compiled
        # the first index of the largest of row[:vocab], as numpy's argmax
        best = 0
        top = row[0]
        for v in range(1, vocab):
            if row[v] > top:
                top = row[v]
                best = v
        return best

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _decode(  # pragma: no cover - compiled
        first, roots, steps, stops, interrupt, tables, block_size, vocab,
        embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
        inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, drafted, made,
    ):  # fmt: skip
        # greedy decoding, a forward a step: job j feeds first[j] at position roots[j] + 1, then
        # each token it picks (its argmax over the first ``vocab`` logits) at the next position,
        # up to steps[j] forwards; drafted[j, s] is its pick after forward s, made[j] how many it
        # made. A job stops after a pick in stops[j] (-1 pads), every job after the forward
        # during which interrupt[0] became nonzero. A step's rows are those _verify builds for
        # the same tokens with no drafts (fused_spec.py): the same picks bit for bit.
        count = first.shape[0]
        longest = 0
        for j in range(count):
            longest = max(longest, steps[j])
        current = first.copy()
        done = np.zeros(count, dtype=np.bool_)
        for step in range(longest):
            rows = 0
            for j in range(count):
                if not done[j] and steps[j] > step:
                    rows += 1
            if rows == 0:
                break
            ids = np.empty(rows, dtype=np.int64)
            positions = np.empty(rows, dtype=np.int64)
            slots = np.empty(rows, dtype=np.int64)
            owners = np.empty(rows, dtype=np.int64)
            keep = np.arange(rows)
            r = 0
            for j in range(count):
                if not done[j] and steps[j] > step:
                    position = roots[j] + 1 + step
                    block, offset = divmod(position, block_size)
                    ids[r] = current[j]
                    positions[r] = position
                    slots[r] = tables[j, block] * block_size + offset
                    owners[r] = j
                    r += 1
            logits = np.empty((rows, head.shape[0]), dtype=np.float32)
            _forward(
                ids, positions, slots, owners, positions, np.zeros(rows, dtype=np.int64),
                np.zeros((rows, 0), dtype=np.bool_), tables, block_size, keep,
                embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
                inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, logits,
            )  # fmt: skip
            r = 0
            for j in range(count):
                if not done[j] and steps[j] > step:
                    best = _argmax(logits[r], vocab)
                    drafted[j, step] = best
                    made[j] = step + 1
                    current[j] = best
                    for t in range(stops.shape[1]):
                        if stops[j, t] == best:
                            done[j] = True
                    r += 1
            if interrupt[0]:
                break

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _chain(  # pragma: no cover - compiled
        first, roots, steps, tables, block_size, vocab,
        embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
        inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, drafted,
    ):  # fmt: skip
        # greedy drafting: _decode of steps[j] forwards for each job j, no stops
        count = first.shape[0]
        _decode(
            first, roots, steps, np.empty((count, 0), dtype=np.int64), np.zeros(1, np.int8),
            tables, block_size, vocab,
            embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
            inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, drafted,
            np.zeros(count, dtype=np.int64),
        )  # fmt: skip


def usable(model: Any, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :class:`FusedLlama` can run ``model``: a plain float32 Llama on a CPU, every layer
    the same shape, numba there."""
    if not available() or device.type != "cpu" or dtype != torch.float32:
        return False
    if not plain_llama(model):
        return False
    inner = model.model
    layers = inner.layers[: model.config.num_hidden_layers]
    if not len(layers):
        return False
    first = layers[0]
    shapes = [_shapes(layer) for layer in layers]
    return (
        all(s == shapes[0] for s in shapes)
        and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
        and first.self_attn.q_proj.weight.shape[0] % first.self_attn.k_proj.weight.shape[0] == 0
    )


def _shapes(layer: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(w.shape) for w in layer_weights(layer))


def _stack(params: list[list[torch.Tensor]]) -> torch.Tensor:
    """One tensor ``[layers, sum of rows, ...]`` holding, per layer, ``params[layer]`` one after
    the other along their first dimension; each parameter then points at its slice."""
    stacked = torch.stack([torch.cat([p.detach() for p in group]) for group in params])
    for layer, group in enumerate(params):
        start = 0
        for p in group:
            p.data = stacked[layer, start : start + p.shape[0]]
            start += p.shape[0]
    return stacked


class FusedLlama:
    """:func:`_forward` for ``model`` (see the module docstring); build it where :func:`usable`
    says it runs. Stacks the model's layer weights in place (the parameters become views)."""

    def __init__(self, model: Any, threads: int = 1):
        #: threads a forward of several jobs is split over (:meth:`__call__`); the model
        #: loop's own and, with 2, one more that waits for work in between
        self.threads = max(1, min(2, threads))
        self._helper: ThreadPoolExecutor | None = None
        # the KV pool's stores of the last call, and their numpy views
        self._pool: tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray] | None = None
        self.split_forwards = 0
        #: called just before each compiled forward of this model lets the GIL go (the model
        #: loop hands the event loop its last iteration's pieces then: see engine/loop.py)
        self.before_call: Callable[[], None] | None = None
        inner = model.model
        config = model.config
        layers = inner.layers[: config.num_hidden_layers]
        first = layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.heads = int(first.q_proj.weight.shape[0]) // self.head_dim
        self.kv_heads = int(first.k_proj.weight.shape[0]) // self.head_dim
        with torch.no_grad():
            norms1 = _stack([[layer.input_layernorm.weight] for layer in layers])
            qkv = _stack(
                [
                    [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                     layer.self_attn.v_proj.weight]
                    for layer in layers
                ]
            )  # fmt: skip
            wo = _stack([[layer.self_attn.o_proj.weight] for layer in layers])
            norms2 = _stack([[layer.post_attention_layernorm.weight] for layer in layers])
            gu = _stack(
                [[layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight] for layer in layers]
            )
            wd = _stack([[layer.mlp.down_proj.weight] for layer in layers])
        self.weights = (
            inner.embed_tokens.weight.detach().numpy(),
            norms1.numpy(),
            qkv.numpy(),
            wo.numpy(),
            norms2.numpy(),
            gu.numpy(),
            wd.numpy(),
            np.array([layer.input_layernorm.variance_epsilon for layer in layers], np.float32),
            np.array(
                [layer.post_attention_layernorm.variance_epsilon for layer in layers], np.float32
            ),
            inner.norm.weight.detach().numpy(),
            np.float32(inner.norm.variance_epsilon),
            model.lm_head.weight.detach().numpy(),
            inner.rotary_emb.inv_freq.detach().float().numpy(),
            self.heads,
            self.kv_heads,
            np.float32(first.scaling),
            np.float32(inner.rotary_emb.attention_scaling),
        )
        self.vocab = int(model.lm_head.weight.shape[0])

    def warm_up(self) -> None:
        """Compile the forward now (or load it from numba's cache), not in the first request:
        one token over a pool of one block."""
        layers = self.weights[2].shape[0]
        store = torch.zeros((layers, 1, self.kv_heads, self.head_dim))
        one = np.zeros(1, dtype=np.int64)
        rows = dict.fromkeys(("ids", "positions", "slots", "jobs", "limits", "tree_base"), one)
        rows["tree"] = np.zeros((1, 0), dtype=np.bool_)
        rows["keep"] = one
        self(rows, np.zeros((1, 1), dtype=np.int64), 1, store, store.clone(), 1)

    def warm_up_chain(self) -> None:
        """Compile :meth:`chain` now (or load it from numba's cache): a draft model's."""
        layers = self.weights[2].shape[0]
        store = torch.zeros((layers, 2, self.kv_heads, self.head_dim))
        self.chain([0], [0], [1], np.zeros((1, 1), dtype=np.int64), 2, 1, store, store.clone())

    def chain(
        self,
        first: list[int],
        roots: list[int],
        steps: list[int],
        tables: np.ndarray,
        block_size: int,
        vocab: int,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> list[list[int]]:
        """Greedy drafting in one call (see :func:`_chain`): job ``j`` (row ``j`` of the block
        ``tables``) feeds ``first[j]`` after its token at position ``roots[j]``, then each token
        it picks, ``steps[j]`` forwards; returns each job's picks, an argmax over the first
        ``vocab`` logits each."""
        count = len(first)
        drafted = np.zeros((count, max(steps, default=0)), dtype=np.int64)
        _chain(
            np.array(first, dtype=np.int64), np.array(roots, dtype=np.int64),
            np.array(steps, dtype=np.int64), tables, block_size, vocab,
            *self.weights, keys.numpy(), values.numpy(), drafted,
        )  # fmt: skip
        return [drafted[j, : steps[j]].tolist() for j in range(count)]

    def decode(
        self,
        first: np.ndarray,
        roots: np.ndarray,
        steps: np.ndarray,
        stops: np.ndarray,
        interrupt: np.ndarray,
        tables: np.ndarray,
        block_size: int,
        stores: tuple[np.ndarray, np.ndarray],
        picks: np.ndarray,
        made: np.ndarray,
    ) -> None:
        """Greedy decode steps in one compiled call (:func:`_decode`, its arguments; ``stores``
        the pool's arrays from :meth:`arrays`), the jobs split over the two threads as a decode
        step's rows are (:func:`split_point`), each half running its own jobs' steps."""

        def run(lo: int, hi: int) -> None:
            _decode(
                first[lo:hi], roots[lo:hi], steps[lo:hi], stops[lo:hi], interrupt,
                tables[lo:hi], block_size, self.vocab, *self.weights, *stores, picks[lo:hi],
                made[lo:hi],
            )  # fmt: skip

        count = len(first)
        self.halves(run, split_point(np.arange(count)) if self.threads > 1 else 0, count)

    def __call__(
        self,
        rows: dict[str, np.ndarray],
        tables: np.ndarray,
        block_size: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        outputs: int,
    ) -> torch.Tensor:
        """One forward of the token rows ``rows`` (``ids``, ``positions``, ``slots``, ``jobs``,
        ``limits``, ``tree_base``, ``tree``, ``keep``: see :func:`_forward`) into the pool's
        stacked ``keys`` and ``values`` ``[layers, slots, kv_heads, dim]``; logits
        ``[outputs, vocab]`` (row ``keep[r]`` for each token row with ``keep[r] >= 0``)."""
        # numpy's allocation and the pool's arrays kept from the last call: after a forward has
        # swept the caches each torch call cost several microseconds, a few times a step
        logits = np.zeros((outputs, self.vocab), dtype=np.float32)
        stores = (*self.arrays(keys, values), logits)
        # each job's rows in one half (they see each other's keys and values), the halves on
        # two threads at once, each writing its own slots and logits rows
        cut = split_point(rows["jobs"]) if self.threads > 1 else 0
        self.halves(
            lambda lo, hi: self._rows(rows, lo, hi, tables, block_size, stores),
            cut,
            len(rows["ids"]),
        )
        return torch.from_numpy(logits)

    def arrays(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The pool's stacked ``keys`` and ``values`` as numpy arrays for the compiled calls,
        kept from the last call while the pool's tensors stay the same."""
        if self._pool is None or self._pool[0] is not keys or self._pool[1] is not values:
            self._pool = (keys, values, keys.numpy(), values.numpy())
        return self._pool[2], self._pool[3]

    def hand_over(self) -> None:
        """:attr:`before_call`, if set: a compiled call that lets the GIL go comes next."""
        if self.before_call is not None:
            self.before_call()

    def halves(self, run: Callable[[int, int], T], cut: int, end: int) -> T:
        """``run(0, end)`` on this thread after :meth:`hand_over`; or, given a ``cut``,
        ``run(0, cut)`` here while ``run(cut, end)`` runs on the second thread (:meth:`both`).
        Returns what ``run`` on this thread returned."""
        if not cut:
            self.hand_over()
            return run(0, end)
        return self.both(lambda: run(0, cut), lambda: run(cut, end))

    def both(self, here: Callable[[], T], there: Callable[[], object], split: bool = True) -> T:
        """``here`` on this thread while ``there`` runs on the second one; ``here``'s result once
        both have ended (their work must not overlap: whole jobs each). ``split``: it is a
        forward split in two (:attr:`split_forwards` counts it).

        The second thread calls :meth:`hand_over` once it holds the GIL, just before ``there``:
        called first, the event loop it woke took the GIL the second thread needed to start,
        and at 8 streams that half began 0.3 ms into a 1.2 ms forward."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="flockctl-fused")

        def second() -> object:
            try:
                self.hand_over()
            except BaseException:
                there()  # its half runs all the same: ``here`` may wait on it (a pipelined run)
                raise
            return there()

        other = self._helper.submit(second)
        try:
            out = here()
        finally:
            # the other half ends about when this one does: poll for a moment, letting the GIL
            # go each time, before sleeping on the future (waking from it took 0.12 ms at 8
            # jobs, a tenth of the step); not longer, since the event loop may need this core
            until = time.perf_counter() + POLL_SECONDS
            while not other.done() and time.perf_counter() < until:
                time.sleep(0)
            other.result()
        self.split_forwards += split
        return out

    def _rows(
        self,
        rows: dict[str, np.ndarray],
        start: int,
        end: int,
        tables: np.ndarray,
        block_size: int,
        stores: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """:func:`_forward` of token rows ``start .. end`` (whole jobs)."""
        part = {name: rows[name][start:end] for name in ROW_FIELDS}
        _forward(
            part["ids"], part["positions"], part["slots"], part["jobs"], part["limits"],
            part["tree_base"], part["tree"], tables, block_size, part["keep"],
            *self.weights, *stores,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the second thread, if one started."""
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None


#: The arrays of a forward's token rows, in :func:`_forward`'s order
ROW_FIELDS = ("ids", "positions", "slots", "jobs", "limits", "tree_base", "tree", "keep")

#: Token rows a forward needs before :class:`FusedLlama` splits it over two threads: at 4 jobs
#: of a decode step the split already gained a tenth (0.96 -> 0.88 ms on the demo model), and at
#: 32 jobs it nearly halved the forward (5.6 -> 3.1 ms), the two cores reading the weights each
#: and the histories half each
SPLIT_MIN_ROWS = 4

#: How long the model loop's thread polls for the other half before it sleeps on it
POLL_SECONDS = 0.0005


def table_array(tables: Sequence[Sequence[int]]) -> np.ndarray:
    """Jobs' block tables as one array for the compiled calls, a row a job, zero-padded (block
    0, the scratch block, for a job without one)."""
    out = np.zeros((len(tables), max(1, max(len(t) for t in tables))), dtype=np.int64)
    for j, table in enumerate(tables):
        out[j, : len(table)] = table
    return out


def split_point(jobs: np.ndarray) -> int:
    """Where to split token rows (grouped by job, ``jobs`` their job indices) into two halves of
    whole jobs for two threads: the job boundary that leaves the larger half smallest, or one
    within two rows of that a multiple of four rows from the start (the products' blocks of four
    rows then fall as in one forward, so each row's logits are the same bit for bit: every
    decode step of an even batch); 0: do not split (too few rows, or a single job)."""
    n = len(jobs)
    if n < SPLIT_MIN_ROWS or jobs[0] == jobs[-1]:
        return 0
    if jobs[-1] == n - 1:  # a row a job (a decode step): the same rule without numpy's calls
        low = n // 2 // 4 * 4
        aligned = low if n / 2 - low <= low + 4 - n / 2 else low + 4
        if 0 < aligned < n and max(aligned, n - aligned) <= (n + 1) // 2 + 2:
            return aligned
        return n // 2
    bounds = np.flatnonzero(jobs[1:] != jobs[:-1]) + 1  # the first row of each job but the first
    larger = np.maximum(bounds, n - bounds)
    near = bounds[larger <= larger.min() + 2]
    aligned = near[near % 4 == 0]
    if len(aligned):
        return int(aligned[np.argmin(np.maximum(aligned, n - aligned))])
    return int(bounds[np.argmin(larger)])
