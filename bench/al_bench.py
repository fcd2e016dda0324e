#!/usr/bin/env python3
"""Label-efficiency benchmark: accuracy against manual labels for random
sampling, least-confidence and dual-agree (with automatic labels), over
several split seeds, through the `cloister` binary itself (run, job show
--json, job stats --json) with the gold oracle.

Usage: bench/al_bench.py CLOISTER_BIN DATA.jsonl.gz [--seeds 0,1,2]
       [--per-round 50] [--budget 1000] [--bits 18]
Prints a Markdown report on stdout.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

CHECKPOINTS = [100, 200, 500, 1000]

SPEC = """
name = "{name}"
dataset = "data"
split_seed = {seed}
preprocess = ["text-normalize"]
features = {{ plugin = "hashed-ngrams", config = {{ bits = {bits} }} }}
[[model]]
template = "logreg"
set = {{ class_weight = "{class_weight}" }}
{mlps}
[selector]
{selector}
[loop]
seed_labels = {seed_labels}
per_round = {per_round}
max_rounds = {rounds}
budget = {budget}
badcases_per_round = 0
{loop_extra}
"""

STRATEGIES = {
    "random": 'builtin = "random"',
    "least-confidence": 'plugin = "least-confidence"',
    "dual-agree": 'plugin = "dual-agree"\nconfig = { threshold = 0.9 }',
}


def mlps(k, class_weight):
    """`k` mlp members of the committee, differing only in their seed."""
    return "\n".join(
        f'[[model]]\ntemplate = "mlp"\nset = {{ hidden = [64], class_weight = "{class_weight}", seed = {i} }}'
        for i in range(k))


def sh(bin_, env, *args, token=None, check=True):
    e = dict(os.environ, CLOISTER_ENV=env)
    if token:
        e["CLOISTER_TOKEN"] = token
    p = subprocess.run([bin_, *args], env=e, capture_output=True, text=True)
    if check and p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{p.stderr}")
    return p


def setup(bin_, data, root):
    env = os.path.join(root, "env")
    out = sh(bin_, env, "init", env).stdout + sh(bin_, env, "init", env, check=False).stderr
    admin = re.search(r"clt_[0-9a-f]{64}", out).group(0)

    def user(name, role):
        o = sh(bin_, env, "user", "add", name, "--role", role, token=admin).stdout
        return re.search(r"clt_[0-9a-f]{64}", o).group(0)

    sci, rev = user("sci", "scientist"), user("rev", "reviewer")
    sh(bin_, env, "dataset", "import", "data", data, token=sci)
    wasm = os.path.join(root, "wasm")
    sh(bin_, env, "plugin", "bundled", "--write", wasm)
    for f in sorted(os.listdir(wasm)):
        o = sh(bin_, env, "plugin", "add", os.path.join(wasm, f), token=sci).stdout
        digest = re.search(r"[0-9a-f]{64}", o).group(0)
        sh(bin_, env, "plugin", "approve", digest, token=rev)
    return env, sci


def run(bin_, env, token, root, name, **kw):
    spec = os.path.join(root, f"{name}.toml")
    with open(spec, "w") as f:
        f.write(SPEC.format(name=name, **kw))
    t = time.time()
    p = sh(bin_, env, "run", spec, "--oracle", "gold", token=token)
    secs = time.time() - t
    job = re.search(r"job (j-[0-9a-f]+)", p.stderr + p.stdout).group(1)
    shown = json.loads(sh(bin_, env, "job", "show", job, "--json", token=token).stdout)
    stats = json.loads(sh(bin_, env, "job", "stats", job, "--json", token=token).stdout)
    return shown, stats, secs


def curve(job, stats=None):
    """(manual labels trained on, committee test accuracy) per round, and
    the final committee's point."""
    points = [(r["train_manual"], r["test_accuracy"]) for r in job["rounds"] if r["models"]]
    if stats is not None and job.get("result"):
        points.append((stats["manual_used"], job["result"]["test_accuracy"]))
    return points


def at(points, labels):
    got = [a for m, a in points if m == labels]
    return got[0] if got else None


def fmt(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("data")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--bits", type=int, default=18)
    ap.add_argument("--checkpoints", default="100,200,500,1000")
    ap.add_argument("--max-auto", type=int, default=None,
                    help="also run dual-agree with at most N automatic labels per round "
                         "(strategy dual-agree-capN)")
    ap.add_argument("--threshold", type=float, default=0.9,
                    help="dual-agree's confidence threshold")
    ap.add_argument("--balance", action="store_true",
                    help="also run dual-agree with balance_classes = true "
                         "(strategy dual-agree-balanced)")
    ap.add_argument("--margin", action="store_true",
                    help="also run dual-agree with rank = \"margin\" "
                         "(strategy dual-agree-margin)")
    ap.add_argument("--class-weight", default="balanced", choices=["balanced", "none"],
                    help="the models' class weighting (the templates' default is balanced)")
    ap.add_argument("--mlps", type=int, default=1,
                    help="mlp members of the committee besides logreg (seeds 0, 1, ...)")
    ap.add_argument("--within", type=float, default=0.5,
                    help="points of test accuracy below full data that count as reached")
    ap.add_argument("--strategies", default=None,
                    help="comma-separated subset of the strategies to run")
    a = ap.parse_args()
    if a.mlps < 1:
        ap.error("--mlps must be at least 1 (a committee needs two models)")
    committee = mlps(a.mlps, a.class_weight)
    STRATEGIES["dual-agree"] = f'plugin = "dual-agree"\nconfig = {{ threshold = {a.threshold} }}'
    if a.balance:
        STRATEGIES["dual-agree-balanced"] = (STRATEGIES["dual-agree"], "balance_classes = true")
    if a.margin:
        STRATEGIES["dual-agree-margin"] = (
            f'plugin = "dual-agree"\nconfig = {{ threshold = {a.threshold}, rank = "margin" }}', "")
    if a.max_auto is not None:
        STRATEGIES[f"dual-agree-cap{a.max_auto}"] = (
            STRATEGIES["dual-agree"], f"max_auto_per_round = {a.max_auto}")
    if a.strategies is not None:
        keep = a.strategies.split(",")
        for name in list(STRATEGIES):
            if name not in keep:
                del STRATEGIES[name]
    global CHECKPOINTS
    CHECKPOINTS = [int(c) for c in a.checkpoints.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    rounds = -(-a.budget // a.per_round)
    with tempfile.TemporaryDirectory() as root:
        env, sci = setup(a.bin, a.data, root)
        full, results = {}, {name: {} for name in STRATEGIES}
        for seed in seeds:
            job, _, secs = run(a.bin, env, sci, root, f"full-{seed}", seed=seed, bits=a.bits,
                               class_weight=a.class_weight, mlps=committee,
                               selector='builtin = "random"', loop_extra="", seed_labels=10**6,
                               per_round=1, rounds=1, budget=10**6 + 1)
            full[seed] = curve(job)[0]
            print(f"seed {seed}: full data {full[seed][0]} labels, test accuracy "
                  f"{full[seed][1]:.4f} ({secs:.0f} s)", file=sys.stderr)
            for k, (name, sel) in enumerate(STRATEGIES.items()):
                sel, extra = sel if isinstance(sel, tuple) else (sel, "")
                job, stats, secs = run(a.bin, env, sci, root, f"s{k}-{seed}", seed=seed,
                                       bits=a.bits, class_weight=a.class_weight,
                                       mlps=committee,
                                       selector=sel, loop_extra=extra,
                                       seed_labels=a.per_round,
                                       per_round=a.per_round, rounds=rounds, budget=a.budget)
                results[name][seed] = (curve(job, stats), dict(stats, stop=job['state'].get('reason', job['state'].get('state'))), secs)
                print(f"seed {seed}: {name} done in {secs:.0f} s", file=sys.stderr)

    first = next(iter(STRATEGIES))
    pool = statistics.mean(r[1]["pool_size"] for r in results[first].values())
    full_acc = statistics.mean(f[1] for f in full.values())
    print(f"Committee: logreg + {a.mlps} × mlp(hidden 64), class weights {a.class_weight}, on hashed-ngrams 2^{a.bits}; "
          f"seeds {a.seeds}; {a.per_round} labels per round starting from {a.per_round} random ones; "
          f"dual-agree threshold {a.threshold}; pool ≈ {pool:.0f} records; full-data committee test accuracy {fmt([f[1] for f in full.values()])}.\n")
    print("| strategy | " + " | ".join(f"{n} labels" for n in CHECKPOINTS) +
          f" | labels to within {a.within} pt of full data | auto labels | auto precision |")
    print("|---|" + "---|" * (len(CHECKPOINTS) + 3))
    for name in STRATEGIES:
        cells = []
        for n in CHECKPOINTS:
            cells.append(fmt([at(results[name][s][0], n) for s in seeds]))
        reach = []
        for s in seeds:
            hit = [m for m, acc in results[name][s][0] if acc is not None and acc >= full[s][1] - a.within / 100]
            reach.append(min(hit) if hit else None)
        reach_txt = ", ".join(str(r) if r is not None else f">{a.budget}" for r in reach)
        autos = [results[name][s][1]["auto_accepted"] for s in seeds]
        precs = [results[name][s][1]["auto_precision"] for s in seeds]
        print(f"| {name} | " + " | ".join(cells) +
              f" | {reach_txt} ({100 * statistics.mean(r or a.budget for r in reach) / pool:.1f}% of the pool) | "
              f"{statistics.mean(autos):.0f} | {fmt(precs)} |")
    print("\n| strategy | seed | manual labels | automatic labels | final test accuracy | stop | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in STRATEGIES:
        for s in seeds:
            points, stats, secs = results[name][s]
            print(f"| {name} | {s} | {stats['manual_used']} | {stats['auto_accepted']} | "
                  f"{points[-1][1]:.4f} | {stats.get('stop', '')} | {secs:.0f} |")
    print(f"\n(full-data accuracy used per seed: " +
          ", ".join(f"seed {s}: {full[s][1]:.4f}" for s in seeds) + ")")


if __name__ == "__main__":
    main()
