"""Summarize a py-spy raw profile (`bench_serving.py --profile FILE`) as microseconds of sampled time per streamed
token: the functions with the most inclusive time, then the hottest lines.

  python tools/profile_summary.py FILE --tokens N [--rate 500] [--top 40] [--only SUBSTRING ...]
"""
from __future__ import annotations

import argparse
import collections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--tokens", type=int, required=True, help="tokens streamed while py-spy recorded")
    ap.add_argument("--rate", type=float, default=500.0, help="py-spy's samples per second (bench_serving records at 500)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--only", nargs="*", default=[], help="keep stacks containing one of these substrings")
    a = ap.parse_args()
    inclusive: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    total = 0
    with open(a.file) as f:
        for raw in f:
            stack, _, count = raw.rstrip().rpartition(" ")
            if not stack or (a.only and not any(s in stack for s in a.only)):
                continue
            n, frames = int(count), stack.split(";")
            total += n
            for name in {fr.split(" (")[0] for fr in frames[1:]}:
                inclusive[name] += n
            lines[frames[-1].split("/")[-1]] += n

    def us(n: int) -> str:
        return f"{n / a.rate * 1e6 / a.tokens:7.2f}"

    print(f"{us(total)} us/token in {total} samples")
    for name, n in inclusive.most_common(a.top):
        print(us(n), name)
    print("--- hottest lines (self time)")
    for name, n in lines.most_common(a.top // 2):
        print(us(n), name)


if __name__ == "__main__":
    main()
