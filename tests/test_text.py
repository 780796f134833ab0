"""TextStream: streamed pieces join to what a one-shot decode gives, and stop strings cut cleanly.

Both tokenizers are trained here on a few KB of text: a byte-level BPE (GPT-2 style, where one
character can span several tokens) and a SentencePiece-style one (Metaspace with byte fallback,
where a token's leading space depends on what comes before it).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flockctl.engine.text import TextStream

VOCABULARY = (
    "the quick brown fox jumps over a lazy dog while naïve café owners serve crème brûlée "
    "日本語 の テキスト ✓ done 🎉 party Straße über señor привет мир 数据 模型 👍🏽 résumé "
    "hello world stop here please"
)
WORDS = VOCABULARY.split()
# Never in the training text, so both tokenizers spell them with single bytes.
UNSEEN = ("🦙", "数据", "🎉")


def corpus(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    return "\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".!?,")
        for _ in range(lines)
    )


def without_unseen(text: str) -> str:
    for s in UNSEEN:
        text = text.replace(s, "")
    return text


@pytest.fixture(scope="session")
def byte_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    tok.train_from_iterator([without_unseen(corpus(0, 300))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([without_unseen(corpus(0, 300))], trainer)
    # Byte fallback as in Llama's tokenizer: unknown characters become <0xNN> tokens.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def decode(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int], skip: bool = True) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(
    tokenizer: object,
    ids: Sequence[int],
    rng: random.Random | None = None,
    **kwargs: object,
) -> tuple[list[str], TextStream]:
    """Push ``ids`` one at a time (or in random chunks of 1-3); the last piece is finish()'s."""
    ts = TextStream(tokenizer, **kwargs)  # type: ignore[arg-type]
    pieces: list[str] = []
    i = 0
    while i < len(ids):
        n = rng.randint(1, 3) if rng else 1
        pieces.append(ts.push(ids[i : i + n]))
        i += n
    pieces.append(ts.finish())
    return pieces, ts


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# --- pieces join to the one-shot decode ------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_join_to_full_decode(byte_bpe: PreTrainedTokenizerFast, skip: bool) -> None:
    # Any ids at all: special tokens, lone bytes, characters cut anywhere, invalid UTF-8.
    rng = random.Random(1234)
    vocab = len(byte_bpe)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 48))]
        pieces, ts = stream(byte_bpe, ids, rng, skip_special_tokens=skip)
        assert "".join(pieces) == decode(byte_bpe, ids, skip)
        assert ts.text == "".join(pieces)
        assert not ts.stopped


@pytest.mark.parametrize("name", ["byte_bpe", "metaspace"])
def test_valid_text_never_shows_half_characters(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(7)
    for n in range(120):
        # Unseen characters side by side make long runs of byte tokens, with windows starting
        # at every offset inside them.
        run = "".join(rng.choices(UNSEEN, k=rng.randint(2, 8)))
        text = corpus(100 + n, rng.randint(1, 4)) + " " + run + " " + corpus(n, 1)
        ids = encode(tokenizer, text)
        pieces, _ = stream(tokenizer, ids, rng if n % 2 else None)
        assert "".join(pieces) == decode(tokenizer, ids)
        assert not any("\ufffd" in p for p in pieces), pieces


@pytest.mark.parametrize("name", ["byte_bpe", "metaspace"])
def test_character_split_over_tokens_arrives_whole(
    name: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(name)
    ids = encode(tokenizer, "ok 🦙 ok")
    # The emoji really is spread over tokens that decode to U+FFFD on their own.
    assert sum("\ufffd" in decode(tokenizer, [i]) for i in ids) >= 2
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == "ok 🦙 ok"
    assert not any("\ufffd" in p for p in pieces)
    # It comes out with the token that completes it, not later.
    completing = next(n for n in range(len(ids)) if "🦙" in decode(tokenizer, ids[: n + 1]))
    assert "🦙" in pieces[completing]


def test_sentencepiece_spaces_follow_context(metaspace: PreTrainedTokenizerFast) -> None:
    ids = encode(metaspace, "the quick brown fox jumps over the lazy dog " * 3)
    # Token by token decoding loses the spaces: the stream must not.
    assert "".join(decode(metaspace, [i]) for i in ids) != decode(metaspace, ids)
    rng = random.Random(3)
    for n in range(100):
        ids = encode(metaspace, corpus(200 + n, rng.randint(1, 5)))
        pieces, _ = stream(metaspace, ids, rng)
        assert "".join(pieces) == decode(metaspace, ids)


@pytest.mark.parametrize("name", ["byte_bpe", "metaspace"])
def test_prompt_gives_context(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(11)
    for n in range(60):
        prompt = encode(tokenizer, corpus(300 + n, 1))[: rng.randint(1, 20)]
        if "\ufffd" in decode(tokenizer, prompt):
            continue  # a prompt cut inside a character: see the test below
        output = encode(tokenizer, corpus(400 + n, 2))
        pieces, _ = stream(tokenizer, output, rng, prompt_ids=prompt)
        whole = decode(tokenizer, prompt + output)
        assert "".join(pieces) == whole[len(decode(tokenizer, prompt)) :]


def test_prompt_context_keeps_the_leading_space(metaspace: PreTrainedTokenizerFast) -> None:
    prompt, output = encode(metaspace, "the quick"), encode(metaspace, "brown fox")
    with_prompt, _ = stream(metaspace, output, prompt_ids=prompt)
    alone, _ = stream(metaspace, output)
    assert "".join(with_prompt) == " brown fox"
    assert "".join(alone) == "brown fox"


def test_prompt_ending_inside_a_character_is_no_context(
    byte_bpe: PreTrainedTokenizerFast,
) -> None:
    ids = encode(byte_bpe, "ok 🦙")
    prompt, output = ids[:-1], ids[-1:] + encode(byte_bpe, " done")
    pieces, _ = stream(byte_bpe, output, prompt_ids=prompt)
    assert "".join(pieces) == decode(byte_bpe, output)


def test_decode_overrides_are_honoured(byte_bpe: PreTrainedTokenizerFast) -> None:
    # A tokenizer class with its own decoding must be called, not bypassed for speed.
    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids: list[int], **kwargs: object) -> str:  # type: ignore[override]
            return super()._decode(token_ids, **kwargs).upper()

    shouting = Shouting(tokenizer_object=byte_bpe.backend_tokenizer)
    ids = encode(byte_bpe, "hello naïve world")
    assert "".join(stream(shouting, ids)[0]) == "HELLO NAÏVE WORLD"
    # A bare tokenizers.Tokenizer works too.
    assert "".join(stream(byte_bpe.backend_tokenizer, ids)[0]) == "hello naïve world"


def test_push_after_finish_is_an_error(byte_bpe: PreTrainedTokenizerFast) -> None:
    ts = TextStream(byte_bpe)
    ts.push(encode(byte_bpe, "hi"))
    ts.finish()
    assert ts.finish() == ""
    with pytest.raises(RuntimeError, match="after finish"):
        ts.push([1])


# --- stop strings ----------------------------------------------------------------------------


def test_stop_string_across_pieces(byte_bpe: PreTrainedTokenizerFast) -> None:
    ids = encode(byte_bpe, "hello world, stop here please and more")
    assert not any("stop here" in decode(byte_bpe, [i]) for i in ids)
    pieces, ts = stream(byte_bpe, ids, stop=("stop here",))
    assert "".join(pieces) == "hello world, "
    assert ts.text == "hello world, "
    assert ts.stopped


def test_stop_at_the_very_start(byte_bpe: PreTrainedTokenizerFast) -> None:
    pieces, ts = stream(byte_bpe, encode(byte_bpe, "hello world"), stop=("hel",))
    assert pieces == [""] * len(pieces)
    assert ts.stopped
    assert ts.text == ""


def test_first_stop_to_appear_wins(byte_bpe: PreTrainedTokenizerFast) -> None:
    ids = encode(byte_bpe, "the quick brown fox jumps")
    # "brown fox" starts first but "n fo" is complete before it is.
    for stops in [("brown fox", "n fo", "jumps"), ("jumps", "n fo", "brown fox")]:
        pieces, ts = stream(byte_bpe, ids, stop=stops)
        assert "".join(pieces) == "the quick brow"
        assert ts.stopped
    pieces, _ = stream(byte_bpe, ids, stop=("jumps", "quick"))
    assert "".join(pieces) == "the "


def test_nothing_is_returned_after_a_stop(byte_bpe: PreTrainedTokenizerFast) -> None:
    ts = TextStream(byte_bpe, stop=("fox",))
    out = [ts.push([i]) for i in encode(byte_bpe, "the quick brown fox jumps over")]
    assert ts.stopped
    assert "".join(out) == "the quick brown "
    assert ts.push(encode(byte_bpe, " more text")) == ""
    assert ts.finish() == ""
    assert ts.text == "the quick brown "


def test_held_tail_released_at_finish(byte_bpe: PreTrainedTokenizerFast) -> None:
    ts = TextStream(byte_bpe, stop=("world!",))
    pushed = "".join(ts.push([i]) for i in encode(byte_bpe, "I say hello wor"))
    assert pushed == "I say hello "  # "wor" may become "world!"
    assert ts.finish() == "wor"
    assert ts.text == "I say hello wor"
    assert not ts.stopped


def test_stop_strings_match_what_a_search_finds(byte_bpe: PreTrainedTokenizerFast) -> None:
    rng = random.Random(99)
    for n in range(300):
        ids = encode(byte_bpe, corpus(500 + n, 2))
        text = decode(byte_bpe, ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 6)])
        stops.append("never there ✗")
        ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
        expected = text[: min(ends)[1]] if ends else text

        ts = TextStream(byte_bpe, stop=tuple(stops))
        pieces: list[str] = []
        i = 0
        while i < len(ids):
            k = rng.randint(1, 3)
            before = ts.stopped
            pieces.append(ts.push(ids[i : i + k]))
            if before:
                assert pieces[-1] == ""
            held = decode(byte_bpe, ids[: i + k])[len(ts.text) :]
            if not ts.stopped and "\ufffd" not in held:
                # Only a tail that could still become a stop string is held back.
                assert not held or any(s.startswith(held) for s in stops), (held, stops)
            i += k
        pieces.append(ts.finish())
        assert "".join(pieces) == expected, stops
        assert ts.stopped == bool(ends)


# --- control characters ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["byte_bpe", "metaspace"])
def test_a_control_character_never_is_a_piece_of_its_own(
    name: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(name)
    text = "hello\x07 world\x0c\x1b done"
    ids = encode(tokenizer, text)
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == decode(tokenizer, ids)
    shown = [p for p in pieces if p]
    assert all(any(c.isprintable() or c in "\t\n\r" for c in p) for p in shown), shown
    # and each one still reaches the client, escaped as JSON requires
    assert "\\u0007" in json.dumps("".join(shown))


def test_output_of_only_control_characters_arrives_at_finish(
    byte_bpe: PreTrainedTokenizerFast,
) -> None:
    ids = encode(byte_bpe, "\x07\x07")
    pieces, _ = stream(byte_bpe, ids)
    assert pieces[:-1] == [""] * (len(pieces) - 1)
    assert pieces[-1] == "\x07\x07"
