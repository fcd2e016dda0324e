"""scikit-learn's LogisticRegression on the features and split that
train-bench wrote (same features, same train/test records; scikit-learn does
not use the validation split). Prints test accuracy and fit time per C.

Usage: bench/sklearn_baseline.py DIR [--reps N] [C ...]   (default C: 1 100)
With --reps, each fit runs N times and the median time is printed.
"""
import sys
import time

from sklearn.datasets import load_svmlight_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score


def main():
    out = sys.argv[1]
    rest = sys.argv[2:]
    reps = 1
    if rest[:1] == ["--reps"]:
        reps, rest = int(rest[1]), rest[2:]
    cs = [float(c) for c in rest] or [1.0, 100.0]
    x, y = load_svmlight_file(f"{out}/features.svmlight", n_features=2**18 + 1)
    split = open(f"{out}/split.txt").read().split()
    train = [i for i, s in enumerate(split) if s == "train"]
    test = [i for i, s in enumerate(split) if s == "test"]
    for c in cs:
        times = []
        for _ in range(reps):
            model = LogisticRegression(C=c, max_iter=2000)
            t = time.perf_counter()
            model.fit(x[train], y[train])
            times.append(time.perf_counter() - t)
        secs = sorted(times)[len(times) // 2]
        pred = model.predict(x[test])
        print(
            f"scikit-learn LogisticRegression C={c:g}: test accuracy {accuracy_score(y[test], pred):.4f}, "
            f"macro F1 {f1_score(y[test], pred, average='macro'):.4f}, fit time {secs:.2f} s"
            + (f" (median of {reps}: {' '.join(f'{t:.2f}' for t in times)})" if reps > 1 else "")
        )


if __name__ == "__main__":
    main()
