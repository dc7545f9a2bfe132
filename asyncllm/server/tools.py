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
import re
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


def forced_calls(tools: list[dict[str, Any]], tool_choice: Any, parallel: bool = True) -> StructuredOutputs | None:
    """The grammar of tool_choice "required" (a JSON array of one or more calls; exactly one unless `parallel`) or
    of a named function (its arguments object); None for "auto" and "none"."""
    if isinstance(tool_choice, dict):
        tool = next(t for t in tools if tool_name(t) == tool_choice["function"]["name"])
        return StructuredOutputs(json=parameters(tool))
    if tool_choice != "required":
        return None
    call = [{"type": "object", "properties": {"name": {"const": tool_name(t)}, "arguments": parameters(t)},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return StructuredOutputs(json={"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}),
                                   "items": {"anyOf": call}})


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


SKIPPED = -2  # ToolCallParser._args_at inside a call it drops (past max_calls)

# the head of a Hermes call, up to where its arguments begin
_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass
class ToolCallParser:
    """One choice's text -> content and tool calls, fed with text deltas (streamed) or all at once (the same
    code: a call's arguments are exactly the concatenation of its streamed deltas). `mode`: "auto", "required" (a
    JSON array of calls, given at the end), "named" (the whole text is the arguments of `name`, streamed).
    `feed` / `finish` return (content, tool-call deltas in OpenAI's streaming shape); `calls` holds the calls.
    `max_calls` 1 (`parallel_tool_calls: false`): calls after the first are dropped, never given as content."""

    mode: str
    names: frozenset[str]
    name: str | None = None
    max_calls: int | None = None  # None: any number
    calls: list[dict[str, Any]] = field(default_factory=list)
    _buffer: str = ""  # text not given out yet (a possible call)
    _held: bool = False  # auto: the whole answer may be a Llama 3 JSON call (decided at the end)
    _started: bool = False
    _args_at: int = -1  # auto: inside a Hermes call whose head was read, where its arguments begin in _buffer
    # (SKIPPED: inside a call past max_calls)
    _sent: int = 0  # characters of those arguments given out

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """A text delta -> (content to stream now, tool-call deltas)."""
        if self.mode == "named":
            if not text:
                return "", []
            deltas = [] if self.calls else [self._start(self.name or "")]
            return "", _merge(deltas + [self._args(text)])
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
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        while True:
            if not buf.startswith(HERMES_OPEN):
                start = buf.find(HERMES_OPEN)
                if start < 0:
                    keep = _partial_suffix(buf, HERMES_OPEN)
                    content.append(buf[: len(buf) - keep])
                    buf = buf[len(buf) - keep :]
                    break
                content.append(buf[:start])
                buf = buf[start:]
            # inside a call: buf starts with <tool_call>
            if self._args_at < 0:
                head = _HERMES_HEAD.match(buf, len(HERMES_OPEN))
                if head is not None and json.loads(f'"{head.group(1)}"') in self.names:
                    if self._full:
                        self._args_at = SKIPPED
                    else:
                        deltas.append(self._start(json.loads(f'"{head.group(1)}"')))
                        self._args_at, self._sent = head.end(), 0
            end = buf.find(HERMES_CLOSE)
            if end < 0:
                if self._args_at >= 0:  # stream the arguments, holding back what may close the call
                    deltas += self._send(_open_arguments(buf[self._args_at :]))
                break
            if self._args_at >= 0:
                deltas += self._send(_final_arguments(buf[self._args_at : end]))
            elif self._args_at == SKIPPED:  # a call past max_calls: dropped
                pass
            else:  # not a call of these tools: it stays text
                content.append(buf[: end + len(HERMES_CLOSE)])
            self._args_at = -1
            buf = buf[end + len(HERMES_CLOSE) :]
        self._buffer = buf
        return "".join(content), _merge(deltas)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the text -> (content still held, tool-call deltas)."""
        if self.mode == "auto" and not self._held and self._args_at != -1:  # an unclosed call at the end
            deltas = self._send(_final_arguments(self._buffer[self._args_at :])) if self._args_at >= 0 else []
            self._buffer, self._args_at = "", -1
            return "", _merge(deltas)
        buf, self._buffer = self._buffer, ""
        if self.mode == "named":
            return "", []
        if self.mode == "required":
            parsed = _json(buf)
            if isinstance(parsed, list) and all(isinstance(c, dict) and c.get("name") in self.names for c in parsed):
                return "", self._whole([(c["name"], c.get("arguments", {})) for c in parsed])
            return buf, []
        if self._held:
            parsed = _json(buf.strip().removeprefix(PYTHON_TAG))
            items = parsed if isinstance(parsed, list) else [parsed]
            if items and all(isinstance(c, dict) and c.get("name") in self.names for c in items):
                return "", self._whole([(c["name"], c.get("parameters", c.get("arguments", {}))) for c in items])
        return buf, []

    @property
    def _full(self) -> bool:
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def _start(self, name: str) -> dict[str, Any]:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        return {"index": len(self.calls) - 1, **call, "function": dict(call["function"])}

    def _args(self, text: str) -> dict[str, Any]:
        self.calls[-1]["function"]["arguments"] += text
        return {"index": len(self.calls) - 1, "function": {"arguments": text}}

    def _send(self, arguments: str) -> list[dict[str, Any]]:
        """Give out the part of the current call's arguments not given yet (`arguments` only grows)."""
        new = arguments[self._sent :]
        self._sent = max(self._sent, len(arguments))
        return [self._args(new)] if new else []

    def _whole(self, found: list[tuple[Any, Any]]) -> list[dict[str, Any]]:
        deltas = []
        for name, args in found[: self.max_calls]:
            deltas.append(self._start(name))
            deltas.append(self._args(json.dumps(args if args is not None else {}, ensure_ascii=False)))
        return _merge(deltas)


def _open_arguments(text: str) -> str:
    """The arguments of a call still open: all but what may close the call (the start of its end tag, trailing
    whitespace and a last "}")."""
    text = text[: len(text) - _partial_suffix(text, HERMES_CLOSE)].rstrip()
    return text[:-1].rstrip() if text.endswith("}") else text


def _final_arguments(text: str) -> str:
    """The arguments of a call that ended (closed, or cut off): up to the "}" that closes the call, when dropping
    it leaves valid JSON (a call cut off before its own "}" keeps its last one)."""
    text = text.rstrip()
    if text.endswith("}") and _json(text[:-1].rstrip()) is not None:
        return text[:-1].rstrip()
    return text


def _merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive deltas of one call in one: its arguments concatenated."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if out and out[-1]["index"] == d["index"] and "name" not in d["function"]:
            last = out[-1]
            last["function"] = {**last["function"], "arguments": last["function"].get("arguments", "") + d["function"]["arguments"]}
        else:
            out.append(d)
    return out


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
