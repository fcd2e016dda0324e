"""A preprocessor written in Python the way an attacker would write it: the
configuration key `attack` picks what it does on every batch (test only).

- `none`: returns the batch unchanged;
- `spin`: loops forever (the fuel budget and the epoch deadline stop it);
- `memory`: grows a list until memory runs out (the memory cap stops it);
- `recursion`: recurses without end (CPython's own limit, then a trap);
- `output`: returns far more text than it was given (the output cap);
- `stdout`: prints a flood (stdout is a stub: a trap, nothing reaches a
  person);
- `invent`: returns a record id it was not given (validation).
"""

from wit_world import exports
from wit_world.imports import types

ATTACK = ["none"]


class Plugin(exports.Plugin):
    def describe(self) -> types.Metadata:
        return types.Metadata(
            name="python-hostile",
            version="6.6.6",
            kind=types.PluginKind.PREPROCESSOR,
            description="Attacks the sandbox from Python (test only)",
            config=[types.ConfigKey(name="attack", default_value="none",
                                    description="which attack")],
        )

    def configure(self, config):
        for key, value in config:
            if key == "attack":
                ATTACK[0] = value


def deeper(n):
    return deeper(n + 1) + 1


class Preprocess(exports.Preprocess):
    def process(self, batch):
        attack = ATTACK[0]
        if attack == "spin":
            n = 0
            while True:
                n += 1
        if attack == "memory":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if attack == "recursion":
            deeper(0)
        if attack == "output":
            for record in batch:
                for field in record.texts:
                    field.value = "x" * (4 << 20)
        if attack == "stdout":
            while True:
                print("leak " * 1000)
        if attack == "invent":
            batch[0].id = "invented"
        return batch
