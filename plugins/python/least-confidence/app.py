"""`py-least-confidence`: uncertainty sampling written in Python with the
Cloister Python SDK, the twin of the Rust `least-confidence` selector.
Every record goes to human review; the priority is one minus the top
probability of the models' mean distribution, so the least confident
records come first. Distributions that do not match the classes are
refused with `invalid-input`.

    cloister plugin build plugins/python/least-confidence --world selector
"""

from cloister_plugin import InvalidInput, Selector, Verdict, export, mean_distribution


class LeastConfidence(Selector):
    NAME = "py-least-confidence"
    VERSION = "0.1.0"
    DESCRIPTION = "Uncertainty sampling: all to human review, least confident first (Python)"

    def select(self, classes, item):
        mean = mean_distribution(item.models)
        if mean is None or len(mean) != len(classes):
            raise InvalidInput(f"bad distributions for {item.id}")
        return Verdict.human_review(1.0 - max(mean))


Plugin, Select = export(LeastConfidence)
