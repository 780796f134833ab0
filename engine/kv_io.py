"""One forward's reads and writes of the paged KV cache, layer by layer, in code TorchScript
compiles as well as Python runs: the served model's scripted forward
(:mod:`flockctl.engine.lean_forward`) and transformers' forward (through
:meth:`flockctl.engine.kv.BatchView.update`) store and read keys and values with the one
:func:`store_and_read`.

No ``from __future__ import annotations`` here: TorchScript reads these annotations as types.
"""

from typing import NamedTuple

import torch


class LayersIO(NamedTuple):
    """Where one forward's keys and values go and come from, for every layer: the pool's
    stores and the slots ``write`` the new tokens take; with dense rows, the rows' stores,
    ``dense_write`` (``[batch * heads * q]`` rows of a layer's ``[-1, dim]`` view) and the
    rows filled from the pool first (``fill_src`` pool slots to ``fill_dst``); else the
    histories' pool slots ``read`` (``[batch * kv_length]``), or ``start:end`` when they are
    one slice of it. The store lists are empty where a caller passes each layer's stores
    itself (:meth:`flockctl.engine.kv.BatchView.update`, layer by layer). ``lengths``: with
    dense rows and one token a row, each row's history length, for the decode attention kernel
    (:mod:`flockctl.engine.decode_attention`) where the runner uses it."""

    pool_keys: list[torch.Tensor]
    pool_values: list[torch.Tensor]
    write: torch.Tensor
    dense_keys: list[torch.Tensor]
    dense_values: list[torch.Tensor]
    dense_write: torch.Tensor | None
    fill_src: torch.Tensor | None
    fill_dst: torch.Tensor | None
    read: torch.Tensor | None
    start: int
    end: int
    kv_length: int
    lengths: torch.Tensor | None


def store_and_read(
    new: torch.Tensor, store: torch.Tensor, rows: torch.Tensor | None, io: LayersIO
) -> torch.Tensor:
    """Write one layer's new keys (or values) ``[batch, heads, q, dim]`` into ``store`` (and
    ``rows``, the layer's dense rows, if any); return the batch's histories ``[batch, heads,
    kv_length, dim]``. Written for TorchScript as well as Python: the served model's scripted
    forward runs it (:mod:`flockctl.engine.lean_forward`), transformers' forward through
    :meth:`BatchView.update`."""
    batch, heads, q, dim = new.size(0), new.size(1), new.size(2), new.size(3)
    store.index_copy_(0, io.write, new.transpose(1, 2).reshape(batch * q, heads, dim))
    dense_write = io.dense_write
    if rows is not None and dense_write is not None:
        slots = rows.view(-1, dim)
        fill_src, fill_dst = io.fill_src, io.fill_dst
        if fill_src is not None and fill_dst is not None:
            slots.index_copy_(0, fill_dst, store.index_select(0, fill_src).view(-1, dim))
        slots.index_copy_(0, dense_write, new.reshape(-1, dim))
        return rows[:batch, :, : io.kv_length]
    read = io.read
    history = store.index_select(0, read) if read is not None else store[io.start : io.end]
    return history.view(batch, io.kv_length, heads, dim).transpose(1, 2)


def layer_kv(
    key: torch.Tensor, value: torch.Tensor, layer: int, io: LayersIO
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`store_and_read` for layer ``layer``'s new keys and values, from ``io``'s lists
    of every layer's stores: the histories ``[batch, heads, kv_length, dim]`` of both."""
    dense_keys: torch.Tensor | None = None
    dense_values: torch.Tensor | None = None
    if len(io.dense_keys) > 0:
        dense_keys, dense_values = io.dense_keys[layer], io.dense_values[layer]
    return (
        store_and_read(key, io.pool_keys[layer], dense_keys, io),
        store_and_read(value, io.pool_values[layer], dense_values, io),
    )
