"""The HTTP server: the official openai client against `python -m asyncllm.serve`, bad requests, disconnects."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import aiohttp
import httpx
import openai
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from asyncllm import AsyncEngine
from asyncllm.server.app import ServerSettings, build_app, make_runner

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncllm.serve", "--port", "0", "--max-model-len", "512", "--log-level", "warning",
         "--max-body-bytes", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = None
    for line in proc.stdout:  # type: ignore[union-attr]
        if m := re.search(r"ready on (http://\S+)", line):
            url = m.group(1)
            break
    assert url, "server did not start"
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0  # graceful shutdown exits 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    assert full.choices[0].message.content == "The capital of France is Paris."
    assert full.choices[0].finish_reason == "stop" and full.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump()["completion_tokens"] == full.usage.completion_tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_completions_usage_and_streaming(client, server):
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    count = httpx.post(f"{server}/tokenize", json={"prompt": prompt}).json()["count"]
    assert full.usage.prompt_tokens == count and full.usage.completion_tokens == 20
    assert full.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stream=True))
    assert streamed == full.choices[0].text
    detok = httpx.post(f"{server}/detokenize", json={"tokens": httpx.post(
        f"{server}/tokenize", json={"prompt": full.choices[0].text, "add_special_tokens": False}).json()["tokens"]})
    assert detok.json()["prompt"] == full.choices[0].text


def test_batch_prompts_n_and_stop(client):
    out = client.completions.create(model=MODEL, prompt=["One, two,", "Red, green,"], n=2, temperature=0,
                                    max_tokens=8, seed=3)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both choices agree
    stopped = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24, stop=["Paris"])
    assert stopped.choices[0].message.content == "The capital of France is "
    assert stopped.choices[0].finish_reason == "stop"


async def test_async_openai_client_streams_concurrently(server):
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused")

    async def one():
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one() for _ in range(8)))
    assert texts == ["The capital of France is Paris."] * 8


def test_cached_tokens_and_hit_rate_reported(client, server):
    system = {"role": "system", "content": "You are a terse assistant. " * 20}
    ask = lambda q: client.chat.completions.create(  # noqa: E731
        model=MODEL, messages=[system, {"role": "user", "content": q}], temperature=0, max_tokens=4)
    first, second = ask("Name a color."), ask("Name a fruit.")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 100 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    # streamed with n=2: a prompt's hit counts once, as in the non-streamed usage
    messages = [system, {"role": "user", "content": "Name a fruit."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4, n=2)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens_details.cached_tokens > 0
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 8
    metrics = httpx.get(f"{server}/metrics").text
    hits = float(re.search(r'^asyncllm:prefix_cache_hits_total\{model_name="SmolLM2-135M-Instruct"\} (\S+)', metrics,
                           re.M).group(1))
    assert hits >= cached


def test_other_routes(server):
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 512
    assert httpx.get(f"{server}/v1/models/{MODEL}").json()["id"] == MODEL
    missing = httpx.get(f"{server}/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/version").json()["version"]
    metrics = httpx.get(f"{server}/metrics").text
    for name in ("asyncllm:num_requests_running", "asyncllm:kv_cache_usage_perc", "asyncllm:prompt_tokens_total",
                 "asyncllm:generation_tokens_total", "asyncllm:num_preemptions_total",
                 "asyncllm:time_to_first_token_seconds_bucket", "asyncllm:inter_token_latency_seconds_bucket",
                 "asyncllm:e2e_request_latency_seconds_bucket", "asyncllm:client_disconnects_total",
                 "asyncllm:request_queue_time_seconds_bucket", "asyncllm:request_prefill_time_seconds_bucket"):
        assert name in metrics
    samples = [line for line in metrics.splitlines() if line.startswith("asyncllm:")]
    assert samples and all(f'model_name="{MODEL}"' in line for line in samples)  # dashboards filter on it
    assert "_created" not in metrics
    chat_ids = httpx.post(f"{server}/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert chat_ids[0] == 1  # <|im_start|> from the chat template


def _hf_logprobs(smollm2_dir, ids: list[int]):
    from conftest import hf_logits

    return hf_logits(smollm2_dir, ids).log_softmax(-1)


def test_chat_logprobs_match_transformers_streamed_and_not(client, server, smollm2_dir):
    kw = dict(model=MODEL, messages=CHAT, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3,
              extra_body={"return_token_ids": True})
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    content = choice.logprobs.content
    out_ids = choice.model_extra["token_ids"]
    assert len(content) == len(out_ids) == full.usage.completion_tokens
    prompt_ids = httpx.post(f"{server}/tokenize", json={"messages": CHAT}).json()["tokens"]
    ref = _hf_logprobs(smollm2_dir, prompt_ids + out_ids)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(smollm2_dir)
    # float32 on both sides, but the server computes in other shapes (prompt chunks, decode rows, cached prompt
    # blocks) than transformers' one forward, so its kernels sum in another order: seen once 1.2e-3 off at -4.76
    for j, (entry, token) in enumerate(zip(content, out_ids)):
        row = ref[len(prompt_ids) - 1 + j]
        assert entry.logprob == pytest.approx(row[token].item(), abs=2e-3)
        assert bytes(entry.bytes).decode() == entry.token == tok.decode([token])
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=2e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy
    assert "".join(e.token for e in content) == choice.message.content + (tok.decode([out_ids[-1]])
                                                                           if choice.finish_reason == "stop" else "")
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # the same tokens; values equal up to float32 rounding (the second request reads the prompt from the cache)
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, [t.token for t in e.top_logprobs]) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None


def test_completion_echo_logprobs_score_a_prompt(client, server, smollm2_dir):
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens=0."""
    prompt = "The capital of France is Paris"
    ids = httpx.post(f"{server}/tokenize", json={"prompt": prompt}).json()["tokens"]
    ref = _hf_logprobs(smollm2_dir, ids)
    for source in (prompt, ids):
        r = client.completions.create(model=MODEL, prompt=source, echo=True, logprobs=2, max_tokens=0)
        c = r.choices[0]
        assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = [ref[q - 1, ids[q]].item() for q in range(1, len(ids))]
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
        assert all(len(t) in (2, 3) and lp.tokens[q] in t for q, t in enumerate(lp.top_logprobs) if t)
        assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0
        assert lp.text_offset == sorted(lp.text_offset)
    # echo with generated tokens: the prompt's entries, then the completion's, offsets continuing
    kw = dict(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=5, temperature=0)
    full = client.completions.create(**kw).choices[0]
    assert full.text.startswith(prompt) and len(full.logprobs.tokens) == len(ids) + 5
    assert full.logprobs.text_offset[len(ids)] == len(prompt)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.text
    merged = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert merged[0] is None and merged[1:] == pytest.approx(full.logprobs.token_logprobs[1:], abs=1e-4)
    offsets = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert offsets == full.logprobs.text_offset
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True).choices[0]
    assert plain.text == prompt and plain.logprobs is None


def test_logit_bias_and_min_tokens_over_http(client):
    base = dict(model=MODEL, messages=CHAT, temperature=0, max_tokens=3, extra_body={"return_token_ids": True})
    plain = client.chat.completions.create(**base).choices[0]
    first = plain.model_extra["token_ids"][0]
    banned = client.chat.completions.create(**base, logit_bias={str(first): -100}).choices[0]
    assert banned.model_extra["token_ids"][0] != first
    forced = client.chat.completions.create(**base, logit_bias={"42": 100}).choices[0]
    assert forced.model_extra["token_ids"] == [42, 42, 42]
    # min_tokens keeps EOS away: the greedy answer stops by itself after ~8 tokens, here it cannot before 20
    short = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=40)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    held = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=40,
                                          extra_body={"min_tokens": 20})
    assert held.usage.completion_tokens >= 20


def test_structured_outputs_over_http(client):
    import json

    import pydantic

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=30)
        country: str = pydantic.Field(max_length=30)
        population: int

    messages = [{"role": "user", "content": "Give me a city as JSON."}]
    parsed = client.chat.completions.parse(model=MODEL, messages=messages, response_format=City, temperature=0,
                                           max_tokens=100)
    assert isinstance(parsed.choices[0].message.parsed, City)
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema(), "strict": True}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, response_format=schema,
                                                 temperature=0, max_tokens=100, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == parsed.choices[0].message.content
    obj = client.chat.completions.create(model=MODEL, messages=messages, response_format={"type": "json_object"},
                                         temperature=0, max_tokens=100)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=1.0,
                                       extra_body={"structured_outputs": {"choice": ["blue", "green"]}})
    assert choice.choices[0].text in ("blue", "green")
    regex = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=20, temperature=1.0,
                                      extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", regex.choices[0].text)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string", "maxLength": 20}}, "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _calls(message) -> list[tuple[str, dict]]:
    import json

    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _streamed_calls(chunks) -> list[tuple[str, dict]]:
    import json

    calls: dict[int, list] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(d.index, [None, ""])
            entry[0] = d.function.name or entry[0]
            entry[1] += d.function.arguments or ""
    return [(name, json.loads(args)) for name, args in (calls[k] for k in sorted(calls))]


def test_tool_choice_required_and_named_give_valid_calls(client):
    named = {"type": "function", "function": {"name": "get_weather"}}

    def check(c, choice) -> None:  # noqa: ANN001
        calls = _calls(c.message)
        assert c.finish_reason == "tool_calls" and calls, c.message
        for name, args in calls:
            assert name in ("get_weather", "get_time")
            if name == "get_weather":
                assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
            else:
                assert set(args) == {"zone"}
        if isinstance(choice, dict):
            assert [n for n, _ in calls] == ["get_weather"]

    for choice, temperature in (("required", 1.0), (named, 0.0), (named, 1.0)):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                           temperature=temperature, seed=1, max_tokens=120)
        check(r.choices[0], choice)
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=120)
    full = client.chat.completions.create(**kw).choices[0]
    check(full, "required")
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert _streamed_calls(chunks) == _calls(full.message)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_choice_auto_parses_the_models_calls(client):
    """The model's answer in the Hermes format (forced here with a regex, as a model trained for tools would
    answer) comes back as tool_calls; streamed deltas give the same calls; plain answers stay text."""
    forced = {"guided_regex": r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "celsius"\}\}\n</tool_call>'}
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60, extra_body=forced)
    full = client.chat.completions.create(**kw).choices[0]
    assert _calls(full.message) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert full.finish_reason == "tool_calls" and not full.message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert _streamed_calls(chunks) == _calls(full.message)
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, tools=[WEATHER], temperature=0, max_tokens=24)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    none = client.chat.completions.create(**{**kw, "tool_choice": "none"}).choices[0]
    assert none.message.tool_calls is None and none.message.content.startswith("<tool_call>")
    # two calls in the answer: parallel_tool_calls false keeps the first (streamed or not)
    two = {"guided_regex": r'(<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", '
                           r'"unit": "celsius"\}\}\n</tool_call>\n){2}'}
    kw2 = {**kw, "max_tokens": 120, "extra_body": two}
    both = client.chat.completions.create(**kw2).choices[0]
    assert [n for n, _ in _calls(both.message)] == ["get_weather", "get_weather"]
    one = client.chat.completions.create(**kw2, parallel_tool_calls=False).choices[0]
    assert _calls(one.message) == _calls(both.message)[:1] and one.finish_reason == "tool_calls"
    assert one.message.content == both.message.content  # the calls' text never becomes content
    chunks = list(client.chat.completions.create(**kw2, parallel_tool_calls=False, stream=True))
    assert _streamed_calls(chunks) == _calls(one.message)


def test_tool_history_and_template_options(client, server):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=30)
    assert r.choices[0].message.content
    # the tools and the call reach the prompt (this template has no tool support: a system message, Hermes text)
    ids = httpx.post(f"{server}/tokenize", json={"messages": history}).json()["tokens"]
    assert len(ids) < r.usage.prompt_tokens
    # continue_final_message: the answer continues the last assistant message
    cont = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        *CHAT, {"role": "assistant", "content": "The capital of France is"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert cont.choices[0].message.content.strip().startswith("Paris")


C, X = "/v1/chat/completions", "/v1/completions"
MSG = {"messages": CHAT}
BAD_REQUESTS = [
    # (path, body, status, param or None)
    (C, b"{not json", 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b"", 400, None),
    (C, {}, 400, "messages"),
    (C, {"messages": []}, 400, "messages"),
    (C, {"messages": "hi"}, 400, "messages"),
    (C, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    (C, {"messages": [{"content": "x"}]}, 400, "messages"),
    (C, {**MSG, "model": "gpt-4"}, 404, "model"),
    (C, {**MSG, "max_tokens": 0}, 400, "max_tokens"),
    (C, {**MSG, "max_tokens": -5}, 400, "max_tokens"),
    (C, {**MSG, "max_tokens": "ten"}, 400, "max_tokens"),
    (C, {**MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (C, {**MSG, "temperature": -1}, 400, "temperature"),
    (C, {**MSG, "temperature": "hot"}, 400, "temperature"),
    (C, {**MSG, "top_p": 0}, 400, "top_p"),
    (C, {**MSG, "top_p": 1.5}, 400, "top_p"),
    (C, {**MSG, "top_k": -2}, 400, "top_k"),
    (C, {**MSG, "min_p": 2}, 400, "min_p"),
    (C, {**MSG, "n": 0}, 400, "n"),
    (C, {**MSG, "stream_options": {"include_usage": True}}, 400, None),
    (C, {**MSG, "max_tokens": 600}, 400, "max_tokens"),
    (C, {**MSG, "top_logprobs": 2}, 400, None),  # without logprobs: true
    (C, {**MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (X, {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    (C, {**MSG, "logit_bias": {"x": 1}}, 400, None),
    (C, {**MSG, "logit_bias": {"42": 101}}, 400, "logit_bias"),
    (C, {**MSG, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (C, {**MSG, "min_tokens": -1}, 400, "min_tokens"),
    (C, {**MSG, "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    (X, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (X, {"prompt": "hi", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    (C, {**MSG, "stop": [""]}, 400, "stop"),
    (C, {**MSG, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (C, {**MSG, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {**MSG, "frequency_penalty": -3}, 400, "frequency_penalty"),
    (C, {**MSG, "presence_penalty": 5}, 400, "presence_penalty"),
    (C, {**MSG, "seed": 2**70}, 400, "seed"),
    (X, {"prompt": ["a"] * 300, "n": 4}, 400, "n"),
    (X, {}, 400, "prompt"),
    (X, {"prompt": []}, 400, None),
    (X, {"prompt": "hi " * 600}, 400, "prompt"),
    (X, {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    # asked for and not implemented: refused, never ignored
    (C, {**MSG, "tool_choice": "required"}, 400, "tool_choice"),  # without tools
    (C, {**MSG, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    (C, {**MSG, "tools": [WEATHER, WEATHER]}, 400, "tools"),
    (C, {**MSG, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools"),
    (C, {**MSG, "tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, 400,
     "tool_choice"),
    (C, {**MSG, "chat_template_kwargs": {"tokenize": False}}, 400, "chat_template_kwargs"),
    (C, {**MSG, "continue_final_message": True}, 400, None),
    (C, {**MSG, "response_format": {"type": "xml"}}, 400, "response_format"),
    (C, {**MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (C, {**MSG, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400, "response_format"),
    (C, {**MSG, "guided_regex": "(unclosed"}, 400, "structured_outputs"),
    (C, {**MSG, "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "structured_outputs"),
    (X, {"prompt": "hi", "guided_choice": []}, 400, "structured_outputs"),
    (C, {**MSG, "modalities": ["text", "audio"]}, 400, "modalities"),
    (C, {"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, 400, "messages"),
    (C, {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]}, 400,
     "messages"),
    (X, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (X, {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    (X, {"prompt": "hi", "cache_salt": "tenant-a"}, 400, "cache_salt"),
    (X, {"prompt": "hi", "truncate_prompt_tokens": 5}, 400, "truncate_prompt_tokens"),
    (X, {"prompt": "hi", "allowed_token_ids": [1, 2]}, 400, "allowed_token_ids"),
    (C, {**MSG, "echo": True}, 400, "echo"),  # (completions implement it)
    (C, {**MSG, "add_special_tokens": True}, 400, "add_special_tokens"),
    (C, {**MSG, "store": True}, 400, "store"),
    (C, {**MSG, "service_tier": "flex"}, 400, "service_tier"),
    (X, {"prompt": "x" * 200_000}, 413, None),
    ("/v1/embeddings", {"input": "x"}, 404, None),
    ("/tokenize", {}, 400, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}{path}", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if "max_tokens" in str(body) and status == 400 and body.get("max_tokens") == 600:
        assert "maximum context length is 512 tokens" in err["message"]


def test_not_implemented_fields_are_accepted_when_they_ask_for_nothing(server):
    body = {**MSG, "max_tokens": 2, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "logit_bias": {}, "modalities": ["text"], "add_generation_prompt": True, "store": False, "echo": False,
            "use_beam_search": False, "length_penalty": 1, "spaces_between_special_tokens": True, "priority": 0,
            "service_tier": "auto", "add_special_tokens": False}
    assert httpx.post(f"{server}{C}", json=body).status_code == 200


def test_server_still_answers_after_bad_requests(client):
    assert client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24).choices[0].message.content


# ---- in-process server on a tiny model: disconnects, auth, engine failure -------------------------------------
@pytest_asyncio.fixture
async def local(tiny_models):
    engine = AsyncEngine(str(tiny_models["llama"]), max_model_len=512)
    await engine.start()
    app = build_app(engine, ServerSettings("tiny", api_key="sekret"))
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield engine, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await engine.shutdown()
    await runner.cleanup()


AUTH = {"Authorization": "Bearer sekret"}


async def test_dropped_connections_free_their_blocks(local):
    engine, url = local
    body = {"prompt": list(range(10, 60)), "max_tokens": 450, "ignore_eos": True, "temperature": 0}
    sessions = [aiohttp.ClientSession(headers=AUTH) for _ in range(20)]

    async def call(i, s):
        async with s.post(f"{url}/v1/completions", json={**body, "stream": i % 2 == 0}) as r:
            async for _ in r.content:
                pass

    tasks = [asyncio.create_task(call(i, s)) for i, s in enumerate(sessions)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(engine.core.scheduler.running) < 20 and loop.time() < deadline:
        await asyncio.sleep(0.005)
    assert len(engine.core.scheduler.running) == 20 and engine.num_free_blocks < engine.num_blocks
    for t in tasks:  # drop every connection mid-way, streaming or not
        t.cancel()
    for s in sessions:
        await s.close()
    deadline = loop.time() + 1.0
    while engine.num_free_blocks != engine.num_blocks and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert engine.num_free_blocks == engine.num_blocks and not engine.core.scheduler.requests
    async with aiohttp.ClientSession() as s:
        metrics = await (await s.get(f"{url}/metrics")).text()
    assert 'asyncllm:client_disconnects_total{model_name="llama"} 20.0' in metrics


async def test_api_key_and_dead_engine(local):
    engine, url = local
    async with aiohttp.ClientSession() as s:
        r = await s.get(f"{url}/v1/models")
        assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        r = await s.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status == 401
        r = await s.get(f"{url}/v1/models", headers=AUTH)
        assert r.status == 200
        assert (await s.get(f"{url}/health")).status == 200  # only /v1 needs the key

        def boom(batch):
            raise RuntimeError("simulated device failure")

        engine.core.runner.launch = boom
        r = await s.post(f"{url}/v1/completions", json={"prompt": [5, 6], "stream": True}, headers=AUTH)
        text = await r.text()
        assert '"error"' in text and "simulated device failure" in text and text.endswith("data: [DONE]\n\n")
        assert (await s.get(f"{url}/health")).status == 503
        r = await s.post(f"{url}/v1/completions", json={"prompt": [5, 6]}, headers=AUTH)
        assert r.status == 503 and (await r.json())["error"]["type"] == "service_unavailable"


async def test_completions_take_add_special_tokens(local, monkeypatch):
    engine, url = local
    seen = []
    encode = engine.encode

    async def spy(prompt, add_special_tokens=True, chat=None):  # noqa: ANN001, ANN202
        seen.append(add_special_tokens)
        return await encode(prompt, add_special_tokens, chat)

    monkeypatch.setattr(engine, "encode", spy)
    async with aiohttp.ClientSession(headers=AUTH) as s:
        for flag in (None, False, True):
            body = {"prompt": "hi", "max_tokens": 1, **({} if flag is None else {"add_special_tokens": flag})}
            assert (await s.post(f"{url}/v1/completions", json=body)).status == 200
    assert seen == [True, False, True]


def test_return_token_ids_stream_and_non_stream(server):
    body = {"prompt": "The sky is", "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    whole = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]
    ids: list[int] = []
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ids += orjson.loads(line[6:])["choices"][0]["token_ids"]
    assert len(whole["token_ids"]) == 8 and ids == whole["token_ids"]
    plain = httpx.post(f"{server}/v1/completions", json={**body, "return_token_ids": False}, timeout=60).json()
    assert "token_ids" not in plain["choices"][0] and plain["choices"][0]["text"] == whole["text"]


async def test_metrics_count_every_streamed_token(local):
    """Push delivery still counts every token: generation tokens, one TTFT per request, one inter-token gap per
    later token, whatever the stream interval and n; each TTFT splits into queue time + prefill time."""
    engine, url = local
    get = engine.metrics.value
    split = [f"asyncllm:{name}_seconds_{part}" for name in ("time_to_first_token", "request_queue_time",
                                                            "request_prefill_time") for part in ("count", "sum")]
    before = {k: get(k) or 0.0 for k in ("asyncllm:generation_tokens_total", "asyncllm:inter_token_latency_seconds_count",
                                        *split)}
    bodies = [{"prompt": [5, 6, 7], "max_tokens": 9 + i, "ignore_eos": True, "stream": i % 2 == 0, "n": 1 + i % 3,
               "temperature": 0} for i in range(6)]
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async def call(body):
            async with s.post(f"{url}/v1/completions", json={**body, "stream_options": {"include_usage": True}}
                              if body["stream"] else body) as r:
                text = await r.text()
            if body["stream"]:
                return orjson.loads([line for line in text.splitlines() if '"usage":{' in line][-1][6:])["usage"]
            return orjson.loads(text)["usage"]

        usages = await asyncio.gather(*(call(b) for b in bodies))
    tokens = sum(u["completion_tokens"] for u in usages)
    requests = sum(b["n"] for b in bodies)
    assert tokens == sum(b["max_tokens"] * b["n"] for b in bodies)
    assert get("asyncllm:generation_tokens_total") - before["asyncllm:generation_tokens_total"] == tokens
    assert (get("asyncllm:inter_token_latency_seconds_count") - before["asyncllm:inter_token_latency_seconds_count"]
            == tokens - requests)
    ttft_n, ttft_s, queue_n, queue_s, prefill_n, prefill_s = (get(k) - before[k] for k in split)
    assert ttft_n == queue_n == prefill_n == requests
    assert queue_s >= 0 and prefill_s > 0
    assert queue_s + prefill_s == pytest.approx(ttft_s)  # both from the request's arrival to its first token


def test_model_directory_may_be_positional():
    from asyncllm.serve import parse_args, parser

    assert parse_args(parser(), ["/models/qwen", "--port", "1"]).model == "/models/qwen"
    assert parse_args(parser(), ["--model", "/models/qwen"]).model == "/models/qwen"
    assert parse_args(parser(), ["/m", "--model", "/m"]).model == "/m"
    with pytest.raises(SystemExit):
        parse_args(parser(), ["/a", "--model", "/b"])


def test_the_cli_is_generated_from_engine_config():
    """One flag per EngineConfig field with its default; ranges and choices enforced; the kwargs build a config."""
    from dataclasses import fields

    from asyncllm.config import EngineConfig
    from asyncllm.serve import engine_kwargs, parse_args, parser

    defaults = engine_kwargs(parse_args(parser(), []))
    assert defaults == {f.name: f.default for f in fields(EngineConfig) if f.name != "model"}
    args = parse_args(parser(), ["--max-num-seqs", "8", "--no-enable-prefix-caching", "--tp", "2", "--device", "cpu",
                                 "--gpu-memory-utilization", "0.5", "--served-model-name", "x", "--enforce-eager"])
    config = EngineConfig(**engine_kwargs(args))
    assert (config.max_num_seqs, config.enable_prefix_caching, config.tensor_parallel_size, config.device,
            config.gpu_memory_utilization, config.served_model_name, config.enforce_eager) == (8, False, 2, "cpu", 0.5,
                                                                                             "x", True)
    for bad in (["--max-num-seqs", "0"], ["--gpu-memory-utilization", "2"], ["--device", "tpu"],
                ["--max-prefill-delay-steps", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(parser(), bad)


async def test_cors_and_served_model_name(tiny_models):
    """--allowed-origins: preflight and responses (streams too) to allowed origins carry the CORS headers, others
    none; --served-model-name is the name clients send and metrics carry."""
    engine = AsyncEngine(str(tiny_models["llama"]), max_model_len=128, served_model_name="my-model")
    await engine.start()
    runner = make_runner(build_app(engine, ServerSettings("my-model", api_key="k", allowed_origins=["http://app.example"])))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    ok, other = {"Origin": "http://app.example"}, {"Origin": "http://evil.example"}
    try:
        async with aiohttp.ClientSession() as s:
            pre = await s.options(f"{url}/v1/completions", headers={
                **ok, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
            assert pre.status == 204 and pre.headers["Access-Control-Allow-Origin"] == "http://app.example"
            assert "authorization" in pre.headers["Access-Control-Allow-Headers"]
            body = {"model": "my-model", "prompt": [5, 6], "max_tokens": 2}
            for stream in (False, True):
                r = await s.post(f"{url}/v1/completions", json={**body, "stream": stream},
                                 headers={**ok, "Authorization": "Bearer k"})
                await r.read()
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "http://app.example"
            r = await s.post(f"{url}/v1/completions", json=body, headers={**other, "Authorization": "Bearer k"})
            await r.read()
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
            r = await s.post(f"{url}/v1/completions", json={**body, "model": "llama"}, headers={"Authorization": "Bearer k"})
            assert r.status == 404
            metrics = await (await s.get(f"{url}/metrics")).text()
            assert 'asyncllm:generation_tokens_total{model_name="my-model"} 6.0' in metrics
    finally:
        await runner.cleanup()
        await engine.shutdown()


async def test_generation_config_defaults(tmp_path):
    """Sampling parameters the model's generation_config.json sets are the defaults of requests that leave them
    out (here top_k 1: greedy), unless --generation-config none; a request's own values win."""
    import dataclasses
    import json

    from asyncllm.server.protocol import CompletionRequest
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "m", "qwen3")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "top_k": 1, "temperature": 1.5,
                                                              "repetition_penalty": 1.1}))
    async with AsyncEngine(str(model), max_model_len=128) as engine:
        assert engine.sampling_defaults == {"top_k": 1, "temperature": 1.5, "repetition_penalty": 1.1}
        body = CompletionRequest(prompt=[5, 6], max_tokens=12, ignore_eos=True)
        p = body.sampling_params(16, 0, engine.sampling_defaults)
        assert (p.top_k, p.temperature, p.repetition_penalty) == (1, 1.5, 1.1)
        own = CompletionRequest(prompt=[5, 6], top_k=0, temperature=0.7).sampling_params(16, 0, engine.sampling_defaults)
        assert (own.top_k, own.temperature, own.repetition_penalty) == (0, 0.7, 1.1)
        outs = {tuple((await engine.generate([5, 6], dataclasses.replace(p, seed=seed))).token_ids) for seed in (1, 2, 3)}
        assert len(outs) == 1  # top_k 1 from the file: every seed gives the greedy tokens
    async with AsyncEngine(str(model), max_model_len=128, generation_config="none") as engine:
        assert engine.sampling_defaults == {}


async def test_plain_streams_take_the_direct_text_path(smollm2_dir, monkeypatch):
    """Plain streamed text goes from the engine loop straight into the connection (SSEChoices.write_text) for
    every token after the first, and the streamed text equals the non-streamed one; a stop string keeps such a
    stream on the notified path (its text is held back), with the same text as without streaming."""
    from asyncllm.server.choices import SSEChoices

    written: list[str] = []
    write_text = SSEChoices.write_text
    monkeypatch.setattr(SSEChoices, "write_text", lambda self, i, text: (written.append(text), write_text(self, i, text)))
    engine = AsyncEngine(smollm2_dir, max_model_len=256)
    await engine.start()
    runner = make_runner(build_app(engine, ServerSettings(MODEL)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/completions"
    try:
        async with aiohttp.ClientSession() as s:
            async def call(body):
                async with s.post(url, json=body) as r:
                    text = await r.text()
                if not body.get("stream"):
                    return orjson.loads(text)["choices"][0]["text"]
                events = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
                return "".join(e["choices"][0]["text"] for e in events if e["choices"])

            for extra in ({}, {"stop": [" RGB"]}):
                body = {"prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0, **extra}
                written.clear()
                streamed, whole = await call({**body, "stream": True}), await call(body)
                assert streamed == whole and whole
                if extra:
                    assert not written
                else:
                    assert len(written) >= 12 and "".join(written) in streamed
    finally:
        await engine.shutdown()
        await runner.cleanup()
