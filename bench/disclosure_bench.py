#!/usr/bin/env python3
"""The disclosure check's cost and its false alarms (docs/BENCHMARKS.md,
"Disclosure control"): trains `logreg` and `mlp` through the `cloister`
binary on each dataset given and reads each model's report: the time the
checks took against the time training took, the verdict, the test accuracy
as trained and as released (pruned), and the membership-inference figures.

Usage: bench/disclosure_bench.py CLOISTER_BIN DATA.jsonl.gz [DATA ...]
       (20 Newsgroups: bench/fetch_20newsgroups.py writes
       bench/data/20newsgroups-train.jsonl.gz)
"""

import json
import os
import re
import sys
import tempfile

from cloister_cli import setup, sh


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    bin_, datasets = sys.argv[1], sys.argv[2:]
    with tempfile.TemporaryDirectory() as root:
        env, _, sci, d = setup(bin_, root)
        print(f"machine: {os.cpu_count()} CPUs; binary: {bin_}\n")
        print("| data | template | train s | check s | check/train | verdict | rows zeroed | test acc. trained | released | MIA mean AUC | significant | TPR at FPR<=1e-3 |")
        print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for n, data in enumerate(datasets):
            name = f"d{n}"
            sh(bin_, env, "dataset", "import", name, data, token=sci)
            for template in ["logreg", "mlp"]:
                out = sh(bin_, env, "train", "--dataset", name,
                         "--preprocess", d["text-normalize"],
                         "--features", d["hashed-ngrams"],
                         "--template", template, token=sci)
                model = re.findall(r"m-[0-9a-f]{12}", out)[-1]
                m = json.loads(sh(bin_, env, "model", "show", model, "--json", token=sci))
                r = m["disclosure"]
                f, mi = r["features"], r["membership"]
                print(
                    f"| {os.path.basename(data)} | {template} | {m['train_seconds']:.2f} | "
                    f"{r['seconds']:.2f} | {r['seconds'] / m['train_seconds']:.3f} | "
                    f"{r['verdict']} | {f['disclosive']} | {f['test_accuracy']:.4f} | "
                    f"{f['test_accuracy_pruned']:.4f} | {mi['mean_auc']:.3f} | "
                    f"{100 * mi['significant_share']:.0f}% | {mi['tpr_at_low_fpr']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
