"""Streamed text equals the tokenizer's own decode, token by token, on both detokenization paths."""
from __future__ import annotations

import random

import pytest

from asyncllm.engine.detokenizer import IncrementalDetokenizer, TokenDecoder, token_decoder
from asyncllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def streamed(tok, ids: list[int], skip: bool) -> str:
    detok = IncrementalDetokenizer(tok, [1, 2, 3], SamplingParams(skip_special_tokens=skip))
    parts = []
    for t in ids:
        detok.push(t)
        parts.append(detok.take(final=False))
    parts.append(detok.take(final=True))
    return "".join(parts)


def test_byte_level_table_equals_decode_on_random_ids(tok):
    """Random ids: special tokens, tokens holding part of a character, invalid UTF-8, a character cut at the end."""
    decoder = token_decoder(tok)
    assert decoder.byte_level and token_decoder(tok) is decoder  # made once per tokenizer
    raw, whole = decoder.table(True)
    partial = [i for i, b in enumerate(raw) if b and whole[i] is None]
    special = [i for i, t in decoder.backend.get_added_tokens_decoder().items() if t.special]
    assert partial and special
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(partial) if (r := rng.random()) < 0.3 else rng.choice(special) if r < 0.35
               else rng.randrange(len(raw)) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            assert streamed(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip), ids


def test_ids_past_the_tokenizer_are_empty(tok):
    """A model vocabulary padded past the tokenizer's: those ids decode to nothing, as in `decode`."""
    n = len(token_decoder(tok).table(True)[0])
    assert streamed(tok, [n, n + 5, 28, n + 1], True) == tok.decode([28])


def test_decode_stream_path_for_other_tokenizers(tok, monkeypatch):
    """Tokenizers without a byte-level decoder stream through DecodeStream: same text for real text."""
    monkeypatch.setattr(TokenDecoder, "__init__", _without_byte_level(TokenDecoder.__init__))
    from asyncllm.engine import detokenizer

    monkeypatch.setattr(detokenizer, "_decoders", detokenizer.weakref.WeakKeyDictionary())
    assert not token_decoder(tok).byte_level
    text = "Héllo wörld — 日本語のテキスト 🎉 naïve café"
    ids = tok.encode(text)
    assert streamed(tok, ids, True) == text


def _without_byte_level(init):
    def patched(self, tokenizer):
        init(self, tokenizer)
        self.byte_level = False

    return patched


class _QuadraticDetokenizer:
    """The plain model of IncrementalDetokenizer's contract: the whole text kept in one string, a stop string looked
    for where it can end, take() hands out all but the last `hold` characters."""

    def __init__(self, pieces, stops: list[str], include: bool) -> None:
        self.pieces, self.stops, self.include = pieces, stops, include
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, piece: str) -> bool:
        if self.stopped or not piece:
            return self.stopped
        search_from = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            i, s = min(hits)
            self.text, self.stopped = self.text[: i + len(s) if self.include else i], True
        return self.stopped

    def take(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta


@pytest.mark.parametrize("tail_chars", [1, 7, 4096])
def test_linear_text_equals_the_plain_model_on_random_streams(tok, monkeypatch, tail_chars):
    """Random ids, stop strings (cut from the text itself, so they hit, or not), takes at random moments, push_take
    at random while idle (push and take in one), the tail spilled into parts often (small TAIL_CHARS): the same stops, deltas
    and final text as the plain model."""
    from asyncllm.engine import detokenizer

    monkeypatch.setattr(detokenizer, "TAIL_CHARS", tail_chars)
    rng = random.Random(tail_chars)
    vocab = [i for i in range(200, 3000)] + tok.encode("日本語のテキスト 🎉 — naïve")
    for _ in range(200):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 120))]
        full = tok.decode(ids)
        stops = []
        for _ in range(rng.randint(0, 3)):
            a = rng.randrange(max(1, len(full)))
            stops.append(full[a : a + rng.randint(1, 8)] if rng.random() < 0.7 else "".join(rng.choice("ab日🎉 ") for _ in range(3)))
        stops = [s for s in stops if s]
        include = rng.random() < 0.5
        detok = IncrementalDetokenizer(tok, [1, 2, 3], SamplingParams(stop=stops, include_stop_str_in_output=include))
        pieces = token_decoder(tok).stream([1, 2, 3], True)
        model = _QuadraticDetokenizer(pieces, stops, include)
        got, want = [], []
        for t in ids:
            assert detok.idle == (not stops and model.emitted == len(model.text))
            if not detok.idle:
                assert detok.push_take(t) is None  # (and pushed nothing: the checks below see t once)
            elif rng.random() < 0.5:  # push and take in one (the direct path of plain streams)
                assert not model.push(pieces.step(t))
                got.append(detok.push_take(t))
                want.append(model.take(final=False))
                assert got[-1] == want[-1]
                continue
            stopped = detok.push(t)
            assert stopped == model.push(pieces.step(t))
            if stopped or rng.random() < 0.3:
                got.append(detok.take(final=stopped))
                want.append(model.take(final=stopped))
                assert got[-1] == want[-1]
            if stopped:
                break
        else:
            model.push(pieces.flush())
            assert detok.finish() == model.text
            got.append(detok.take(final=True))
            want.append(model.take(final=True))
        assert got == want and "".join(got) == model.text == detok.text, (ids, stops, include)
