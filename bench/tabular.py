#!/usr/bin/env python3
"""Numeric (tabular) data: `cloister train` on scikit-learn's bundled
breast-cancer, wine and digits sets, with the templates' `standardize`
setting at `auto` (the default) and `off`, against scikit-learn's
`LogisticRegression` and `MLPClassifier` with and without
`StandardScaler`, on the same test split (docs/BENCHMARKS.md, "Numeric
data").

Each set is written as a CSV (id, label, one column per feature), imported
with `--numeric-field '*'` and featurized by the bundled `standardize`
without statistics (`fields=*`, `width=` the number of columns): the
values reach the template as they are. Cloister's split of a record
without text is by its id (datasets::split_of); scikit-learn is fitted on
the same training split (validation records unused) and scored on the same
test split. The test splits are small (59, 19 and 184 records), so every
figure is the mean over `--seeds` split seeds (`--split-seed`).

Usage: bench/tabular.py CLOISTER_BIN [--seeds 5]   (needs `pip install scikit-learn`)
"""

import csv
import warnings
import hashlib
import os
import re
import shutil
import sys
import tempfile

from cloister_cli import setup, sh


def split_of_id(record_id, seed=0):
    """Cloister's split of a record without text (by id)."""
    h = hashlib.sha256()
    h.update(b"cloister-split-v1")
    h.update(seed.to_bytes(8, "little"))
    h.update(b"id")
    h.update(record_id.encode())
    x = int.from_bytes(h.digest()[:2], "little") * 1000 // 65536
    return "train" if x < 800 else "validation" if x < 900 else "test"


def main():
    import argparse
    ap = argparse.ArgumentParser(usage=__doc__)
    ap.add_argument("bin")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    bin_ = os.path.abspath(args.bin)
    seeds = range(args.seeds)
    import numpy as np
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    warnings.filterwarnings("ignore")  # raw LogisticRegression's convergence warnings
    root = tempfile.mkdtemp(prefix="cloister-tabular-")
    try:
        env, _, sci, _ = setup(bin_, root)
        print("| data | records (train/test, seed 0) | Cloister logreg off → auto | Cloister mlp off → auto "
              "| scikit-learn LR raw / scaled | scikit-learn MLP scaled |")
        print("|---|---|---|---|---|---|")
        for name, loader in [("breast-cancer", load_breast_cancer), ("wine", load_wine),
                             ("digits", load_digits)]:
            d = loader()
            ids = [f"r{i}" for i in range(len(d.target))]
            labels = [str(d.target_names[t]) for t in d.target]
            path = os.path.join(root, f"{name}.csv")
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "label"] + [f"f{j}" for j in range(d.data.shape[1])])
                for i, row in enumerate(d.data):
                    w.writerow([ids[i], labels[i]] + [repr(float(v)) for v in row])
            sh(bin_, env, "dataset", "import", name, path, "--numeric-field", "*", token=sci)
            acc = {}
            for template in ["logreg", "mlp"]:
                for setting in ["off", "auto"]:
                    runs = []
                    for seed in seeds:
                        out = sh(bin_, env, "train", "--dataset", name, "--features", "standardize",
                                 "--features-config", "fields=*",
                                 "--features-config", f"width={d.data.shape[1]}",
                                 "--template", template, "--set", f"standardize={setting}",
                                 "--split-seed", str(seed), token=sci)
                        runs.append(float(re.search(r"test: accuracy (\S+)", out).group(1)))
                    acc[template, setting] = sum(runs) / len(runs)
            y = np.array(labels)
            sk = {"raw": [], "scaled": [], "mlp": []}
            sizes = None
            for seed in seeds:
                split = [split_of_id(i, seed) for i in ids]
                tr = [i for i, s in enumerate(split) if s == "train"]
                te = [i for i, s in enumerate(split) if s == "test"]
                sizes = sizes or f"{len(tr)}/{len(te)}"

                def score(model):
                    model.fit(d.data[tr], y[tr])
                    return float(np.mean(model.predict(d.data[te]) == y[te]))

                sk["raw"].append(score(LogisticRegression(max_iter=5000)))
                sk["scaled"].append(score(make_pipeline(StandardScaler(),
                                                        LogisticRegression(max_iter=5000))))
                sk["mlp"].append(score(make_pipeline(StandardScaler(),
                                                     MLPClassifier(max_iter=2000, random_state=0))))
            mean = {k: sum(v) / len(v) for k, v in sk.items()}
            print(f"| {name} | {sizes} "
                  f"| {acc['logreg', 'off']:.4f} → {acc['logreg', 'auto']:.4f} "
                  f"| {acc['mlp', 'off']:.4f} → {acc['mlp', 'auto']:.4f} "
                  f"| {mean['raw']:.4f} / {mean['scaled']:.4f} | {mean['mlp']:.4f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
