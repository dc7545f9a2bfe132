"""langchain-openai against asyncllm's server: tool calling (`bind_tools`) and structured output
(`with_structured_output`), unchanged LangChain code.

    python -m asyncllm.serve --port 8000 &         # the bundled SmolLM2-135M-Instruct
    pip install langchain-openai
    python examples/langchain_tools.py [http://127.0.0.1:8000/v1]

A 135M model is no agent: `tool_choice="required"` (or a named tool) makes the server enforce a valid call with a
grammar, and `method="function_calling"` does the same for structured output, so even this model answers in
shape. With a model trained for tools (Qwen 2.5/3, Hermes, Llama 3.1) `tool_choice="auto"` works as well.
"""
from __future__ import annotations

import sys

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city."""
    return f"21 degrees {unit} and sunny in {city}"


class Person(BaseModel):
    name: str = Field(description="the person's name", max_length=30)
    age: int = Field(description="age in years", ge=0, le=120)


def main(base_url: str) -> None:
    llm = ChatOpenAI(base_url=base_url, api_key="unused", model="SmolLM2-135M-Instruct", temperature=0,
                     max_tokens=128)
    with_tools = llm.bind_tools([get_weather], tool_choice="required")
    message = with_tools.invoke("What is the weather in Paris?")
    print("tool calls:", message.tool_calls)
    for call in message.tool_calls:
        print("  ->", get_weather.invoke(call["args"]))
    person = llm.with_structured_output(Person, method="function_calling").invoke("Invent a person.")
    print("structured output:", repr(person))
    person = llm.with_structured_output(Person, method="json_schema").invoke("Invent a person.")
    print("json_schema:", repr(person))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1")
