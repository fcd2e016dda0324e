#!/usr/bin/env python3
"""Derive Cloister's bundled digits dataset from scikit-learn's copy of the
UCI "Optical Recognition of Handwritten Digits" test set
(sklearn/datasets/data/digits.csv.gz, BSD-3-Clause, see
LICENSE-scikit-learn-BSD-3-Clause).

Each row of the CSV is 64 pixel intensities (0..16, an 8x8 image) and the
digit. Each becomes one JSON line: {"id": "digit-NNNN", "pixels": [64
numbers], "label": "0".."9"}, in the original order.

Usage: prepare.py [DIGITS_CSV_GZ]   (default: download the scikit-learn
wheel with pip and read the file from it). Writes digits.jsonl.gz next to
this script, byte-for-byte reproducible.
"""
import csv
import glob
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile


def source_bytes():
    if len(sys.argv) > 1:
        with open(sys.argv[1], "rb") as f:
            return f.read()
    tmp = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "scikit-learn", "-d", tmp], check=True)
    wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
    return zipfile.ZipFile(wheel).read("sklearn/datasets/data/digits.csv.gz")


def main():
    text = gzip.decompress(source_bytes()).decode("ascii")
    rows = []
    for i, row in enumerate(csv.reader(io.StringIO(text))):
        values = [int(float(v)) for v in row]
        if len(values) != 65:
            sys.exit(f"row {i + 1}: expected 65 values, got {len(values)}")
        rows.append({"id": f"digit-{i:04d}", "pixels": values[:64], "label": str(values[64])})
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.jsonl.gz")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for r in rows:
            gz.write((json.dumps(r, separators=(",", ":")) + "\n").encode("ascii"))
    with open(out, "wb") as f:
        f.write(buf.getvalue())
    print(f"wrote {out}: {len(rows)} images")


if __name__ == "__main__":
    main()
