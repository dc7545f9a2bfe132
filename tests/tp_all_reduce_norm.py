"""Run by torchrun from test_gpu_tensor_parallel: the fused all-reduce + residual add + RMSNorm kernel against
NCCL's all-gather and the torch reference, on every rank, for many back-to-back calls that alternate exchange slots
(a race between a rank staging its next input and a slow peer still reading shows as a wrong sum). Rank 0 prints
one JSON line: the number of calls checked and the worst differences."""
import json
import os

import torch
import torch.distributed as dist

from asyncllm import distributed
from asyncllm_kernels import rms_norm_ref

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
device = torch.device("cuda", rank)
torch.cuda.set_device(device)
dist.init_process_group("nccl")
dtype = torch.bfloat16
symm = distributed.SymmetricMemoryAllReduce(dist.group.WORLD, device, dtype, distributed.SYMM_MEM_ALL_REDUCE_BYTES)
gen = torch.Generator(device).manual_seed(100 + rank)  # different partial sums on every rank
calls, worst_out, worst_res, mismatched_ranks = 0, 0.0, 0.0, 0
for rows, cols in [(1, 4096), (3, 576), (64, 512), (128, 4096), (200, 1024), (5, 1000)]:
    weight = (torch.rand(cols, device=device, generator=torch.Generator(device).manual_seed(7)) + 0.5).to(dtype)
    inputs = [torch.randn(rows, cols, device=device, generator=gen).to(dtype) for _ in range(40)]
    residual = torch.randn(rows, cols, device=device, generator=torch.Generator(device).manual_seed(9)).to(dtype)
    ref_residual = residual.clone()
    outs = [symm.add_rms_norm(x, residual, weight, 1e-6, i % 2) for i, x in enumerate(inputs)]  # back to back
    for x, out in zip(inputs, outs):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        total = torch.zeros(rows, cols, device=device)
        for p in parts:  # rank order, float32, rounded once: the kernel's arithmetic
            total += p.float()
        ref = rms_norm_ref(total.to(dtype), weight, 1e-6, residual=ref_residual)
        worst_out = max(worst_out, (out.float() - ref.float()).abs().max().item())
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out)
        mismatched_ranks += sum(not torch.equal(g, gathered[0]) for g in gathered)
        calls += 1
    worst_res = max(worst_res, (residual.float() - ref_residual.float()).abs().max().item())
if rank == 0:
    print(json.dumps({"calls": calls, "max_out_diff": worst_out, "max_residual_diff": worst_res,
                      "ranks_differing": mismatched_ranks}), flush=True)
del symm
dist.barrier()
dist.destroy_process_group()
