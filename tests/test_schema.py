"""The typed contract of the status snapshot and an engine's /stats (flockctl.schema) against the
real documents: a daemon on 127.0.0.1 relaying a real engine (a tiny model with a draft model, so
speculation is on) that holds a job, and that engine's own /stats.

A payload must carry every key its TypedDict requires, no key it does not declare, and values of
the declared kinds, all the way down. And the declared shapes are pinned to their versions: a
change of shape fails here until the version is bumped and the new shape recorded under it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args, get_origin, get_type_hints, is_typeddict

import httpx
import pytest
from conftest import TINY, until
from tinymodel import build_tiny_bert

from flockctl import schema
from flockctl.schema import (
    SNAPSHOT_SCHEMA_VERSION,
    STATS_SCHEMA_VERSION,
    EncoderStats,
    EngineStats,
    EngineView,
    LogChunk,
    StatusSnapshot,
    WorkerDetail,
)

#: The fingerprint of each version's declared shape (``fingerprint`` below). A new version adds
#: its line; the old lines stay, so no two versions can claim the same shape.
SNAPSHOT_SHAPES = {
    1: "757cfd083085aded",
    2: "bb2dae6d382a44a3",
    3: "50a1f7d73996c3f6",
    4: "a96d4e98ea35ad87",
}
STATS_SHAPES = {
    1: "493925497c462cdc",
    2: "b91510926e37f15a",
    3: "263c50c0c84188d7",
    4: "66565c987ccfe43c",
    5: "7cafa893be64ec15",
    6: "6722a66ce5a3f9ba",
    7: "cf0a9fd1f541b163",
    8: "83594c0eae225892",
}
#: The embedding-only engine's ``/stats``, versioned with the other engine's.
ENCODER_STATS_SHAPES = {
    2: "f0279cff8feed26c",
    3: "cd44029e30158335",
    4: "b514560b54e9fd1d",
    5: "6480a0e5f2851dfc",
    6: "fdc26fa89252ac50",
    7: "fdc26fa89252ac50",  # what version 7 added is the other engine's
    8: "fdc26fa89252ac50",  # and version 8's
}


def problems(value: Any, kind: Any, where: str) -> list[str]:
    """Where ``value`` departs from the type ``kind``: a missing or undeclared key, or a value of
    another kind. ``Any`` and the values of ``dict[str, X]`` are not looked into."""
    if kind is Any:
        return []
    if is_typeddict(kind):
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not an object"]
        hints = get_type_hints(kind)
        found = [f"{where}: missing {key!r}" for key in sorted(kind.__required_keys__ - set(value))]
        found += [f"{where}: undeclared key {key!r}" for key in sorted(set(value) - set(hints))]
        for key in sorted(set(value) & set(hints)):
            found += problems(value[key], hints[key], f"{where}.{key}")
        return found
    origin, args = get_origin(kind), get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return []
        tries = [problems(value, arg, where) for arg in args if arg is not type(None)]
        return [] if any(not found for found in tries) else min(tries, key=len)
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__}, not a list"]
        return [p for i, item in enumerate(value) for p in problems(item, args[0], f"{where}[{i}]")]
    if origin is dict:
        return [] if isinstance(value, dict) else [f"{where}: {type(value).__name__}, not a dict"]
    accepted = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}[kind]
    if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return []
    return [f"{where}: {value!r} is not {kind.__name__}"]


def shape(kind: Any, stop: Mapping[Any, Any] = MappingProxyType({})) -> dict[str, dict[str, str]]:
    """Every TypedDict reachable from ``kind``, with each key's type (``?``: may be absent).
    A type in ``stop`` extends its value, a type versioned apart: only the keys it adds count."""
    out: dict[str, dict[str, str]] = {}

    def visit(t: Any) -> None:
        if is_typeddict(t):
            if t.__name__ in out:
                return
            hints = get_type_hints(t)
            if t in stop:
                apart = get_type_hints(stop[t])
                hints = {k: v for k, v in hints.items() if k not in apart}
            out[t.__name__] = {
                key: _name(hint) + ("" if key in t.__required_keys__ else "?")
                for key, hint in sorted(hints.items())
            }
            if t in stop:
                return
            for hint in hints.values():
                visit(hint)
        for arg in get_args(t):
            visit(arg)

    visit(kind)
    return out


def _name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("flockctl.schema.", "").replace("typing.", "")


def fingerprint(kind: Any, stop: Mapping[Any, Any] = MappingProxyType({})) -> str:
    text = json.dumps(shape(kind, stop), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# The snapshot relays an engine's stats, which have their own version: only what the daemon adds
# to them (``EngineView``'s own keys) counts toward the snapshot's shape.
SNAPSHOT_STOP = MappingProxyType({EngineView: EngineStats})


def test_each_shape_is_recorded_under_its_version() -> None:
    for name, shapes, version, kind, stop, own in (
        ("SNAPSHOT", SNAPSHOT_SHAPES, SNAPSHOT_SCHEMA_VERSION, StatusSnapshot, SNAPSHOT_STOP, True),
        ("STATS", STATS_SHAPES, STATS_SCHEMA_VERSION, EngineStats, MappingProxyType({}), True),
        # the encoder's stats follow the other engine's version: a bump may leave them as they were
        ("STATS", ENCODER_STATS_SHAPES, STATS_SCHEMA_VERSION, EncoderStats, MappingProxyType({}),
         False),
    ):  # fmt: skip
        assert max(shapes) == version, f"{name}_SCHEMA_VERSION is {version}; record its shape"
        if own:
            assert len(set(shapes.values())) == len(shapes), f"two {name} versions with one shape"
        now = fingerprint(kind, stop)
        assert shapes[version] == now, (
            f"the declared {name.lower()} shape changed (fingerprint {now}): bump"
            f" {name}_SCHEMA_VERSION in flockctl/schema.py and record {now} under it here,"
            f" keeping the old lines. The shape now: {json.dumps(shape(kind, stop))}"
        )


def test_the_checker_finds_a_missing_an_undeclared_and_a_wrong_key() -> None:
    chunk: dict[str, Any] = {"target": "daemon", "offset": 8, "lines": ["started"], "reset": False}
    assert problems(chunk, LogChunk, "logs") == []
    del chunk["reset"]
    chunk["extra"] = 1
    chunk["lines"] = ["a", 2]
    assert problems(chunk, LogChunk, "logs") == [
        "logs: missing 'reset'",
        "logs: undeclared key 'extra'",
        "logs.lines[1]: 2 is not str",
    ]
    assert problems({"soft": None, "hard": True}, schema.OpenFiles, "open_files") == [
        "open_files.hard: True is not int"
    ]


# -- the real documents ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny: Path) -> Iterator[Any]:
    """The engine conftest's ``served`` runs, here with a draft model (itself) so speculation's
    figures are in its stats."""
    from flockctl.engine.config import EngineConfig
    from flockctl.engine.loader import load_engine

    config = EngineConfig(
        model=str(tiny),
        served_model_name=TINY,
        device="cpu",
        max_batch_size=4,
        draft_models=(str(tiny),),
        spec="on",
    )
    engine = load_engine(config, progress=False)
    try:
        yield engine
    finally:
        engine.close()


@contextmanager
def loop_held(engine: Any) -> Iterator[None]:
    """Hold the engine's model loop, so a job submitted now stays live (listed by /stats) until
    the block ends."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(60)

    engine.model_loop.run_soon(hold)
    assert holding.wait(60), "the model loop never took the hold"
    try:
        yield
    finally:
        release.set()


async def test_a_real_snapshot_and_real_stats_have_the_declared_shapes(
    daemon: Any, served: str, engine: Any, http: Any
) -> None:
    from flockctl.engine.job import SamplingParams

    d = await daemon(endpoints=[served])
    await d.wait_ready(1)
    d.deployment.state_dir.mkdir(parents=True, exist_ok=True)
    (d.deployment.state_dir / "daemon.log").write_text("started\n")
    (worker,) = d.deployment.pool
    with loop_held(engine):
        handle = engine.submit(engine.tokenizer.encode("the flock"), SamplingParams(max_tokens=4))
        await until(lambda: worker.engine and worker.engine["jobs"], "the held job, pulled")
        docs: dict[str, Any] = {}
        for path in ("/-/status", f"/-/workers/{worker.id}", "/-/logs/daemon"):
            async with http.get(f"{d.url}{path}", headers=d.admin) as resp:
                assert resp.status == 200, await resp.text()
                docs[path] = await resp.json()
        async with httpx.AsyncClient(trust_env=False) as client:
            stats = (await client.get(f"{served}/stats")).json()
    async for _delta in handle:
        pass

    snap = docs["/-/status"]
    assert snap["schema"] == SNAPSHOT_SCHEMA_VERSION
    assert stats["schema_version"] == STATS_SCHEMA_VERSION
    relayed = snap["workers"][0]["engine"]
    assert relayed["jobs"] and relayed["speculation"] and relayed["jobs"][0]["speculation"]
    assert problems(snap, StatusSnapshot, "snapshot") == []
    assert problems(docs[f"/-/workers/{worker.id}"], WorkerDetail, "worker detail") == []
    assert problems(docs["/-/logs/daemon"], LogChunk, "logs") == []
    assert stats["jobs"] and problems(stats, EngineStats, "stats") == []
    # and the check would see a snapshot of another shape
    changed = {**snap, "ready": snap["ready_workers"]}
    del changed["ready_workers"]
    assert problems(changed, StatusSnapshot, "snapshot") == [
        "snapshot: missing 'ready_workers'",
        "snapshot: undeclared key 'ready'",
    ]


async def test_an_embedding_only_engines_stats_have_their_declared_shape(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from flockctl.engine.api import create_app
    from flockctl.engine.config import EngineConfig
    from flockctl.engine.loader import load_engine

    bert = build_tiny_bert(tiny, tmp_path_factory.mktemp("bert"))
    engine = load_engine(
        EngineConfig(model=str(bert), served_model_name="bert", device="cpu"), progress=False
    )
    try:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            stats = (await client.get("/stats")).json()
            detailed = (await client.get("/stats/detailed")).json()
    finally:
        engine.close()
    assert stats["schema_version"] == STATS_SCHEMA_VERSION and stats["capabilities"] == ["embed"]
    assert problems(stats, EncoderStats, "stats") == []
    assert "process_rss" in detailed and problems(detailed, EncoderStats, "stats") == []
    assert "stats: missing 'kv'" in problems(stats, EngineStats, "stats")
