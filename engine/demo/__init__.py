"""The ``demo`` model: a small target/draft pair built on this machine, with no download.

``flockctl engine serve --model demo`` must work offline and on any machine, so the demo is trained
here from text every Python installation carries: the standard library's own ``.py`` sources. One
byte-level BPE tokenizer is shared by a 16-layer target and a 2-layer draft; the draft is meant for
speculative decoding, so it starts from the target's embeddings and first layers and is then
distilled from the target's logits, which makes it agree with the target's greedy choice far more
often than a draft trained alone on the same compute. The target is deep and narrow on purpose: at
these sizes a step's cost follows the number of layers, so the draft costs about a seventh of the
target per step, the kind of gap that makes speculation pay with real model pairs.

The build is deterministic for a given recipe, Python and machine (fixed seed, fixed step counts,
never bounded by time), takes about two and a half minutes on two CPU cores, and is cached under
the user's cache directory (``cache_root()``), so later starts load it in seconds.

``flockctl engine demo`` (or ``python -m flockctl.engine.demo``, the same command) builds it ahead
of time; ``--force`` rebuilds. The package, one module per concern:

- ``recipe``: what decides the weights (``DemoRecipe``, ``DEMO_VERSION``, the special tokens);
- ``cache``: where builds lie, and the lock that makes processes starting at once build once;
- ``build``: one build, start to finish, and the manifest that marks it complete;
- ``corpus``: the standard library's sources and the tokenizer trained on them;
- ``training`` and ``muon``: the two models, their training, distillation and evaluation;
- ``progress``: the build's bar, log lines and one-line phase text;
- ``command``: the command line.

Importing the package imports no torch: only a build (``ensure_demo`` with nothing cached) does.
"""

from __future__ import annotations

from flockctl.engine.demo.cache import (
    DemoPaths,
    cache_root,
    demo_dir,
    demo_is_built,
    ensure_demo,
)
from flockctl.engine.demo.recipe import DEFAULT_RECIPE, DEMO_VERSION, DemoBuildError, DemoRecipe

__all__ = [
    "DEFAULT_RECIPE",
    "DEMO_VERSION",
    "DemoBuildError",
    "DemoPaths",
    "DemoRecipe",
    "cache_root",
    "demo_dir",
    "demo_is_built",
    "ensure_demo",
]
