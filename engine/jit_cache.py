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


@lru_cache(maxsize=64)
def _digest(files: tuple[str, ...], stats: tuple[tuple[float, int], ...]) -> str:
    del stats  # in the key only: a file that changes while the process runs is read again
    hasher = hashlib.sha256()
    for name in files:
        hasher.update(name.encode())
        hasher.update(Path(name).read_bytes())
    return hasher.hexdigest()


def group_stamp(files: Sequence[str]) -> str:
    """One digest of the contents of ``files`` (and their names, so a file that moves between
    groups changes the stamp too)."""
    stats = tuple((st.st_mtime, st.st_size) for st in (os.stat(name) for name in files))
    return _digest(tuple(files), stats)


def _locator_classes(caching: Any) -> list[type]:
    """numba's locators of source-file-backed functions, public or (before 0.61) private."""
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
    group = tuple(sorted({os.path.realpath(name) for name in files}))
    for name in group:
        _groups[name] = group
    _install()
