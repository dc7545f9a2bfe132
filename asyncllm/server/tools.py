"""Tool calling (chat completions): the tools go into the prompt, `tool_choice` decides how the model may answer,
and its tool calls are parsed out of its text.

- The tools are rendered by the model's chat template (`apply_chat_template(tools=...)`). A template that does not
  use `tools` gets them in a system message instead, in the Hermes format (`<tool_call>` JSON), which `auto` parses.
- tool_choice "none": the tools are in the prompt, the answer is text. "auto": the model may answer with calls in
  the Hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, Qwen 2.5/3, Hermes) or the Llama 3
  JSON format (the whole answer `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`).
  "required" and a named function are enforced by a grammar: the answer is a JSON array of calls
  (`[{"name": ..., "arguments": {...}}]`, each validating against its tool's parameters), or the named function's
  arguments object; even a tiny model then produces a valid call.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from asyncllm.errors import InvalidRequestError
from asyncllm.sampling_params import StructuredOutputs

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def tool_name(tool: dict[str, Any]) -> str:
    return tool["function"]["name"]


def parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def check_tools(tools: list[dict[str, Any]], tool_choice: Any) -> str | None:
    """Validate tools and tool_choice; returns the forced function's name (a named tool_choice) or None."""
    names = [tool_name(t) for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool names must be unique", "tools")
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return name
    if tool_choice in ("required", "auto") and not tools:
        raise InvalidRequestError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    return None


def forced_calls(tools: list[dict[str, Any]], tool_choice: Any) -> StructuredOutputs | None:
    """The grammar of tool_choice "required" (a JSON array of one or more calls) or of a named function (its
    arguments object); None for "auto" and "none"."""
    if isinstance(tool_choice, dict):
        tool = next(t for t in tools if tool_name(t) == tool_choice["function"]["name"])
        return StructuredOutputs(json=parameters(tool))
    if tool_choice != "required":
        return None
    call = [{"type": "object", "properties": {"name": {"const": tool_name(t)}, "arguments": parameters(t)},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return StructuredOutputs(json={"type": "array", "minItems": 1, "items": {"anyOf": call}})


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The tools for a template that does not render them: a system message in the Hermes format."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more of these functions to answer. Their signatures are inside "
            f"<tools></tools>:\n<tools>\n{listing}\n</tools>\n\nTo call a function, answer with a JSON object "
            f"holding its name and arguments inside {HERMES_OPEN}{HERMES_CLOSE} tags, one per call:\n"
            f'{HERMES_OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n{HERMES_CLOSE}')


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      template_has_tools: bool) -> list[dict[str, Any]]:
    """Messages for the chat template: assistant tool calls with their arguments as objects (templates serialize
    them), and, for a template without tool support, the tools as a system message and earlier calls as Hermes
    text."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            calls = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"].get("arguments"))}}
                     for c in calls]
            m["tool_calls"] = calls
            if not template_has_tools:
                text = "\n".join(f'{HERMES_OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})}\n{HERMES_CLOSE}'
                                 for c in calls)
                m["content"] = ((m.get("content") or "") + "\n" + text).strip()
                del m["tool_calls"]
        out.append(m)
    if tools and not template_has_tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            raise InvalidRequestError("tool call arguments must be a JSON object", "messages") from None
    return arguments if arguments is not None else {}


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


@dataclass
class ToolCallParser:
    """One choice's text -> content and tool calls, fed with text deltas (streamed) or all at once. `mode`:
    "auto", "required" (a JSON array of calls), "named" (the arguments of `name`)."""

    mode: str
    names: frozenset[str]
    name: str | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    _buffer: str = ""  # text not given out yet (a possible call)
    _held: bool = False  # auto: the whole answer may be a Llama 3 JSON call (decided at the end)
    _started: bool = False

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """A text delta -> (content to stream now, calls completed by it)."""
        if self.mode != "auto":
            self._buffer += text
            return "", []
        buf = self._buffer + text
        if not self._started:
            stripped = buf.lstrip()
            if not stripped or (len(stripped) < len(PYTHON_TAG) and PYTHON_TAG.startswith(stripped)):
                self._buffer = buf  # undecided yet
                return "", []
            self._started = True
            self._held = stripped.startswith(("{", "[", PYTHON_TAG))
        if self._held:
            self._buffer = buf
            return "", []
        content, calls = [], []
        while True:
            start = buf.find(HERMES_OPEN)
            if start < 0:
                keep = _partial_suffix(buf, HERMES_OPEN)
                content.append(buf[: len(buf) - keep])
                buf = buf[len(buf) - keep :]
                break
            content.append(buf[:start])
            end = buf.find(HERMES_CLOSE, start)
            if end < 0:
                buf = buf[start:]
                break
            found = self._parse_hermes(buf[start + len(HERMES_OPEN) : end])
            if not found:  # not a call of these tools: it stays text
                content.append(buf[start : end + len(HERMES_CLOSE)])
            calls += found
            buf = buf[end + len(HERMES_CLOSE) :]
        self._buffer = buf
        return "".join(content), calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the text -> (content still held, calls completed)."""
        buf, self._buffer = self._buffer, ""
        if self.mode == "named":
            return self._add([(self.name, _json(buf))]) if _json(buf) is not None else (buf, [])
        if self.mode == "required":
            parsed = _json(buf)
            if isinstance(parsed, list) and all(isinstance(c, dict) and c.get("name") in self.names for c in parsed):
                return self._add([(c["name"], c.get("arguments", {})) for c in parsed])
            return buf, []
        if self._held:
            parsed = _json(buf.strip().removeprefix(PYTHON_TAG))
            items = parsed if isinstance(parsed, list) else [parsed]
            if items and all(isinstance(c, dict) and c.get("name") in self.names for c in items):
                return self._add([(c["name"], c.get("parameters", c.get("arguments", {}))) for c in items])
            return buf, []
        if buf.startswith(HERMES_OPEN):  # an unclosed call at the end: parse what is there
            calls = self._parse_hermes(buf[len(HERMES_OPEN) :])
            if calls:
                return "", calls
        return buf, []

    def _parse_hermes(self, body: str) -> list[dict[str, Any]]:
        parsed = _json(body)
        if isinstance(parsed, dict) and parsed.get("name") in self.names:
            return self._add([(parsed["name"], parsed.get("arguments", parsed.get("parameters", {})))])[1]
        return []

    def _add(self, found: list[tuple[Any, Any]]) -> tuple[str, list[dict[str, Any]]]:
        new = [_call(name, args if args is not None else {}) for name, args in found]
        self.calls += new
        return "", new


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (held back: the tag may be completing)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
