"""`python -m asyncllm.shell` / `asyncllm shell`: a chat REPL over AsyncEngine with streaming output.

/reset clears the history, /exit (or Ctrl-D) leaves. Ctrl-C during a reply stops the reply and returns to the
prompt; Ctrl-C at the prompt leaves. Options: the engine flags of `asyncllm serve` plus --max-tokens,
--temperature, --system (`asyncllm shell --help`).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.errors import AsyncLLMError
from asyncllm.sampling_params import SamplingParams
from asyncllm.serve import add_engine_flags, engine_kwargs


class StdinLines:
    """Lines from standard input read on the event loop (no thread blocked in input(), so Ctrl-C at the prompt
    ends the shell at once). Raw reads: a pipe may deliver several lines at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.fd = loop, sys.stdin.fileno()
        self.buffer, self.eof = b"", False
        self.regular_file = stat.S_ISREG(os.fstat(self.fd).st_mode)  # `< file`: never blocks, cannot be polled
        self.waiter: asyncio.Future[str | None] | None = None

    async def next(self) -> str | None:
        """The next line, or None at end of input or when `cancel` is called."""
        while b"\n" not in self.buffer and not self.eof:
            if self.regular_file:
                self._readable()
                continue
            self.waiter = self.loop.create_future()
            self.loop.add_reader(self.fd, self._readable)
            try:
                if await self.waiter is None:
                    return None
            finally:
                self.loop.remove_reader(self.fd)
                self.waiter = None
        if not self.buffer and self.eof:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")

    def _readable(self) -> None:
        data = os.read(self.fd, 1 << 16)
        self.buffer += data
        self.eof = not data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result("")

    def cancel(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def repl(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    async with AsyncEngine(args.model, **engine_kwargs(args)) as engine:
        lines = StdinLines(loop)
        reply: asyncio.Task[str] | None = None

        def interrupt() -> None:  # Ctrl-C: stop the reply if one is running, else leave
            if reply is not None and not reply.done():
                reply.cancel()
            else:
                lines.cancel()

        async def answer() -> str:
            out = []
            async for chunk in engine.stream(history, params):
                print(chunk.text, end="", flush=True)
                out.append(chunk.text)
            return "".join(out)

        loop.add_signal_handler(signal.SIGINT, interrupt)
        print("asyncllm shell: /reset clears the conversation, /exit or Ctrl-D leaves; Ctrl-C stops a reply.",
              flush=True)
        while True:
            print("> ", end="", flush=True)
            line = await lines.next()
            if line is None:
                print()
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
            reply = asyncio.create_task(answer())
            await asyncio.wait([reply])
            if reply.cancelled():
                print("\n[interrupted]", flush=True)
                history.pop()
                continue
            if isinstance(reply.exception(), AsyncLLMError):
                print(f"\n[error: {reply.exception()}]")
                history.pop()
                continue
            print()
            history.append({"role": "assistant", "content": reply.result()})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncllm shell", description="Chat with a model in the terminal (streamed "
                                "replies; Ctrl-C stops a reply, /reset, /exit).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_flags(p)
    return p


def run(argv: list[str] | None = None) -> int:
    from asyncllm.serve import failed, parse_args, setup_logging

    args = parse_args(parser(), argv)
    setup_logging(args.log_level)
    try:
        return asyncio.run(repl(args))
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        return 130
    except Exception as e:
        return failed(e)


if __name__ == "__main__":
    sys.exit(run())
