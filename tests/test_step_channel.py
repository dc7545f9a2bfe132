"""The shared-memory ring that carries each step from rank 0 to the followers: messages of any size arrive whole
and in order (across slot boundaries and ring wrap-around), and a dead peer raises an error naming its rank
instead of hanging."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from asyncllm import step_channel
from asyncllm.step_channel import NUM_SLOTS, SLOT_WORDS, PeerDiedError, StepChannel


@pytest.fixture
def pair():
    leader = StepChannel.create(2)
    follower = StepChannel.attach(leader.name, 2, 1)
    leader.unlink()
    yield leader, follower
    follower.close()
    leader.close()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_messages_arrive_whole_and_in_order(pair):
    leader, follower = pair
    rng = np.random.default_rng(0)
    # up to one message longer than the whole ring (the reader frees slots while the sender still writes it)
    sizes = [0, 1, SLOT_WORDS - 1, SLOT_WORDS, 3 * SLOT_WORDS + 5, NUM_SLOTS * SLOT_WORDS + 3]
    sizes += [int(x) for x in rng.integers(1, 300, 3 * NUM_SLOTS)]
    msgs = [rng.integers(-2**62, 2**62, n, dtype=np.int64) for n in sizes]
    got: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: got.extend(follower.recv() for _ in msgs))
    reader.start()
    for m in msgs:  # the sender runs ahead of the reader by up to NUM_SLOTS slots
        leader.send(m)
    reader.join(timeout=30)
    assert len(got) == len(msgs)
    for m, g in zip(msgs, got):
        np.testing.assert_array_equal(g, m)


def test_sender_waits_for_a_full_ring_and_names_a_dead_follower(pair, monkeypatch):
    leader, follower = pair
    monkeypatch.setattr(step_channel, "LIVENESS_EVERY_S", 0.1)
    for i in range(NUM_SLOTS):  # nobody reads: the ring fills, nothing blocks yet
        leader.send(np.array([i]))
    follower.pids[0] = dead_pid()
    t = time.monotonic()
    with pytest.raises(PeerDiedError, match="rank 1"):
        leader.send(np.array([99]))
    assert time.monotonic() - t < 5


def test_follower_names_a_dead_leader(pair, monkeypatch):
    _, follower = pair
    monkeypatch.setattr(step_channel, "LIVENESS_EVERY_S", 0.1)
    follower.ctrl[0] = dead_pid()
    with pytest.raises(PeerDiedError, match="rank 0"):
        follower.recv()
