#!/usr/bin/env python3
"""What disclosure control costs a fitted featurizer (docs/BENCHMARKS.md,
"Fitted features").

For each dataset, split seed and template, trains through the `cloister`
binary with `text-normalize` + `tfidf` twice, each in its own environment:
once with the default k = 10 (the fit keeps terms at least 10 training
records share; the templates' `min_support = 10`), and once in an
environment whose `limits.toml` sets `[disclosure] min_records = 2`, with
`--set min_support=0` — scikit-learn's `min_df = 2` vocabulary, the
reference the end-to-end benchmark compares with. Reports each model's
vocabulary size, test accuracy as trained and as released (the disclosure
check's pruned copy), and the cost: the k = 10 model's released accuracy
against the k = 2 model as trained.

Usage: bench/fitted_cost.py CLOISTER_BIN DATA.jsonl.gz [DATA ...]
       [--seeds 0,1,2] [--templates logreg,mlp]
"""

import argparse
import json
import os
import re
import tempfile

from cloister_cli import setup, sh


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--templates", default="logreg,mlp")
    a = ap.parse_args()
    print("| data | template | split seed | k | terms | test acc. trained | released | cost (points) | verdict |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as root:
        envs = {}
        for k in [2, 10]:
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
                    for k in [2, 10]:
                        env, sci, d = envs[k]
                        args = ["train", "--dataset", f"d{n}",
                                "--preprocess", d["text-normalize"],
                                "--features", d["tfidf"],
                                "--template", template, "--split-seed", seed]
                        if k != 10:
                            args += ["--set", "min_support=0"]
                        out = sh(a.bin, env, *args, token=sci)
                        model = re.findall(r"m-[0-9a-f]{12}", out)[-1]
                        m = json.loads(sh(a.bin, env, "model", "show", model, "--json",
                                          token=sci))
                        rep = m["disclosure"]
                        trained = rep["features"]["test_accuracy"]
                        released = rep["features"]["test_accuracy_pruned"]
                        if ref is None:
                            ref = trained
                        print(
                            f"| {os.path.basename(data)} | {template} | {seed} | {k} | "
                            f"{rep['vocabulary']['terms']:,} | {trained:.4f} | {released:.4f} | "
                            f"{100 * (ref - released):+.2f} | {rep['verdict']} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
