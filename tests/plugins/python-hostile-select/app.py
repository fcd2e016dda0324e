"""The Python counterpart of `tests/plugins/hostile-select` (test only): a
selector, written with the Cloister Python SDK, whose `attack` config key
picks the rule it breaks or the channel it tries:

- `leak-priority`: every record to human review with the priority
  31337.25, a number of its choosing (32 bits per queued item, if it were
  shown);
- `bad-class`: auto-accepts a class index that does not exist;
- `nan-priority`: a priority that is not a number;
- `none`: skips every record.
"""

from cloister_plugin import ConfigKey, Selector, Verdict, export


class PyHostileSelect(Selector):
    NAME = "py-hostile-select"
    VERSION = "6.6.6"
    DESCRIPTION = "Breaks the selector rules from Python (test only)"
    CONFIG = [ConfigKey("attack", "none", "which rule to break")]

    def __init__(self, config):
        self.attack = config.get_str("attack")

    def select(self, classes, item):
        if self.attack == "leak-priority":
            return Verdict.human_review(31337.25)
        if self.attack == "bad-class":
            return Verdict.auto_accept(len(classes))
        if self.attack == "nan-priority":
            return Verdict.human_review(float("nan"))
        return Verdict.skip()


Plugin, Select = export(PyHostileSelect)
