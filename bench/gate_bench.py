#!/usr/bin/env python3
"""Precision-gate benchmark (issue 18): automatic labels with and without
`[auto_label]`, through the `cloister` binary with the gold oracle, so the
gate's estimate (made without gold) can be put next to the precision
measured against gold.

Usage: bench/gate_bench.py CLOISTER_BIN DATA.jsonl.gz [--seed 0]
       [--per-round 250] [--budget 2000] [--target 0.95]
       bench/gate_bench.py --make-pairs OUT.jsonl.gz  (from 20 Newsgroups)

`--make-pairs` writes the hard binary set used in docs/BENCHMARKS.md:
all of 20 Newsgroups (bench/fetch_20newsgroups.py), relabeled `a` or `b`
so that every pair of confusable groups is split between the two classes
(IBM vs Mac hardware, baseball vs hockey, autos vs motorcycles, ...).
Prints a Markdown table on stdout.
"""
import argparse
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from al_bench import setup, sh  # noqa: E402

PAIRS = [
    ("comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware"),
    ("rec.sport.baseball", "rec.sport.hockey"),
    ("rec.autos", "rec.motorcycles"),
    ("alt.atheism", "soc.religion.christian"),
    ("talk.politics.guns", "talk.politics.misc"),
    ("comp.graphics", "comp.windows.x"),
    ("sci.electronics", "sci.space"),
    ("comp.os.ms-windows.misc", "misc.forsale"),
    ("talk.religion.misc", "talk.politics.mideast"),
    ("sci.crypt", "sci.med"),
]

SPEC = """
name = "{name}"
dataset = "data"
split_seed = {seed}
preprocess = ["text-normalize"]
features = {{ plugin = "hashed-ngrams", config = {{ bits = 18 }} }}
[[model]]
template = "logreg"
[[model]]
template = "mlp"
set = {{ hidden = [64] }}
[selector]
plugin = "dual-agree"
config = {{ threshold = {threshold} }}
[loop]
seed_labels = {per_round}
per_round = {per_round}
max_rounds = {rounds}
budget = {budget}
badcases_per_round = 0
{gate}
"""


def make_pairs(out):
    here = os.path.dirname(os.path.abspath(__file__))
    side = {a: "a" for a, _ in PAIRS} | {b: "b" for _, b in PAIRS}
    n = 0
    with gzip.open(out, "wt") as w:
        for split in ("train", "test"):
            path = os.path.join(here, "data", f"20newsgroups-{split}.jsonl.gz")
            with gzip.open(path, "rt") as f:
                for line in f:
                    r = json.loads(line)
                    r["label"] = side[r["label"]]
                    w.write(json.dumps(r) + "\n")
                    n += 1
    print(f"wrote {n} records to {out}", file=sys.stderr)


def run(bin_, env, token, root, name, **kw):
    spec = os.path.join(root, f"{name}.toml")
    with open(spec, "w") as f:
        f.write(SPEC.format(name=name, **kw))
    t = time.time()
    p = sh(bin_, env, "run", spec, "--oracle", "gold", token=token)
    secs = time.time() - t
    job = next(w for w in (p.stderr + p.stdout).split() if w.startswith("j-"))
    job = job.rstrip(":,.")
    shown = json.loads(sh(bin_, env, "job", "show", job, "--json", token=token).stdout)
    stats = json.loads(sh(bin_, env, "job", "stats", job, "--json", token=token).stdout)
    return shown, stats, secs


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin", nargs="?")
    ap.add_argument("data", nargs="?")
    ap.add_argument("--make-pairs", metavar="OUT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-round", type=int, default=250)
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--strict", type=float, default=0.98,
                    help="a second, stricter target")
    a = ap.parse_args()
    if a.make_pairs:
        make_pairs(a.make_pairs)
        return
    if not (a.bin and a.data):
        ap.error("CLOISTER_BIN and DATA are required")
    rounds = -(-a.budget // a.per_round)
    gate = (f"[auto_label]\ntarget_precision = {a.target}\n")
    strict = gate.replace(str(a.target), str(a.strict))
    variants = [
        ("dual-agree 0.9, no gate", 0.9, ""),
        ("dual-agree 0.5, no gate", 0.5, ""),
        (f"dual-agree 0.9 + gate {a.target}", 0.9, gate),
        (f"dual-agree 0.5 + gate {a.target}", 0.5, gate),
        (f"dual-agree 0.5 + gate {a.target}, overall", 0.5, gate + "per_class = false\n"),
        (f"dual-agree 0.5 + gate {a.strict}", 0.5, strict),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        env, sci = setup(a.bin, a.data, root)
        for k, (name, threshold, g) in enumerate(variants):
            job, stats, secs = run(a.bin, env, sci, root, f"v{k}", seed=a.seed,
                                   threshold=threshold, gate=g, per_round=a.per_round,
                                   rounds=rounds, budget=a.budget)
            rows.append((name, job, stats, secs))
            print(f"{name}: {secs:.0f} s", file=sys.stderr)
    print(f"Split seed {a.seed}; logreg + mlp(64) on hashed-ngrams 2^18; rounds of "
          f"{a.per_round} manual labels from {a.per_round} random ones, budget {a.budget}; "
          f"the gold oracle answers.\n")
    print("| run | manual labels | automatic labels | precision against gold | "
          "estimated without gold (rounds' intervals) | spot checks (confirmed) | revoked | "
          "rounds closed by the gate | test accuracy | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, job, s, secs in rows:
        est = "-"
        if s.get("auto_estimate") is not None:
            est = (f"{pct(s['auto_estimate'])} ({pct(s['auto_estimate_low'])} – "
                   f"{pct(s['auto_estimate_high'])})")
        closed = sum(1 for r in job["rounds"] if r.get("gate") and
                     not any(g["threshold"] is not None for g in r["gate"]["groups"]))
        gated = sum(1 for r in job["rounds"] if r.get("gate"))
        acc = job.get("result", {}) or {}
        print(f"| {name} | {s['manual_used']} | {s['auto_accepted']} | "
              f"{pct(s['auto_precision'])} | {est} | {s.get('spot_checked', 0)} "
              f"({s.get('spot_agreed', 0)}) | {s.get('revoked', 0)} | "
              f"{closed} of {gated} | {acc.get('test_accuracy', float('nan')):.4f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
