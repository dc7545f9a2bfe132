"""Tool calling: the parser of the models' call formats, and tool_choice over HTTP with the official client."""
from __future__ import annotations

import json

import pytest

from asyncllm.server.tools import ToolCallParser, forced_calls

NAMES = frozenset({"get_weather", "add"})


def run(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[dict]]:
    """Feed the pieces; the streamed deltas must add up to the parser's calls (ids, names, arguments)."""
    content, deltas = "", []
    for p in pieces:
        c, new = parser.feed(p)
        content, deltas = content + c, deltas + new
    c, new = parser.finish()
    rebuilt: dict[int, dict] = {}
    for d in deltas + new:
        call = rebuilt.setdefault(d["index"], {"id": d.get("id"), "type": d.get("type"),
                                               "function": {"name": d["function"].get("name"), "arguments": ""}})
        call["function"]["arguments"] += d["function"].get("arguments", "")
    assert [rebuilt[k] for k in sorted(rebuilt)] == parser.calls
    return content + c, parser.calls


def split_every(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(0, len(text), n)]


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


@pytest.mark.parametrize("step", [1, 3, 7, 1000])  # streamed in pieces of any size, tags split anywhere
def test_hermes_calls_and_content(step):
    content, calls = run(ToolCallParser("auto", NAMES), split_every(HERMES, step))
    assert content.strip() == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("text, expected", [
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', [("add", {"a": 1, "b": 2})]),  # Llama 3 JSON
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    ('[{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2}}]', [("add", {"a": 1}), ("add", {"a": 2})]),
])
def test_llama_json_calls(text, expected):
    for step in (2, 1000):
        content, calls = run(ToolCallParser("auto", NAMES), split_every(text, step))
        assert content == "" and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected


@pytest.mark.parametrize("text", ["Just text, no call.", '{"not": "a call"}', '<tool_call>{"name": "unknown"}</tool_call>',
                                  "a < b and <tool", '{"name": "add", "parameters": '])
def test_text_that_is_not_a_call_stays_content(text):
    for step in (1, 2, 1000):
        content, calls = run(ToolCallParser("auto", NAMES), split_every(text, step))
        assert calls == [] and content == text


def test_required_and_named_forms():
    content, calls = run(ToolCallParser("required", NAMES), ['[{"name": "add", "argu', 'ments": {"a": 5}}]'])
    assert content == "" and calls[0]["function"]["name"] == "add" and json.loads(calls[0]["function"]["arguments"]) == {"a": 5}
    content, calls = run(ToolCallParser("named", NAMES, "get_weather"), ['{"city": ', '"Rome"}'])
    assert content == "" and calls[0]["function"]["name"] == "get_weather"
    content, calls = run(ToolCallParser("named", NAMES, "get_weather"), ['{"city": "Ro'])
    assert content == "" and calls[0]["function"]["arguments"] == '{"city": "Ro'  # cut by max_tokens: as streamed


def test_hermes_arguments_stream_as_they_come():
    parser = ToolCallParser("auto", NAMES)
    pieces = ['<tool_call>\n{"name": "add", "arguments": ', '{"a": 1', ', "b": {"c": 2}', '}', '}\n</tool_call>']
    seen = [parser.feed(p)[1] for p in pieces]
    assert seen[0][0]["function"] == {"name": "add", "arguments": ""} and seen[0][0]["id"].startswith("call_")
    assert [d["function"]["arguments"] for step in seen[1:] for d in step] == ['{"a": 1', ', "b": {"c": 2', '}', '}']
    assert json.loads(parser.calls[0]["function"]["arguments"]) == {"a": 1, "b": {"c": 2}}
    # a call cut off before its own closing brace keeps the arguments' last one
    cut = ToolCallParser("auto", NAMES)
    content, calls = run(cut, ['<tool_call>{"name": "add", "arguments": {"a": 1}'])
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"a": 1}


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_one_call_at_most_without_parallel_calls(step):
    """parallel_tool_calls false: the first call only; the others are dropped, never given as content."""
    content, calls = run(ToolCallParser("auto", NAMES, max_calls=1), split_every(HERMES + "\nDone.", step))
    assert content.split() == ["Let", "me", "check.", "Done."]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    held = '[{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2}}]'
    assert run(ToolCallParser("auto", NAMES, max_calls=1), split_every(held, step))[1][0]["function"]["arguments"] == '{"a": 1}'
    assert len(run(ToolCallParser("auto", NAMES, max_calls=1), split_every(held, step))[1]) == 1
    cut = HERMES[: HERMES.rindex("}}")]  # the dropped call cut off by max_tokens: still dropped
    content, calls = run(ToolCallParser("auto", NAMES, max_calls=1), split_every(cut, step))
    assert content.strip() == "Let me check." and len(calls) == 1


def test_required_grammar_takes_one_call_without_parallel_calls():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert "maxItems" not in json.loads(forced_calls(tools, "required").json)
    assert json.loads(forced_calls(tools, "required", parallel=False).json)["maxItems"] == 1
