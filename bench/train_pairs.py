#!/usr/bin/env python3
"""Two builds of `cloister` training the same models, alternately
(docs/BENCHMARKS.md, "Training speed").

Sets up one environment with the bundled plugins approved and the given
datasets imported, trains every (features, template) pipeline once with the
first binary to fill the feature cache and store the fits, then runs
`--rounds` rounds: in each, every pipeline's `cloister train` with binary A
and then with binary B (or B first with `--b-first`). Each `train` is timed
whole (process start to exit); its epoch lines give the median epoch's
samples/s. Prints one line per run, then per pipeline: each binary's wall
times and median epoch samples/s, the test accuracies, and the wall-time
ratio A / B per round (above 1: B is faster) with its median.

Both binaries read the one environment, so they must share a store format
(builds of nearby commits). The machine's noise between consecutive runs is
what the alternation and the per-round ratios are for.

Usage: bench/train_pairs.py BIN_A BIN_B DATA.jsonl.gz [DATA ...] [--rounds 3]
       [--features tfidf,hashed-ngrams] [--templates logreg,mlp] [--b-first]
       [--set KEY=VALUE ...]   (passed to every `train`)
"""

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time

from cloister_cli import setup, sh


def train(bin_, env, sci, dataset, pre, feat, template, sets):
    """One timed `cloister train`: (wall seconds, median epoch samples/s,
    test accuracy)."""
    args = ["train", "--dataset", dataset, "--preprocess", pre, "--features", feat,
            "--template", template]
    for s in sets:
        args += ["--set", s]
    started = time.perf_counter()
    out = sh(bin_, env, *args, token=sci)
    wall = time.perf_counter() - started
    rates = sorted(int(r) for r in re.findall(r"(\d+) samples/s", out))
    model = re.findall(r"m-[0-9a-f]{12}", out)[-1]
    shown = json.loads(sh(bin_, env, "model", "show", model, "--json", token=sci))
    return wall, rates[len(rates) // 2], shown["evaluation"]["accuracy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--features", default="tfidf,hashed-ngrams")
    ap.add_argument("--templates", default="logreg,mlp")
    ap.add_argument("--b-first", action="store_true")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="cloister-pairs-")
    try:
        env, _, sci, digests = setup(args.a, root)
        pre = digests["text-normalize"]
        names = []
        for path in args.data:
            name = re.sub(r"[^a-z0-9]+", "-", os.path.basename(path).split(".")[0].lower())
            sh(args.a, env, "dataset", "import", name, path, token=sci)
            names.append(name)
        pipelines = [(d, f, t) for d in names for f in args.features.split(",")
                     for t in args.templates.split(",")]
        for d, f, t in pipelines:
            train(args.a, env, sci, d, pre, digests[f], t, args.sets)
        order = [("B", args.b), ("A", args.a)] if args.b_first else [("A", args.a), ("B", args.b)]
        runs = {}
        for r in range(args.rounds):
            for d, f, t in pipelines:
                for side, bin_ in order:
                    wall, rate, acc = train(bin_, env, sci, d, pre, digests[f], t, args.sets)
                    runs.setdefault((d, f, t, side), []).append((wall, rate, acc))
                    print(f"round {r + 1} {d} {f} + {t} {side}: {wall:.2f} s, "
                          f"median epoch {rate:,} samples/s, test accuracy {acc:.4f}", flush=True)
        print()
        for d, f, t in pipelines:
            a, b = runs[(d, f, t, "A")], runs[(d, f, t, "B")]
            ratios = [x[0] / y[0] for x, y in zip(a, b)]
            print(f"{d} {f} + {t}:")
            for side, rs in (("A", a), ("B", b)):
                print(f"  {side} wall {' / '.join(f'{x[0]:.2f}' for x in rs)} s; "
                      f"median epoch samples/s {' / '.join(f'{x[1]:,}' for x in rs)} "
                      f"(median {statistics.median(x[1] for x in rs):,.0f}); "
                      f"test accuracy {' / '.join(f'{x[2]:.4f}' for x in rs)}")
            print(f"  wall A / B per round {' '.join(f'{x:.2f}' for x in ratios)}, "
                  f"median {statistics.median(ratios):.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
