"""Running a plugin class natively, in its own unit tests, the way the host
runs it, and refusing what the host would refuse.

The Python twin of the Rust SDK's ``cloister_plugin_sdk::testing``. A
plugin module imports natively (``export`` returns stand-ins outside a
build), so a test imports the class from ``app`` and hands it to the
functions here. They take it through the steps the host takes -- the
metadata check of ``cloister plugin add``, configuration with the declared
defaults, a fitted featurizer's fit (one fresh instance per training
record, the keys at least ``min_records`` records contain), the batch
call -- and hold what it returns to the interface's rules: ids kept and in
order, one row per record, indices below the dimension and increasing,
numbers that survive the interface's widths (a feature value is a 32-bit
float), one verdict per item, class indices in range. What the export layer
does to a result (a dropped label, numbers made floats) is done here too,
so a test sees what the host would receive.

A test that passes here fails in the sandbox only on what only the sandbox
measures (fuel, memory, time, output size) or on the component itself:
build it and run ``cloister plugin run`` on mock data for those::

    from cloister_plugin import Record, testing
    from app import HashedWords

    plugin = testing.configure(HashedWords, {"bits": "8"})
    rows = testing.featurize(plugin, [Record("a", {"text": "Hello hello"})])
    assert len(rows) == 1 and all(0 <= i < 256 for i, _ in rows[0])
    try:
        testing.featurize(plugin, [Record("b")])        # no text field
    except testing.Refused as e:
        assert e.kind == "plugin" and e.error.code == "invalid-input"

Standard library only, like the SDK. Not part of a built component.
"""

import math
import re
import struct
import unicodedata

from . import (
    Config,
    ConfigKey,
    Features,
    FittedFeaturizer,
    Featurizer,
    Internal,
    PluginError,
    Preprocessor,
    Record,
    Selector,
    Verdict,
    Vocabulary,
    describe_exception,
)

__all__ = [
    "MAX_DIMENSION",
    "MAX_TERMS",
    "PredictionSet",
    "Refused",
    "check_metadata",
    "configure",
    "process",
    "featurize",
    "fit_vocabulary",
    "fit",
    "select",
    "is_deceptive",
]

#: The largest dimension a featurizer may declare under the host's default
#: limits (an environment's administrator may set a lower one).
MAX_DIMENSION = 1 << 24

#: The most terms a fit keeps (the most frequent, ties to the smaller key),
#: as the host does.
MAX_TERMS = 1 << 20

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


class Refused(Exception):
    """What the host would refuse, and why. ``kind`` says which check:

    - ``"metadata"``: ``cloister plugin add`` refuses the component;
      ``field`` (``name``, ``version``, ``description``, ``config.name``,
      ...) and ``problem`` say why.
    - ``"plugin"``: the plugin raised; ``error`` is the ``PluginError`` the
      host would receive (any other exception becomes ``internal`` with its
      traceback as detail, as in a built component). In an environment,
      users see only the code; key and detail go to the administrators' log.
    - ``"dimension"``: a featurizer declared a dimension of 0 or above
      ``MAX_DIMENSION`` (``declared``; a ``dimension()`` that raises
      declares 0).
    - ``"output"``: the result breaks the interface's rules; ``rule`` names
      the rule (``wrong-count``, ``bad-offsets``, ``index-out-of-range``,
      ``unsorted-indices``, ``non-finite``, ``unknown-id``,
      ``class-out-of-range``, ``wrong-type``) and the host rejects the
      whole batch.
    - ``"empty-fit"``: the fit kept no term (``min_records``,
      ``documents``).
    - ``"input"``: the test gave something the host never sends (two
      records with one id, a label shown to a preprocessor or featurizer,
      a prediction that is not a distribution over the classes): the test
      is wrong, not the plugin.
    """

    def __init__(self, kind, message, **fields):
        super().__init__(message)
        self.kind = kind
        self.field = fields.get("field")
        self.problem = fields.get("problem")
        self.error = fields.get("error")
        self.declared = fields.get("declared")
        self.rule = fields.get("rule")
        self.min_records = fields.get("min_records")
        self.documents = fields.get("documents")


def _metadata(field, problem):
    return Refused("metadata", f"metadata `{field}` {problem}", field=field, problem=problem)


def _plugin(error):
    key = f" ({error.key})" if error.key is not None else ""
    return Refused("plugin", f"the plugin reported an error: {error.code}{key}: {error.detail}", error=error)


def _dimension(declared):
    return Refused(
        "dimension",
        f"the featurizer declared dimension {declared}; it must be 1 to {MAX_DIMENSION}",
        declared=declared,
    )


def _output(rule, message):
    return Refused("output", f"the output breaks the plugin interface's rules: {message}", rule=rule)


def _input(what):
    return Refused("input", f"the test's input: {what}")


def _call(f, *args):
    """``f(*args)`` with errors as a built component reports them: a
    ``PluginError`` as itself, any other exception as ``internal`` with its
    type, message and innermost frames."""
    try:
        return f(*args)
    except PluginError as e:
        raise _plugin(e) from e
    except Exception as e:
        raise _plugin(Internal(describe_exception(e))) from e


# -- metadata ----------------------------------------------------------------

_IDENTIFIER = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}")
_IDENTIFIER_RULE = "must be 1-64 characters of a-z, 0-9, '-', '_', '.'"
_SHORT_RULE = (
    "must be at most 1000 printable characters (no control, bidirectional or invisible format characters)"
)
_DECEPTIVE = (
    (0x061C, 0x061C),
    (0x200E, 0x200F),
    (0x202A, 0x202E),
    (0x2066, 0x2069),
    (0x00AD, 0x00AD),
    (0x180E, 0x180E),
    (0x200B, 0x200D),
    (0x2028, 0x2029),
    (0x2060, 0x2064),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0xE0000, 0xE007F),
)


def is_deceptive(c):
    """Whether the host refuses the character ``c`` in metadata: a control
    character, a bidirectional control, or an invisible format character
    (text that would read differently from what it is)."""
    if unicodedata.category(c) == "Cc":
        return True
    o = ord(c)
    return any(lo <= o <= hi for lo, hi in _DECEPTIVE)


def _printable(s):
    return not any(is_deceptive(c) for c in s)


def _identifier(s):
    return isinstance(s, str) and _IDENTIFIER.fullmatch(s) is not None


def _semver(s):
    if not isinstance(s, str) or len(s.encode("utf-8")) > 64:
        return False
    if re.fullmatch(r"[A-Za-z0-9+.\-]*", s) is None:
        return False
    core = re.split(r"[-+]", s, maxsplit=1)[0]
    parts = core.split(".")
    return len(parts) == 3 and all(re.fullmatch(r"[0-9]+", p) for p in parts)


def check_metadata(cls):
    """The checks ``cloister plugin add`` makes on what reviewers will read:
    a ``NAME`` of 1-64 characters of ``a-z 0-9 - _ .`` starting with a
    letter or digit, a semantic ``VERSION``, a ``DESCRIPTION`` of at most
    1,000 printable characters, at most 64 ``CONFIG`` keys with such names,
    each once, with printable defaults (at most 64 KiB) and descriptions.
    Printable means no control, bidirectional or invisible format
    character. Raises ``Refused`` (kind ``"metadata"``)."""
    if not (isinstance(cls, type) and issubclass(cls, (Preprocessor, Featurizer, Selector))):
        raise TypeError("check_metadata() takes a plugin class (a subclass of an SDK plugin kind)")
    if not _identifier(cls.NAME):
        raise _metadata("name", _IDENTIFIER_RULE)
    if not _semver(cls.VERSION):
        raise _metadata("version", "must be a semantic version such as 1.2.3")
    description = cls.DESCRIPTION
    if not isinstance(description, str) or len(description) > 1000 or not _printable(description):
        raise _metadata("description", _SHORT_RULE)
    try:
        keys = list(cls.CONFIG)
    except TypeError:
        raise _metadata("config", "must be a list of ConfigKey") from None
    if not all(isinstance(k, ConfigKey) for k in keys):
        raise _metadata("config", "must be a list of ConfigKey")
    if len(keys) > 64:
        raise _metadata("config", "declares more than 64 keys")
    seen = set()
    for k in keys:
        if not _identifier(getattr(k, "name", None)):
            raise _metadata("config.name", _IDENTIFIER_RULE)
        if k.name in seen:
            raise _metadata("config.name", "declares a key twice")
        seen.add(k.name)
        default = k.default_value
        if not isinstance(default, str) or len(default.encode("utf-8")) > 65536 or not _printable(default):
            raise _metadata(
                "config.default-value",
                "must be at most 64 KiB of printable text (no control, bidirectional or invisible format characters)",
            )
        if not isinstance(k.description, str) or len(k.description) > 1000 or not _printable(k.description):
            raise _metadata("config.description", _SHORT_RULE)


def _pairs(config):
    """``config`` (a dict, or (key, value) pairs) as the host passes it:
    strings."""
    items = config.items() if isinstance(config, dict) else (config or ())
    out = []
    for pair in items:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise _input(f"configuration entry {pair!r} is not a (key, value) pair") from None
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        if not isinstance(key, str) or not isinstance(value, str):
            raise _input(f"configuration entry {pair!r}: keys and values are strings")
        out.append((key, value))
    return out


def configure(cls, config=None):
    """Checks ``cls``'s metadata as ``cloister plugin add`` does, configures
    it with ``config`` (a dict or (key, value) pairs; every other declared
    key takes its default; an undeclared or repeated key is refused, as the
    host refuses it before the plugin sees it) and returns the instance."""
    check_metadata(cls)
    pairs = _pairs(config)
    try:
        checked = Config(cls.CONFIG, pairs)
    except PluginError as e:
        raise _plugin(e) from e
    return _call(cls, checked)


# -- records -----------------------------------------------------------------


def _numeric_values(value):
    return value if isinstance(value, (list, tuple)) else [value]


def _records_as_sent(records):
    """The host's checks on records it sends (distinct string ids, text
    fields of strings, finite numbers, no label), and copies of them: the
    plugin gets its own, as from the host."""
    if isinstance(records, Record):
        raise _input("give a list of records, not one record")
    seen = set()
    copies = []
    for r in records:
        if not isinstance(r, Record):
            raise _input(f"{r!r} is not a Record")
        if not isinstance(r.id, str):
            raise _input(f"record id {r.id!r} is not a string")
        if r.id in seen:
            raise _input(f"the id `{r.id}` appears twice in one batch")
        seen.add(r.id)
        if r.label is not None:
            raise _input(
                f"record `{r.id}` has a label: the host never shows labels to preprocessors and featurizers"
            )
        if not all(isinstance(n, str) and isinstance(v, str) for n, v in r.texts.items()):
            raise _input(f"record `{r.id}`: text fields are strings")
        for name, value in r.numerics.items():
            values = _numeric_values(value)
            if not isinstance(name, str) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
            ):
                raise _input(f"record `{r.id}`: numeric field {name!r} is not finite numbers")
        numerics = {n: (list(v) if isinstance(v, (list, tuple)) else v) for n, v in r.numerics.items()}
        copies.append(Record(r.id, dict(r.texts), numerics))
    return copies


def process(plugin, records):
    """Runs a preprocessor over ``records`` as the host does and checks its
    output: records whose ids are a subsequence of the input's (kept in
    order, none invented or repeated), text fields of strings, finite
    numbers. Returns the records as the host receives them (numbers as
    floats; a label the plugin set is dropped by the export, as the
    interface carries none back)."""
    if not isinstance(plugin, Preprocessor):
        raise TypeError("process() takes a configured Preprocessor")
    batch = _records_as_sent(records)
    ids = [r.id for r in batch]
    out = _call(plugin.process_batch, batch)
    received = []
    following = 0
    for position, r in enumerate(out):
        if not isinstance(r, Record):
            raise _plugin(Internal(f"process returned {type(r).__name__}, not a Record"))
        try:
            following = ids.index(r.id, following) + 1
        except ValueError:
            raise _output(
                "unknown-id",
                f"output record {position} has an id that is not an input id in input order "
                "(ids must be preserved, never invented or reordered)",
            ) from None
        if not isinstance(r.texts, dict) or not isinstance(r.numerics, dict):
            # The export's `.items()` fails inside the plugin's call.
            raise _plugin(Internal(f"output record {position}: texts and numerics must be dicts"))
        if not all(isinstance(n, str) and isinstance(v, str) for n, v in r.texts.items()):
            raise _output("wrong-type", f"output record {position}: text fields must map strings to strings")
        numerics = {}
        for name, value in r.numerics.items():
            # The export's own conversion: what does not convert is the
            # plugin's error (internal), as in a built component.
            if isinstance(value, (list, tuple)):
                converted = _call(lambda v: [float(x) for x in v], value)
            else:
                converted = _call(float, value)
            if not isinstance(name, str):
                raise _output("wrong-type", f"output record {position}: a numeric field's name is not a string")
            if not all(math.isfinite(v) for v in _numeric_values(converted)):
                raise _output("non-finite", f"row {position}: non-finite value")
            numerics[name] = converted
        received.append(Record(r.id, dict(r.texts), numerics))
    return received


# -- features ----------------------------------------------------------------


def _f32(value):
    """``value`` as the interface's 32-bit float, or ``None`` when it is not
    a finite one."""
    try:
        narrowed = struct.unpack("<f", struct.pack("<f", value))[0]
    except (OverflowError, struct.error, TypeError):
        return None
    return narrowed if math.isfinite(narrowed) else None


def _declared_dimension(plugin):
    try:
        declared = int(plugin.dimension())
    except Exception as e:
        # The export reports a dimension() that raises as 0.
        raise _dimension(0) from e
    if declared <= 0 or declared > MAX_DIMENSION:
        raise _dimension(declared)
    return declared


def _is_u32(x):
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _U32


def _rows(n, dimension, out):
    """The rules for a featurizer's ``out`` (a ``Features``) for ``n``
    records; the rows as the host receives them."""
    offsets, indices, values = out.offsets, out.indices, out.values
    if not all(_is_u32(o) for o in offsets) or not all(_is_u32(i) for i in indices):
        raise _output("wrong-type", "offsets and feature indices must be integers from 0 to 2**32 - 1")
    if len(offsets) != n + 1:
        raise _output("wrong-count", f"expected {n} results, got {max(len(offsets) - 1, 0)}")
    if (
        offsets[0] != 0
        or any(a > b for a, b in zip(offsets, offsets[1:]))
        or offsets[n] != len(indices)
        or len(indices) != len(values)
    ):
        raise _output("bad-offsets", "malformed sparse-batch offsets")
    rows = []
    for row in range(n):
        a, z = offsets[row], offsets[row + 1]
        idx = indices[a:z]
        for index in idx:
            if index >= dimension:
                raise _output(
                    "index-out-of-range",
                    f"row {row}: feature index {index} is out of range for dimension {dimension}",
                )
        if any(x >= y for x, y in zip(idx, idx[1:])):
            raise _output("unsorted-indices", f"row {row}: feature indices are not strictly increasing")
        narrowed = [_f32(v) for v in values[a:z]]
        if any(v is None for v in narrowed):
            raise _output("non-finite", f"row {row}: non-finite value (as a 32-bit float)")
        rows.append(list(zip(idx, narrowed)))
    return rows


def featurize(plugin, records):
    """Runs a featurizer over ``records`` as the host does (its dimension
    first, then the batch) and checks the rows: one per record, indices
    below the dimension and strictly increasing, values finite as 32-bit
    floats. Returns each row's ``(index, value)`` pairs in index order,
    the values as the host receives them (rounded to 32-bit floats)."""
    if not isinstance(plugin, Featurizer):
        raise TypeError("featurize() takes a configured Featurizer")
    batch = _records_as_sent(records)
    dimension = _declared_dimension(plugin)
    out = Features()
    _call(plugin.featurize_batch, batch, out)
    return _rows(len(batch), dimension, out)


def fit_vocabulary(cls, config, training, min_records=10):
    """A fitted featurizer's fit on ``training``, as the host makes it: each
    record's term keys from a fresh instance configured with ``config`` (so
    nothing carries from one record to the next), counted once per record
    (a key is taken modulo 2**64, as the export does); the keys at least
    ``min_records`` records contain are kept (the environment's ``k``, 10 by
    default; 0 counts as 1), at most ``MAX_TERMS`` of them, the most
    frequent first (ties: the smaller key). Returns the ``Vocabulary``
    ``load`` receives."""
    if not (isinstance(cls, type) and issubclass(cls, FittedFeaturizer)):
        raise TypeError("fit_vocabulary() takes a FittedFeaturizer class")
    batch = _records_as_sent(training)
    counts = {}
    for record in batch:
        fresh = configure(cls, config)
        keys = _call(lambda r: {int(k) & _U64 for k in fresh.terms(r)}, record)
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
    k = max(int(min_records), 1)
    kept = [(key, n) for key, n in counts.items() if n >= k]
    if not kept:
        raise Refused(
            "empty-fit",
            f"the fit found no term that at least {k} of the {len(batch)} training records contain",
            min_records=k,
            documents=len(batch),
        )
    if len(kept) > MAX_TERMS:
        kept.sort(key=lambda kn: (-kn[1], kn[0]))
        kept = kept[:MAX_TERMS]
    kept.sort()
    return Vocabulary(min(len(batch), _U32), [key for key, _ in kept], [n for _, n in kept])


def fit(cls, config, training, min_records=10):
    """A fitted featurizer fitted on ``training`` (``fit_vocabulary``) and
    ready to featurize: a new instance configured with ``config`` that has
    loaded the vocabulary and declared a dimension in range."""
    vocabulary = fit_vocabulary(cls, config, training, min_records)
    plugin = configure(cls, config)
    _call(plugin.load, vocabulary)
    _declared_dimension(plugin)
    return plugin


# -- selectors ---------------------------------------------------------------


class PredictionSet:
    """One item a selector decides on, as the host sends it: the record's
    ``id`` and ``models``, one probability distribution over the classes per
    model (two or more in a job)."""

    __slots__ = ("id", "models")

    def __init__(self, id, models):
        self.id = id
        self.models = [list(m) for m in models]

    def __repr__(self):
        return f"PredictionSet(id={self.id!r}, models={self.models!r})"


def _prediction_sets(classes, items):
    if not classes:
        raise _input("no classes given")
    if not all(isinstance(c, str) for c in classes):
        raise _input("class names are strings")
    if len(set(classes)) != len(classes):
        raise _input("class names are not distinct")
    seen = set()
    copies = []
    for p in items:
        if not isinstance(p.id, str):
            raise _input(f"item id {p.id!r} is not a string")
        if p.id in seen:
            raise _input(f"the id `{p.id}` appears twice in one batch")
        seen.add(p.id)
        if not p.models:
            raise _input(f"item `{p.id}` has no model predictions")
        for dist in p.models:
            narrowed = [_f32(v) for v in dist]
            if len(dist) != len(classes) or any(v is None or v < 0 for v in narrowed):
                raise _input(f"a prediction of item `{p.id}` is not a distribution over the {len(classes)} classes")
        copies.append(PredictionSet(p.id, [[_f32(v) for v in dist] for dist in p.models]))
    return copies


def select(plugin, classes, items):
    """Runs a selector over ``items`` (``PredictionSet``s) as the host does,
    after the host's checks on its input (classes named and distinct, ids
    distinct, each item with at least one model's distribution over the
    classes: as many finite, non-negative values as classes), and checks
    its verdicts: one per item, each a ``Verdict`` with a known action, an
    accepted class index in range, a priority finite as a 32-bit float.
    Returns the verdicts."""
    if not isinstance(plugin, Selector):
        raise TypeError("select() takes a configured Selector")
    classes = list(classes)
    batch = _prediction_sets(classes, items)
    out = _call(lambda: list(plugin.select_batch(list(classes), batch)))
    if len(out) != len(batch):
        # The export raises this inside the plugin's call.
        raise _plugin(Internal(f"{len(out)} verdicts for {len(batch)} items"))
    for position, v in enumerate(out):
        if not isinstance(v, Verdict):
            raise _plugin(Internal(f"select returned {type(v).__name__}, not a Verdict"))
        if v.action not in ("auto-accept", "human-review", "skip"):
            raise _plugin(Internal(f"verdict {position} has the unknown action {v.action!r}"))
        if v.action == "auto-accept":
            if not _is_u32(v.index):
                raise _output("wrong-type", f"decision {position} accepts {v.index!r}, not a class index")
            if v.index >= len(classes):
                raise _output(
                    "class-out-of-range",
                    f"decision {position} accepts class index {v.index}, but there are {len(classes)} classes",
                )
        if _f32(v.priority) is None:
            raise _output("non-finite", f"row {position}: non-finite value")
    return out

