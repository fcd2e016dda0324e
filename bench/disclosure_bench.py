#!/usr/bin/env python3
"""The disclosure check's cost and its false alarms (docs/BENCHMARKS.md,
"Disclosure control"): trains `logreg` and `mlp` through the `cloister`
binary on each dataset given, twice: with `min_support=0` (every feature
learned, the check prunes at release) and with the templates' default
`min_support=10` (rare features never learned), and reads each model's
report: the time the checks took against the time training took, the
verdict, the test accuracy as trained and as released, and the
membership-inference figures. The accuracy disclosure control costs is
the released accuracy of either variant against the `min_support=0` model
as trained, on the same split.

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
        print("| data | template | min_support | train s | check s | check/train | verdict | rows zeroed | test acc. trained | released | cost (points) | MIA mean AUC | flagged | TPR at FPR<=1e-3 (chance) |")
        print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|")
        for n, data in enumerate(datasets):
            name = f"d{n}"
            sh(bin_, env, "dataset", "import", name, data, token=sci)
            for template in ["logreg", "mlp"]:
                base = None
                for min_support in ["0", "10"]:
                    out = sh(bin_, env, "train", "--dataset", name,
                             "--preprocess", d["text-normalize"],
                             "--features", d["hashed-ngrams"],
                             "--template", template,
                             "--set", f"min_support={min_support}", token=sci)
                    model = re.findall(r"m-[0-9a-f]{12}", out)[-1]
                    m = json.loads(sh(bin_, env, "model", "show", model, "--json", token=sci))
                    r = m["disclosure"]
                    f, mi = r["features"], r["membership"]
                    if base is None:
                        base = f["test_accuracy"]
                    cost = 100 * (base - f["test_accuracy_pruned"])
                    print(
                        f"| {os.path.basename(data)} | {template} | {min_support} | "
                        f"{m['train_seconds']:.2f} | {r['seconds']:.2f} | "
                        f"{r['seconds'] / m['train_seconds']:.3f} | {r['verdict']} | "
                        f"{f['disclosive']} | {f['test_accuracy']:.4f} | "
                        f"{f['test_accuracy_pruned']:.4f} | {cost:+.2f} | {mi['mean_auc']:.3f} | "
                        f"{'yes' if r.get('membership_flagged') else 'no'} | "
                        f"{mi['tpr_at_low_fpr']:.4f} ({mi.get('chance_tpr_at_low_fpr', 0):.4f}) |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
