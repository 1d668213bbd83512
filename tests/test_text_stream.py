"""Token ids -> text pieces (client/text_stream.py) with the real SmolLM2 tokenizer: no swarm, no model."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from torchnode.client.sampling import SamplingParams
from torchnode.client.text_stream import TextPiece, TextStream, text_pieces

TEXTS = [
    "Hello, world! How are you today?",
    "  leading spaces,   runs of spaces\n\ttabs and\n\nnew lines  ",
    "Café crème brûlée: naïve façade, Ærøskøbing, São Paulo, e\u0301 (combining)",
    "I love 🍕 and 🎉🎉! Family: 👩\u200d👩\u200d👧\u200d👦, flags 🇫🇷🇯🇵, skin 👍🏽",
    "日本語のテキストと中文字符，한국어 문장, Ελληνικά, русский текст, עברית, العربية",
    "def f(x):\n    return x ** 2  # code, with symbols: {}[]<>|\\~`",
    "1234567890 3.14159 -42 1e-5 0x1F",
]


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return AutoTokenizer.from_pretrained(default_checkpoint.path)


def decode_in_pieces(tokenizer, ids: list[int], stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in ids]
    return [*pieces, stream.flush()], stream


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_whole_decode(tokenizer, text):
    ids = encode(tokenizer, text)
    pieces, _ = decode_in_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)  # incomplete characters are held back, never sent


def test_multibyte_characters_wait_for_their_last_token(tokenizer):
    ids = encode(tokenizer, "🍕")
    assert len(ids) > 1  # one character, several byte tokens
    stream = TextStream(tokenizer)
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🍕"]


def test_special_tokens_are_skipped(tokenizer):
    special = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [special[0], *encode(tokenizer, "Hi there"), special[1], *encode(tokenizer, " again"), special[1]]
    pieces, _ = decode_in_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == "Hi there again"
    stream = TextStream(tokenizer, skip_special_tokens=False)
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tokenizer.decode(ids)


def test_an_incomplete_character_at_the_end_comes_out_on_flush(tokenizer):
    ids = encode(tokenizer, "ok 🍕")[:-1]
    pieces, _ = decode_in_pieces(tokenizer, ids)
    assert pieces[-1].endswith("\ufffd") and "".join(pieces) == tokenizer.decode(ids)


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("The quick brown fox jumps over the lazy dog", ["own fo"], "The quick br"),  # across token boundaries
        ("The quick brown fox jumps over the lazy dog", ["lazy", "quick"], "The "),  # the earliest stop wins
        ("The quick brown fox", ["The"], ""),
        ("I love 🍕 and 🎉!", ["🎉"], "I love 🍕 and "),  # a stop made of byte tokens
        ("Café crème brûlée", ["ème b"], "Café cr"),
        ("The quick brown fox", ["fox!"], "The quick brown fox"),  # a stop's start, held, then flushed
        ("The quick brown fox", ["cat"], "The quick brown fox"),
    ],
)
def test_stop_strings_end_the_text_and_are_left_out(tokenizer, text, stop, expected):
    pieces, stream = decode_in_pieces(tokenizer, encode(tokenizer, text), stop)
    assert "".join(pieces) == expected
    assert stream.stopped == (expected != text)
    if stream.stopped:
        assert stream.push(encode(tokenizer, " more")[0]) == stream.flush() == ""  # nothing after a stop


def test_text_that_may_start_a_stop_is_held_back(tokenizer):
    stream = TextStream(tokenizer, ["brown fox"])
    out = "".join(stream.push(i) for i in encode(tokenizer, "The quick brown"))
    assert out == "The quick " and not stream.stopped
    out += "".join(stream.push(i) for i in encode(tokenizer, " cow"))
    assert out + stream.flush() == "The quick brown cow"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_token_ids_decode_alike_in_pieces(tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    pieces, _ = decode_in_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60), data=st.data())
def test_any_text_with_a_stop_string_from_it(tokenizer, text, data):
    ids = encode(tokenizer, text)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    pieces, _ = decode_in_pieces(tokenizer, ids)
    assert "".join(pieces) == whole
    if whole:
        start = data.draw(st.integers(0, len(whole) - 1))
        stop = whole[start : data.draw(st.integers(start + 1, min(len(whole), start + 6)))]
        pieces, stream = decode_in_pieces(tokenizer, ids, [stop])
        assert "".join(pieces) == whole[: whole.index(stop)] and stream.stopped


class CountingTokenizer:
    """The tokenizer, counting the ids each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def test_decoding_cost_grows_linearly_with_length(tokenizer):
    text = " ".join(TEXTS) * 8

    def decoded_per_token(n: int) -> float:
        counting = CountingTokenizer(tokenizer)
        pieces, _ = decode_in_pieces(counting, encode(tokenizer, text)[:n], ["never in the text"])
        assert "".join(pieces) == tokenizer.decode(encode(tokenizer, text)[:n])
        return counting.decoded / n

    short, long = decoded_per_token(200), decoded_per_token(1600)
    assert long < 8 and long < 1.5 * short  # a whole-sequence decode per token would be ~800 per token


# ---- text_pieces: the generation iterator, finish reasons and token counts


def scripted(tokenizer, script: list[int]):
    """Stands in for generate_ids: the scripted ids, ending after EOS unless ignore_eos, as generate_ids does."""

    async def new_ids(params: SamplingParams):
        for token in script[: params.max_new_tokens]:
            yield torch.tensor([token])
            if token == tokenizer.eos_token_id and not params.ignore_eos:
                return

    return new_ids


def run(tokenizer, script: list[int], params: SamplingParams) -> list[TextPiece]:
    async def collect() -> list[TextPiece]:
        new_ids = scripted(tokenizer, script)(params)
        return [p async for p in text_pieces(tokenizer, new_ids, params, [tokenizer.eos_token_id])]

    return asyncio.run(collect())


@pytest.mark.parametrize("case", ["eos", "eos at max_tokens", "max_tokens", "stop string", "ignore_eos", "zero"])
def test_finish_reason_and_token_count(tokenizer, case):
    eos = tokenizer.eos_token_id
    words = encode(tokenizer, "Hello world")
    script = words + (
        [eos] * 3 if case in ("eos", "eos at max_tokens", "ignore_eos") else encode(tokenizer, " dog") * 10
    )
    stop = ("lo w",) if case == "stop string" else ()
    max_tokens = {"eos at max_tokens": len(words), "zero": 0}.get(case, 10)
    finish, count = {
        "eos": ("stop", len(words) + 1),
        "eos at max_tokens": ("length", len(words)),
        "max_tokens": ("length", 10),
        "stop string": ("stop", next(k for k in range(len(script)) if "lo w" in tokenizer.decode(script[:k]))),
        "ignore_eos": ("length", len(words) + 3),
        "zero": ("length", 0),
    }[case]
    params = SamplingParams(max_new_tokens=max_tokens, stop=stop, ignore_eos=case == "ignore_eos")
    out = run(tokenizer, script, params)
    assert out[-1].finish_reason == finish and all(p.finish_reason is None and p.text for p in out[:-1])
    assert out[-1].tokens == count and [p.tokens for p in out] == sorted(p.tokens for p in out)
    full = tokenizer.decode(script[:count], skip_special_tokens=True)
    assert "".join(p.text for p in out) == (full[: full.index(stop[0])] if stop else full)


def test_closing_the_pieces_closes_the_ids_before_and_after_they_start(tokenizer):
    closed = []

    async def new_ids():
        try:
            for token in encode(tokenizer, "one two three four"):
                yield torch.tensor([token])
        finally:
            closed.append(True)

    async def main() -> None:
        params = SamplingParams(max_new_tokens=10)
        pieces = text_pieces(tokenizer, new_ids(), params, [])
        assert (await anext(pieces)).text == "one"
        await pieces.aclose()  # a client leaving: the session under the ids must close now
        assert closed == [True]
        zero = text_pieces(tokenizer, new_ids(), SamplingParams(max_new_tokens=0), [])
        assert [p async for p in zero] == [TextPiece("", "length", 0)]  # never started: no session opened

    asyncio.run(main())
    assert closed == [True]
