"""Tensor parallelism on CPU (gloo): `torchrun --nproc-per-node 2` gives exactly the float32 tokens of TP 1,
through `LLM` and through the HTTP server; a follower that dies ends the job with an error; SIGTERM ends it
cleanly."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from asyncllm import LLM, SamplingParams
from conftest import (follower_pid, free_port, leader_pid, make_tiny_model, random_prompts, start_server,
                      start_tp_server, stop_tp_server)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ASYNCLLM_COLLECTIVE_TIMEOUT_S": "20"}
PROMPTS = random_prompts(5, 512, 3, 40, seed=31)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama-kv2", "qwen2-kv1"])
def model(request, tmp_path_factory):
    """4 query heads; 2 KV heads (split over 2 ranks) or 1 (replicated on both); qwen2 has q/k/v biases."""
    arch, kv = request.param.split("-kv")
    return make_tiny_model(tmp_path_factory.mktemp("tp") / request.param, arch, num_key_value_heads=int(kv),
                           intermediate_size=96, vocab_size=511)  # a vocabulary that does not split evenly


def tp_generate(model: Path, out: Path, *args: str, prompts: list[list[int]] = PROMPTS) -> subprocess.CompletedProcess:
    """tests/tp_generate.py over 2 ranks (args: device dtype max_tokens config_json params_json)."""
    return subprocess.run([*TORCHRUN, str(Path(__file__).parent / "tp_generate.py"), str(model), str(out),
                           json.dumps(prompts), *args], env=ENV, capture_output=True, text=True, timeout=300)


def tp1_tokens(model: Path, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    return [o.token_ids for o in LLM(str(model), max_model_len=512).generate(prompts, GREEDY, use_tqdm=False)]


def test_llm_under_torchrun_equals_tp1(model, tmp_path):
    out = tmp_path / "tokens.json"
    proc = tp_generate(model, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())["tokens"] == tp1_tokens(model)


def test_sampling_chunked_prefill_and_preemption_under_torchrun_equal_tp1(model, tmp_path):
    """Seeded sampling with top-k/top-p and penalties, prompts cut into 16-token chunks, and a cache of 8 blocks that
    forces preemptions: rank 0 decides all of it, the follower only runs the steps, and nothing changes."""
    config = dict(max_model_len=128, num_kv_blocks=8, max_num_batched_tokens=16, max_num_seqs=3)
    params = dict(temperature=0.8, top_k=40, top_p=0.9, seed=7, presence_penalty=0.5, repetition_penalty=1.1,
                  max_tokens=16, ignore_eos=True)
    out = tmp_path / "tokens.json"
    proc = tp_generate(model, out, "cpu", "float32", "16", json.dumps(config), json.dumps(params))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    llm = LLM(str(model), **config)
    ref = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(**params), use_tqdm=False)]
    assert got["preemptions"] > 0 and got["preemptions"] == llm.engine.scheduler.stats.num_preemptions
    assert got["tokens"] == ref


@pytest.mark.parametrize("model", ["llama-kv2"], indirect=True)  # the transport, not the model, is under test
def test_broadcast_step_transport_equals_tp1(model, tmp_path):
    """Steps by torch.distributed broadcasts (the multi-host transport) on one host: the tokens of TP 1, with
    prefill steps longer than the broadcast's first part (its second broadcast) and decode steps within it."""
    prompts = PROMPTS + random_prompts(4, 511, 450, 500, seed=32)  # ~1,900 prompt tokens: a step of > 4,096 words
    out = tmp_path / "tokens.json"
    proc = tp_generate(model, out, "cpu", "float32", "12", json.dumps({"step_transport": "broadcast"}), prompts=prompts)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "steps by broadcast" in proc.stdout + proc.stderr
    assert json.loads(out.read_text())["tokens"] == tp1_tokens(model, prompts)


@pytest.mark.parametrize("model", ["llama-kv2"], indirect=True)  # the transport, not the model, is under test
def test_two_node_launch_on_one_machine(model, tmp_path):
    """`torchrun --nnodes 2` twice (node ranks 0 and 1, one process each, rendezvous on 127.0.0.1) with broadcast
    steps: the job a two-host user runs, on one machine."""
    port = free_port()
    out = tmp_path / "tokens.json"
    args = [str(Path(__file__).parent / "tp_generate.py"), str(model), str(out), json.dumps(PROMPTS), "cpu", "float32",
            "12", json.dumps({"step_transport": "broadcast"})]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), *args],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "steps by broadcast" in logs[0]
    assert json.loads(out.read_text())["tokens"] == tp1_tokens(model)


def start_two_nodes(model: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, list[str], subprocess.Popen]:
    """The HTTP server as two single-process torchrun "nodes" (broadcast steps); returns node 0 (rank 0: HTTP), its
    URL and output so far, and node 1 (the follower), once rank 0 is ready."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    serve = ["-m", "asyncllm.serve", "--model", str(model), "--device", "cpu", "--tp", "2", "--port", "0",
             "--max-model-len", "128", "--step-transport", "broadcast"]
    node1 = subprocess.Popen([*base, "--node-rank", "1", *serve], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        node0, url, lines = start_server([*base, "--node-rank", "0", *serve], env)
    except BaseException:
        os.killpg(node1.pid, signal.SIGKILL)
        raise
    return node0, url, lines, node1


TWO_NODE_ENV = {**ENV, "ASYNCLLM_PEER_DEAD_S": "3"}


@pytest.mark.parametrize("model", ["llama-kv2"], indirect=True)  # the transport, not the model, is under test
def test_two_nodes_serve_http_like_tp1_and_stop_on_sigterm(model):
    node0, url, lines, node1 = start_two_nodes(model, TWO_NODE_ENV)
    try:
        got = []
        for prompt in PROMPTS:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                          "ignore_eos": True, "return_token_ids": True}, timeout=60)
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["token_ids"])
        os.kill(leader_pid(lines), signal.SIGTERM)  # rank 0 ends the job on both nodes
        assert node0.wait(timeout=60) == 0 and node1.wait(timeout=60) == 0
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert got == tp1_tokens(model)


@pytest.mark.parametrize("model", ["llama-kv2"], indirect=True)  # the transport, not the model, is under test
def test_a_dead_node_ends_the_job_on_the_other_within_seconds(model):
    """The follower's whole node goes (its torchrun and worker killed): no agent on node 0 sees it, the heartbeat
    does, and rank 0 exits with an error naming rank 1."""
    node0, url, lines, node1 = start_two_nodes(model, TWO_NODE_ENV)
    try:
        follower = follower_pid(node1, [])
        os.killpg(node1.pid, signal.SIGKILL)
        os.kill(follower, signal.SIGKILL)  # torchrun may run it in a process group of its own
        start = time.monotonic()
        code = node0.wait(timeout=60)
        assert code != 0 and time.monotonic() - start < 20
        report = "".join(lines) + node0.stdout.read()  # type: ignore[union-attr]
        assert "tensor-parallel rank 1 stopped answering" in report, report[-3000:]
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def test_auto_step_transport_tells_one_host_from_several(monkeypatch):
    """auto picks the ring only when every rank shares rank 0's machine (its fingerprint, as rank 0 broadcasts it)."""
    import asyncllm.distributed as d

    monkeypatch.setattr(d.dist, "all_reduce", lambda t, op=None, group=None: None)
    monkeypatch.setattr(d.dist, "broadcast", lambda t, src, group=None: None)  # rank 0's fingerprint is this one's
    assert d._on_one_host(None, 2) is True
    monkeypatch.setattr(d.dist, "broadcast", lambda t, src, group=None: t.add_(1))  # another machine's
    assert d._on_one_host(None, 2) is False


def test_symm_mem_all_reduce_needs_cuda(model, tmp_path):
    proc = tp_generate(model, tmp_path / "o", "cpu", "float32", "4", json.dumps({"all_reduce": "symm_mem"}))
    assert proc.returncode != 0 and "all_reduce='symm_mem' needs CUDA GPUs" in proc.stdout + proc.stderr


def test_http_server_under_torchrun_equals_tp1_and_stops_on_sigterm(model):
    proc, url, lines = start_tp_server(model, 2, "cpu", ENV)
    try:
        follower = follower_pid(proc, lines)
        got = []
        for prompt in PROMPTS:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                          "ignore_eos": True, "return_token_ids": True}, timeout=60)
            assert r.status_code == 200, r.text
            got.append(r.json())
        os.kill(leader_pid(lines), signal.SIGTERM)  # rank 0 ends the job: followers exit, torchrun exits 0
        assert proc.wait(timeout=60) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(follower, 0)  # the follower is gone too
    finally:
        stop_tp_server(proc)
    ids = [choice["token_ids"] for body in got for choice in body["choices"]]
    assert ids == tp1_tokens(model)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_dead_rank_ends_the_job_with_an_error_naming_it(model, victim):
    proc, url, lines = start_tp_server(model, 2, "cpu", ENV)
    try:
        pid = follower_pid(proc, lines) if victim else leader_pid(lines)
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        code = proc.wait(timeout=30)
        assert code != 0 and time.monotonic() - t < 30
        report = "".join(lines) + proc.stdout.read()  # type: ignore[union-attr]
        assert re.search(rf"rank\s*:\s*{victim}\b", report), report[-3000:]
    finally:
        stop_tp_server(proc)
