"""Incremental detokenization with stop strings.

Text is produced token by token by the tokenizers library's DecodeStream, which never yields half of a multi-byte
character. Text that could still become the start of a stop string is held back until it cannot, so a stop string
spanning several tokens never leaks. Concatenated deltas always equal `text`.
"""
from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from asyncllm.sampling_params import SamplingParams

PROMPT_CONTEXT = 8  # prompt tokens given to the decoder so the first output token gets its leading space right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError("streaming needs a fast (tokenizers-backed) tokenizer")
        self._backend = backend
        self._stream = DecodeStream(ids=list(prompt_token_ids[-PROMPT_CONTEXT:]),
                                    skip_special_tokens=params.skip_special_tokens)
        self._stops = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""  # all output text so far, cut at a stop string once one matched
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string matched

    def push(self, token_id: int) -> bool:
        """Add one token; True when a stop string matched (the text is cut and no more tokens count)."""
        if self.stopped:
            return True
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return False
        search_from = max(0, len(self.text) - self._hold)  # a new match must end inside the new piece
        self.text += piece
        if self._stops:
            hits = [(i, s) for s in self._stops if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s) if self._include_stop else i]
                self.stopped = True
        return self.stopped

    def take(self, final: bool) -> str:
        """The text not handed out yet, minus what could still start a stop string unless `final`."""
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
