"""Request schemas of the OpenAI-compatible API (pydantic). Unknown fields are ignored, like OpenAI's own server;
fields OpenAI (or vLLM) defines that this server does not implement are refused with a 400 naming them, unless their
value means "not used" (UNIMPLEMENTED): never silently ignored."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from asyncllm.errors import InvalidRequestError
from asyncllm.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputs


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# field -> the values that mean "not used" (accepted); any other value gets a 400 naming the field
UNIMPLEMENTED: dict[str, tuple[Any, ...]] = {
    # OpenAI's
    "best_of": (None, 1), "functions": (None, []), "function_call": (None, "none"), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
    "verbosity": (None,), "store": (None, False), "service_tier": (None, "auto", "default"),
    # vLLM's extensions
    "prompt_logprobs": (None,), "use_beam_search": (None, False), "length_penalty": (None, 1.0),
    "allowed_token_ids": (None,), "bad_words": (None, []), "truncate_prompt_tokens": (None,), "priority": (None, 0),
    "return_tokens_as_token_ids": (None, False), "spaces_between_special_tokens": (None, True),
    "logits_processors": (None, []), "prompt_embeds": (None,), "mm_processor_kwargs": (None, {}),
    "structural_tag": (None,), "guided_whitespace_pattern": (None,), "guided_decoding_backend": (None, "xgrammar", "auto"),
    "cache_salt": (None,), "request_id": (None,), "kv_transfer_params": (None,), "vllm_xargs": (None,),
}
CHAT_UNIMPLEMENTED: dict[str, tuple[Any, ...]] = {  # vLLM's chat extensions (completions implement echo and tokens)
    "echo": (None, False), "add_special_tokens": (None, False), "documents": (None, []), "chat_template": (None,),
}


def unimplemented_field(data: dict[str, Any], chat: bool) -> str | None:
    """The first field of a generation request body that asks for something not implemented, or None."""
    for table in (UNIMPLEMENTED, CHAT_UNIMPLEMENTED) if chat else (UNIMPLEMENTED,):
        for k, unused in table.items():
            if k in data and data[k] not in unused:
                return k
    return None


class StreamOptions(_Model):
    include_usage: bool = False


class JsonSchema(_Model):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class StructuredOutputsField(_Model):
    """vLLM's `structured_outputs` extension (one of)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _Generation(_Model):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # extension (as vLLM's): each choice also carries its generated token ids
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = Field(default=1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[str, float] | None = None  # token id (as JSON keys are strings) -> bias in [-100, 100]
    min_tokens: int = Field(default=0, ge=0)
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs, or its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "_Generation":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        if self.logit_bias and not all(k.isdigit() for k in self.logit_bias):
            raise ValueError("logit_bias keys must be token ids")
        return self

    def _logprobs(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) of SamplingParams."""
        return None, None

    def structured(self) -> StructuredOutputs | None:
        """The one structured-output constraint asked for, or None. Raises ValueError for several."""
        found: list[StructuredOutputs] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(StructuredOutputs(json_object=True))
        elif rf is not None and rf.type == "json_schema":
            assert rf.json_schema is not None
            found.append(StructuredOutputs(json=rf.json_schema.schema_))
        so = self.structured_outputs
        if so is not None:
            found.append(StructuredOutputs(json=so.json_, json_object=so.json_object, regex=so.regex,
                                           choice=tuple(so.choice) if so.choice is not None else None,
                                           grammar=so.grammar))
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                found.append(StructuredOutputs(**{name: tuple(value) if name == "choice" else value}))
        if len(found) > 1:
            raise InvalidRequestError("give one of response_format, structured_outputs and guided_*",
                                      "response_format")
        return found[0] if found else None

    def sampling_params(self, default_max_tokens: int | None, index: int = 0,
                        defaults: dict[str, float] | None = None) -> SamplingParams:
        """SamplingParams for choice `index` (choices with a seed get seed + index, so they differ). `defaults`:
        the model's generation_config values, for the fields the request leaves out."""
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        d = defaults or {}

        def pick(name: str, fallback: float) -> Any:
            value = getattr(self, name)
            return value if value is not None else d.get(name, fallback)

        return SamplingParams(
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=int(pick("top_k", 0)),
            min_p=pick("min_p", 0.0),
            seed=None if self.seed is None else (self.seed + index) % 2**64,  # stays a valid generator seed
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=list(self.stop_token_ids or []),
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            min_tokens=self.min_tokens,
            structured_outputs=self.structured(),
            **dict(zip(("logprobs", "prompt_logprobs"), self._logprobs())),
        )


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoiceFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # false: at most one call (the grammar of "required"; auto drops the rest)
    # the chat template's options (as vLLM's)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt set to false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def _logprobs(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    @property
    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    @property
    def tool_choice_value(self) -> Any:
        """"none" | "auto" | "required" | {"type": "function", ...}; default "auto" with tools, else "none"."""
        choice = self.tool_choice
        if choice is None:
            return "auto" if self.tools else "none"
        return choice if isinstance(choice, str) else choice.model_dump()

    def structured(self) -> StructuredOutputs | None:
        from asyncllm.server.tools import check_tools, forced_calls

        check_tools(self.tool_dicts, self.tool_choice_value)
        forced = forced_calls(self.tool_dicts, self.tool_choice_value, self.parallel_tool_calls)
        other = super().structured()
        if forced is not None and other is not None:
            raise InvalidRequestError("a required or named tool_choice cannot be combined with response_format",
                                      "tool_choice")
        return forced or other


# A completion's prompt: the usual shapes tried first, strictly, then the lax union (the result is the union's: a
# strict match is the one its smart mode picks). The smart union alone took ~90 us for a prompt of 550 token ids.
Prompt = Annotated[
    StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    | str | list[str] | list[int] | list[list[int]],
    Field(union_mode="left_to_right"),
]


class CompletionRequest(_Generation):
    prompt: Prompt
    max_tokens: int | None = Field(default=None, ge=0)  # 0: the prompt only (with echo and logprobs: scoring)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt comes back before the completion (with its log-probabilities)
    suffix: str | None = None
    add_special_tokens: bool = True  # (as vLLM's) text prompts get the tokenizer's special tokens (BOS)

    def _logprobs(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    @model_validator(mode="after")
    def _completion(self) -> "CompletionRequest":
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):  # validated: a list holds one kind (and is not empty)
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]
