"""Triton kernels, imported as `asyncllm_kernels` (a bare `kernels` would shadow the Hugging Face package).

Empty until the GPU fast path lands: the engine runs on the torch reference implementations meanwhile.
"""
