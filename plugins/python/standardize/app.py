"""`py-standardize`: the Rust `standardize` featurizer written again in
Python, so the two can be compared (same output, tested; speed in
docs/BENCHMARKS.md). Numeric fields, concatenated in order, become
z-scores with the given mean and standard deviation per position (0 where
the deviation is 0); the output is dense.

    componentize-py -d ../../../plugin-sdk/wit -w featurizer \
        componentize --stub-wasi app -o py-standardize.wasm
"""

import math

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types

STATE = {}


def error(code, detail, key=None):
    return Err(types.PluginError(code=code, key=key, detail=detail))


def floats(config, key):
    text = config.get(key, "")
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise error(types.ErrorCode.INVALID_CONFIG, f"not a list of numbers: {text!r}", key)


class Plugin(exports.Plugin):
    def describe(self) -> types.Metadata:
        return types.Metadata(
            name="py-standardize",
            version="0.1.0",
            kind=types.PluginKind.FEATURIZER,
            description="Z-score numeric fields with given statistics; dense output (Python)",
            config=[
                types.ConfigKey("fields", "pixels", "comma-separated numeric fields, in order"),
                types.ConfigKey("mean", "", "comma-separated mean per position (required)"),
                types.ConfigKey("std", "", "comma-separated standard deviation per position"),
            ],
        )

    def configure(self, config):
        config = dict(config)
        fields = [f.strip() for f in config.get("fields", "").split(",") if f.strip()]
        if not fields:
            raise error(types.ErrorCode.INVALID_CONFIG, "needs a field", "fields")
        mean, std = floats(config, "mean"), floats(config, "std")
        if not mean or not all(math.isfinite(m) for m in mean):
            raise error(types.ErrorCode.INVALID_CONFIG, "required, finite", "mean")
        if len(std) != len(mean) or not all(math.isfinite(s) and s >= 0 for s in std):
            raise error(types.ErrorCode.INVALID_CONFIG, "one finite value >= 0 per mean", "std")
        STATE.update(fields=fields, mean=mean, std=std)


class Featurize(exports.Featurize):
    def dimension(self) -> int:
        return len(STATE.get("mean", []))

    def featurize(self, batch):
        fields, mean, std = STATE["fields"], STATE["mean"], STATE["std"]
        n = len(mean)
        positions = list(range(n))
        offsets, indices, values = [0], [], []
        for record in batch:
            numerics = {f.name: f.value for f in record.numerics}
            row = []
            for name in fields:
                value = numerics.get(name)
                if value is None:
                    raise error(types.ErrorCode.INVALID_INPUT, f"no numeric field {name!r}")
                xs = value.value if isinstance(value, types.Numeric_Vector) else [value.value]
                row.extend(xs)
            if len(row) != n:
                raise error(types.ErrorCode.UNSUPPORTED, f"{len(row)} values, expected {n}")
            for x, m, s in zip(row, mean, std):
                if not math.isfinite(x):
                    raise error(types.ErrorCode.INVALID_INPUT, "a non-finite value")
                values.append((x - m) / s if s > 0 else 0.0)
            indices.extend(positions)
            offsets.append(len(indices))
        return types.SparseBatch(offsets=offsets, indices=indices, values=values)
