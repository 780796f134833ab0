"""The compiled loops' on-disk cache, stamped with every source file they are built from.

numba caches a compiled function (``cache=True``) under a stamp of the one file that defines it.
A compiled function that calls another one carries the callee's machine code in its own cached
library, so after a change to the callee's file alone (an upgrade of flockctl that rewrote
``fused_forward.py`` but not ``fused_spec.py``, an edit in a checkout) the caller's stale cache
still loads, and runs the old callee against today's callers and data layout: wrong tokens or a
crash, with nothing to say why. :func:`share_stamp` stamps every function defined in a group of
files with one digest of all of them, so a change to any file of the group compiles the group's
functions again (once; the next start loads them). The directories are numba's own (its
``NUMBA_CACHE_DIR``, else the package's ``__pycache__``, else the user's cache directory), then,
where none of those can be written (a read-only install with a read-only home, as in a container
with a read-only root), a directory of this user's under the system's temporary directory
(:func:`fallback_dir`). numba refuses to define a cached function it has nowhere to write
("cannot cache function ...: no locator available"), which made the engine fail at import; where
not even that directory can be written, :func:`share_stamp` says so and the loops compile at
each start instead (:data:`flockctl.engine.fused_forward.CACHE`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

#: the engine's files whose compiled loops call one another's (or read their constants)
ENGINE_SOURCES: tuple[Path, ...] = tuple(
    Path(__file__).with_name(name)
    for name in ("decode_attention.py", "fused_forward.py", "fused_spec.py")
)

# each file of a group -> the group's files, all as real paths
_groups: dict[str, tuple[str, ...]] = {}

log = logging.getLogger("flockctl.engine")


def fallback_dir() -> str:
    """Where the engine's compiled loops are cached when numba's own places cannot be written:
    a directory of this user's under the system's temporary directory."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    try:
        base = tempfile.gettempdir()
    except OSError:  # no temporary directory can be written either (nor the current one)
        base = os.curdir
    return os.path.join(base, f"flockctl-numba-{user}")


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


_MISSING = b"\0missing"


def _stat(name: str) -> tuple[float, int] | None:
    try:
        st = os.stat(name)
    except OSError:  # gone since (a package being replaced under a running process)
        return None
    return st.st_mtime, st.st_size


def _read(name: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError:
        return _MISSING


@lru_cache(maxsize=64)
def _digest(files: tuple[str, ...], stats: tuple[tuple[float, int] | None, ...]) -> str:
    # stats are in the key only, so that a file that changed is read again
    hasher = hashlib.sha256()
    for name, stat in zip(files, stats, strict=True):
        hasher.update(name.encode())
        hasher.update(_read(name) if stat is not None else _MISSING)
    return hasher.hexdigest()


def group_stamp(files: Sequence[str]) -> str:
    """One digest of the contents of ``files`` (and their names, so a file that moves between
    groups changes the stamp too; a file that is not there counts as missing)."""
    return _digest(tuple(files), tuple(_stat(name) for name in files))


def _locator_classes(caching: Any) -> list[type]:
    """numba's locators of functions backed by a source file (an older numba's: private)."""
    found = []
    for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator"):
        cls = getattr(caching, name, None) or getattr(caching, "_" + name, None)
        if cls is not None:
            found.append(cls)
    return found


def _install() -> None:
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # type: ignore[attr-defined]
    if any(getattr(cls, "_flockctl_group", False) for cls in impl._locator_classes):
        return

    class GroupStamp:
        """Mixed into a numba locator: functions of a registered group's files only, stamped
        with the group's digest."""

        _flockctl_group = True
        _py_file: str

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if os.path.realpath(py_file) not in _groups:
                return None
            return super().from_function(py_func, py_file)  # type: ignore[misc]

        def get_source_stamp(self) -> str:
            return group_stamp(_groups[os.path.realpath(self._py_file)])

    bases = _locator_classes(caching)
    ours = [type(f"Group{base.__name__}", (GroupStamp, base), {}) for base in bases]

    class GroupFallbackLocator(GroupStamp, bases[-1]):  # type: ignore[misc,valid-type]
        """The last place for a group's functions: :func:`fallback_dir`."""

        announced = False  # the log said where the loops are cached

        def __init__(self, py_func: Any, py_file: str) -> None:
            super().__init__(py_func, py_file)
            subpath = self.get_suitable_cache_subpath(py_file)
            self._cache_path = os.path.join(fallback_dir(), subpath)

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            found = super().from_function(py_func, py_file)
            if found is not None and not cls.announced:
                cls.announced = True
                log.info(
                    "compiled loops cached in %s: no writable __pycache__ or user cache directory",
                    fallback_dir(),
                )
            return found

    impl._locator_classes = [*ours, GroupFallbackLocator, *impl._locator_classes]


def share_stamp(files: Iterable[str | os.PathLike[str]] = ENGINE_SOURCES) -> bool:
    """Stamp the cached functions defined in any of ``files`` with one digest of all of them.
    Call it before the files' ``cache=True`` functions are defined (numba picks a function's
    cache locator as it decorates it); registering the same files again changes nothing.

    Returns whether the functions can be cached at all: False only where not even
    :func:`fallback_dir` can be written (then define them with ``cache=False``: numba would
    refuse them), with a warning."""
    # files that are not there (a frozen application carries no sources) keep numba's stamp
    group = tuple(sorted({os.path.realpath(n) for n in files if os.path.exists(n)}))
    for name in group:
        _groups[name] = group
    _install()
    if all(_can_cache(folder) for folder in {os.path.dirname(name) for name in group}):
        return True
    log.warning(
        "no directory to cache the engine's compiled loops in (%s cannot be written either):"
        " they compile at each start",
        fallback_dir(),
    )
    return False


def _can_cache(folder: str) -> bool:
    """Whether one of the places numba, then :func:`fallback_dir`, would cache the functions of
    the files in ``folder`` in can be written (in their order: the first that can is numba's
    choice too)."""
    from numba.core import config
    from numba.misc.appdirs import AppDirs

    given = getattr(config, "CACHE_DIR", "")  # NUMBA_CACHE_DIR
    places = [given] if given else []
    places += [
        os.path.join(folder, "__pycache__"),
        AppDirs(appname="numba", appauthor=False).user_cache_dir,
        fallback_dir(),
    ]
    return any(_writable(place) for place in places)
