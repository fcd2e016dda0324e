"""scikit-learn's LogisticRegression on the features and split that
train-bench wrote (same features, same train/test records; scikit-learn does
not use the validation split). Prints test accuracy and fit time per C.

Usage: bench/sklearn_baseline.py DIR [C ...]   (default C: 1 100)
"""
import sys
import time

from sklearn.datasets import load_svmlight_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score


def main():
    out = sys.argv[1]
    cs = [float(c) for c in sys.argv[2:]] or [1.0, 100.0]
    x, y = load_svmlight_file(f"{out}/features.svmlight", n_features=2**18 + 1)
    split = open(f"{out}/split.txt").read().split()
    train = [i for i, s in enumerate(split) if s == "train"]
    test = [i for i, s in enumerate(split) if s == "test"]
    for c in cs:
        model = LogisticRegression(C=c, max_iter=2000)
        t = time.perf_counter()
        model.fit(x[train], y[train])
        secs = time.perf_counter() - t
        pred = model.predict(x[test])
        print(
            f"scikit-learn LogisticRegression C={c:g}: test accuracy {accuracy_score(y[test], pred):.4f}, "
            f"macro F1 {f1_score(y[test], pred, average='macro'):.4f}, fit time {secs:.2f} s"
        )


if __name__ == "__main__":
    main()
