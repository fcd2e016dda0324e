"""`py-standardize`: the Rust `standardize` featurizer written again in
Python with the Cloister Python SDK, so the two can be compared (same
output bit for bit, tested; speed in docs/BENCHMARKS.md). Numeric fields,
concatenated in order, become z-scores with the given mean and standard
deviation per position (0 where the deviation is 0), or without them go
through as they are; the output is dense.

    cloister plugin build plugins/python/standardize --world featurizer
"""

import math

F32_MAX = 3.4028234663852886e38

from cloister_plugin import ConfigKey, Featurizer, InvalidConfig, InvalidInput, Unsupported, export


class Standardize(Featurizer):
    NAME = "py-standardize"
    VERSION = "0.1.0"
    DESCRIPTION = "Z-score numeric fields with given statistics; dense output (Python)"
    CONFIG = [
        ConfigKey("fields", "pixels", "comma-separated numeric fields, in order; `*`: all, by name"),
        ConfigKey("mean", "", "comma-separated mean per position (none: the values as they are)"),
        ConfigKey("std", "", "comma-separated standard deviation per position, >= 0 (with mean)"),
        ConfigKey("width", "", "positions per record without mean and std (default: one per field)"),
    ]

    def __init__(self, config):
        self.fields = config.get_list("fields")
        self.mean = config.get_list("mean", float)
        self.std = config.get_list("std", float)
        width = config.get_list("width", int)
        if not self.fields:
            raise InvalidConfig("fields", "needs a field")
        if not all(math.isfinite(m) for m in self.mean):
            raise InvalidConfig("mean", "values must be finite")
        if len(self.std) != len(self.mean) or any(not math.isfinite(s) or s < 0 for s in self.std):
            raise InvalidConfig("std", "one finite value >= 0 per mean")
        self.every = "*" in self.fields
        if self.every and len(self.fields) > 1:
            raise InvalidConfig("fields", "`*` stands alone")
        if self.every and not width and not self.mean:
            raise InvalidConfig("width", "needed with fields `*`")
        if len(width) > 1:
            raise InvalidConfig("width", "takes one number")
        if not width:
            self.width = len(self.mean) or len(self.fields)
        elif width[0] > 0 and (not self.mean or width[0] == len(self.mean)):
            self.width = width[0]
        else:
            raise InvalidConfig("width", "must be a positive number of positions (equal to mean's)")

    def dimension(self):
        return self.width

    def featurize(self, record, out):
        row = []
        names = sorted(record.numerics) if self.every else self.fields
        for name in names:
            value = record.numeric(name)
            if value is None:
                raise InvalidInput(f"no numeric field {name!r}")
            row.extend(value if isinstance(value, list) else [value])
        if len(row) != self.width:
            raise Unsupported(f"{len(row)} values, expected {self.width}")
        if not all(math.isfinite(x) for x in row):
            raise InvalidInput("a non-finite value")
        if not self.mean:
            if any(abs(x) > F32_MAX for x in row):
                raise InvalidInput("a value beyond single precision")
            out.push_dense(row)
            return
        out.push_dense((x - m) / s if s > 0 else 0.0 for x, m, s in zip(row, self.mean, self.std))


Plugin, Featurize = export(Standardize)
