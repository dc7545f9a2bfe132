"""Run under torchrun on N GPUs by test_gpu_tensor_parallel: the flashinfer all-reduce + add + RMSNorm kernel
against NCCL's all-reduce and the reference norm, for several row counts. Prints "ok" on rank 0."""
from __future__ import annotations

import torch

from asyncllm import distributed
from asyncllm_kernels import rms_norm_ref

device = torch.device("cuda", int(__import__("os").environ["LOCAL_RANK"]))
tp = distributed.init_from_env(None, device)
hidden = 1024
tp.use_fast_all_reduce("flashinfer", device, torch.bfloat16, hidden)
fused = tp.fused_norm
assert fused is not None and fused.max_rows == distributed.FAST_ALL_REDUCE_BYTES // (hidden * 2)
weight = torch.randn(hidden, device=device, dtype=torch.bfloat16)
for rows in (1, 3, 64, fused.max_rows):
    torch.manual_seed(100 + rows)  # same residual on every rank; a different partial sum per rank
    residual = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16) * (tp.rank + 1)
    assert fused.fits(x)
    total = x.float().clone()
    torch.distributed.all_reduce(total, group=tp.device_group)
    ref_res = residual.clone()
    ref = rms_norm_ref(total.to(torch.bfloat16), weight, 1e-5, residual=ref_res)
    for _ in range(3):  # the kernel's buffers rotate: repeated calls stay right
        res = residual.clone()
        out = fused(x, res, weight, 1e-5)
        torch.testing.assert_close(res, ref_res, atol=0.05, rtol=0.02)
        torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
assert not fused.fits(torch.empty(fused.max_rows + 1, hidden, device=device, dtype=torch.bfloat16))
distributed.shutdown()
if tp.rank == 0:
    print("ok")
