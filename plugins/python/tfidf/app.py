"""`py-tfidf`: a fitted featurizer written in Python with the Cloister
Python SDK, the twin of the Rust `tfidf`: words (runs of letters, digits
and `_` of at least two characters, lowercased) and bigrams of consecutive
words; a vocabulary the host counts over the training split; sublinear
counts times the smoothed IDF `ln((1 + n) / (1 + df)) + 1`, each row of
unit length. Like the Rust plugin it can also take the character n-grams
of each word (`char_ngrams = "LO-HI"`, scikit-learn's `char_wb`) and hash
the words and bigrams outside the vocabulary into `tail_buckets` buckets
after its columns, so that a rare word's signal is not all lost
(docs/disclosure.md); the blocks — words, character n-grams, buckets — are
each scaled to unit length, then the row. Its features equal the Rust
plugin's to float rounding, with and without those settings (tested).

    cloister plugin build plugins/python/tfidf --world fitted-featurizer
"""

import math
import re

from cloister_plugin import (
    ConfigKey,
    FittedFeaturizer,
    InvalidConfig,
    InvalidInput,
    export,
    l2_normalize,
    term_key,
)

WORD = re.compile(r"[^\W]+")

_MASK = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
# A character n-gram's key starts with this byte, which no word holds.
_CHAR_MARK = 1


def _char_key(gram):
    """The key of a character n-gram: FNV-1a over the mark byte and the
    n-gram's UTF-8 bytes, with the low bit set (the words' keys have it
    clear when character n-grams are on)."""
    h = ((_FNV_OFFSET ^ _CHAR_MARK) * _FNV_PRIME) & _MASK
    for b in gram.encode("utf-8"):
        h = ((h ^ b) * _FNV_PRIME) & _MASK
    return h | 1


def _char_grams(word, lo, hi):
    """The word's character n-grams of `lo` to `hi` characters, padded
    with a space on either side; a padded word shorter than `lo` gives
    itself once."""
    padded = " " + word + " "
    if len(padded) < lo:
        yield _char_key(padded)
        return
    for start in range(len(padded)):
        for n in range(lo, hi + 1):
            if start + n > len(padded):
                break
            yield _char_key(padded[start : start + n])


def _tail_bucket(key, buckets):
    """The bucket of a word or bigram key outside the vocabulary."""
    k = ((key ^ (key >> 31)) * 0x94D049BB133111EB) & _MASK
    return (k >> 32) % buckets


def _parse_char_ngrams(raw):
    rule = "must be 0 or LO-HI with 1 <= LO <= HI <= 8, e.g. 2-5"
    raw = raw.strip()
    if raw == "0":
        return None
    lo, sep, hi = raw.partition("-")
    try:
        lo, hi = int(lo.strip()), int(hi.strip())
    except ValueError:
        raise InvalidConfig("char_ngrams", rule) from None
    if not sep or not 1 <= lo <= hi <= 8:
        raise InvalidConfig("char_ngrams", rule)
    return lo, hi


class Tfidf(FittedFeaturizer):
    NAME = "py-tfidf"
    VERSION = "0.2.0"
    DESCRIPTION = "TF-IDF of words and bigrams (and optionally character n-grams) over a vocabulary fitted on the training split (Python)"
    CONFIG = [
        ConfigKey(
            "char_ngrams",
            "0",
            'also character n-grams of each word padded with spaces, "LO-HI" characters (1 <= LO <= HI <= 8, e.g. "2-5"), or 0 for none',
        ),
        ConfigKey(
            "tail_buckets",
            "0",
            "hash the words and bigrams outside the vocabulary into this many buckets after its columns (0..=1048576; 0 drops them)",
        ),
    ]

    def __init__(self, config):
        self.chars = _parse_char_ngrams(config.get_str("char_ngrams"))
        self.tail = config.get_int("tail_buckets", 0, 1 << 20)
        self.index, self.idf, self.is_char = {}, [], []

    def keys(self, record):
        text = record.text("text")
        if text is None:
            raise InvalidInput(f"record {record.id} has no text field 'text'")
        words = [w.lower() for w in WORD.findall(text) if len(w) >= 2]
        # With character n-grams on, word and bigram keys have the low bit
        # clear (character n-grams' keys have it set).
        mark = (lambda k: k & ~1) if self.chars else (lambda k: k)
        for i, w in enumerate(words):
            yield mark(term_key(w))
            if i > 0:
                yield mark(term_key(words[i - 1] + " " + w))
            if self.chars:
                yield from _char_grams(w, *self.chars)

    def terms(self, record):
        return set(self.keys(record))

    def load(self, vocabulary):
        n = vocabulary.documents
        self.index = {k: i for i, k in enumerate(vocabulary.keys)}
        self.idf = [math.log((1 + n) / (1 + df)) + 1 for df in vocabulary.document_frequencies]
        self.is_char = [bool(self.chars) and k & 1 == 1 for k in vocabulary.keys]

    def dimension(self):
        return len(self.idf) + self.tail

    def featurize(self, record, out):
        first = len(self.idf)
        for k in self.keys(record):
            if k in self.index:
                out.push(self.index[k], 1.0)
            elif self.tail and (not self.chars or k & 1 == 0):
                out.push(first + _tail_bucket(k, self.tail), 1.0)

    def block(self, i):
        """0: words and bigrams, 1: character n-grams, 2: tail buckets."""
        if i >= len(self.idf):
            return 2
        return 1 if self.is_char[i] else 0

    def finish_row(self, indices, values):
        first = len(self.idf)
        values[:] = [
            (1 + math.log(v)) * (self.idf[i] if i < first else 1.0)
            for i, v in zip(indices, values)
        ]
        if not self.chars and not self.tail:
            l2_normalize(values)
            return
        sums = [0.0, 0.0, 0.0]
        for i, v in zip(indices, values):
            sums[self.block(i)] += v * v
        present = sum(1 for s in sums if s > 0)
        scale = [1 / (math.sqrt(s) * math.sqrt(present)) if s > 0 else 0.0 for s in sums]
        values[:] = [v * scale[self.block(i)] for i, v in zip(indices, values)]


Plugin, Fit, Featurize = export(Tfidf)
