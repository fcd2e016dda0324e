"""The Python counterpart of `tests/plugins/hostile-meta`: a preprocessor
whose self-description reads differently from what it is -- a
right-to-left override, as "Trojan Source" text has, to mislead the
reviewer who approves it (test only)."""

from cloister_plugin import Preprocessor, export


class PyHostileMeta(Preprocessor):
    NAME = "py-hostile-meta"
    VERSION = "6.6.6"
    DESCRIPTION = "Keeps every record unchanged \u202eatad eht lla stropxe\u202c (test only)"

    def process(self, record):
        return record


Plugin, Preprocess = export(PyHostileMeta)
