"""`LLM`: the synchronous API for offline batches."""
from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from tqdm.auto import tqdm

from asyncllm.config import EngineConfig
from asyncllm.engine.core import EngineCore
from asyncllm.engine.detokenizer import IncrementalDetokenizer
from asyncllm.engine.request import Request
from asyncllm.errors import InvalidRequestError
from asyncllm.outputs import GenerateOutput
from asyncllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Prompt = str | list[int]


class LLM:
    """Offline generation: `LLM(model=None, **config).generate(prompts, sampling_params)`.

    `model=None` is the bundled SmolLM2-135M-Instruct; config keywords are the fields of EngineConfig.
    """

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.config = EngineConfig.from_kwargs(model, **config)
        self.engine = EngineCore(self.config)
        self.tokenizer = self.engine.tokenizer
        if self.engine.runner.tp.size > 1:
            if self.engine.is_follower:
                self.engine.follow()  # returns when rank 0 calls shutdown() or exits
            else:
                atexit.register(self.close)

    @property
    def is_follower(self) -> bool:
        """Under torchrun, ranks 1..N-1: the object returned once rank 0 shut down; it cannot generate."""
        return self.engine.is_follower

    def close(self) -> None:
        """Free every device buffer now (KV cache, CUDA graphs, weights) and release tensor-parallel followers;
        the LLM cannot generate afterwards. `with LLM(...) as llm:` calls it on exit. Without it, `del llm` frees
        the same (no reference cycles hold them) and followers are released at interpreter exit."""
        atexit.unregister(self.close)
        self.engine.shutdown()

    shutdown = close  # the earlier name

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerateOutput]:
        """Generate for every prompt (a string, or a list of token ids); outputs come back in prompt order."""
        if self.is_follower:
            raise RuntimeError("this LLM is a tensor-parallel follower (rank > 0): generate on rank 0")
        if self.engine.runner.closed:
            raise RuntimeError("this LLM was closed")
        if isinstance(prompts, str) or (self.engine.is_token_ids(prompts) and len(prompts)):
            prompts = [prompts]  # type: ignore[list-item]
        if isinstance(prompts, dict) or not isinstance(prompts, Iterable):  # (chat messages go through `chat`)
            raise InvalidRequestError(f"prompts must be a prompt or a list of them, not {prompts!r:.40}", "prompt")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        token_lists = [list(p) if self.engine.is_token_ids(p) else self.engine.encode(p) for p in prompts]
        # validate everything before queueing anything, so a bad prompt leaves the engine untouched
        reqs = [self.engine.make_request(ids, p) for ids, p in zip(token_lists, params)]
        # stop strings need incremental text: those requests get a detokenizer; the rest decode once at the end
        detoks = {r.request_id: d for r in reqs if (d := self.engine.detokenizer(r, always=False)) is not None}
        for req in reqs:
            self.engine.add(req)
        self._run(reqs, detoks, use_tqdm)
        return [self._output(r, detoks.get(r.request_id)) for r in reqs]

    def chat(
        self,
        conversations: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerateOutput]:
        """Like `generate`, for chat messages: the model's chat template is applied to each conversation."""
        convs = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        prompts = [self.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def encode(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.engine.encode(messages)

    def _run(self, reqs: list[Request], detoks: dict[str, IncrementalDetokenizer], use_tqdm: bool) -> None:
        bar = tqdm(total=len(reqs), desc="generate", disable=not use_tqdm, dynamic_ncols=True)
        stats = self.engine.stats
        t0, p0, g0 = time.perf_counter(), stats.prompt_tokens, stats.generation_tokens
        try:
            while self.engine.busy:
                stepped = self.engine.step()
                if detoks:  # (per token: skipped unless a request has stop strings)
                    for r in stepped:
                        detok = detoks.get(r.request_id)
                        if detok is not None and r.max_tokens and detok.push(r.token_ids[-1]):
                            self.engine.finish(r.request_id, "stop")
                if use_tqdm:  # throughput since the call started
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(
                        prefill=f"{(stats.prompt_tokens - p0) / dt:.0f}tok/s",
                        decode=f"{(stats.generation_tokens - g0) / dt:.0f}tok/s",
                        refresh=False,
                    )
                    bar.update(sum(r.finished for r in stepped))
        except BaseException:
            try:
                for r in reqs:
                    self.engine.abort(r.request_id)
            except Exception:  # the engine is already broken: the first error is the one to report
                log.exception("cleanup after a failed generate also failed")
            raise
        finally:
            bar.close()

    def _output(self, req: Request, detok: IncrementalDetokenizer | None) -> GenerateOutput:
        out = req.output_token_ids
        text = detok.finish() if detok is not None else self.engine.decode(out, req.params.skip_special_tokens)
        return GenerateOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=out,
            text=text,
            finish_reason=req.finish_reason,  # type: ignore[arg-type]
            num_cached_tokens=max(0, req.num_cached_tokens),
            logprobs=req.output_logprobs,
            prompt_logprobs=req.prompt_logprobs,
        )
