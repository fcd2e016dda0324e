"""`py-lowercase`: a preprocessor written in Python that lowercases every
text field of every record.

Build it into a component against Cloister's interface with
componentize-py (https://pypi.org/project/componentize-py/, 0.25.1):

    componentize-py -d ../../../plugin-sdk/wit -w preprocessor \
        componentize --stub-wasi app -o py-lowercase.wasm

`--stub-wasi` replaces every WASI import with a trapping stub, so the
component imports nothing but `cloister:plugin/types`. The runtime runs it
like any other plugin (docs/threat-model.md, "Python components").
"""

from wit_world import exports
from wit_world.imports import types


class Plugin(exports.Plugin):
    def describe(self) -> types.Metadata:
        return types.Metadata(
            name="py-lowercase",
            version="0.1.0",
            kind=types.PluginKind.PREPROCESSOR,
            description="Lowercases every text field (written in Python)",
            config=[],
        )

    def configure(self, config):
        pass


class Preprocess(exports.Preprocess):
    def process(self, batch):
        for record in batch:
            for field in record.texts:
                field.value = field.value.lower()
        return batch
