#!/usr/bin/env python3
"""Whole-process timings of service operations through the `cloister`
binary: a candidate binary against a baseline binary, in the same run, on
the same environment, alternating A B A B so that drift in the machine's
speed hits both alike (docs/BENCHMARKS.md, "The house").

Usage: bench/service_bench.py BASELINE_BIN CANDIDATE_BIN [--runs N]
       [--data FILE.jsonl.gz]

Both binaries must read the same environment format. The environment is
set up once with the candidate: users, the bundled SpamAssassin corpus,
the bundled plugins approved. Then, per operation, each binary runs N
times (after one warm-up each); the report gives the medians and the
median of the pairwise ratios candidate / baseline.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

from cloister_cli import setup as new_env, sh


def setup(bin_, data, root):
    env, admin, sci, digests = new_env(bin_, root)
    sh(bin_, env, "dataset", "import", "spam", data, token=sci)
    return env, admin, sci, digests


def timed(bin_, env, tok, args):
    t = time.monotonic()
    sh(bin_, env, *args, token=tok)
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline")
    ap.add_argument("candidate")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--data", default="data/spamassassin/spamassassin.jsonl.gz")
    a = ap.parse_args()
    if a.runs < 1:
        sys.exit("--runs must be at least 1")
    with tempfile.TemporaryDirectory() as root:
        env, admin, sci, d = setup(a.candidate, a.data, root)
        # (name, token, arguments)
        ops = {
            "train logreg (plugins + training + evaluation)": (sci, [
                "train", "--dataset", "spam",
                "--preprocess", d["text-normalize"],
                "--features", d["hashed-ngrams"],
                "--template", "logreg",
            ]),
            "dataset stats": (sci, ["dataset", "stats", "spam"]),
            "model list --json": (sci, ["model", "list", "--json"]),
            "audit verify": (admin, ["audit", "verify"]),
        }
        print(f"machine: {os.cpu_count()} CPUs; runs: {a.runs} per binary and operation")
        print(f"baseline: {a.baseline}\ncandidate: {a.candidate}\n")
        print("| operation | baseline median, s | candidate median, s | ratio (median of pairs) |")
        print("|---|---:|---:|---:|")
        for name, (tok, args) in ops.items():
            timed(a.baseline, env, tok, args)
            timed(a.candidate, env, tok, args)
            base, cand = [], []
            for _ in range(a.runs):
                base.append(timed(a.baseline, env, tok, args))
                cand.append(timed(a.candidate, env, tok, args))
            ratio = statistics.median(c / b for b, c in zip(base, cand))
            print(
                f"| {name} | {statistics.median(base):.3f} | "
                f"{statistics.median(cand):.3f} | {ratio:.3f} |"
            )


if __name__ == "__main__":
    main()
