"""The compiled loops' cache (``engine/jit_cache.py``): a change to the file of a function that a
cached function calls compiles the caller again, where numba's own stamp (the caller's file
alone) would load the caller with the callee's old code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flockctl.engine import fused_forward, jit_cache

pytest.importorskip("numba")

CALLEE = """
import numba

@numba.njit(cache=True)
def scale(x):
    return x * {factor}
"""

CALLER = """
import numba
from callee import scale

@numba.njit(cache=True)
def twice_plus_one(x):
    return scale(x) + 1
"""

DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "shared":
    from flockctl.engine.jit_cache import share_stamp
    share_stamp([sys.argv[1] + "/caller.py", sys.argv[1] + "/callee.py"])
import caller
value = caller.twice_plus_one(5)
print(json.dumps({"value": value, "hits": sum(caller.twice_plus_one.stats.cache_hits.values())}))
"""


def run(folder: Path, mode: str, **env_vars: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | env_vars
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(folder), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def write(folder: Path, factor: int) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "caller.py").write_text(CALLER)
    (folder / "callee.py").write_text(CALLEE.format(factor=factor))


@pytest.mark.e2e
def test_a_callee_change_compiles_its_cached_callers_again(tmp_path: Path) -> None:
    shared, own = tmp_path / "shared", tmp_path / "own"
    for folder, mode in ((shared, "shared"), (own, "own")):
        write(folder, 2)
        assert run(folder, mode) == {"value": 11, "hits": 0}
        assert run(folder, mode) == {"value": 11, "hits": 1}  # the cache is in use
        write(folder, 3)  # the callee's file alone changes
    # one stamp for both files: the caller is compiled again with the new callee, then cached
    assert run(shared, "shared") == {"value": 16, "hits": 0}
    assert run(shared, "shared") == {"value": 16, "hits": 1}
    # numba's stamp alone: the caller's cache still loads, with the callee's old code in it
    assert run(own, "own") == {"value": 11, "hits": 1}


def test_the_stamp_covers_every_file_of_the_group(tmp_path: Path) -> None:
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("x = 1\n")
    second.write_text("y = 1\n")
    files = [str(first), str(second)]
    before = jit_cache.group_stamp(files)
    assert jit_cache.group_stamp(files) == before
    second.write_text("y = 22\n")
    changed = jit_cache.group_stamp(files)
    assert changed != before
    second.unlink()  # a file gone from under a running process: a stamp of its own, no error
    assert jit_cache.group_stamp(files) not in (before, changed)


def test_files_that_are_not_there_keep_numbas_own_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jit_cache, "_groups", {})
    there, gone = tmp_path / "there.py", tmp_path / "gone.py"
    there.write_text("x = 1\n")
    jit_cache.share_stamp([there, gone])
    assert jit_cache._groups[os.path.realpath(there)] == (os.path.realpath(there),)
    assert os.path.realpath(gone) not in jit_cache._groups


def test_the_engine_loops_carry_the_group_stamp() -> None:
    if not fused_forward.available():
        pytest.skip("numba is not installed")
    from flockctl.engine import fused_spec

    stamps = {
        loop._cache._impl.locator.get_source_stamp()
        for loop in (fused_forward._forward, fused_forward._chain, fused_spec._target_loop)
    }
    expected = jit_cache.group_stamp(sorted(os.path.realpath(p) for p in jit_cache.ENGINE_SOURCES))
    assert stamps == {expected}


@pytest.mark.e2e
def test_with_no_writable_cache_directory_of_numbas_the_loops_cache_in_a_temporary_one(
    tmp_path: Path,
) -> None:
    """A read-only install with a read-only home (here: a file where each directory would go):
    numba refuses to define a cached function, so the engine failed at import; the group's
    functions go to a directory of the user's under the temporary directory instead."""
    folder = tmp_path / "app"
    write(folder, 2)
    (folder / "__pycache__").write_text("")  # numba cannot make its in-tree cache here
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {
        "HOME": str(blocked / "home"),  # nor its user-wide one
        "XDG_CACHE_HOME": str(blocked / "cache"),
        "TMPDIR": str(temporary),
    }
    with pytest.raises(subprocess.CalledProcessError) as refused:  # numba alone
        run(folder, "own", **env)
    assert "no locator available" in refused.value.stderr
    assert run(folder, "shared", **env) == {"value": 11, "hits": 0}
    assert run(folder, "shared", **env) == {"value": 11, "hits": 1}
    cached = list(temporary.glob("flockctl-numba-*/**/caller.twice_plus_one-*.nbi"))
    assert len(cached) == 1


def test_with_no_directory_at_all_the_loops_compile_uncached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(jit_cache, "_groups", {})
    source = tmp_path / "loops.py"
    source.write_text("x = 1\n")
    assert jit_cache.share_stamp([source]) is True
    monkeypatch.setattr(jit_cache, "_writable", lambda _path: False)

    def no_temporary_directory() -> str:
        raise FileNotFoundError("No usable temporary directory found")

    monkeypatch.setattr(jit_cache.tempfile, "gettempdir", no_temporary_directory)
    with caplog.at_level("WARNING", logger="flockctl.engine"):
        assert jit_cache.share_stamp([source]) is False
    assert "they compile at each start" in caplog.text
