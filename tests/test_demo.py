"""The offline demo model: built from the standard library, cached, shared safely, reproducible.

Every test builds a tiny recipe (a few training steps on a few hundred kilobytes) so the whole file
runs in seconds; the real recipe differs only in sizes and step counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flockctl.engine import demo  # noqa: E402
from flockctl.engine.demo import (  # noqa: E402
    DemoPaths,
    DemoRecipe,
    build,
    cache,
    command,
    ensure_demo,
)

VERSION = f"v{demo.DEMO_VERSION}"
TINY = DemoRecipe(
    text_bytes=150_000,
    heldout_bytes=8_000,
    vocab_size=512,
    seq_len=32,
    batch_size=4,
    target_hidden=32,
    target_layers=2,
    target_heads=2,
    target_intermediate=64,
    target_steps=3,
    draft_layers=1,
    draft_steps=2,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return ensure_demo(tmp_path_factory.mktemp("demo-cache"), TINY, progress=False)


def manifest(paths: DemoPaths) -> dict:
    return json.loads((paths.target.parent / "manifest.json").read_text())


def test_both_models_load_with_the_standard_auto_classes(built: DemoPaths) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.target)
    prompt = tokenizer("def main():\n    return", return_tensors="pt").input_ids
    for path in (built.target, built.draft):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.dtype == torch.float32
        assert model.config.eos_token_id == tokenizer.eos_token_id
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, prompt.shape[1] + 4)
    layers = manifest(built)["recipe"]
    target = AutoModelForCausalLM.from_pretrained(built.target)
    draft = AutoModelForCausalLM.from_pretrained(built.draft)
    assert target.config.num_hidden_layers == layers["target_layers"]
    assert draft.config.num_hidden_layers == layers["draft_layers"]


def test_draft_and_target_share_one_tokenizer(built: DemoPaths) -> None:
    from transformers import AutoTokenizer

    target = AutoTokenizer.from_pretrained(built.target)
    draft = AutoTokenizer.from_pretrained(built.draft)
    assert target.get_vocab() == draft.get_vocab()
    assert len(target) <= TINY.vocab_size
    assert (built.target / "tokenizer.json").read_bytes() == (
        built.draft / "tokenizer.json"
    ).read_bytes()


def test_chat_template_renders_a_prompt_for_the_assistant(built: DemoPaths) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.target)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a loop."},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|endoftext|><|system|>\nBe brief.\n<|user|>\nWrite a loop.\n<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids  # one token, not spelt out
    assert tokenizer.decode(ids) == text


def test_multibyte_text_round_trips(built: DemoPaths) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.target)
    for text in ("naïve 日本語 ✓", "emoji 🦙 and tabs\tand\r\nlines", "    return x  # ok"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_second_call_returns_the_cached_build(built: DemoPaths) -> None:
    marker = built.target.parent / "manifest.json"
    before = marker.stat().st_mtime_ns
    again = ensure_demo(built.target.parent.parent.parent, TINY, progress=False)
    assert again == built
    assert marker.stat().st_mtime_ns == before


def test_same_recipe_gives_identical_weights(built: DemoPaths, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    other = ensure_demo(tmp_path, TINY, progress=False)
    assert other.target != built.target
    for mine, theirs in ((built.target, other.target), (built.draft, other.draft)):
        a = load_file(mine / "model.safetensors")
        b = load_file(theirs / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (mine / "tokenizer.json").read_bytes() == (theirs / "tokenizer.json").read_bytes()


def test_manifest_records_what_was_built(built: DemoPaths) -> None:
    m = manifest(built)
    assert m["demo_version"] == demo.DEMO_VERSION
    assert m["recipe"]["seed"] == TINY.seed
    assert m["params"]["draft"] < m["params"]["target"]
    assert 0.0 <= m["draft_agreement"] <= 1.0
    assert m["text"]["train_bytes"] >= TINY.text_bytes
    assert {"torch", "transformers", "tokenizers", "python"} <= m["versions"].keys()


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    real_build = build.build_demo

    def counting_build(out: Path, recipe: DemoRecipe, *args: Any) -> None:
        builds.append(out)
        real_build(out, recipe, *args)

    monkeypatch.setattr(build, "build_demo", counting_build)
    start = threading.Barrier(2)
    results: list[DemoPaths] = []
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            results.append(ensure_demo(tmp_path, TINY, progress=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(builds) == 1
    assert results[0] == results[1]
    assert (results[0].target.parent / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [VERSION, f"{VERSION}.lock"]


def test_a_waiting_caller_reports_the_other_builds_progress(tmp_path: Path) -> None:
    import fcntl

    directory = tmp_path / "demo"
    directory.mkdir()
    (directory / f"{VERSION}.progress").write_text(
        "building demo model: target 62%, about 40 s left\n"
    )
    told: list[str] = []
    fd = os.open(directory / f"{VERSION}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is building
    waiter = threading.Thread(
        target=ensure_demo, args=(tmp_path, TINY, False), kwargs={"report": told.append}
    )
    waiter.start()
    try:
        for _ in range(1000):
            if told:
                break
            waiter.join(0.01)
        assert told[0] == "waiting for another build: demo model: target 62%, about 40 s left"
        assert waiter.is_alive()
    finally:
        os.close(fd)  # the other build ends; the waiter builds (its recipe is not cached)
    waiter.join(60)
    assert not waiter.is_alive()
    assert demo.demo_is_built(TINY, tmp_path)
    assert told[-1].startswith("building demo model: saving")
    assert not (directory / f"{VERSION}.progress").exists()


def test_failed_build_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_build(out: Path, recipe: DemoRecipe, *_: Any) -> None:
        (out / "target").mkdir()
        raise RuntimeError("killed half way")

    monkeypatch.setattr(build, "build_demo", broken_build)
    with pytest.raises(RuntimeError, match="half way"):
        ensure_demo(tmp_path, TINY, progress=False)
    assert not demo.demo_dir(tmp_path).exists()
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [f"{VERSION}.lock"]


def test_changed_recipe_or_force_rebuilds(built: DemoPaths, tmp_path: Path) -> None:
    shutil.copytree(built.target.parent.parent, tmp_path / "demo")
    paths = cache.paths_in(demo.demo_dir(tmp_path))
    marker = paths.target.parent / "manifest.json"
    first = marker.stat().st_mtime_ns
    assert ensure_demo(tmp_path, TINY, progress=False) == paths
    assert marker.stat().st_mtime_ns == first

    changed = dataclasses.replace(TINY, draft_steps=1)
    assert ensure_demo(tmp_path, changed, progress=False) == paths
    assert manifest(paths)["recipe"]["draft_steps"] == 1
    second = marker.stat().st_mtime_ns
    assert second != first

    ensure_demo(tmp_path, changed, progress=False, force=True)
    assert marker.stat().st_mtime_ns != second
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [VERSION, f"{VERSION}.lock"]


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOCKCTL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_root() == tmp_path / "home" / ".cache" / "flockctl"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_root() == tmp_path / "xdg" / "flockctl"
    monkeypatch.setenv("FLOCKCTL_CACHE", str(tmp_path / "mine"))
    assert demo.cache_root() == tmp_path / "mine"
    assert demo.demo_dir() == tmp_path / "mine" / "demo" / f"v{demo.DEMO_VERSION}"
    assert demo.demo_dir(tmp_path) == tmp_path / "demo" / f"v{demo.DEMO_VERSION}"


def test_command_prints_the_two_paths(built: DemoPaths, capsys: pytest.CaptureFixture[str]) -> None:
    root = built.target.parent.parent.parent
    assert command.build_and_report(root, TINY) == 0  # the tiny build, cached by the fixture
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"target {built.target}", f"draft {built.draft}"]
    assert "next token" in captured.err


def test_up_builds_the_demo_first_only_for_local_engine_workers_serving_it() -> None:
    from flockctl.demo_first import serves_demo
    from flockctl.server.config import DeploymentConfig

    assert serves_demo(DeploymentConfig(model="demo"))
    assert serves_demo(DeploymentConfig(model="./my-model", draft_models=["demo"]))
    assert not serves_demo(DeploymentConfig(model="./my-model"))
    assert not serves_demo(DeploymentConfig(worker_command="serve --port {port}"))
    assert not serves_demo(DeploymentConfig(endpoints=["http://127.0.0.1:9"]))
