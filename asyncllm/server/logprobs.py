"""Log-probabilities in OpenAI's shapes: chat (`logprobs.content`: token, logprob, bytes, top_logprobs) and
completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

A token's string is its own text; a token that is only part of a UTF-8 character is written "bytes:\\xNN..."
(its `bytes` are exact either way). Without a tokenizer tokens are written "token_id:N".
"""
from __future__ import annotations

from typing import Any

from asyncllm.engine.detokenizer import token_decoder
from asyncllm.outputs import Logprob


class LogprobFormatter:
    """One per server: token strings are cached (the same few thousand tokens come back again and again)."""

    def __init__(self, tokenizer: Any) -> None:
        self.decoder = token_decoder(tokenizer) if tokenizer is not None else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """(the token's string, its bytes)."""
        hit = self._cache.get(token_id)
        if hit is None:
            if self.decoder is None:
                hit = f"token_id:{token_id}", []
            else:
                data = self.decoder.token_bytes(token_id)
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
                hit = text, list(data)
            if len(self._cache) < 1 << 18:
                self._cache[token_id] = hit
        return hit

    def chat(self, logprobs: list[Logprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text, data = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": data}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs], "refusal": None}

    def completion(self, logprobs: list[Logprob | None], offset: int) -> tuple[dict[str, Any], int]:
        """The `logprobs` object of a completion choice whose first token starts at character `offset` of the
        choice's text; returns it and the offset after its last token. top_logprobs holds the top k and the
        token itself (as OpenAI's legacy API and vLLM); the prompt's first token has none (null)."""
        tokens, values, tops, offsets = [], [], [], []
        for lp in logprobs:
            if lp is None:  # the first prompt token: nothing predicts it
                continue
            text = self.token(lp.token_id)[0]
            tokens.append(text)
            values.append(lp.logprob)
            top = {self.token(t)[0]: v for t, v in lp.top}
            top.setdefault(text, lp.logprob)
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset

    def prompt_completion(self, prompt_ids: list[int], logprobs: list[Logprob | None]) -> tuple[dict[str, Any], int]:
        """Echo: the prompt's tokens, the first with null log-probabilities."""
        first = self.token(prompt_ids[0])[0]
        rest, end = self.completion(logprobs[1:], len(first))
        return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
                "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}, end
