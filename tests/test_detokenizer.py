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
