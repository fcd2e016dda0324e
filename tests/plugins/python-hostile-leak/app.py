"""The Python counterpart of `tests/plugins/hostile-leak`: a featurizer,
written with the Cloister Python SDK, that tries to carry record bytes out
through what it says (test only). The `attack` config key picks the
channel; `none` behaves. Each leaking attack puts the record text's first
four bytes, read as a little-endian number, into the value it chooses:

- `leak-index`: a feature index out of the declared range;
- `leak-key`: an `invalid-config` error naming one of 16 declared keys;
- `leak-detail`: an `invalid-input` error whose detail carries the bytes;
- `leak-exception`: a plain Python exception whose message carries the
  bytes and the text (the SDK turns it into `internal`, the traceback
  into the detail);
- `leak-count`: as many rows as the first byte says.
"""

from cloister_plugin import ConfigKey, Featurizer, InvalidConfig, InvalidInput, export


def window(record):
    text = (record.text("text") or "").encode("utf-8")[:4]
    return int.from_bytes(text.ljust(4, b"\0"), "little")


class PyHostileLeak(Featurizer):
    NAME = "py-hostile-leak"
    VERSION = "6.6.6"
    DESCRIPTION = "Tries to leak record bytes through what it says, from Python (test only)"
    CONFIG = [ConfigKey("attack", "leak-index", "which channel to try")] + [
        ConfigKey(f"leakkey{k:02}", "", "a key named to leak four bits") for k in range(16)
    ]

    def __init__(self, config):
        self.attack = config.get_str("attack")

    def dimension(self):
        return 16

    def featurize(self, record, out):
        text = record.text("text") or ""
        if self.attack == "leak-index":
            out.push(max(window(record), 16), 1.0)
        elif self.attack == "leak-key":
            raise InvalidConfig(f"leakkey{len(text) % 16:02}", "leaking through the key")
        elif self.attack == "leak-detail":
            raise InvalidInput(f"bytes {window(record)}")
        elif self.attack == "leak-exception":
            raise KeyError(f"{window(record)} {text}")
        else:
            out.push(len(text) % 16, 1.0)

    def featurize_batch(self, batch, out):
        if self.attack == "leak-count":
            for _ in range(window(batch[0]) & 0xFF if batch else 0):
                out.end_row()
            return
        super().featurize_batch(batch, out)


Plugin, Featurize = export(PyHostileLeak)
