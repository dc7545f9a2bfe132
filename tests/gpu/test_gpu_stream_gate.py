"""StreamGate (engine/stream_gate.py): work queued behind a closed gate waits for the host, and a copy from
page-locked memory queued behind it carries what the host wrote before opening; structured outputs whose sampling
waits on the GPU behind a gate give the same tokens as when the host waits for the masks; a gate left closed is
opened when the engine shuts down."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from asyncllm import LLM, SamplingParams
from asyncllm.engine.stream_gate import StreamGate
from conftest import TOKENIZER_IDS, make_byte_level_tokenizer, make_tiny_model, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_work_behind_a_closed_gate_waits_and_copies_what_the_host_wrote():
    stream = torch.cuda.Stream()
    gate = StreamGate(stream)
    host = torch.zeros(4, dtype=torch.int32, pin_memory=True)
    with torch.cuda.stream(stream):
        tickets = [gate.close()]
        device = host.to("cuda", non_blocking=True)  # queued behind the gate: reads the host memory when it runs
        first = torch.cuda.Event()
        first.record(stream)
        tickets.append(gate.close())
        device2 = host.to("cuda", non_blocking=True)
        second = torch.cuda.Event()
        second.record(stream)
    time.sleep(0.05)
    assert not first.query() and not second.query()  # nothing passed the closed gate
    host.copy_(torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    gate.open(tickets[0])
    first.synchronize()
    assert device.cpu().tolist() == [1, 2, 3, 4]
    time.sleep(0.05)
    assert not second.query()  # the second gate is still closed
    host.copy_(torch.tensor([5, 6, 7, 8], dtype=torch.int32))
    gate.open(tickets[0])  # an older ticket opens nothing more
    time.sleep(0.02)
    assert not second.query()
    gate.open(tickets[1])
    second.synchronize()
    assert device2.cpu().tolist() == [5, 6, 7, 8]


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    large = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=128, initializer_range=0.08)
    return make_byte_level_tokenizer(make_tiny_model(tmp_path_factory.mktemp("gate") / "llama", "llama",
                                                     dtype_name="bfloat16", **{**large, **TOKENIZER_IDS}))


def structured_batch():
    from test_structured_outputs import BOUNDED

    from asyncllm.sampling_params import StructuredOutputs

    specs = [StructuredOutputs(regex="[0-9]{3}-[a-z]{2}[0-9]{4}"), StructuredOutputs(json=BOUNDED),
             StructuredOutputs(choice=["left", "right", "up"])]
    prompts = random_prompts(24, 300, 10, 100, seed=7)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, structured_outputs=specs[i % 4])
              if i % 4 < 3 else SamplingParams(temperature=1.0, seed=i, max_tokens=48, ignore_eos=True)
              for i in range(len(prompts))]
    return prompts, params


def test_gated_masks_give_the_tokens_of_host_waited_masks(byte_model):
    """Seeded sampling under grammars: the sampling queued behind a gate (masks filled after it was queued, by the
    native grammar workers or on the Python path) and the sampling queued once the host had the masks draw the
    same tokens; the gated runs did use gates, the first the native workers."""
    from asyncllm.engine.native_grammar import GrammarWork

    prompts, params = structured_batch()
    runs = []
    for gated, native in ((True, True), (True, False), (False, False)):
        llm = LLM(str(byte_model), device="cuda", dtype="bfloat16", max_model_len=512, num_kv_blocks=2048)
        assert llm.engine.overlap
        llm.engine.gate_masks = gated
        llm.engine.native_grammar = native
        runs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        if gated:
            gate = llm.engine.__dict__.get("_gate")
            assert gate is not None and gate._closed > 10, "the constrained steps did not go through the gate"
        else:
            assert "_gate" not in llm.engine.__dict__
        work = llm.engine.__dict__.get("_grammar_work")
        if native:  # (where the workers can be built)
            assert work is not None or GrammarWork.make(1) is None, "the native grammar workers were not used"
        else:
            assert work is None
        llm.engine.shutdown()
    assert runs[0] == runs[1] == runs[2]


def test_a_gate_left_closed_is_opened_at_shutdown(byte_model):
    """A step queued behind a gate whose masks never started (its caller stopped before `collect`): shutdown opens
    the gate instead of leaving the stream stalled (it would hang on the device's next synchronize)."""
    prompts, params = structured_batch()
    llm = LLM(str(byte_model), device="cuda", dtype="bfloat16", max_model_len=512, num_kv_blocks=2048)
    core = llm.engine
    for ids, p in zip(prompts[:3], params[:3]):
        core.add(core.make_request(ids, p))
    assert core.collect(core.launch(core.schedule())) is None  # the prompts (overlap: nothing to collect yet)
    core.launch(core.schedule())  # their next tokens are fed from the device: the sampling goes behind a gate
    assert core._to_fill is not None, "no step went behind a gate"
    done = threading.Event()

    def stop():
        core.shutdown()
        torch.cuda.synchronize()
        done.set()

    threading.Thread(target=stop, daemon=True).start()
    assert done.wait(30), "the stream stayed stalled behind the gate"
