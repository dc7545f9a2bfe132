"""Sums up a serving step trace (`bench_serving.py --step-trace FILE`): one JSON line per file.

gap_ms mean: time between applied steps (gaps over 1 s, idle, left out); p50 / p99: weighted by the step's decode
rows (each row is one stream's inter-token gap, as the clients see them, less HTTP); gpu_ms_mean: the timed steps'
mean GPU time (from an event recorded before the step's inputs are prepared: host work the GPU waited for counts;
tools/phase_trace.py has the pure GPU time); mixed_fit: GPU ms = intercept + slope x prompt tokens over the steps
with prompt tokens and decode rows (least squares); decode_ms: median GPU time of steps without prompt tokens. With
the model's decode step time these say what a step that prefills costs the decoding streams.
    python tools/step_trace.py FILE...
"""
from __future__ import annotations

import json
import sys

import numpy as np


def summary(path: str) -> dict:
    a = np.loadtxt(path, ndmin=2)
    t, prompt, decode, gpu = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    gaps, rows = np.diff(t) * 1e3, decode[1:]  # a step's gap: since the step before was applied
    order = np.argsort(gaps)
    weight = np.cumsum(rows[order]) / max(rows.sum(), 1)
    gap = {q: round(float(gaps[order][min(np.searchsorted(weight, q), len(gaps) - 1)]), 2) for q in (0.5, 0.99)}
    out = dict(trace=path, steps=len(a),
               gap_ms={"mean": round(float(gaps[gaps < 1e3].mean()), 2), "p50": gap[0.5], "p99": gap[0.99]},
               rows_in_gaps_over_3x_p50=round(float(rows[gaps > 3 * gap[0.5]].sum() / max(rows.sum(), 1)), 4))
    mixed = (prompt > 0) & (decode > 0) & (gpu > 0)
    if mixed.sum() >= 3:
        slope, intercept = np.polyfit(prompt[mixed], gpu[mixed], 1)
        out["mixed_fit"] = dict(steps=int(mixed.sum()), intercept_ms=round(float(intercept), 2),
                                slope_us_per_token=round(float(slope) * 1e3, 2))
    if (gpu > 0).any():  # against the mean gap: how much of the steps' time the GPU was busy with them
        out["gpu_ms_mean"] = round(float(gpu[gpu > 0].mean()), 2)
    alone = (prompt == 0) & (gpu > 0)
    if alone.any():
        out["decode_ms"] = round(float(np.median(gpu[alone])), 2)
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(summary(path)), flush=True)
