"""An embedding model served on its own: an encoder checkpoint (a BERT-style ``AutoModel``) has no
LM head, so there is nothing to decode, no KV cache and no scheduler; one thread owns the model
and runs the embedding batches posted to it.

:class:`EncoderEngine` answers what the API asks of an engine (name, context, health, ``/stats``,
``/metrics``) and refuses generation with a 400 naming ``model``, so a client that sends a
completion to an embedding model learns why instead of getting a 404 or a 500.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil
import torch

from flockctl import __version__
from flockctl.engine.config import EngineConfig
from flockctl.engine.device import DeviceMemory
from flockctl.engine.embeddings import Embedder, matryoshka_dimensions
from flockctl.engine.job import InvalidRequest
from flockctl.engine.metrics import EngineMetrics
from flockctl.schema import STATS_SCHEMA_VERSION, EncoderStats

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("flockctl.engine")


class EncoderEngine:
    """An embedding-only engine: the model, its tokenizer and the thread that runs its batches."""

    capabilities = ("embed",)

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        model_name: str,
        max_model_len: int,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.dtype = dtype
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.memory = DeviceMemory(device)
        self.started = time.time()
        self.failed: str | None = None
        self.closing = False
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        embeddings = model.get_input_embeddings().weight
        assert isinstance(embeddings, torch.Tensor)
        # the ids it takes; the routes, shared with Engine, check token ids against it
        self.vocab_size = int(embeddings.shape[0])
        self.embedder = Embedder(
            model,
            device,
            pooling=config.pooling or "cls",
            max_len=max_model_len,
            vocab_size=self.vocab_size,
            run_soon=self._calls.put,
            dimensions=matryoshka_dimensions(model.config),
        )
        self.metrics = EngineMetrics(self.stats)
        self._thread = threading.Thread(target=self._run, name="flockctl-encoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            while (call := self._calls.get()) is not None:
                try:
                    call()
                except Exception as exc:  # the embedder fails its own inputs; this is a bug
                    log.exception("the encoder thread crashed")
                    self.failed = f"the encoder thread crashed: {type(exc).__name__}: {exc}"
                    self.embedder.close(self.failed)
                    return

    def submit(self, prompt_ids: list[int], params: Any) -> Any:
        raise InvalidRequest(
            f"the model {self.model_name!r} is an embedding model: it serves /v1/embeddings,"
            " /tokenize and /detokenize, not text generation",
            "model",
        )

    def job_info(self, job_id: str) -> dict[str, Any] | None:
        return None  # no jobs: embeddings are answered whole

    def spec_stats(self) -> dict[str, Any] | None:
        return None

    def stats(self, detailed: bool = False) -> EncoderStats:
        out: EncoderStats = {
            "schema_version": STATS_SCHEMA_VERSION,
            "engine": "flockctl",
            "version": __version__,
            "model": self.model_name,
            "capabilities": list(self.capabilities),
            "device": self.memory.read(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": "exact",  # transformers' own forward
            "fused_threads": 0,
            "max_model_len": self.max_model_len,
            "running": 0,
            "waiting": 0,
            "swapped": 0,
            "embeddings": self.embedder.stats(),
            "uptime": round(time.time() - self.started, 3),
            "jobs": [],
        }
        if detailed:
            out["process_rss"] = psutil.Process().memory_info().rss
        return out

    def close(self) -> None:
        self.closing = True
        self.embedder.close("the engine is shutting down")
        self._calls.put(None)
        self._thread.join(timeout=30)
