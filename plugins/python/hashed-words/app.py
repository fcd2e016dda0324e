"""`py-hashed-words`: a text featurizer written in Python with the Cloister
Python SDK -- the example of docs/plugin-authoring.md's Python walkthrough.
The words of one text field (runs of letters, digits and `_`, lowercased)
are hashed into `2^bits` buckets; counts become `1 + ln(count)` and each
row has unit length.

    cloister plugin build plugins/python/hashed-words --world featurizer
"""

import math
import re

from cloister_plugin import ConfigKey, Featurizer, InvalidInput, export, l2_normalize, term_key

WORD = re.compile(r"\w+")


class HashedWords(Featurizer):
    NAME = "py-hashed-words"
    VERSION = "0.1.0"
    DESCRIPTION = "Hashed bag of words of one text field, sublinear counts, unit length (Python)"
    CONFIG = [
        ConfigKey("field", "text", "the text field to featurize"),
        ConfigKey("bits", "16", "log2 of the number of buckets, 1..24"),
    ]

    def __init__(self, config):
        self.field = config.get_str("field")
        self.buckets = 1 << config.get_int("bits", 1, 24)

    def dimension(self):
        return self.buckets

    def featurize(self, record, out):
        text = record.text(self.field)
        if text is None:
            raise InvalidInput(f"no text field {self.field!r}")
        for word in WORD.findall(text.lower()):
            out.push(term_key(word) % self.buckets, 1.0)

    def finish_row(self, indices, values):
        values[:] = [1.0 + math.log(v) for v in values]
        l2_normalize(values)


Plugin, Featurize = export(HashedWords)
