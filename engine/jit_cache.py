"""The compiled loops' on-disk cache, stamped with every source file they are built from.

numba caches a compiled function (``cache=True``) under a stamp of the one file that defines it.
A compiled function that calls another one carries the callee's machine code in its own cached
library, so after a change to the callee's file alone (an upgrade of flockctl that rewrote
``fused_forward.py`` but not ``fused_spec.py``, an edit in a checkout) the caller's stale cache
still loads, and runs the old callee against today's callers and data layout: wrong tokens or a
crash, with nothing to say why. :func:`share_stamp` stamps every function defined in a group of
files with one digest of all of them, so a change to any file of the group compiles the group's
functions again (once; the next start loads them). The directories are numba's own (its
``NUMBA_CACHE_DIR``, else the package's ``__pycache__``, else the user's cache directory).
"""

from __future__ import annotations

import hashlib
import os
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

    ours = [
        type(f"Group{base.__name__}", (GroupStamp, base), {}) for base in _locator_classes(caching)
    ]
    impl._locator_classes = ours + list(impl._locator_classes)


def share_stamp(files: Iterable[str | os.PathLike[str]] = ENGINE_SOURCES) -> None:
    """Stamp the cached functions defined in any of ``files`` with one digest of all of them.
    Call it before the files' ``cache=True`` functions are defined (numba picks a function's
    cache locator as it decorates it); calling it again with the same files does nothing."""
    # files that are not there (a frozen application carries no sources) keep numba's stamp
    group = tuple(sorted({os.path.realpath(n) for n in files if os.path.exists(n)}))
    for name in group:
        _groups[name] = group
    _install()
