"""`py-least-confidence`: uncertainty sampling written in Python, the twin
of the Rust `least-confidence` selector. Every record goes to human
review; the priority is one minus the top probability of the models' mean
distribution, so the least confident records come first. Distributions
that do not match the classes are refused with `invalid-input`.

    componentize-py -d ../../../plugin-sdk/wit -w selector \
        componentize --stub-wasi app -o py-least-confidence.wasm
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types


def invalid_input(detail):
    return Err(types.PluginError(code=types.ErrorCode.INVALID_INPUT, key=None, detail=detail))


class Plugin(exports.Plugin):
    def describe(self) -> types.Metadata:
        return types.Metadata(
            name="py-least-confidence",
            version="0.1.0",
            kind=types.PluginKind.SELECTOR,
            description="Uncertainty sampling: all to human review, least confident first (Python)",
            config=[],
        )

    def configure(self, config):
        pass


class Select(exports.Select):
    def select(self, classes, batch):
        decisions = []
        for item in batch:
            models = item.models
            if not models or any(len(m) != len(classes) for m in models):
                raise invalid_input(f"bad distributions for {item.id}")
            mean = [sum(col) / len(models) for col in zip(*models)]
            top = max(mean)
            decisions.append(
                types.Decision(id=item.id, action=types.Action_HumanReview(), priority=1.0 - top)
            )
        return decisions
