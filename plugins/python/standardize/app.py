"""`py-standardize`: the Rust `standardize` featurizer written again in
Python with the Cloister Python SDK, so the two can be compared (same
output bit for bit, tested; speed in docs/BENCHMARKS.md). Numeric fields,
concatenated in order, become z-scores with the given mean and standard
deviation per position (0 where the deviation is 0); the output is dense.

    cloister plugin build plugins/python/standardize --world featurizer
"""

import math

from cloister_plugin import ConfigKey, Featurizer, InvalidConfig, InvalidInput, Unsupported, export


class Standardize(Featurizer):
    NAME = "py-standardize"
    VERSION = "0.1.0"
    DESCRIPTION = "Z-score numeric fields with given statistics; dense output (Python)"
    CONFIG = [
        ConfigKey("fields", "pixels", "comma-separated numeric fields, in order"),
        ConfigKey("mean", "", "comma-separated mean per position (required)"),
        ConfigKey("std", "", "comma-separated standard deviation per position"),
    ]

    def __init__(self, config):
        self.fields = config.get_list("fields")
        self.mean = config.get_list("mean", float)
        self.std = config.get_list("std", float)
        if not self.fields:
            raise InvalidConfig("fields", "needs a field")
        if not self.mean:
            raise InvalidConfig("mean", "required")
        if len(self.std) != len(self.mean) or any(s < 0 for s in self.std):
            raise InvalidConfig("std", "one value >= 0 per mean")

    def dimension(self):
        return len(self.mean)

    def featurize(self, record, out):
        row = []
        for name in self.fields:
            value = record.numeric(name)
            if value is None:
                raise InvalidInput(f"no numeric field {name!r}")
            row.extend(value if isinstance(value, list) else [value])
        if len(row) != len(self.mean):
            raise Unsupported(f"{len(row)} values, expected {len(self.mean)}")
        if not all(math.isfinite(x) for x in row):
            raise InvalidInput("a non-finite value")
        out.push_dense((x - m) / s if s > 0 else 0.0 for x, m, s in zip(row, self.mean, self.std))


Plugin, Featurize = export(Standardize)
