#!/usr/bin/env python3
"""Fits on `cloister worker` processes against fits in the process (issue
21), through the `cloister` binary: for each configuration a new
environment, the dataset imported, the bundled plugins approved, then

- `train` with the mlp template (one fit), timed twice: first from cold
  (the plugin stages run — on the workers when there are workers — and
  fill the feature cache), then again (the features from the cache);
- an active-learning job (`run --oracle gold`; two committee members per
  round, logreg and mlp), timed; its rounds and test accuracy printed so
  that the configurations can be seen to agree.

Configurations: sled in the process; PostgreSQL in the process;
PostgreSQL with the plugin stages and fits on 1 and on 2 workers
(processes on this machine).

Usage: bench/workers_bench.py CLOISTER_BIN DATA.jsonl.gz SOCKET_DIR REPS
(SOCKET_DIR: a PostgreSQL server's Unix socket directory, user cloister,
trust authentication; bench/workers.sh starts one). Markdown on stdout.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from cloister_cli import setup, sh

SPEC = """
name = "w"
dataset = "data"
split_seed = 3
preprocess = ["text-normalize"]
features = { plugin = "hashed-ngrams", config = { bits = 18 } }
[[model]]
template = "logreg"
[[model]]
template = "mlp"
set = { hidden = [64], epochs = 12 }
[selector]
plugin = "dual-agree"
config = { threshold = 0.9 }
[loop]
seed_labels = 100
per_round = 100
max_rounds = 4
budget = 600
badcases_per_round = 0
"""


def sh_json(bin_, env, *args, token=None):
    e = dict(os.environ, CLOISTER_ENV=env, CLOISTER_TOKEN=token)
    p = subprocess.run([bin_, *args], env=e, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def new_db(sock):
    name = f"w{time.time_ns()}"
    subprocess.run(
        ["psql", "-h", sock, "-U", "cloister", "-d", "postgres", "-Atqc", f"CREATE DATABASE {name}"],
        check=True, capture_output=True,
    )
    return f"postgresql:///{name}?host={sock}&user=cloister"


def one(bin_, data, sock, kind, workers):
    with tempfile.TemporaryDirectory() as root:
        init_args = []
        if kind == "postgres":
            objects = os.path.join(root, "objects")
            os.mkdir(objects, 0o700)
            init_args = ["--store", new_db(sock), "--objects", f"file://{objects}"]
            if workers:
                init_args.append("--workers")
        env, _admin, sci, d = setup(bin_, root, init_args)
        sh(bin_, env, "dataset", "import", "data", data, token=sci)
        procs = [
            subprocess.Popen(
                [bin_, "worker", "--name", f"w{i}"],
                env=dict(os.environ, CLOISTER_ENV=env),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for i in range(workers)
        ]
        try:
            # The first train also fills the feature cache; the timed one
            # reads it, so both configurations time the same work.
            train = ["train", "--dataset", "data", "--preprocess", d["text-normalize"],
                     "--features", d["hashed-ngrams"], "--template", "mlp",
                     "--set", "epochs=12", "--set", "hidden=64"]
            t = time.monotonic()
            sh(bin_, env, *train, token=sci)
            cold_s = time.monotonic() - t
            t = time.monotonic()
            out = sh(bin_, env, *train, token=sci)
            train_s = time.monotonic() - t
            acc = re.search(r"accuracy[^0-9]*([0-9.]+)", out)
            spec = os.path.join(root, "w.toml")
            with open(spec, "w") as f:
                f.write(SPEC)
            t = time.monotonic()
            out = sh(bin_, env, "run", spec, "--oracle", "gold", token=sci)
            job_s = time.monotonic() - t
            job = re.search(r"job (j-[0-9a-f]+)", out).group(1)
            shown = sh_json(bin_, env, "job", "show", job, "--json", token=sci)
        finally:
            for p in procs:
                p.kill()
            logs = [p.communicate()[0] for p in procs]
        fits = [len(re.findall(r"\(fit\): done in", log)) for log in logs]
        stages = [len(re.findall(r"\(stage\): done in", log)) for log in logs]
        fit_s = sum(float(x) for log in logs for x in re.findall(r"\(fit\): done in ([0-9.]+) s", log))
        stage_s = sum(float(x) for log in logs for x in re.findall(r"\(stage\): done in ([0-9.]+) s", log))
        rounds = [(r["train_manual"], r["auto_accepted"], r["queued"]) for r in shown["rounds"]]
        return {
            "cold_s": cold_s,
            "stages": stages,
            "stage_s": stage_s,
            "train_s": train_s,
            "train_acc": acc.group(1) if acc else "?",
            "job_s": job_s,
            "job_acc": shown["result"]["test_accuracy"],
            "rounds": rounds,
            "fits": fits,
            "fit_s": fit_s,
        }


def main():
    bin_, data, sock, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    configs = [("sled", 0), ("postgres", 0), ("postgres", 1), ("postgres", 2)]
    results = {c: [] for c in configs}
    for rep in range(reps):
        for c in configs:
            r = one(bin_, data, sock, *c)
            results[c].append(r)
            print(f"- rep {rep + 1} {c[0]}, {c[1]} workers: cold train {r['cold_s']:.2f} s "
                  f"(stage tasks per worker {r['stages']}, {r['stage_s']:.2f} s on workers), "
                  f"train {r['train_s']:.2f} s "
                  f"(accuracy {r['train_acc']}), job {r['job_s']:.2f} s "
                  f"(test accuracy {r['job_acc']:.4f}, rounds {r['rounds']}, fits per worker {r['fits']}, "
                  f"fitting {r['fit_s']:.2f} s on workers)",
                  flush=True)
    print()
    print("| configuration | cold train mlp, s (median) | stage tasks | stages on workers, s (median) | train mlp, s (median) | AL job, s (median) | job vs in-process PostgreSQL | fits on workers | fitting on workers, s (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = statistics.median(r["job_s"] for r in results[("postgres", 0)])
    for c in configs:
        cold = statistics.median(r["cold_s"] for r in results[c])
        st = statistics.median(sum(r["stages"]) for r in results[c])
        sts = statistics.median(r["stage_s"] for r in results[c])
        tr = statistics.median(r["train_s"] for r in results[c])
        jb = statistics.median(r["job_s"] for r in results[c])
        fs = statistics.median(r["fit_s"] for r in results[c])
        n = statistics.median(sum(r["fits"]) for r in results[c])
        name = f"{c[0]}, in the process" if c[1] == 0 else f"{c[0]}, {c[1]} worker{'s' if c[1] > 1 else ''}"
        print(f"| {name} | {cold:.2f} | {st:.0f} | {sts:.2f} | {tr:.2f} | {jb:.2f} | {jb / base:.2f}× | {n:.0f} | {fs:.2f} |")
    same = {(json.dumps(r["rounds"]), round(r["job_acc"], 6)) for rs in results.values() for r in rs}
    print()
    print(f"job outcomes (rounds, test accuracy) identical across all runs: {len(same) == 1}")


if __name__ == "__main__":
    main()
