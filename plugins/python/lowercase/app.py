"""`py-lowercase`: a preprocessor written in Python with the Cloister
Python SDK that lowercases every text field of every record.

    cloister plugin build plugins/python/lowercase --world preprocessor

The build runs componentize-py (https://pypi.org/project/componentize-py/,
0.25.1) with `--stub-wasi`, which replaces every WASI import with a
trapping stub, so the component imports nothing but
`cloister:plugin/types`. The runtime runs it like any other plugin
(docs/threat-model.md, "Python components").
"""

from cloister_plugin import Preprocessor, export


class Lowercase(Preprocessor):
    NAME = "py-lowercase"
    VERSION = "0.1.0"
    DESCRIPTION = "Lowercases every text field (written in Python)"

    def process(self, record):
        record.texts = {name: value.lower() for name, value in record.texts.items()}
        return record


Plugin, Preprocess = export(Lowercase)
