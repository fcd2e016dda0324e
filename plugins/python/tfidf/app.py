"""`py-tfidf`: a fitted featurizer written in Python with the Cloister
Python SDK, the twin of the Rust `tfidf` at its defaults: words (runs of
letters, digits and `_` of at least two characters, lowercased) and
bigrams of consecutive words; a vocabulary the host counts over the
training split; sublinear counts times the smoothed IDF
`ln((1 + n) / (1 + df)) + 1`, each row of unit length. Its features equal
the Rust plugin's to float rounding (tested).

    cloister plugin build plugins/python/tfidf --world fitted-featurizer
"""

import math
import re

from cloister_plugin import FittedFeaturizer, InvalidInput, export, l2_normalize, term_key

WORD = re.compile(r"[^\W]+")


class Tfidf(FittedFeaturizer):
    NAME = "py-tfidf"
    VERSION = "0.1.0"
    DESCRIPTION = "TF-IDF of words and bigrams over a vocabulary fitted on the training split (Python)"

    def __init__(self, config):
        self.index, self.idf = {}, []

    def keys(self, record):
        text = record.text("text")
        if text is None:
            raise InvalidInput(f"record {record.id} has no text field 'text'")
        words = [w.lower() for w in WORD.findall(text) if len(w) >= 2]
        yield from (term_key(w) for w in words)
        yield from (term_key(a + " " + b) for a, b in zip(words, words[1:]))

    def terms(self, record):
        return set(self.keys(record))

    def load(self, vocabulary):
        n = vocabulary.documents
        self.index = {k: i for i, k in enumerate(vocabulary.keys)}
        self.idf = [math.log((1 + n) / (1 + df)) + 1 for df in vocabulary.document_frequencies]

    def dimension(self):
        return len(self.idf)

    def featurize(self, record, out):
        for k in self.keys(record):
            if k in self.index:
                out.push(self.index[k], 1.0)

    def finish_row(self, indices, values):
        values[:] = [(1 + math.log(v)) * self.idf[i] for i, v in zip(indices, values)]
        l2_normalize(values)


Plugin, Fit, Featurize = export(Tfidf)
