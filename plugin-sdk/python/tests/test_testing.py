"""Tests of ``cloister_plugin.testing``, the native harness for Python
plugins: the examples in ``plugins/python`` pass it, and each way a plugin
can break the interface's rules is refused with the rule it broke.

Run: ``PYTHONPATH=plugin-sdk/python python3 -m unittest discover -s
plugin-sdk/python/tests`` (the integration test
``python::the_python_testing_harness_passes_its_own_tests`` does).
"""

import importlib.util
import math
import pathlib
import unittest

from cloister_plugin import (
    ConfigKey,
    Featurizer,
    FittedFeaturizer,
    InvalidInput,
    Preprocessor,
    Record,
    Selector,
    Verdict,
    export,
    term_key,
    testing,
)
from cloister_plugin.testing import PredictionSet, Refused

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "plugins" / "python"


def example(name):
    """The example plugin's ``app`` module, imported natively (its
    ``export`` returns stand-ins outside a build)."""
    spec = importlib.util.spec_from_file_location(f"example_{name.replace('-', '_')}", EXAMPLES / name / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(test, kind, f, *args):
    with test.assertRaises(Refused) as caught:
        f(*args)
    test.assertEqual(caught.exception.kind, kind, str(caught.exception))
    return caught.exception


class Misbehaves:
    """A test plugin whose ``bad`` key picks a way to break the rules."""

    VERSION = "0.1.0"
    CONFIG = [ConfigKey("bad", "", "how to misbehave")]

    def __init__(self, config):
        self.bad = config.get_str("bad")


class Words(Misbehaves, Featurizer):
    """Word counts in 16 buckets."""

    NAME = "words"
    DESCRIPTION = "Word counts in 16 buckets"

    def dimension(self):
        if self.bad == "dimension":
            return 0
        if self.bad == "dimension-raises":
            raise KeyError("no dimension")
        return 16

    def featurize(self, record, out):
        text = record.text("text")
        if text is None:
            raise InvalidInput("no text")
        for w in text.split():
            out.push(term_key(w) % 16, 1.0)
        pushes = {"index": (16, 1.0), "nan": (0, math.nan), "wide": (1, 1e39), "negative": (-1, 1.0)}
        if self.bad in pushes:
            out.push(*pushes[self.bad])
        if self.bad == "crash":
            {}["ZQXJ"]

    def featurize_batch(self, batch, out):
        if self.bad == "rows":
            batch = batch[:-1]
        super().featurize_batch(batch, out)
        if self.bad == "unsorted" and len(out.indices) >= 2:
            out.indices[0], out.indices[1] = out.indices[1], out.indices[0]


def text(id, t):
    return Record(id, {"text": t})


class FeaturizerTests(unittest.TestCase):
    def test_rows_come_back_sorted_summed_and_as_32_bit_floats(self):
        plugin = testing.configure(Words)
        rows = testing.featurize(plugin, [text("a", "x y x"), text("b", "")])
        self.assertEqual(len(rows), 2)
        self.assertEqual(rows[1], [])
        want = {}
        for w in "x y x".split():
            want[term_key(w) % 16] = want.get(term_key(w) % 16, 0.0) + 1.0
        self.assertEqual(rows[0], sorted(want.items()))

    def test_each_broken_rule_is_named(self):
        batch = [text("a", "x y"), text("b", "z")]
        for bad, rule in [
            ("index", "index-out-of-range"),
            ("nan", "non-finite"),
            ("wide", "non-finite"),
            ("rows", "wrong-count"),
            ("negative", "wrong-type"),
            ("unsorted", "unsorted-indices"),
        ]:
            with self.subTest(bad=bad):
                plugin = testing.configure(Words, {"bad": bad})
                e = refused(self, "output", testing.featurize, plugin, batch)
                self.assertEqual(e.rule, rule, str(e))

    def test_a_dimension_out_of_range_or_raising_is_refused(self):
        for bad in ["dimension", "dimension-raises"]:
            plugin = testing.configure(Words, {"bad": bad})
            e = refused(self, "dimension", testing.featurize, plugin, [text("a", "x")])
            self.assertEqual(e.declared, 0)

    def test_errors_arrive_as_the_host_gets_them(self):
        plugin = testing.configure(Words)
        e = refused(self, "plugin", testing.featurize, plugin, [Record("a")])
        self.assertEqual((e.error.code, e.error.detail), ("invalid-input", "no text"))
        # Any other exception: internal, with type, message and frames.
        plugin = testing.configure(Words, {"bad": "crash"})
        e = refused(self, "plugin", testing.featurize, plugin, [text("a", "x")])
        self.assertEqual(e.error.code, "internal")
        self.assertIn("KeyError", e.error.detail)
        self.assertIn("ZQXJ", e.error.detail)

    def test_configuration_is_checked_as_the_host_checks_it(self):
        e = refused(self, "plugin", testing.configure, Words, {"bda": "x"})
        self.assertEqual((e.error.code, e.error.key), ("invalid-config", "bda"))
        e = refused(self, "plugin", testing.configure, Words, [("bad", "x"), ("bad", "y")])
        self.assertEqual(e.error.key, "bad")
        hashed = example("hashed-words").HashedWords
        e = refused(self, "plugin", testing.configure, hashed, {"bits": 30})
        self.assertEqual((e.error.code, e.error.key), ("invalid-config", "bits"))

    def test_input_the_host_never_sends_is_the_test_s_mistake(self):
        plugin = testing.configure(Words)
        refused(self, "input", testing.featurize, plugin, [text("a", "x"), text("a", "y")])
        refused(self, "input", testing.featurize, plugin, [Record("a", {"text": "x"}, label="spam")])
        refused(self, "input", testing.featurize, plugin, [Record("a", {"text": 3})])
        refused(self, "input", testing.featurize, plugin, [Record("a", {}, {"n": math.inf})])

    def test_the_plugin_gets_copies(self):
        class Scribbler(Words):
            def featurize(self, record, out):
                record.texts["text"] = "changed"
                out.push(0, 1.0)

        mine = text("a", "x")
        testing.featurize(testing.configure(Scribbler), [mine])
        self.assertEqual(mine.texts, {"text": "x"})


class MetadataTests(unittest.TestCase):
    def variant(self, **attrs):
        return type("Variant", (Words,), attrs)

    def test_what_plugin_add_refuses(self):
        for attrs, field in [
            ({"NAME": ""}, "name"),
            ({"NAME": "Words"}, "name"),
            ({"NAME": "-words"}, "name"),
            ({"NAME": "w" * 65}, "name"),
            ({"VERSION": "1.0"}, "version"),
            ({"VERSION": "v1.0.0"}, "version"),
            ({"DESCRIPTION": "safe \u202egnp.exe"}, "description"),
            ({"DESCRIPTION": "x" * 1001}, "description"),
            ({"CONFIG": [ConfigKey("a"), ConfigKey("a")]}, "config.name"),
            ({"CONFIG": [ConfigKey("A")]}, "config.name"),
            ({"CONFIG": [ConfigKey("a", "x\x1b[2J")]}, "config.default-value"),
            ({"CONFIG": [ConfigKey("a", "x", "zero\u200bwidth")]}, "config.description"),
            ({"CONFIG": [ConfigKey(f"k{i}") for i in range(65)]}, "config"),
            ({"CONFIG": 3}, "config"),
            ({"CONFIG": [("a", "1")]}, "config"),
        ]:
            with self.subTest(attrs=repr(attrs)[:60]):
                e = refused(self, "metadata", testing.check_metadata, self.variant(**attrs))
                self.assertEqual(e.field, field)

    def test_what_it_accepts(self):
        testing.check_metadata(self.variant(NAME="a.b_c-1", VERSION="1.2.3-rc.1+build.5", DESCRIPTION="naïve 日本語"))
        for name in ["hashed-words", "lowercase", "least-confidence", "standardize", "tfidf"]:
            module = example(name)
            cls = next(
                v
                for v in vars(module).values()
                if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "NAME")
            )
            testing.check_metadata(cls)


class Reorder(Misbehaves, Preprocessor):
    NAME = "reorder"
    DESCRIPTION = "Misbehaves as configured"

    def process_batch(self, batch):
        if self.bad == "reverse":
            return list(reversed(batch))
        if self.bad == "invent":
            return batch + [Record("new")]
        if self.bad == "repeat":
            return batch + batch[-1:]
        if self.bad == "not-a-record":
            return [{"id": batch[0].id}]
        if self.bad == "texts-list":
            batch[0].texts = [("t", "x")]
        if self.bad == "label":
            batch[0].label = "spam"
        if self.bad == "inf":
            batch[0].numerics["n"] = math.inf
        if self.bad == "word":
            batch[0].numerics["n"] = "many"
        if self.bad == "drop":
            return batch[1:]
        return batch


class PreprocessorTests(unittest.TestCase):
    def test_the_example_lowercases_and_keeps_ids(self):
        plugin = testing.configure(example("lowercase").Lowercase)
        out = testing.process(plugin, [Record("a", {"t": "HeLLo"}, {"n": 2}), Record("b", {"t": "X"})])
        self.assertEqual([(r.id, r.texts, r.numerics) for r in out], [("a", {"t": "hello"}, {"n": 2.0}), ("b", {"t": "x"}, {})])

    def test_ids_are_a_subsequence_and_numbers_finite(self):
        batch = [Record("a", {"t": "x"}), Record("b", {"t": "y"})]
        for bad, kind, rule in [
            ("reverse", "output", "unknown-id"),
            ("invent", "output", "unknown-id"),
            ("repeat", "output", "unknown-id"),
            ("inf", "output", "non-finite"),
            ("not-a-record", "plugin", None),
            ("texts-list", "plugin", None),
            ("word", "plugin", None),
        ]:
            with self.subTest(bad=bad):
                e = refused(self, kind, testing.process, testing.configure(Reorder, {"bad": bad}), batch)
                self.assertEqual(e.rule, rule, str(e))
                if kind == "plugin":
                    self.assertEqual(e.error.code, "internal")
        kept = testing.process(testing.configure(Reorder, {"bad": "drop"}), batch)
        self.assertEqual([r.id for r in kept], ["b"])

    def test_a_label_set_by_the_plugin_never_reaches_the_host(self):
        out = testing.process(testing.configure(Reorder, {"bad": "label"}), [Record("a")])
        self.assertIsNone(out[0].label)


class Keys(FittedFeaturizer):
    NAME = "keys"
    VERSION = "0.1.0"
    DESCRIPTION = "One feature per fitted word"

    def __init__(self, config):
        self.index = None
        self.seen = []

    def terms(self, record):
        # A fresh instance per record: nothing carries over.
        assert not self.seen, "terms() called twice on one instance"
        self.seen.append(record.id)
        return [-1] + [term_key(w) for w in record.text("text").split()]

    def load(self, vocabulary):
        self.index = {k: i for i, k in enumerate(vocabulary.keys)}

    def dimension(self):
        return len(self.index)

    def featurize(self, record, out):
        for w in record.text("text").split():
            if term_key(w) in self.index:
                out.push(self.index[term_key(w)], 1.0)


class FittedTests(unittest.TestCase):
    training = [text("a", "cat dog"), text("b", "cat"), text("c", "cat bird"), text("d", "dog")]

    def test_the_host_counts_keys_once_per_record(self):
        v = testing.fit_vocabulary(Keys, {}, self.training, min_records=2)
        self.assertEqual(v.documents, 4)
        want = sorted([(term_key("cat"), 3), (term_key("dog"), 2), ((1 << 64) - 1, 4)])
        self.assertEqual(list(zip(v.keys, v.document_frequencies)), want)
        plugin = testing.fit(Keys, {}, self.training, min_records=2)
        rows = testing.featurize(plugin, [text("e", "dog bird cat")])
        self.assertEqual(len(rows[0]), 2)

    def test_a_fit_that_keeps_nothing_is_refused(self):
        e = refused(self, "empty-fit", testing.fit_vocabulary, Keys, {}, self.training[:1] * 1, 5)
        self.assertEqual((e.min_records, e.documents), (5, 1))

    def test_the_python_tfidf_example_fits_and_featurizes(self):
        tfidf = example("tfidf").Tfidf
        plugin = testing.fit(tfidf, {}, [text(str(i), t) for i, t in enumerate(["red apple", "red car", "green apple"] * 2)], 2)
        (row,) = testing.featurize(plugin, [text("x", "red apple pie")])
        self.assertAlmostEqual(sum(v * v for _, v in row), 1.0, places=5)
        e = refused(self, "plugin", testing.featurize, plugin, [Record("y")])
        self.assertEqual(e.error.code, "invalid-input")


class Picky(Misbehaves, Selector):
    NAME = "picky"
    DESCRIPTION = "Misbehaves as configured"

    def select(self, classes, item):
        if self.bad == "class":
            return Verdict.auto_accept(len(classes))
        if self.bad == "priority":
            return Verdict.human_review(math.inf)
        if self.bad == "typo":
            return Verdict("auto_accept", 0)
        if self.bad == "none":
            return None
        return Verdict.auto_accept(0, 0.5)

    def select_batch(self, classes, batch):
        if self.bad == "nothing":
            return None
        verdicts = super().select_batch(classes, batch)
        return verdicts[1:] if self.bad == "count" else verdicts


class SelectorTests(unittest.TestCase):
    items = [PredictionSet("a", [[0.9, 0.1], [0.8, 0.2]]), PredictionSet("b", [[0.5, 0.5], [0.4, 0.6]])]

    def test_the_example_ranks_the_least_confident_first(self):
        plugin = testing.configure(example("least-confidence").LeastConfidence)
        verdicts = testing.select(plugin, ["ham", "spam"], self.items)
        self.assertEqual([v.action for v in verdicts], ["human-review", "human-review"])
        self.assertGreater(verdicts[1].priority, verdicts[0].priority)

    def test_each_broken_rule_is_named(self):
        for bad, kind, rule in [
            ("class", "output", "class-out-of-range"),
            ("priority", "output", "non-finite"),
            ("typo", "plugin", None),
            ("none", "plugin", None),
            ("count", "plugin", None),
            ("nothing", "plugin", None),
        ]:
            with self.subTest(bad=bad):
                e = refused(self, kind, testing.select, testing.configure(Picky, {"bad": bad}), ["ham", "spam"], self.items)
                self.assertEqual(e.rule, rule, str(e))
        self.assertEqual(len(testing.select(testing.configure(Picky), ["ham", "spam"], self.items)), 2)

    def test_input_the_host_never_sends(self):
        plugin = testing.configure(Picky)
        for classes, items in [
            ([], self.items),
            (["ham", "ham"], self.items),
            (["ham", "spam"], [PredictionSet("a", [])]),
            (["ham", "spam"], [PredictionSet("a", [[1.0]])]),
            (["ham", "spam"], [PredictionSet("a", [[1.0, -0.1]])]),
            (["ham", "spam"], [PredictionSet("a", [[1.0, 0.0]]), PredictionSet("a", [[1.0, 0.0]])]),
        ]:
            with self.subTest(classes=classes, items=items):
                refused(self, "input", testing.select, plugin, classes, items)


class ExportTests(unittest.TestCase):
    def test_natively_export_returns_stand_ins_that_refuse_use(self):
        plugin, featurize = export(Words)
        with self.assertRaises(RuntimeError):
            plugin()
        self.assertEqual(len(export(Keys)), 3)
        with self.assertRaises(TypeError):
            export(int)

    def test_a_verdict_with_an_unknown_action_is_a_bug_at_once(self):
        with self.assertRaises(ValueError):
            Verdict("auto_accept", 0)


if __name__ == "__main__":
    unittest.main()
