"""The official `openai` client against a running `python -m asyncllm.serve` (sync and async, streaming).

    python -m asyncllm.serve &          # serves SmolLM2-135M-Instruct on 127.0.0.1:8000
    python examples/openai_client.py
"""
import asyncio

import openai

BASE = "http://127.0.0.1:8000/v1"
MODEL = "SmolLM2-135M-Instruct"
messages = [{"role": "user", "content": "What is the capital of France?"}]

client = openai.OpenAI(base_url=BASE, api_key="unused")  # a key is needed only with --api-key
reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
print("sync:", reply.choices[0].message.content, reply.usage)

print("sync stream: ", end="")
for chunk in client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32, stream=True):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()


async def main() -> None:
    aclient = openai.AsyncOpenAI(base_url=BASE, api_key="unused")

    async def one(topic: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=f"A fact about {topic}:", max_tokens=24,
                                                  temperature=0.7, seed=1, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    for topic, text in zip(["cats", "the sea", "Mars"], await asyncio.gather(one("cats"), one("the sea"), one("Mars"))):
        print(f"async stream [{topic}]:{text}")


asyncio.run(main())
