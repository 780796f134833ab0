"""How an engine is set up (``flockctl engine serve``'s flags, checked when the config is made)
and the one error that says a model could not be loaded.

No torch here: whatever only builds or checks settings does not pay for the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass


class EngineLoadError(RuntimeError):
    """The model could not be loaded; the message says which and why."""


@dataclass
class EngineConfig:
    model: str = "demo"
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    scheduler: str = "mlfq"
    max_batch_size: int = 0  # 0 (auto): from the KV budget, see batcher.auto_batch_size
    kv_budget: int | None = None
    max_model_len: int | None = None
    max_waiting: int = 256
    seed: int = 0
    block_size: int = 16
    mlfq_levels: int = 6
    starvation_limit: float = 5.0
    threads: int | None = None  # torch CPU threads; None: see cores.default_threads
    # threads the fused forward splits a batch's jobs over (1 or 2); 0 (auto): see
    # engine.fused_threads
    fused_threads: int = 0
    host_kv_budget: int | None = None  # tokens of swap space in host memory; default: kv budget
    draft_models: tuple[str, ...] = ()  # speculative models (SSMs); 'demo': the demo's draft
    spec_tree: tuple[int, ...] | None = None  # children per node at each depth; None: device's
    spec: str = "auto"  # auto | on | off
    prefix_caching: bool = True  # share the KV blocks of prompt prefixes seen before
    # fast: decode steps over a CPU's dense rows attend with engine/decode_attention.py;
    # exact: transformers' attention, logits bit for bit
    attention: str = "fast"
    pooling: str | None = None  # last | mean | cls; None: last (causal LM), cls (encoder)
    max_tokens_per_batch: int | None = None  # tokens one iteration may feed; None: no cap
    # chunked prefill: tokens one iteration feeds, a long prompt in chunks; 0 (auto): the device's
    max_num_batched_tokens: int = 0
    # greedy decode steps one compiled call may run while no job waits (1: one per iteration)
    num_scheduler_steps: int = 16
    # OTLP collector for traces and metrics; None: OTEL_EXPORTER_OTLP_ENDPOINT, else none
    otel_collector_endpoint: str | None = None
    access_log: bool = False  # a JSON line per finished job on stderr

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.fused_threads not in (0, 1, 2):
            raise ValueError(f"fused_threads must be 1 or 2 (or 0: auto), got {self.fused_threads}")
        if self.attention not in ("fast", "exact"):
            raise ValueError(f"attention must be fast or exact, got {self.attention!r}")
        for name in ("max_waiting", "block_size", "mlfq_levels", "num_scheduler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_batch_size", "max_num_batched_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must be at least 1 (or 0: auto), got {getattr(self, name)}"
                )
        if 0 < self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least"
                f" max_batch_size ({self.max_batch_size}): every decoding job feeds a token"
            )
        if self.kv_budget is not None and self.kv_budget < self.block_size:
            raise ValueError(f"kv_budget must be at least {self.block_size} tokens")
        if self.spec not in ("auto", "on", "off"):
            raise ValueError(f"spec must be auto, on or off, got {self.spec!r}")
        if self.spec == "on" and not self.draft_models:
            raise ValueError("--spec on needs at least one --draft-model")
        if self.spec_tree is not None and (
            not self.spec_tree or any(w < 1 for w in self.spec_tree)
        ):
            raise ValueError(f"spec_tree widths must be at least 1, got {self.spec_tree}")
        if self.pooling not in (None, "last", "mean", "cls"):
            raise ValueError(f"pooling must be last, mean or cls, got {self.pooling!r}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ValueError(
                f"max_tokens_per_batch must be at least 1, got {self.max_tokens_per_batch}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
