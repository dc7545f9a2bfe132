"""flashinfer's kernel call recorded at a step's first layer and replayed for the others (layers/flashinfer_attention.py)
gives what the wrapper's run() gives, on steps that prefill (mixed with decode rows) and on decode-only steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HQ, HK, D, BS = 8, 2, 64, 16


def _meta(query_lens: list[int], seq_lens: list[int], rng: np.random.Generator, num_blocks: int):
    from asyncllm.layers.attention import AttentionMetadata

    dev = torch.device("cuda")
    width = max(-(-s // BS) for s in seq_lens)
    blocks = rng.permutation(num_blocks)[: len(seq_lens) * width].reshape(len(seq_lens), width)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, device=dev), seq_lens=torch.tensor(seq_lens, device=dev),
        block_tables=torch.tensor(blocks, device=dev), slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64,
                                                                                device=dev),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, block_size=BS, block_tables_cpu=blocks.astype(np.int64))


@pytest.mark.parametrize("query_lens, seq_lens", [([1, 37, 1, 5, 1], [9, 60, 33, 5, 130]),  # prefill + decode rows
                                                  ([1] * 7, [3, 17, 16, 64, 100, 1, 250])])  # decode only
def test_recorded_kernel_call_equals_the_wrapper_on_every_layer(query_lens, seq_lens):
    from asyncllm.layers.flashinfer_attention import FlashInferAttentionBackend

    rng = np.random.default_rng(0)
    num_blocks, layers = 128, 4
    dev, dtype = torch.device("cuda"), torch.bfloat16
    backend = FlashInferAttentionBackend(dev, dtype, HQ, HK, D, D**-0.5)
    caches = torch.randn(layers, 2, num_blocks, BS, HK, D, dtype=dtype, device=dev)
    qs = torch.randn(layers, sum(query_lens), HQ, D, dtype=dtype, device=dev)
    meta = _meta(query_lens, seq_lens, rng, num_blocks)
    backend.plan(meta)
    got = torch.full_like(qs, float("nan"))
    for i in range(layers):
        backend.attend(qs[i], caches[i], backend.scale, got[i])
    assert backend.call is not None and backend.call.fn is not None, "this flashinfer's call was not recorded"
    want = torch.stack([backend.wrapper.run(qs[i], (caches[i][0], caches[i][1])) for i in range(layers)])
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    # every layer's output differs (the replays did not write one layer's result into all of them)
    assert not torch.equal(got[0], got[1])
    # the next plan records again: the old call (with the old plan's buffers) is dropped
    backend.plan(_meta(query_lens[::-1], seq_lens[::-1], rng, num_blocks))
    assert backend.call is None
