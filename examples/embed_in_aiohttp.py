"""Embed `AsyncEngine.stream()` in your own aiohttp app: GET /poem?topic=... streams a poem as plain text.

    python examples/embed_in_aiohttp.py   # then: curl -N 'localhost:8080/poem?topic=the%20sea'
"""
from aiohttp import web

from asyncllm import AsyncEngine, SamplingParams

engine = AsyncEngine(max_model_len=1024)  # the bundled SmolLM2; loads in the background on start-up


async def poem(request: web.Request) -> web.StreamResponse:
    topic = request.query.get("topic", "autumn")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    messages = [{"role": "user", "content": f"Write a short poem about {topic}."}]
    # if the client hangs up, this handler is cancelled and the stream aborts its request (KV blocks freed)
    async for chunk in engine.stream(messages, SamplingParams(temperature=0.7, max_tokens=128)):
        await resp.write(chunk.text.encode())
    await resp.write_eof()
    return resp


async def lifecycle(app: web.Application):
    await engine.start()
    yield
    await engine.shutdown()


app = web.Application()
app.cleanup_ctx.append(lifecycle)
app.router.add_get("/poem", poem)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=8080, handler_cancellation=True)
