#!/usr/bin/env python3
"""What disclosure control costs a fitted featurizer (docs/BENCHMARKS.md,
"Fitted features").

For each dataset, split seed and template, trains through the `cloister`
binary with `text-normalize` + `tfidf` once per *variant*, each variant in
an environment of its k: k = 10 is the default (the fit keeps terms at
least 10 training records share; the templates' `min_support = 10`); any
other k gets an environment whose `limits.toml` sets `[disclosure]
min_records = k`, trained with `--set min_support=0`. A variant is
`K:CONFIG`, CONFIG being the featurizer's `KEY=VALUE` pairs joined by `+`
(empty for its defaults). The default variants are `2:` — scikit-learn's
`min_df = 2` vocabulary, the reference the end-to-end benchmark compares
with — and `10:`.

Reports each model's vocabulary size, test accuracy as trained and as
released (the disclosure check's pruned copy), the cost — its released
accuracy against the *first* variant's model as trained — and the
membership attack's mean AUC and true-positive rate at FPR <= 1e-3 on the
released copy.

Usage: bench/fitted_cost.py CLOISTER_BIN DATA.jsonl.gz [DATA ...]
       [--seeds 0,1,2] [--templates logreg,mlp]
       [--variants "2:,10:,10:char_ngrams=2-5"]
"""

import argparse
import json
import os
import re
import tempfile
import time

from cloister_cli import setup, sh


def parse_variant(v):
    k, _, config = v.partition(":")
    pairs = [p for p in config.split("+") if p]
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"variant {v!r}: {p!r} is not KEY=VALUE")
    return int(k), pairs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--templates", default="logreg,mlp")
    ap.add_argument("--variants", default="2:,10:")
    a = ap.parse_args()
    variants = [parse_variant(v) for v in a.variants.split(",")]
    print("| data | template | split seed | k | featurizer config | terms | train s | "
          "test acc. trained | released | cost (points) | verdict | MIA AUC | TPR at FPR<=1e-3 |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        envs = {}
        for k in sorted({k for k, _ in variants}):
            r = os.path.join(root, f"k{k}")
            os.makedirs(r)
            env, _, sci, d = setup(a.bin, r)
            if k != 10:
                with open(os.path.join(env, "limits.toml"), "w") as f:
                    f.write(f"[disclosure]\nmin_records = {k}\n")
            envs[k] = (env, sci, d)
        for n, data in enumerate(a.data):
            for k, (env, sci, _) in envs.items():
                sh(a.bin, env, "dataset", "import", f"d{n}", data, token=sci)
            for template in a.templates.split(","):
                for seed in a.seeds.split(","):
                    ref = None
                    for k, config in variants:
                        env, sci, d = envs[k]
                        args = ["train", "--dataset", f"d{n}",
                                "--preprocess", d["text-normalize"],
                                "--features", d["tfidf"],
                                "--template", template, "--split-seed", seed]
                        for p in config:
                            args += ["--features-config", p]
                        if k != 10:
                            args += ["--set", "min_support=0"]
                        t = time.perf_counter()
                        out = sh(a.bin, env, *args, token=sci)
                        secs = time.perf_counter() - t
                        model = re.findall(r"m-[0-9a-f]{12}", out)[-1]
                        m = json.loads(sh(a.bin, env, "model", "show", model, "--json",
                                          token=sci))
                        rep = m["disclosure"]
                        mi = rep["membership"]
                        trained = rep["features"]["test_accuracy"]
                        released = rep["features"]["test_accuracy_pruned"]
                        if ref is None:
                            ref = trained
                        print(
                            f"| {os.path.basename(data)} | {template} | {seed} | {k} | "
                            f"{' '.join(config) or 'defaults'} | "
                            f"{rep['vocabulary']['terms']:,} | {secs:.1f} | {trained:.4f} | "
                            f"{released:.4f} | {100 * (ref - released):+.2f} | {rep['verdict']} | "
                            f"{mi['mean_auc']:.3f} | {mi['tpr_at_low_fpr']:.4f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
