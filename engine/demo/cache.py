"""Where the demo is cached, and how several processes starting at once build it only once.

``manifest.json``, written last into a temporary directory that is then renamed into place, marks
a complete build; an exclusive lock on ``<demo_dir>.lock`` makes the first caller build while the
others wait, reading its progress from ``<demo_dir>.progress``. Nothing here imports torch:
``flockctl up`` asks ``demo_is_built`` before it decides to build, and only a build imports
:mod:`flockctl.engine.demo.build`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flockctl import paths
from flockctl.engine.demo.recipe import DEFAULT_RECIPE, DEMO_VERSION, DemoRecipe

MANIFEST = "manifest.json"
_WAIT_POLL = 0.5  # seconds between two tries of the lock while another process builds


@dataclass(frozen=True)
class DemoPaths:
    """Where a complete demo build lies; each is a ``save_pretrained`` directory."""

    target: Path  # the model to serve, with its tokenizer
    draft: Path  # the speculative-decoding draft, with the same tokenizer files


def cache_root() -> Path:
    """flockctl's cache directory: ``$FLOCKCTL_CACHE``, else ``$XDG_CACHE_HOME/flockctl``, else
    the platform's (``~/.cache/flockctl`` on Linux; ``flockctl.paths``). Rebuildable data only;
    nothing in it needs a backup."""
    return paths.cache_dir()


def demo_dir(root: Path | None = None) -> Path:
    """The build directory of this ``DEMO_VERSION``; older versions beside it are left alone."""
    return (cache_root() if root is None else Path(root)) / "demo" / f"v{DEMO_VERSION}"


def paths_in(directory: Path) -> DemoPaths:
    """The pair inside a build directory, complete or not."""
    return DemoPaths(target=directory / "target", draft=directory / "draft")


def read_manifest(paths: DemoPaths) -> dict[str, Any]:
    """What a complete build recorded about itself (see ``build_demo``)."""
    return json.loads((paths.target.parent / MANIFEST).read_text())


def ensure_demo(
    root: Path | None = None,
    recipe: DemoRecipe = DEFAULT_RECIPE,
    progress: bool = True,
    *,
    force: bool = False,
    report: Callable[[str], None] | None = None,
) -> DemoPaths:
    """Return the demo pair, building it first unless a complete build of ``recipe`` is cached.

    Safe to call from several processes at once: the build runs under an exclusive lock on
    ``<demo_dir>.lock``, so the first caller builds and the others wait, then find it complete.
    ``force`` rebuilds even when a complete build exists (``--force`` on the command line).
    ``progress`` shows the build on stderr (a bar on a terminal, plain lines elsewhere);
    ``report`` gets a one-line phase text on every step, also while waiting for another
    process's build (whose progress it reads from ``<demo_dir>.progress``).
    """
    final = demo_dir(root)
    if not force and _is_complete(final, recipe):
        return paths_in(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    progress_file = final.with_name(final.name + ".progress")
    lock = final.with_name(final.name + ".lock")
    with _exclusive_lock(lock, final if progress else None, progress_file, report):
        if not force and _is_complete(final, recipe):
            return paths_in(final)  # another process built it while we waited
        from flockctl.engine.demo import build  # torch, only now that there is a build to run

        for stale in final.parent.glob(final.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))

        def tell(text: str) -> None:
            _write_progress(progress_file, text)
            if report is not None:
                report(text)

        try:
            build.build_demo(tmp, recipe, "auto" if progress else None, tell)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
                final.rename(old / "old")
            tmp.rename(final)
        finally:
            for leftover in final.parent.glob(final.name + ".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            progress_file.unlink(missing_ok=True)
    return paths_in(final)


def demo_is_built(recipe: DemoRecipe = DEFAULT_RECIPE, root: Path | None = None) -> bool:
    """Whether a complete build of ``recipe`` is cached (reads a manifest; imports no torch)."""
    return _is_complete(demo_dir(root), recipe)


def _is_complete(directory: Path, recipe: DemoRecipe) -> bool:
    paths = paths_in(directory)
    try:
        manifest = read_manifest(paths)
    except (OSError, ValueError):
        return False
    return (
        manifest.get("recipe") == dataclasses.asdict(recipe)
        and (paths.target / "config.json").is_file()
        and (paths.draft / "config.json").is_file()
    )


@contextlib.contextmanager
def _exclusive_lock(
    path: Path,
    announce: Path | None,
    progress_file: Path,
    report: Callable[[str], None] | None,
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; say on stderr when it means waiting (for
    ``announce`` to be built by another process), since that can take minutes, and pass the
    other build's progress (from ``progress_file``) to ``report`` while waiting."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if announce is not None:
                print(f"waiting for another process to finish building {announce}", file=sys.stderr)
            while True:
                if report is not None:
                    report(f"waiting for another build: {_read_progress(progress_file)}")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(_WAIT_POLL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write_progress(path: Path, text: str) -> None:
    """Atomically, so a waiting process never reads half a line."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def _read_progress(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text.removeprefix("building ") or "the demo model"
