"""`python -m asyncllm.shell`: a chat REPL over AsyncEngine with streaming output. /reset clears the history,
/exit (or Ctrl-D) leaves. Options: the engine flags of `asyncllm serve` plus --max-tokens, --temperature, --system."""
from __future__ import annotations

import asyncio
import sys

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.errors import AsyncLLMError
from asyncllm.sampling_params import SamplingParams
from asyncllm.serve import engine_kwargs, parser


async def repl(args) -> int:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    async with AsyncEngine(args.model, **engine_kwargs(args)) as engine:
        print("asyncllm shell: /reset clears the conversation, /exit leaves.", flush=True)
        while True:
            try:
                line = await loop.run_in_executor(None, input, "> ")
            except EOFError:
                return 0
            line = line.strip()
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history = list(system)
                print("(conversation cleared)")
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            reply = []
            try:
                async for chunk in engine.stream(history, params):
                    print(chunk.text, end="", flush=True)
                    reply.append(chunk.text)
            except AsyncLLMError as e:
                print(f"\n[error: {e}]")
                history.pop()
                continue
            print()
            history.append({"role": "assistant", "content": "".join(reply)})


def run(argv: list[str] | None = None) -> int:
    p = parser()
    p.prog = "asyncllm shell"
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--system", default=None, help="system prompt")
    args = p.parse_args(argv)
    try:
        return asyncio.run(repl(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(run())
