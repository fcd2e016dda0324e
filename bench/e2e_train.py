#!/usr/bin/env python3
"""End-to-end `cloister train` against scikit-learn's TF-IDF + logistic
regression, and the feature cache (docs/BENCHMARKS.md, "Training speed").

For each dataset, featurizer and template: imports the dataset into a new
environment, then times the `cloister train` command (text-normalize, the
featurizer — `hashed-ngrams`, or `tfidf`, which first fits its vocabulary
on the training split — training, evaluation, the disclosure check) twice:
the first run ("cold") runs the plugins in the sandbox and fills the
feature cache (and stores the fit), the second ("cached") takes its
features (and its fit) from them. Then fits scikit-learn's `TfidfVectorizer` (unigrams
and bigrams, sublinear TF, min_df 2) + `LogisticRegression` on the same
training split (Cloister's split, recomputed here from its definition:
SHA-256 of the record's text) and scores the same test split, timing
vectorizing, fitting and predicting. Every figure is the median of
`--reps` runs, alternating Cloister and scikit-learn.

Usage: bench/e2e_train.py CLOISTER_BIN DATA.jsonl.gz [DATA ...] [--reps N]
       [--baseline OTHER_CLOISTER_BIN]
       [--C 10] [--features hashed-ngrams,tfidf] [--templates logreg,mlp]
       [--features-config KEY=VALUE ...]   (passed to every `train`)
       (needs `pip install scikit-learn`)
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import statistics
import shutil
import tempfile
import time

from cloister_cli import setup, sh


def split_of(text):
    """Cloister's split (datasets::split_of, seed 0) of a one-text record."""
    h = hashlib.sha256()
    h.update(b"cloister-split-v1")
    h.update((0).to_bytes(8, "little"))
    b = text.encode()
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
    d = h.digest()
    x = int.from_bytes(d[:2], "little") * 1000 // 65536
    return "train" if x < 800 else "validation" if x < 900 else "test"


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def sklearn_run(records, c):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    split = [split_of(r["text"]) for r in records]
    train = [r for r, s in zip(records, split) if s == "train"]
    test = [r for r, s in zip(records, split) if s == "test"]
    t = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    xtr = vec.fit_transform([r["text"] for r in train])
    clf = LogisticRegression(C=c, max_iter=1000)
    clf.fit(xtr, [r["label"] for r in train])
    pred = clf.predict(vec.transform([r["text"] for r in test]))
    seconds = time.perf_counter() - t
    acc = sum(p == r["label"] for p, r in zip(pred, test)) / len(test)
    return seconds, acc, len(train), len(test)


def cloister_run(bin_, label, root, n, rep, data, features, template, ntr, nte, times,
                 accs, config=()):
    """A cold run (a new environment: nothing cached or fitted for this
    dataset), then a cached one, of `bin_ train`; their times and accuracy
    go under `label` + the pipeline."""
    env_root = os.path.join(root, f"{n}-{rep}-{features}-{template}-{label.strip()}")
    os.makedirs(env_root)
    env, _, sci, d = setup(bin_, env_root)
    sh(bin_, env, "dataset", "import", "d", data, token=sci)
    for phase in ["cold", "cached"]:
        t = time.perf_counter()
        extra = [a for kv in config for a in ("--features-config", kv)]
        out = sh(bin_, env, "train", "--dataset", "d",
                 "--preprocess", d["text-normalize"],
                 "--features", d[features],
                 "--template", template, *extra, token=sci)
        s = time.perf_counter() - t
        cached = "features from the cache" in out
        if cached != (phase == "cached"):
            raise SystemExit(f"expected a {phase} run:\n{out}")
        model = re.findall(r"m-[0-9a-f]{12}", out)[-1]
        m = json.loads(sh(bin_, env, "model", "show", model, "--json", token=sci))
        key = f"{label}cloister {features} + {template}, {phase}"
        times.setdefault(key, []).append(s)
        accs[key] = m["evaluation"]["accuracy"]
        if m["split_sizes"][0] != ntr or m["split_sizes"][2] != nte:
            raise SystemExit(f"split mismatch: cloister {m['split_sizes']} vs {ntr}/{nte}")
    shutil.rmtree(env_root)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--C", type=float, default=10.0)
    ap.add_argument("--templates", default="logreg,mlp")
    ap.add_argument("--features", default="hashed-ngrams,tfidf")
    ap.add_argument("--features-config", action="append", default=[],
                    help="KEY=VALUE for the featurizer, repeatable (given to every train)")
    ap.add_argument("--baseline", help="another cloister binary (e.g. an older build), "
                    "timed in the same loop right after BIN, so the two compare in one run")
    a = ap.parse_args()
    bins = [("", a.bin)] + ([("baseline ", a.baseline)] if a.baseline else [])
    print(f"machine: {os.cpu_count()} CPUs; binary: {a.bin}; "
          f"baseline: {a.baseline or '-'}; scikit-learn C={a.C}; "
          f"featurizer config: {' '.join(a.features_config) or '-'}\n")
    print("| data | pipeline | wall s (median) | runs | test accuracy | vs scikit-learn |")
    print("|---|---|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        for n, data in enumerate(a.data):
            records = load(data)
            times = {}
            accs = {}
            for rep in range(a.reps):
                s, acc, ntr, nte = sklearn_run(records, a.C)
                times.setdefault("sklearn", []).append(s)
                accs["sklearn"] = acc
                for features in a.features.split(","):
                    for template in a.templates.split(","):
                        for label, bin_ in bins:
                            cloister_run(bin_, label, root, n, rep, data, features,
                                         template, ntr, nte, times, accs,
                                         a.features_config)
            base = statistics.median(times["sklearn"])
            for key, ts in times.items():
                med = statistics.median(ts)
                print(
                    f"| {os.path.basename(data)} | {key} | {med:.2f} | "
                    f"{' '.join(f'{t:.2f}' for t in ts)} | {accs[key]:.4f} | "
                    f"{base / med:.1f}x faster |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
