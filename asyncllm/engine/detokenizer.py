"""Incremental detokenization with stop strings.

Text is produced token by token and never holds half of a multi-byte character. Byte-level BPE tokenizers
(GPT-2 style: Llama 3, Qwen, SmolLM2, ...) decode through a table of each token's bytes and Python's incremental
UTF-8 decoder, which is what their decoder does in one call (about 0.3 us a token, and it never releases the
GIL mid-step); others go through the tokenizers library's DecodeStream. Text that could still become the start of
a stop string is held back until it cannot, so a stop string spanning several tokens never leaks. Concatenated
deltas always equal `text`.
"""
from __future__ import annotations

import codecs
import weakref
from typing import Any, Protocol

from tokenizers import decoders
from tokenizers.decoders import DecodeStream

from asyncllm.sampling_params import SamplingParams

PROMPT_CONTEXT = 8  # prompt tokens given to DecodeStream so the first output token gets its leading space right


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: the character standing for each byte (printable bytes stand for themselves,
    the rest are shifted past 255), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = {b: b for b in printable}
    shifted = 256
    for b in range(256):
        if b not in chars:
            chars[b] = shifted
            shifted += 1
    return {chr(c): b for b, c in chars.items()}


class TokenDecoder:
    """One tokenizer's token -> text machinery, shared by all its requests (`token_decoder(tokenizer)`)."""

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError("streaming needs a fast (tokenizers-backed) tokenizer")
        self.backend = backend
        self.byte_level = type(backend.decoder) is decoders.ByteLevel
        self._tables: dict[bool, tuple[list[bytes], list[str | None]]] = {}

    def table(self, skip_special_tokens: bool) -> tuple[list[bytes], list[str | None]]:
        """Each token id's bytes, as the ByteLevel decoder maps them (a token with a character outside the
        alphabet, e.g. an added token, stands for its own UTF-8; b"" for skipped special tokens and holes), and
        its text when those bytes are whole UTF-8 characters on their own (else None)."""
        if skip_special_tokens not in self._tables:
            alphabet = _byte_level_alphabet()
            special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
            raw: list[bytes] = []
            for i in range(self.backend.get_vocab_size(with_added_tokens=True)):
                token = self.backend.id_to_token(i)
                if token is None or (skip_special_tokens and i in special):
                    raw.append(b"")
                    continue
                try:
                    raw.append(bytes(alphabet[c] for c in token))
                except KeyError:
                    raw.append(token.encode())
            self._tables[skip_special_tokens] = (raw, [_whole_text(b) for b in raw])
        return self._tables[skip_special_tokens]

    def warm_up(self) -> None:
        """Build the byte tables now (~0.1 s for a 150k vocabulary) rather than inside the first request."""
        if self.byte_level:
            self.table(True)
            self.table(False)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes on its own (special tokens included; b"" outside the vocabulary)."""
        if self.byte_level:
            raw = self.table(False)[0]
            return raw[token_id] if 0 <= token_id < len(raw) else b""
        return self.backend.decode([token_id], skip_special_tokens=False).encode()

    def stream(self, prompt_token_ids: list[int], skip_special_tokens: bool) -> "TextStream":
        if self.byte_level:
            return _ByteLevelStream(*self.table(skip_special_tokens))
        return _DecodeStream(self.backend, prompt_token_ids, skip_special_tokens)


def _whole_text(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


class TextStream(Protocol):
    def step(self, token_id: int) -> str:
        """The new text that `token_id` completes (possibly "")."""

    def flush(self) -> str:
        """The end of the output: text still held (an incomplete character becomes U+FFFD, as in `decode`)."""


class _ByteLevelStream:
    __slots__ = ("raw", "text", "held")

    def __init__(self, raw: list[bytes], text: list[str | None]) -> None:
        self.raw, self.text = raw, text
        self.held = b""  # the start of a character whose other bytes are still to come

    def step(self, token_id: int) -> str:
        if token_id >= len(self.raw):
            return ""
        if not self.held and (whole := self.text[token_id]) is not None:
            return whole  # the usual case: a token of whole characters
        data = self.held + self.raw[token_id]
        out, used = codecs.utf_8_decode(data, "replace", False)  # invalid bytes become U+FFFD, as in `decode`
        self.held = data[used:]
        return out

    def flush(self) -> str:
        out, self.held = codecs.utf_8_decode(self.held, "replace", True)[0], b""
        return out


class _DecodeStream:
    def __init__(self, backend: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.backend = backend
        self.ds = DecodeStream(ids=list(prompt_token_ids[-PROMPT_CONTEXT:]), skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self.ds.step(self.backend, token_id) or ""

    def flush(self) -> str:
        return ""


_decoders: "weakref.WeakKeyDictionary[Any, TokenDecoder]" = weakref.WeakKeyDictionary()


def token_decoder(tokenizer: Any) -> TokenDecoder:
    """The TokenDecoder of `tokenizer`, made once (its byte table costs ~0.1 s for a 150k vocabulary)."""
    decoder = _decoders.get(tokenizer)
    if decoder is None:
        decoder = _decoders[tokenizer] = TokenDecoder(tokenizer)
    return decoder


# characters kept in IncrementalDetokenizer's tail string before its head moves into the list of parts (the tail is
# copied once per token; the whole text never is)
TAIL_CHARS = 4096


class IncrementalDetokenizer:
    """One request's output text, token by token, cut at its first stop string. Linear in the output's length: the
    text is a list of parts plus a short tail string (never one string copied per token); a stop string is looked
    for only where it can end, in the new piece, starting at most `hold` characters before it."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._stream = token_decoder(tokenizer).stream(prompt_token_ids, params.skip_special_tokens)
        self._stops = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        # characters at the end that could still start a stop string: never handed out before the next piece
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        # Invariant: text = "".join(_taken) + "".join(_parts) + _tail; `take` has handed out exactly _taken; _tail
        # holds at least the last `_hold` characters of the text (all of it when it is shorter).
        self._taken: list[str] = []
        self._parts: list[str] = []
        self._tail = ""
        self.stopped = False  # a stop string matched

    @property
    def text(self) -> str:
        """All output text so far, cut at a stop string once one matched (joined on each call)."""
        return "".join(self._taken) + "".join(self._parts) + self._tail

    def push(self, token_id: int) -> bool:
        """Add one token; True when a stop string matched (the text is cut and no more tokens count)."""
        if self.stopped:
            return True
        piece = self._stream.step(token_id)
        if not piece:
            return False
        search_from = max(0, len(self._tail) - self._hold)  # a new match must end inside the new piece
        tail = self._tail + piece
        if self._stops:
            hits = [(i, s) for s in self._stops if (i := tail.find(s, search_from)) >= 0]
            if hits:
                i, s = min(hits)
                tail = tail[: i + len(s) if self._include_stop else i]
                self.stopped = True
        if len(tail) > TAIL_CHARS + self._hold:  # the head moves into the parts; the last `hold` characters stay
            cut = len(tail) - self._hold
            self._parts.append(tail[:cut])
            tail = tail[cut:]
        self._tail = tail
        return self.stopped

    @property
    def idle(self) -> bool:
        """No stop strings and everything taken: `push_take` hands out each token's text at once."""
        return not (self._stops or self._tail or self._parts)

    def push_take(self, token_id: int) -> str | None:
        """`push` then `take(False)` in one while `idle`: the token's new text (possibly ""). None, having done
        nothing, when not idle (the caller pushes the token the usual way)."""
        if self._stops or self._tail or self._parts:
            return None
        piece = self._stream.step(token_id)
        if piece:
            self._taken.append(piece)
        return piece

    def finish(self) -> str:
        """The output ended: add what the decoder still holds (no stop string is looked for in it). Returns
        `text`."""
        self._flush()
        return self.text

    def _flush(self) -> None:
        if not self.stopped:
            self._tail += self._stream.flush()

    def take(self, final: bool) -> str:
        """The text not handed out yet, minus what could still start a stop string unless `final`."""
        if final:
            self._flush()
        pending = self._tail
        if self._parts:
            pending, self._parts = "".join(self._parts) + pending, []
        if final or self.stopped or not self._hold:  # nothing held back (always so without stop strings)
            delta, self._tail = pending, ""
        else:
            n = max(0, len(pending) - self._hold)
            delta, self._tail = pending[:n], pending[n:]
        if delta:
            self._taken.append(delta)
        return delta
