"""The OpenAI-compatible HTTP server (aiohttp), on the same event loop as the engine."""
