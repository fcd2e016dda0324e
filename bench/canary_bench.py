#!/usr/bin/env python3
"""Canary exposure (issue 19): for each dataset and template, trains a
model with the shipped settings and one with `min_support = 0`, then runs
`cloister model check-disclosure ID --canaries N` and reports the
exposure as trained and as released, with the time the measurement took
next to the training time.

Usage: bench/canary_bench.py CLOISTER_BIN DATA.jsonl.gz [DATA ...]
       [--canaries 50] [--templates logreg,mlp]
"""
import argparse
import json
import os
import re
import tempfile
import time

from cloister_cli import setup, sh


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--canaries", type=int, default=50)
    ap.add_argument("--templates", default="logreg,mlp")
    ap.add_argument("--sets", default="min_support=10;min_support=0",
                    help="settings to compare, `;`-separated, each `,`-separated KEY=VALUE")
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; binary: {a.bin}; {a.canaries} canaries, "
          f"1000 references\n")
    print("| data | template | settings | test accuracy | train s | canaries s | exposure as "
          "trained (mean / max) | as released (mean / max) | of |")
    print("|---|---|---|---:|---:|---:|---|---|---:|")
    with tempfile.TemporaryDirectory() as root:
        env, _, sci, d = setup(a.bin, root)
        for n, data in enumerate(a.data):
            name = f"d{n}"
            sh(a.bin, env, "dataset", "import", name, data, token=sci)
            for template in a.templates.split(","):
                for support in a.sets.split(";"):
                    sets = [x for kv in support.split(",") for x in ("--set", kv)]
                    t = time.perf_counter()
                    out = sh(a.bin, env, "train", "--dataset", name,
                             "--preprocess", d["text-normalize"],
                             "--features", d["hashed-ngrams"],
                             "--template", template, *sets, token=sci)
                    train_s = time.perf_counter() - t
                    model = re.findall(r"m-[0-9a-f]{12}", out)[-1]
                    t = time.perf_counter()
                    rep = json.loads(sh(a.bin, env, "model", "check-disclosure", model,
                                        "--canaries", str(a.canaries), "--json", token=sci))
                    canary_s = time.perf_counter() - t
                    c = rep["canaries"]
                    acc = json.loads(sh(a.bin, env, "model", "show", model, "--json",
                                        token=sci))["evaluation"]["accuracy"]
                    print(f"| {os.path.basename(data)} | {template} | {support} | {acc:.4f} | "
                          f"{train_s:.1f} | {canary_s:.1f} | {c['mean_exposure']:.2f} / "
                          f"{c['max_exposure']:.2f} | {c['mean_exposure_released']:.2f} / "
                          f"{c['max_exposure_released']:.2f} | {c['max_possible']:.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()
