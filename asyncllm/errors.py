"""Errors raised by the public API. Each one is something a caller can act on."""


class AsyncLLMError(Exception):
    """Base class of every error asyncllm raises on purpose."""


class InvalidRequestError(AsyncLLMError, ValueError):
    """The request can never be served as asked (bad parameters, or too long for the model or the KV cache)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class OutOfMemoryError(AsyncLLMError, RuntimeError):
    """The KV cache cannot hold even one request of `max_model_len` tokens."""


class ModelNotFoundError(AsyncLLMError, ValueError):
    """The model path does not exist, or its architecture is not supported."""


class ModelLoadError(AsyncLLMError, ValueError):
    """The model's files cannot be read (invalid config.json, truncated or corrupt weights) or do not match its
    config (a missing or misshapen weight)."""


class EngineDeadError(AsyncLLMError, RuntimeError):
    """The engine loop failed; the engine serves no more requests."""


class EngineShutdownError(EngineDeadError):
    """The engine is shutting down: it admits no new request, and a request it had to cut short ends with this
    error (never with a normal finish)."""


class EngineOverloadedError(AsyncLLMError, RuntimeError):
    """Too much work is queued already (e.g. prompts waiting for the tokenizer): retry later."""
