"""A greedy speculative step in two compiled calls: the draft's catch-up and chains, then the
model's verification of every chain.

A speculative step of greedy chains (:meth:`Speculator._chain_step`) ran three fused forwards with
Python between them: the draft catching up on the tokens it had not seen and picking its first
token, the rest of each chain, then the model's verification. At batch 1 on the demo pair that
Python (building each forward's rows, a logits tensor per call, the argmax, the hand-overs) was
about a quarter of the step. Here the draft's catch-up, first pick and chain are one call
(:func:`_draft`), and the verification builds its own rows from the chains and returns the
model's argmax at every row (:func:`_verify`): the same forwards over the same rows as the three
calls fed, so the same tokens bit for bit.

With two threads (:attr:`FusedLlama.threads`) the jobs split into two groups at the point the
verification's rows would split (:func:`split_point`), each group's draft and verification on
its own thread: the draft's forwards split too. A lone job has the second thread to itself: the
draft goes on past its chain there while the model verifies it, drafting what may be the next
step's chain (``ahead``).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flockctl.engine.decode_attention import FASTMATH, available
from flockctl.engine.fused_forward import FusedLlama, split_point, table_array

if TYPE_CHECKING:
    from flockctl.engine.runner import Runner

if available():
    import numba
    from llvmlite import ir as llvm_ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    from flockctl.engine.fused_forward import (
        CACHE,
        _argmax,
        _chain,
        _decode,
        _forward,
        item_pointer,
    )

    # words a pipelined run's two threads share (:func:`_draft_loop`, :func:`_target_loop`);
    # _GONE: the draft's thread has left its loop (or never entered it); _CARRY_*: the state
    # the draft's last chain was drafted from
    _PUBLISHED, _VERDICTS, _DONE, _ACCEPTED, _BONUS, _GONE = 0, 1, 2, 3, 4, 5
    _CARRY_ROOT, _CARRY_LAST = 6, 7

    @intrinsic
    def _load_acquire(typingctx, array, index):  # pragma: no cover - compiled
        """``array[index]`` (1-D int64) read with acquire order: the reads after it see what the
        other thread wrote before its release of the same word."""
        sig = numba.types.int64(array, index)

        def codegen(context, builder, signature, args):
            ptr = item_pointer(context, builder, signature, args)
            return builder.load_atomic(ptr, "acquire", 8)

        return sig, codegen

    @intrinsic
    def _store_release(typingctx, array, index, value):  # pragma: no cover - compiled
        """``array[index] = value`` (1-D int64) with release order (see :func:`_load_acquire`)."""
        sig = numba.types.void(array, index, numba.types.int64)

        def codegen(context, builder, signature, args):
            ptr = item_pointer(context, builder, signature, args)
            builder.store_atomic(args[2], ptr, "release", 8)
            return context.get_dummy_value()

        return sig, codegen

    # the spin-wait hint of this machine's instruction set: x86's pause, Arm's yield (none
    # elsewhere). Each loop spins while the other thread works, and where the two threads are
    # hyperthreads of one core a bare spin takes that core's issue slots from the thread it waits
    # for; the hint also spares the pipeline the misordered loads a spin's exit flushes.
    _ARCH = platform.machine().lower()
    _SPIN_HINT = (
        ("llvm.x86.sse2.pause", ())
        if _ARCH in ("x86_64", "amd64", "i686", "x86")
        else ("llvm.aarch64.hint", (1,))
        if _ARCH in ("aarch64", "arm64")
        else None
    )

    @intrinsic
    def _spin_pause(typingctx):  # pragma: no cover - compiled
        """One spin-wait hint (:data:`_SPIN_HINT`), or nothing where the machine has none."""
        sig = numba.types.void()

        def codegen(context, builder, signature, args):
            if _SPIN_HINT is not None:
                name, immediates = _SPIN_HINT
                word = llvm_ir.IntType(32)
                fn = cgutils.get_or_insert_function(
                    builder.module,
                    llvm_ir.FunctionType(llvm_ir.VoidType(), [word] * len(immediates)),
                    name,
                )
                builder.call(fn, [word(i) for i in immediates])
            return context.get_dummy_value()

        return sig, codegen

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _draft(  # pragma: no cover - compiled
        ids, positions, slots, jobs, keep, roots, depths, tables, block_size, vocab,
        embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
        inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, drafted,
    ):  # fmt: skip
        # the catch-up rows (each job's tokens the draft has not seen, causal, the last of each
        # kept as logits row j), job j's first pick the argmax of that row, then its chain of
        # depths[j] - 1 more picks (_chain): drafted[j, :depths[j]]. A job of depth 0 feeds no
        # row and draws nothing.
        count = roots.shape[0]
        rows = ids.shape[0]
        logits = np.empty((count, head.shape[0]), dtype=np.float32)
        _forward(
            ids, positions, slots, jobs, positions, np.zeros(rows, dtype=np.int64),
            np.zeros((rows, 0), dtype=np.bool_), tables, block_size, keep,
            embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
            inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, logits,
        )  # fmt: skip
        first = np.zeros(count, dtype=np.int64)
        more = np.zeros(count, dtype=np.int64)
        longest = 0
        for j in range(count):
            if depths[j] > 0:
                first[j] = _argmax(logits[j], vocab)
                drafted[j, 0] = first[j]
                more[j] = depths[j] - 1
                longest = max(longest, more[j])
        if longest:
            rest = np.zeros((count, longest), dtype=np.int64)
            _chain(
                first, roots, more, tables, block_size, vocab,
                embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
                inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, rest,
            )  # fmt: skip
            for j in range(count):
                for s in range(more[j]):
                    drafted[j, s + 1] = rest[j, s]

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _verify(  # pragma: no cover - compiled
        last, roots, depths, drafted, tables, block_size,
        embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
        inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, picks,
    ):  # fmt: skip
        # job j feeds [last[j], *drafted[j, :depths[j]]] at positions roots[j] ...; picks[j, k]
        # is the model's argmax after its k-th row (over the whole vocabulary)
        count = last.shape[0]
        rows = 0
        for j in range(count):
            rows += depths[j] + 1
        ids = np.empty(rows, dtype=np.int64)
        positions = np.empty(rows, dtype=np.int64)
        slots = np.empty(rows, dtype=np.int64)
        owners = np.empty(rows, dtype=np.int64)
        r = 0
        for j in range(count):
            for k in range(depths[j] + 1):
                position = roots[j] + k
                block, offset = divmod(position, block_size)
                ids[r] = last[j] if k == 0 else drafted[j, k - 1]
                positions[r] = position
                slots[r] = tables[j, block] * block_size + offset
                owners[r] = j
                r += 1
        logits = np.empty((rows, head.shape[0]), dtype=np.float32)
        _forward(
            ids, positions, slots, owners, positions, np.zeros(rows, dtype=np.int64),
            np.zeros((rows, 0), dtype=np.bool_), tables, block_size, np.arange(rows),
            embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
            inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, logits,
        )  # fmt: skip
        r = 0
        for j in range(count):
            for k in range(depths[j] + 1):
                picks[j, k] = _argmax(logits[r], head.shape[0])
                r += 1

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _draft_loop(  # pragma: no cover - compiled
        up_ids, up_positions, up_slots, root, last, depth, given, tables, block_size, vocab,
        embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
        inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, chain, shared,
    ):  # fmt: skip
        # the draft's thread of a pipelined run (one job): catch up on the tokens it has not
        # seen (up_*), then, step after step, publish the chain drafted from the state the model
        # confirmed (root: the position of its last token; the first step's chain is given[0]
        # where given has a row), then draft its guess at the model's token after the chain and
        # the next step's chain from it, while the model verifies: the chain is accepted whole
        # and the model's token is the guess (that chain is published at once), or the verdict
        # says where to draft from instead, while the model waits. Once the model's loop is
        # done, the last chain drafted from a guess is left in chain[depth:] and the guess's
        # state in shared[_CARRY_ROOT], shared[_CARRY_LAST] (the next run's first chain, if the
        # guess held).
        n = up_ids.shape[0]
        if n:
            _forward(
                up_ids, up_positions, up_slots, np.zeros(n, dtype=np.int64), up_positions,
                np.zeros(n, dtype=np.int64), np.zeros((n, 0), dtype=np.bool_), tables,
                block_size, np.full(n, -1, dtype=np.int64),
                embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
                inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values,
                np.empty((0, head.shape[0]), dtype=np.float32),
            )  # fmt: skip
        mine = np.zeros((1, depth), dtype=np.int64)
        ahead = np.zeros((1, depth), dtype=np.int64)
        guessed = np.zeros((1, 1), dtype=np.int64)
        if given.shape[0]:
            for i in range(depth):
                mine[0, i] = given[0, i]
        else:
            _chain(
                np.full(1, last, dtype=np.int64), np.full(1, root - 1, dtype=np.int64),
                np.full(1, depth, dtype=np.int64), tables, block_size, vocab,
                embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
                inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, mine,
            )  # fmt: skip
        step = 0
        while True:
            for i in range(depth):
                chain[i] = mine[0, i]
            _store_release(shared, _PUBLISHED, step + 1)
            # the guess (fed the chain's last token), then the next chain from it
            _chain(
                np.full(1, mine[0, depth - 1], dtype=np.int64),
                np.full(1, root + depth - 1, dtype=np.int64), np.ones(1, dtype=np.int64),
                tables, block_size, vocab,
                embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
                inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, guessed,
            )  # fmt: skip
            guess_root = root + depth + 1
            guess = guessed[0, 0]
            _chain(
                np.full(1, guess, dtype=np.int64), np.full(1, guess_root - 1, dtype=np.int64),
                np.full(1, depth, dtype=np.int64), tables, block_size, vocab,
                embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
                inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, ahead,
            )  # fmt: skip
            while _load_acquire(shared, _VERDICTS) <= step and not _load_acquire(shared, _DONE):
                _spin_pause()
            if _load_acquire(shared, _DONE):
                for i in range(depth):
                    chain[depth + i] = ahead[0, i]
                shared[_CARRY_ROOT] = guess_root
                shared[_CARRY_LAST] = guess
                return
            accepted = shared[_ACCEPTED]
            bonus = shared[_BONUS]
            step += 1
            if accepted == depth and bonus == guess:
                root, last = guess_root, guess
                for i in range(depth):
                    mine[0, i] = ahead[0, i]
            else:
                root, last = root + accepted + 1, bonus
                _chain(
                    np.full(1, last, dtype=np.int64), np.full(1, root - 1, dtype=np.int64),
                    np.full(1, depth, dtype=np.int64), tables, block_size, vocab,
                    embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps,
                    head, inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, mine,
                )  # fmt: skip

    @numba.njit(nogil=True, fastmath=FASTMATH, boundscheck=False, cache=CACHE)
    def _target_loop(  # pragma: no cover - compiled
        root, last, depth, steps, stops, room, interrupt, tables, block_size,
        embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
        inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, chain, shared, out,
        accepts,
    ):  # fmt: skip
        # the model's thread of a pipelined run: each step waits for its chain, verifies it
        # (_verify's rows: the same picks as a single speculative step) and publishes the
        # verdict. out[:made] gets the tokens (the accepted drafts, then the model's own), at
        # most room, ending after a token in stops; accepts[s] the drafts step s accepted.
        # Returns the tokens made and the steps run; ends after the step during which
        # interrupt[0] became nonzero.
        made = 0
        lasts = np.zeros(1, dtype=np.int64)
        roots = np.zeros(1, dtype=np.int64)
        depths = np.full(1, depth, dtype=np.int64)
        drafted = np.zeros((1, depth), dtype=np.int64)
        picks = np.zeros((1, depth + 1), dtype=np.int64)
        step = 0
        finished = steps < 1 or room < 1
        while not finished:
            while _load_acquire(shared, _PUBLISHED) <= step:
                _spin_pause()
                if _load_acquire(shared, _GONE):  # it failed: no chain will come
                    _store_release(shared, _DONE, 1)
                    return made, step
            for i in range(depth):
                drafted[0, i] = chain[i]
            lasts[0] = last
            roots[0] = root
            _verify(
                lasts, roots, depths, drafted, tables, block_size,
                embed, norm1, wqkv, wo, norm2, wgu, wd, eps1, eps2, final_norm, final_eps, head,
                inv_freq, heads, kv_heads, scaling, rope_scaling, keys, values, picks,
            )  # fmt: skip
            accepted = 0
            while accepted < depth and drafted[0, accepted] == picks[0, accepted]:
                accepted += 1
            accepts[step] = accepted
            for i in range(accepted + 1):
                token = drafted[0, i] if i < accepted else picks[0, accepted]
                out[made] = token
                made += 1
                for t in range(stops.shape[0]):
                    if stops[t] == token:
                        finished = True
                if made >= room:
                    finished = True
                if finished:
                    break
            root += accepted + 1
            last = picks[0, accepted]
            step += 1
            if step >= steps or interrupt[0]:
                finished = True
            shared[_ACCEPTED] = accepted
            shared[_BONUS] = last
            if finished:
                _store_release(shared, _DONE, 1)
            _store_release(shared, _VERDICTS, step)
        _store_release(shared, _DONE, 1)
        return made, step


@dataclass
class ChainsOut:
    """What :func:`greedy_chains` returns: each job's chain (its drafts), the model's pick after
    each of its verified rows (one more than the chain), and the seconds the drafting and the
    verification took (on the model loop's thread)."""

    chains: list[list[int]]
    picks: list[list[int]]
    draft_seconds: float
    verify_seconds: float
    ahead: list[int]  # the draft's picks after the chain (``ahead`` of them), or none


def greedy_chains(
    target: Runner,
    drafter: Runner,
    job_ids: Sequence[str],
    catchup: Sequence[tuple[list[int], int] | None],
    depths: Sequence[int],
    last: Sequence[int],
    roots: Sequence[int],
    vocab: int,
    given: Sequence[list[int] | None] | None = None,
    ahead: int = 0,
) -> ChainsOut:
    """Draft and verify greedy chains for ``job_ids``: job ``i`` (depth ``depths[i]``, 0: it only
    decodes) first feeds the draft ``catchup[i]`` (its unseen tokens from a position), drafts a
    chain of ``depths[i]`` tokens (argmax over the first ``vocab`` logits), then the model
    verifies ``[last[i], *chain]`` from position ``roots[i]`` (its last token's). Both runners
    must be :meth:`Runner.chainable`; keys and values go to both pools as the runners' own
    forwards would write them.

    ``given[i]``: job ``i``'s chain, drafted before (its ``catchup[i]`` is None). ``ahead``: for
    one job, while the model verifies its chain, the draft goes on from the chain's last token,
    ``ahead`` forwards on the second thread (:attr:`ChainsOut.ahead`): the next step's chain if
    this one is accepted whole and the model's next token is the draft's first pick after it."""
    assert target.fused is not None and drafter.fused is not None
    d_pool = drafter.pool.stacked(drafter.fused.kv_heads, drafter.fused.head_dim)
    t_pool = target.pool.stacked(target.fused.kv_heads, target.fused.head_dim)
    assert d_pool is not None and t_pool is not None
    d_stores = drafter.fused.arrays(*d_pool)
    t_stores = target.fused.arrays(*t_pool)
    count = len(job_ids)
    for job_id, span, root in zip(job_ids, catchup, roots, strict=True):
        target.pool.check_private(job_id, root)
        if span is not None:
            drafter.pool.check_private(job_id, span[1])
    depth = np.array(depths, dtype=np.int64)
    deepest = max(depths)
    cut_job = 0  # the first job of the second thread's half; 0: no split
    if target.fused.threads > 1 and count > 1:
        owners = np.repeat(np.arange(count, dtype=np.int64), depth + 1)
        cut = split_point(owners)
        cut_job = int(owners[cut]) if cut else 0
    drafted = np.zeros((count, max(1, deepest)), dtype=np.int64)
    for j, chain in enumerate(given or ()):
        if chain is not None:
            drafted[j, : len(chain)] = chain
    if ahead:
        assert count == 1 and not cut_job and depths[0] > 0
        onward = np.zeros((1, ahead), dtype=np.int64)
    picks = np.zeros((count, deepest + 1), dtype=np.int64)
    last_arr = np.array(last, dtype=np.int64)
    root_arr = np.array(roots, dtype=np.int64)
    t_tables = table_array([target.pool.tables[j] for j in job_ids])
    d_tables = table_array([drafter.pool.tables.get(j, ()) for j in job_ids])
    d_bs, t_bs = drafter.pool.block_size, target.pool.block_size
    d_weights, t_weights = drafter.fused.weights, target.fused.weights
    t_fused = target.fused

    def group(lo: int, hi: int) -> tuple[float, float]:
        start = time.perf_counter()
        spans = catchup[lo:hi]
        if any(span is not None for span in spans):
            ids, positions, slots, jobs, keep = _catchup_rows(spans, d_tables[lo:hi], d_bs)
            _draft(
                ids, positions, slots, jobs, keep, root_arr[lo:hi], depth[lo:hi], d_tables[lo:hi],
                d_bs, vocab, *d_weights, *d_stores, drafted[lo:hi],
            )  # fmt: skip
        drafting = time.perf_counter()

        def verify() -> None:
            _verify(
                last_arr[lo:hi], root_arr[lo:hi], depth[lo:hi], drafted[lo:hi], t_tables[lo:hi],
                t_bs, *t_weights, *t_stores, picks[lo:hi],
            )  # fmt: skip

        def draft_on() -> None:  # from the chain's last token, fed after the others
            _chain(
                drafted[:, depths[0] - 1].copy(), root_arr + depths[0] - 1,
                np.array([ahead], dtype=np.int64), d_tables, d_bs, vocab, *d_weights,
                *d_stores, onward,
            )  # fmt: skip

        if ahead:
            t_fused.both(verify, draft_on, split=False)
        else:
            verify()
        return drafting - start, time.perf_counter() - drafting

    draft_s, verify_s = t_fused.halves(group, cut_job, count)
    drafter.fused_done((deepest if any(span is not None for span in catchup) else 0) + ahead)
    target.fused_done(1)
    chains = drafted.tolist()
    rows_picked = picks.tolist()
    return ChainsOut(
        [chains[j][:d] for j, d in enumerate(depths)],
        [rows_picked[j][: d + 1] for j, d in enumerate(depths)],
        draft_s,
        verify_s,
        onward[0].tolist() if ahead else [],
    )


def greedy_run(
    target: Runner,
    job_ids: Sequence[str],
    last: Sequence[int],
    roots: Sequence[int],
    steps: Sequence[int],
    stops: np.ndarray,
    interrupt: np.ndarray,
) -> list[list[int]]:
    """Greedy decode steps of ``job_ids`` in one compiled call (:func:`_decode`): job ``i``
    feeds ``last[i]`` at position ``roots[i]``, then each token it picks, up to ``steps[i]``
    forwards, stopping after a pick in ``stops[i]`` (-1 pads), all of them after the forward
    during which ``interrupt[0]`` was set; returns each job's picks. A step's rows, and the
    split over two threads (made once for the run: each half runs its own jobs' steps), are the
    runner's fused forward's for that step, so the same tokens bit for bit, with no logits
    going through torch and the sampler and no Python between the steps. ``target`` must be
    :meth:`Runner.chainable`, its pool's tables cover each job's last position."""
    fused = target.fused
    assert fused is not None
    pool = target.pool.stacked(fused.kv_heads, fused.head_dim)
    assert pool is not None
    stores = fused.arrays(*pool)
    for job_id, root in zip(job_ids, roots, strict=True):
        target.pool.check_private(job_id, root)
    count = len(job_ids)
    step_arr = np.array(steps, dtype=np.int64)
    picks = np.zeros((count, max(steps)), dtype=np.int64)
    made = np.zeros(count, dtype=np.int64)
    last_arr = np.array(last, dtype=np.int64)
    root_arr = np.array(roots, dtype=np.int64)
    tables = table_array([target.pool.tables[j] for j in job_ids])
    # _decode feeds first[j] after position roots[j]
    fused.decode(
        last_arr, root_arr - 1, step_arr, stops, interrupt, tables, target.pool.block_size,
        stores, picks, made,
    )  # fmt: skip
    target.fused_done(int(made.max()))
    rows: list[list[int]] = picks.tolist()
    return [row[:n] for row, n in zip(rows, made.tolist(), strict=True)]


@dataclass
class RunOut:
    """What :func:`pipelined_run` returns: the tokens made (the accepted drafts and the
    model's own, step after step), the drafts each step accepted, the run's seconds, and the
    chain the draft drafted last (``carry``, from its guess at the model's last token: the next
    step's if the guess held, which ``carry_at`` (the guess's position and token) tells)."""

    tokens: list[int]
    accepted: list[int]
    seconds: float
    carry: list[int]
    carry_at: tuple[int, int]


def pipelined_run(
    target: Runner,
    drafter: Runner,
    job_id: str,
    catchup: tuple[list[int], int] | None,
    depth: int,
    last: int,
    root: int,
    steps: int,
    room: int,
    stops: np.ndarray,
    interrupt: np.ndarray,
    vocab: int,
    given: list[int] | None = None,
) -> RunOut:
    """Up to ``steps`` greedy speculative steps of one job, drafts of ``depth`` tokens, on two
    threads at once: the model verifies step ``k``'s chain on this one (:func:`_target_loop`)
    while the draft, on the fused forward's second thread (:func:`_draft_loop`), drafts step
    ``k + 1``'s on the guess that step ``k``'s chain is accepted whole; where the guess fails
    it drafts again from the model's verdict while the model waits. The job's last token is
    ``last`` at position ``root``; ``catchup``: the tokens the draft has not seen before it,
    from a position; ``given``: the first step's chain, drafted before (by the last run: no
    catch-up then). The run makes at most ``room`` tokens, ends after a token in ``stops``
    (1-D), and after the step during which ``interrupt[0]`` was set. Each step's verification
    is :func:`greedy_chains`'s, so the same tokens as single steps bit for bit. Both pools must
    hold blocks for the run: the model's for every position a step may feed (up to ``depth``
    from a root, the roots under ``root + room``), the draft's for ``depth + 1`` more."""
    t_fused, d_fused = target.fused, drafter.fused
    assert t_fused is not None and d_fused is not None and t_fused.threads > 1
    t_pool = target.pool.stacked(t_fused.kv_heads, t_fused.head_dim)
    d_pool = drafter.pool.stacked(d_fused.kv_heads, d_fused.head_dim)
    assert t_pool is not None and d_pool is not None
    t_stores, d_stores = t_fused.arrays(*t_pool), d_fused.arrays(*d_pool)
    target.pool.check_private(job_id, root)
    t_tables = table_array([target.pool.tables[job_id]])
    d_tables = table_array([drafter.pool.tables[job_id]])
    d_bs = drafter.pool.block_size
    if catchup is not None and catchup[0]:
        ids, positions, slots, _jobs, _keep = _catchup_rows([catchup], d_tables, d_bs)
        drafter.pool.check_private(job_id, catchup[1])
    else:
        ids = positions = slots = np.zeros(0, dtype=np.int64)
    first = np.array([given[:depth]] if given else np.zeros((0, depth)), dtype=np.int64)
    chain = np.zeros(2 * depth, dtype=np.int64)  # the step's chain, then the one carried
    shared = np.zeros(8, dtype=np.int64)
    out = np.zeros(max(1, room), dtype=np.int64)
    accepts = np.zeros(max(1, steps), dtype=np.int64)
    made = ran = 0

    # each side marks in ``shared`` that it has ended, however it ended, so the other never
    # waits for it in vain (a failure then reaches the model loop as the step's error)
    def verify() -> None:
        nonlocal made, ran
        try:
            made, ran = _target_loop(
                root, last, depth, steps, stops, room, interrupt, t_tables,
                target.pool.block_size, *t_fused.weights, *t_stores, chain, shared, out,
                accepts,
            )  # fmt: skip
        finally:
            shared[_DONE] = 1

    def draft() -> None:
        try:
            _draft_loop(
                ids, positions, slots, root, last, depth, first, d_tables, d_bs, vocab,
                *d_fused.weights, *d_stores, chain, shared,
            )  # fmt: skip
        finally:
            shared[_GONE] = 1

    start = time.perf_counter()
    t_fused.both(verify, draft, split=False)
    seconds = time.perf_counter() - start
    target.fused_done(ran)
    drafter.fused_done(ran * (depth + 1))
    return RunOut(
        out[:made].tolist(),
        accepts[:ran].tolist(),
        seconds,
        chain[depth:].tolist(),
        (int(shared[_CARRY_ROOT]), int(shared[_CARRY_LAST])),
    )


def _catchup_rows(
    spans: Sequence[tuple[list[int], int] | None], tables: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The draft's catch-up rows of a group: each drafting job's unseen tokens at their positions,
    the last of each kept as its own logits row."""
    ids: list[int] = []
    positions: list[int] = []
    jobs: list[int] = []
    keep: list[int] = []
    for j, span in enumerate(spans):
        if span is None:
            continue
        tokens, start = span
        n = len(tokens)
        ids += tokens
        positions += range(start, start + n)
        jobs += [j] * n
        keep += [-1] * (n - 1) + [j]
    pos = np.array(positions, dtype=np.int64)
    owner = np.array(jobs, dtype=np.int64)
    slots = tables[owner, pos // block_size] * block_size + pos % block_size
    return (
        np.array(ids, dtype=np.int64), pos, slots, owner, np.array(keep, dtype=np.int64),
    )  # fmt: skip


def _scratch(model: FusedLlama, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed key and value stores of ``slots`` slots in every layer of ``model``, for a warm-up
    call."""
    layers = model.weights[2].shape[0]
    shape = (layers, slots, model.kv_heads, model.head_dim)
    return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)


def warm_up_decode(model: FusedLlama) -> None:
    """Compile :func:`_decode` with stops (:func:`greedy_run`'s) now, or load it from numba's
    cache, not in the first request: one job decoding one token over a pool of two slots."""
    one = np.zeros(1, dtype=np.int64)
    _decode(
        one, one, one + 1, np.full((1, 1), -1, dtype=np.int64), np.zeros(1, dtype=np.int8),
        np.zeros((1, 1), dtype=np.int64), 2, 1, *model.weights, *_scratch(model, 2),
        np.zeros((1, 1), dtype=np.int64), np.zeros(1, dtype=np.int64),
    )  # fmt: skip


def warm_up(target: FusedLlama, draft: FusedLlama) -> None:
    """Compile :func:`_draft`, :func:`_verify` and a pipelined run's two loops now (or load them
    from numba's cache), not in the first speculative step: one job drafting one token over
    pools of a few slots."""
    one = np.zeros(1, dtype=np.int64)
    table = np.zeros((1, 1), dtype=np.int64)
    drafted = np.zeros((1, 1), dtype=np.int64)
    _draft(
        one, one, one, one, one, one, one + 1, table, 2, 1, *draft.weights, *_scratch(draft, 2),
        drafted,
    )  # fmt: skip
    _verify(
        one, one, one, drafted, table, 2, *target.weights, *_scratch(target, 2),
        np.zeros((1, 2), dtype=np.int64),
    )  # fmt: skip
    # the model's loop, told to make nothing, marks the run done; the draft's then drafts its
    # first chain and the next and, the run being done, ends (both on this thread, in turn)
    shared = np.zeros(8, dtype=np.int64)
    chain = np.zeros(2, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    table = np.arange(4, dtype=np.int64)[None, :]  # the draft feeds positions 1 to 3
    _target_loop(
        1, 0, 1, 0, empty, 0, np.zeros(1, dtype=np.int8), table, 4, *target.weights,
        *_scratch(target, 16), chain, shared, np.zeros(1, dtype=np.int64),
        np.zeros(1, dtype=np.int64),
    )  # fmt: skip
    _draft_loop(
        empty, empty, empty, 1, 0, 1, np.zeros((0, 1), dtype=np.int64), table, 4, 1,
        *draft.weights, *_scratch(draft, 16), chain, shared,
    )  # fmt: skip
