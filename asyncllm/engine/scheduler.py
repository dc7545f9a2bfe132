"""Continuous batching policy, in plain Python (no torch, no CUDA).

Each step: every running request advances (a decode token, or the next chunk of its prefill), then waiting
requests are admitted first-come first-served while the token budget, `max_num_seqs` and free KV blocks allow.
While requests decode, admission may wait up to `max_prefill_delay_steps` steps for the waiting prompts to fill
half of what is left of the step's budget: a step that prefills costs more than a decode step (piecewise graphs
or eager, not one whole-step graph), so gathering new prompts into fewer steps may cost the running requests less,
for a few steps more of time to first token.
While requests decode, a step also takes at most `StepCosts.limit()` prompt tokens (engine/step_costs.py: sized from
measured GPU step times so that a step that prefills takes at most `max_step_slowdown` times a decode step), so a
running stream's inter-token gap stays within that budget even while a burst of new requests is prefilled; their
first tokens come later instead. So that the queue cannot grow for ever, the limit rises to 1/QUEUE_STEPS of the
prompt tokens still to prefill (waiting or part-prefilled): a backlog drains in about QUEUE_STEPS steps, and
prompts arriving faster than the limit lets through wait about QUEUE_STEPS steps.
When a running request needs a block and none is free, the most recently admitted request is preempted by
recompute: its blocks are freed and it goes back to the head of the waiting queue with all its tokens (prompt and
output so far) to prefill again.

Overlap scheduling: step N+1 may be scheduled before step N's tokens reach the host. A request whose token is
still on the device (`num_pending`) decodes it next (the runner feeds it from the device), unless that token
will surely end it (length limits); a token that turns out to be EOS wastes one row, which `update` drops. Only
known tokens go into the prefix cache. Blocks freed while a step is in flight are safe to reuse: every step runs
on one CUDA stream, so a later step's writes come after the in-flight step's reads and writes.
"""
from __future__ import annotations

import itertools
import time

from collections import deque
from dataclasses import dataclass, field

from asyncllm.engine.kv_cache import BlockManager
from asyncllm.engine.request import Request, RequestStatus
from asyncllm.engine.step_costs import StepCosts
from asyncllm.errors import InvalidRequestError
from asyncllm.outputs import Logprob

QUEUE_STEPS = 100  # while the limit holds, a step takes at least 1/QUEUE_STEPS of the prompt tokens still to prefill


@dataclass
class Batch:
    """One step's work. Row i computes tokens [starts[i], starts[i] + num_new_tokens[i]) of requests[i]."""

    requests: list[Request] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)  # row ends at the request's last token: sample the next one
    # row's last input token is still on the device: its index in the previous step's sampled ids, else -1
    feed: list[int] = field(default_factory=list)
    extras: list[int] = field(default_factory=list)  # rows whose request has extras (Request.extras), in order
    constrained: bool = False  # a row's request follows a grammar (structured outputs; it has extras)
    num_prompt_tokens: int = 0  # tokens of prompts (or recomputation) in the step; the other rows decode
    num_decode_rows: int = 0
    prompt_budget: int = 0  # most prompt tokens the scheduler let the step take
    gpu_ms: float = 0.0  # the step's measured GPU time, set once it ran (CUDA; 0: not measured)

    def add(self, req: Request, n: int) -> None:
        start = req.num_computed_tokens
        self.requests.append(req)
        self.starts.append(start)
        self.num_new_tokens.append(n)
        self.sample.append(start + n == req.num_scheduled_tokens)
        self.feed.append(-1)  # the scheduler sets it for requests with a pending token
        if req.extras:
            self.extras.append(len(self.requests) - 1)
            if req.grammar is not None:
                self.constrained = True

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class StepLogprobs:
    """A step's log-probabilities, by batch row: of the token it sampled, and of the prompt tokens its chunk
    predicts ((position of the predicted token, its Logprob), in position order)."""

    sampled: dict[int, Logprob] = field(default_factory=dict)
    prompt: dict[int, list[tuple[int, Logprob]]] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_prefill_delay_steps: int = 0  # 0: admit at once
    max_step_slowdown: float = 0.0  # 0: no prompt-token limit while requests decode


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prompt_tokens: int = 0  # tokens prefilled (recomputation after preemption included)
    generation_tokens: int = 0
    cache_queries: int = 0  # prompt tokens looked up in the prefix cache (first admissions)
    cache_hits: int = 0  # of those, tokens found


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        # rows of the runner's device-resident tables: one per running request (Request.row)
        self._free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        self._held = 0  # consecutive steps that held the waiting requests back
        self.costs = StepCosts(config.max_step_slowdown)  # learned from the steps' gpu_ms, in update

    # ---- admission -------------------------------------------------------------------------------------------
    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise InvalidRequestError if a request of this size can never be served."""
        total, limit = num_prompt_tokens + max_tokens, self.config.max_model_len
        if num_prompt_tokens == 0:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if total > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested {total} tokens "
                f"({num_prompt_tokens} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                "max_tokens" if num_prompt_tokens < limit else "prompt",
            )
        need = self.blocks.blocks_for(total)
        if need > self.blocks.num_blocks:
            raise InvalidRequestError(
                f"the request needs {total} tokens of KV cache ({need} blocks) but the whole cache holds "
                f"{self.blocks.num_blocks * self.blocks.block_size} tokens ({self.blocks.num_blocks} blocks)",
                "max_tokens",
            )

    def add(self, req: Request) -> None:
        self.check(req.num_prompt_tokens, req.max_tokens)
        if req.request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {req.request_id!r}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, "abort")
        return req

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ------------------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        prompt_budget = batch.prompt_budget = self._prompt_budget(budget)
        preemptions = self.stats.num_preemptions
        bs = self.blocks.block_size
        reqs, starts, n_new, sample, feed = batch.requests, batch.starts, batch.num_new_tokens, batch.sample, batch.feed
        running = self.running
        caching = self.blocks.cache is not None
        offers: list[int] = []  # rows that fill a block the prefix cache has not been offered yet
        row = prompt_tokens = prompt_rows = 0  # row: the next sampled id's index in the step's sampled ids
        extras = batch.extras
        add_req, add_start, add_n, add_sample, add_feed = (reqs.append, starts.append, n_new.append, sample.append,
                                                           feed.append)
        # Running requests in admission order; a victim is always taken from the end, so never one already batched
        # (the iteration sees the list shrink). Per-row work is what a step costs on the host: Batch.add, the length
        # checks and the row's bookkeeping are inlined here, in one pass. A request's max_total_tokens is within
        # max_model_len (`check`).
        for req in running:
            if budget <= 0:
                break
            end = known = len(req.token_ids)
            pending = req.num_pending
            if pending:
                end += pending
                if end >= req.max_total_tokens:
                    continue  # its last token is on the device: nothing more to compute
            start = req.num_computed_tokens
            n = end - start
            if n > budget:
                n = budget
            if n > 1 or start < req.num_prompt_tokens:  # prompt tokens (or recomputation after preemption)
                if n > prompt_budget:
                    n = prompt_budget
                    if not n:
                        continue
                prompt_budget -= n
                if n > 1 or start + n <= req.num_prompt_tokens:  # (else it counts as a decode row)
                    prompt_tokens += n
                    prompt_rows += 1
            computed = start + n
            if computed > len(req.block_table) * bs and not self._grow(req, n):
                break  # req preempted itself: it was the last running request
            add_req(req)
            add_start(start)
            add_n(n)
            # its pending token is computed now: the input comes from the previous step's sampled ids
            add_feed(req.pending_row if pending else -1)
            req.num_computed_tokens = computed
            if computed == end:  # it samples: its next token will exist on the device before the host sees it
                add_sample(True)
                req.num_pending = pending + 1
                req.pending_row = row
                row += 1
            else:
                add_sample(False)
            if caching and (known if known < computed else computed) // bs > req.num_cached_blocks:
                offers.append(len(reqs) - 1)
            if req.extras:
                extras.append(len(reqs) - 1)
                if req.grammar is not None:
                    batch.constrained = True
            budget -= n
        # Admit nothing in a step that had to preempt: the victims would only come straight back.
        preempted = self.stats.num_preemptions != preemptions
        hold = self._hold_admission(budget)
        while (self.waiting and budget > 0 and prompt_budget > 0 and len(self.running) < self.config.max_num_seqs
               and not preempted and not hold):
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted with a token in flight: admit it once the token is known
            # reuse cached whole blocks of the prefix, but always compute at least the last token (and every
            # position whose prompt log-probability is still to come)
            cached = [] if req.wants_prompt_logprobs else self.blocks.match(req.token_ids[: (req.num_tokens - 1) // bs * bs])
            computed = len(cached) * bs
            n = min(req.num_tokens - computed, budget, prompt_budget)
            need = self.blocks.blocks_for(computed + n) - len(cached)
            if not self.blocks.can_allocate(need):
                self.blocks.free(cached)
                break
            self.waiting.popleft()
            req.block_table = cached + self.blocks.allocate(need)
            req.num_computed_tokens = computed
            req.num_cached_blocks = len(cached)
            if req.num_cached_tokens < 0:  # first admission: what the client is told was cached
                req.num_cached_tokens = computed
                req.scheduled_time = time.monotonic()
                self.stats.cache_queries += req.num_tokens
                self.stats.cache_hits += computed
            req.status = RequestStatus.RUNNING
            req.row = self._free_rows.pop()
            self.running.append(req)
            batch.add(req, n)
            req.num_computed_tokens += n
            budget -= n
            prompt_budget -= n
            if n > 1 or req.num_computed_tokens <= req.num_prompt_tokens:
                prompt_tokens += n
                prompt_rows += 1
            if sample[-1]:
                req.num_pending += 1
                req.pending_row = row
                row += 1
            if caching and min(req.num_computed_tokens, len(req.token_ids)) // bs > req.num_cached_blocks:
                offers.append(len(reqs) - 1)
        # The prefix cache gets the blocks this step fills once admission matched against it: their K/V are written
        # before any later step can read them, never by this one. It may swap only blocks earlier steps wrote
        # (starts[i] // bs) for its own copies of a prefix.
        for i in offers:
            req = reqs[i]
            full = min(req.num_computed_tokens, len(req.token_ids)) // bs
            if self.blocks.cache_blocks(req.token_ids, req.block_table, starts[i] // bs, req.num_cached_blocks, full):
                # the cache may have swapped blocks from here on for its own copies: the device resends them
                req.num_synced_blocks = min(req.num_synced_blocks, req.num_cached_blocks)
                req.num_cached_blocks = full
        batch.num_prompt_tokens, batch.num_decode_rows = prompt_tokens, len(reqs) - prompt_rows
        self.stats.prompt_tokens += prompt_tokens
        return batch

    def _prompt_budget(self, budget: int) -> int:
        """Prompt tokens this step may take (see the module docstring): the step's budget, or the limit while a
        request decodes, raised to 1/QUEUE_STEPS of the prompt tokens still to prefill."""
        limit = self.costs.limit()
        if limit is None or limit >= budget:
            return budget
        decoding, backlog = False, 0
        for req in self.running:
            left = len(req.token_ids) + req.num_pending - req.num_computed_tokens
            if left <= 1 and req.num_computed_tokens >= req.num_prompt_tokens:  # it decodes (as in `schedule`)
                decoding = True
            else:  # prefilling, or recomputing after preemption
                backlog += left
        if not decoding:
            return budget
        enough = budget * QUEUE_STEPS  # a backlog this long already lifts the limit to the budget
        for req in self.waiting:
            if backlog >= enough:
                break
            backlog += req.num_tokens - req.num_computed_tokens
        return min(budget, max(limit, backlog // QUEUE_STEPS))

    def _hold_admission(self, budget: int) -> bool:
        """Hold the waiting requests back this step (see the module docstring)?"""
        if not self.waiting or not self.running or self._held >= self.config.max_prefill_delay_steps:
            self._held = 0
            return False
        want, waiting_tokens = budget // 2, 0
        for req in self.waiting:
            waiting_tokens += req.num_tokens
            if waiting_tokens >= want:
                self._held = 0
                return False
        self._held += 1
        return True

    def _grow(self, req: Request, n: int) -> bool:
        """Give `req` the blocks for n more tokens, preempting later requests if needed.
        False if `req` itself had to be preempted."""
        need = self.blocks.blocks_for(req.num_computed_tokens + n) - len(req.block_table)
        while not self.blocks.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.block_table.extend(self.blocks.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = req.num_cached_blocks = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- results ---------------------------------------------------------------------------------------------
    def update(self, batch: Batch, sampled: list[int], logprobs: StepLogprobs | None = None) -> list[Request]:
        """Append each sampled token (one per row with batch.sample set, in row order) and apply stop rules.
        Returns the requests that received a token, or finished without one (max_tokens=0: the token sampled
        after the prompt is dropped); finished ones have released their blocks."""
        if logprobs is not None and logprobs.prompt:
            for i, entries in logprobs.prompt.items():
                known = batch.requests[i].prompt_logprobs
                assert known is not None
                for position, lp in entries:  # a recomputed chunk (after preemption) repeats known positions
                    if position == len(known):
                        known.append(lp)
        if batch.gpu_ms:
            self.costs.observe(batch.num_prompt_tokens, batch.num_decode_rows, batch.gpu_ms)
        out: list[Request] = []
        keep = out.append
        any_finished = False
        dropped = 0
        finished = RequestStatus.FINISHED
        reqs = batch.requests
        # the rows that sampled (a decode step's rows all do), with their tokens
        rows = range(len(reqs))
        for i, token in zip(rows if len(sampled) == len(reqs) else itertools.compress(rows, batch.sample), sampled):
            req = reqs[i]
            req.num_pending -= 1
            if req.status is finished:  # aborted, stopped or ended by EOS while the step ran
                continue
            keep(req)
            if not req.max_tokens:  # prompt only
                reason = "length"
                dropped += 1
            else:
                tokens = req.token_ids
                tokens.append(token)
                if req.output_logprobs is not None and logprobs is not None:
                    req.output_logprobs.append(logprobs.sampled[i])
                if token in req.stop_ids:
                    reason = "stop"
                elif req.grammar is not None and (token in req.grammar_stops or req.grammar_refused):
                    reason = "stop"  # the grammar is complete (its stop token, EOS, was sampled)
                elif len(tokens) >= req.max_total_tokens:  # (within max_model_len: `check`)
                    reason = "length"
                else:
                    continue
            if req.status is RequestStatus.WAITING:  # preempted while its token was in flight
                self.waiting.remove(req)
            self._finish(req, reason)
            any_finished = True
        self.stats.generation_tokens += len(out) - dropped
        if any_finished:
            self.running = [r for r in self.running if not r.finished]
        return out

    def finish(self, req: Request, reason: str) -> None:
        """End a running request early (a stop string matched above the scheduler)."""
        if not req.finished:
            (self.waiting if req.status is RequestStatus.WAITING else self.running).remove(req)
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self._release(req)
        self.requests.pop(req.request_id, None)

    def _release(self, req: Request) -> None:
        """A request leaves the running set: its blocks and its row go back."""
        if req.block_table:
            self.blocks.free(req.block_table)
            req.block_table = []
        if req.row >= 0:
            self._free_rows.append(req.row)
            req.row = -1
        req.num_synced_blocks = 0

    def check_invariants(self) -> None:
        """Raise AssertionError if the queues, the requests' block tables and the block manager disagree (tests)."""
        self.blocks.check_invariants()
        held = [0] * self.blocks.num_blocks
        for req in self.running:
            assert req.status is RequestStatus.RUNNING and req.request_id in self.requests
            assert len(set(req.block_table)) == len(req.block_table), "a block twice in one table"
            assert len(req.block_table) == self.blocks.blocks_for(req.num_computed_tokens), "table size != tokens"
            assert req.num_computed_tokens <= req.num_scheduled_tokens
            # never a token sampled past the request's limit (but the one after a prompt-only request's prompt)
            assert req.num_scheduled_tokens <= max(req.max_total_tokens, req.num_prompt_tokens + 1), "past max_tokens"
            for b in req.block_table:
                held[b] += 1
        for req in self.waiting:
            assert req.status is RequestStatus.WAITING and not req.block_table and req.request_id in self.requests
            assert req.row == -1 and req.num_synced_blocks == 0
        rows = [r.row for r in self.running]
        assert sorted(rows + self._free_rows) == list(range(self.config.max_num_seqs)), "rows lost or shared"
        assert all(r.num_synced_blocks <= len(r.block_table) for r in self.running)
        assert len(self.running) + len(self.waiting) == len(self.requests), "a request in no queue or in two"
        refs = [self.blocks.ref_count(b) for b in range(self.blocks.num_blocks)]
        assert held == refs, "reference counts differ from the running requests' block tables"
