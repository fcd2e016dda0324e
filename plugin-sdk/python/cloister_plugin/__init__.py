"""The Cloister plugin SDK for Python.

Write a Cloister plugin -- a preprocessor, a featurizer, a fitted
featurizer or a selector -- as one Python class, and build it into a
WebAssembly component with ``cloister plugin build``, which runs
componentize-py against Cloister's interface with every WASI import
stubbed out. The shape follows the Rust SDK (``cloister-plugin-sdk``)::

    from cloister_plugin import Featurizer, export

    class TextLength(Featurizer):
        NAME = "text-length"
        VERSION = "0.1.0"
        DESCRIPTION = "Length of the text field in characters"

        def dimension(self):
            return 1

        def featurize(self, record, out):
            out.push(0, len(record.text("text") or ""))

    Plugin, Featurize = export(TextLength)

A plugin class declares its identity (``NAME``, ``VERSION``,
``DESCRIPTION``) and its configuration keys (``CONFIG``, a list of
``ConfigKey``); ``__init__`` receives the checked ``Config``. Errors are
raised as ``InvalidConfig``, ``InvalidInput``, ``Unsupported`` or
``Internal``; their code is all a user of Cloister ever sees, the detail
goes to the administrators' plugin log. Any other exception becomes
``internal`` the same way.

Everything but ``export`` is plain Python and runs natively too, so the
logic can be unit-tested with ``python3`` before it is built.
"""

import math
import traceback

__all__ = [
    "ConfigKey",
    "Config",
    "Record",
    "Features",
    "Vocabulary",
    "Verdict",
    "PluginError",
    "InvalidConfig",
    "InvalidInput",
    "Unsupported",
    "Internal",
    "Plugin",
    "Preprocessor",
    "Featurizer",
    "FittedFeaturizer",
    "Selector",
    "term_key",
    "term_key_parts",
    "l2_normalize",
    "argmax",
    "entropy",
    "mean_distribution",
    "export",
]

# -- errors -----------------------------------------------------------------


class PluginError(Exception):
    """A plugin's error with one of the interface's fixed codes.

    ``code`` is one of ``invalid-config``, ``invalid-input``,
    ``unsupported``, ``internal``; ``key`` names the configuration key of an
    ``invalid-config`` error; ``detail`` is free text for the
    administrators' log and is never shown to users.
    """

    CODE = "internal"

    def __init__(self, detail="", key=None):
        super().__init__(detail)
        self.detail = str(detail)
        self.key = key

    @property
    def code(self):
        return self.CODE


class InvalidConfig(PluginError):
    """A configuration value is malformed or out of range; names the key."""

    CODE = "invalid-config"

    def __init__(self, key, detail):
        super().__init__(detail, key=key)


class InvalidInput(PluginError):
    """A record lacks a field the plugin needs, or a field has a bad value."""

    CODE = "invalid-input"


class Unsupported(PluginError):
    """The plugin cannot handle this input."""

    CODE = "unsupported"


class Internal(PluginError):
    """A bug in the plugin."""

    CODE = "internal"


# -- configuration ----------------------------------------------------------


class ConfigKey:
    """A configuration key the plugin accepts: its name, the value used
    when it is not given, and what it means (for reviewers)."""

    def __init__(self, name, default_value="", description=""):
        self.name = name
        self.default_value = str(default_value)
        self.description = description


class Config:
    """A plugin's configuration: every declared key with its value, given
    or default. Typed getters raise ``InvalidConfig`` naming the key when a
    value does not parse or is out of range."""

    def __init__(self, keys, pairs):
        declared = {k.name: k.default_value for k in keys}
        values = {}
        for key, value in pairs:
            if key not in declared:
                raise InvalidConfig(key, "unknown configuration key")
            if key in values:
                raise InvalidConfig(key, "key given more than once")
            values[key] = value
        for name, default in declared.items():
            values.setdefault(name, default)
        self._values = values

    def get_str(self, key):
        """The raw string value of ``key``."""
        if key not in self._values:
            raise InvalidConfig(key, "key not declared by the plugin")
        return self._values[key]

    def get_int(self, key, minimum=None, maximum=None):
        """``key`` as an integer, optionally within ``[minimum, maximum]``."""
        raw = self.get_str(key)
        try:
            value = int(raw.strip())
        except ValueError:
            raise InvalidConfig(key, f"cannot parse {raw!r} as an integer") from None
        return _within(key, value, minimum, maximum)

    def get_float(self, key, minimum=None, maximum=None):
        """``key`` as a finite number, optionally within ``[minimum, maximum]``."""
        raw = self.get_str(key)
        value = _finite(key, raw)
        return _within(key, value, minimum, maximum)

    def get_bool(self, key):
        """``key`` as a boolean (``true``/``false``, ``yes``/``no``, ``1``/``0``)."""
        raw = self.get_str(key).strip().lower()
        if raw in ("true", "yes", "1"):
            return True
        if raw in ("false", "no", "0"):
            return False
        raise InvalidConfig(key, f"expected true or false, got {raw!r}")

    def get_list(self, key, parse=str):
        """``key`` as a comma-separated list, each part parsed by ``parse``
        (``str``, ``int`` or ``float``; floats must be finite). An empty
        value is an empty list."""
        raw = self.get_str(key)
        if not raw.strip():
            return []
        out = []
        for part in raw.split(","):
            part = part.strip()
            if parse is float:
                out.append(_finite(key, part))
                continue
            try:
                out.append(parse(part))
            except ValueError:
                raise InvalidConfig(key, f"cannot parse {part!r}") from None
        return out


def _finite(key, raw):
    try:
        value = float(raw.strip())
    except ValueError:
        raise InvalidConfig(key, f"cannot parse {raw!r} as a number") from None
    if not math.isfinite(value):
        raise InvalidConfig(key, f"{raw!r} is not finite")
    return value


def _within(key, value, minimum, maximum):
    if minimum is not None and value < minimum:
        raise InvalidConfig(key, f"{value} is below {minimum}")
    if maximum is not None and value > maximum:
        raise InvalidConfig(key, f"{value} is above {maximum}")
    return value


# -- records and features ---------------------------------------------------


class Record:
    """One data record: ``id``, ``texts`` (name -> str), ``numerics``
    (name -> float, or a list of floats for a vector field) and ``label``
    (always ``None`` for preprocessors and featurizers: features never see
    the target). A preprocessor may change ``texts`` and ``numerics`` in
    place and return the record; it must not change ``id``."""

    __slots__ = ("id", "texts", "numerics", "label")

    def __init__(self, id, texts=None, numerics=None, label=None):
        self.id = id
        self.texts = dict(texts or {})
        self.numerics = dict(numerics or {})
        self.label = label

    def text(self, name):
        """The text field ``name``, or ``None``."""
        return self.texts.get(name)

    def numeric(self, name):
        """The numeric field ``name`` (a float or a list), or ``None``."""
        return self.numerics.get(name)

    def __repr__(self):
        return f"Record(id={self.id!r}, texts={self.texts!r}, numerics={self.numerics!r})"


class Features:
    """Collects the feature rows of a batch. ``push`` (index, value) pairs
    for the current row in any order; ``end_row`` sorts them, sums repeated
    indices and appends the row. Zeros are kept, so a dense row pushes
    every index (``push_dense``)."""

    def __init__(self):
        self.offsets = [0]
        self.indices = []
        self.values = []
        self._row = []

    def push(self, index, value):
        """Add ``value`` at ``index`` to the current row."""
        self._row.append((int(index), float(value)))

    def push_dense(self, values, start=0):
        """Push ``values[i]`` at index ``start + i`` for every ``i``."""
        self._row.extend((start + i, float(v)) for i, v in enumerate(values))

    def end_row(self):
        """Close the current row."""
        row = self._row
        row.sort(key=lambda pair: pair[0])
        indices, values = self.indices, self.values
        last = None
        for index, value in row:
            if index == last:
                values[-1] += value
            else:
                indices.append(index)
                values.append(value)
                last = index
        self._row = []
        self.offsets.append(len(indices))

    def rows(self):
        """The number of closed rows."""
        return len(self.offsets) - 1


def l2_normalize(values):
    """Scale ``values`` (a list, in place) to unit Euclidean length; a row
    of zeros stays zero."""
    norm = math.sqrt(sum(v * v for v in values))
    if norm > 0:
        for i, v in enumerate(values):
            values[i] = v / norm
    return values


class Vocabulary:
    """What a fitted featurizer learnt, as the host counted it: term keys
    (increasing) with the number of training records that contain each,
    every count at least the environment's minimum cell size."""

    __slots__ = ("documents", "keys", "document_frequencies")

    def __init__(self, documents, keys, document_frequencies):
        self.documents = documents
        self.keys = list(keys)
        self.document_frequencies = list(document_frequencies)


_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x00000100000001B3
_MASK = (1 << 64) - 1


def term_key_parts(parts):
    """``term_key`` of the parts joined by single spaces: the same key the
    Rust SDK's ``term_key_parts`` gives."""
    h = _FNV_OFFSET
    for i, part in enumerate(parts):
        if i > 0:
            h = ((h ^ 0x20) * _FNV_PRIME) & _MASK
        for b in part.encode("utf-8"):
            h = ((h ^ b) * _FNV_PRIME) & _MASK
    return h


def term_key(term):
    """A stable 64-bit key for a term (FNV-1a over its UTF-8 bytes), equal
    to the Rust SDK's ``term_key`` for the same term."""
    return term_key_parts((term,))


# -- selectors --------------------------------------------------------------


class Verdict:
    """A selector's verdict on one record: accept class ``index``
    automatically, send it to a human, or skip it for now. ``priority``
    orders the human queue (higher first)."""

    __slots__ = ("action", "index", "priority")

    ACTIONS = ("auto-accept", "human-review", "skip")

    def __init__(self, action, index=None, priority=0.0):
        if action not in self.ACTIONS:
            raise ValueError(f"unknown verdict action {action!r} (auto-accept, human-review or skip)")
        self.action = action
        self.index = index
        self.priority = float(priority)

    @classmethod
    def auto_accept(cls, index, priority=0.0):
        return cls("auto-accept", int(index), priority)

    @classmethod
    def human_review(cls, priority=0.0):
        return cls("human-review", None, priority)

    @classmethod
    def skip(cls, priority=0.0):
        return cls("skip", None, priority)


def argmax(p):
    """``(index, value)`` of the largest entry of ``p`` (the first on ties),
    or ``None`` for an empty list."""
    if not p:
        return None
    best = 0
    for i, v in enumerate(p):
        if v > p[best]:
            best = i
    return best, p[best]


def entropy(p):
    """Shannon entropy of a distribution, in nats (zeros contribute 0)."""
    return -sum(v * math.log(v) for v in p if v > 0)


def mean_distribution(models):
    """The mean of the models' distributions, or ``None`` when there are
    none or their lengths differ."""
    if not models or any(len(m) != len(models[0]) for m in models):
        return None
    n = len(models)
    return [sum(col) / n for col in zip(*models)]


# -- plugin kinds -----------------------------------------------------------


class Plugin:
    """What every plugin is: its identity and how it is configured.
    Subclass one of the kinds below, not this."""

    #: The plugin's name, e.g. ``"hashed-words"``.
    NAME = ""
    #: Its semantic version.
    VERSION = "0.1.0"
    #: One sentence for reviewers.
    DESCRIPTION = ""
    #: The ``ConfigKey``s it accepts; the host rejects any other key.
    CONFIG = ()

    def __init__(self, config):
        """Build the plugin from its checked ``Config`` (every declared key
        present, defaults filled in)."""


class Preprocessor(Plugin):
    """Rewrites or drops records. Ids are preserved in order, never
    invented; labels are never shown."""

    KIND = "preprocessor"

    def process(self, record):
        """Return the record (possibly rewritten) to keep it, ``None`` to
        drop it."""
        raise NotImplementedError

    def process_batch(self, batch):
        """The whole batch; the default calls ``process`` for each record."""
        out = []
        for record in batch:
            kept = self.process(record)
            if kept is not None:
                out.append(kept)
        return out


class Featurizer(Plugin):
    """Maps each record to a sparse feature vector of a fixed dimension.
    Labels are never shown."""

    KIND = "featurizer"

    def dimension(self):
        """The dimension of the feature space."""
        raise NotImplementedError

    def featurize(self, record, out):
        """Push the features of one record into ``out`` (a ``Features``)."""
        raise NotImplementedError

    def finish_row(self, indices, values):
        """Post-process one finished row (sorted, repeats summed) by
        changing ``values`` in place, e.g. ``l2_normalize(values)``. The
        default does nothing."""

    def featurize_batch(self, batch, out):
        """One row per record, in order; the default calls ``featurize``,
        ``out.end_row()`` and ``finish_row`` for each record."""
        for record in batch:
            self.featurize(record, out)
            out.end_row()
            a, b = out.offsets[-2], out.offsets[-1]
            if a < b:
                values = out.values[a:b]
                self.finish_row(out.indices[a:b], values)
                out.values[a:b] = values


class FittedFeaturizer(Featurizer):
    """A featurizer that learns from the training split first. The plugin
    extracts, the host counts: ``terms`` names the term keys of one
    training record (each in a fresh instance), and every instance that
    featurizes first receives the keys at least k records contain
    (``load``). Make keys with ``term_key``."""

    def terms(self, record):
        """The term keys (ints below 2**64) of one training record; any
        order, repeats count once."""
        raise NotImplementedError

    def load(self, vocabulary):
        """Take the fitted ``Vocabulary``; called once, before
        ``dimension`` and ``featurize``."""
        raise NotImplementedError


class Selector(Plugin):
    """Decides, from two or more models' predictions, whether a record's
    label is accepted automatically, sent to a human, or skipped."""

    KIND = "selector"

    def select(self, classes, item):
        """A ``Verdict`` for one record. ``item.id`` names it;
        ``item.models`` holds one distribution over ``classes`` per model."""
        raise NotImplementedError

    def select_batch(self, classes, batch):
        """One verdict per item, in order; the default calls ``select``."""
        return [self.select(classes, item) for item in batch]


# -- the export --------------------------------------------------------------

_INSTANCE = []


def describe_exception(e):
    """The exception's type, message and innermost frames, for the
    administrators' log. Built from the frames alone: the `traceback`
    module's formatting reads source files, and a plugin has no files (the
    read would trap)."""
    frames = [
        f"  {frame.f_code.co_filename}:{line} in {frame.f_code.co_name}"
        for frame, line in traceback.walk_tb(e.__traceback__)
    ]
    return "\n".join([f"{type(e).__name__}: {e}"] + frames[-8:])


def _instance():
    if not _INSTANCE:
        raise Internal("plugin called before configure")
    return _INSTANCE[0]


def _native_stand_ins(cls, n):
    """What ``export`` returns outside a build: ``n`` classes that say, if
    anything instantiates them, that the interface exists only in a built
    component."""

    class NotBuilt:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(
                f"{cls.__name__} is exported only in a component built by `cloister plugin build`; "
                "natively, test the class itself (cloister_plugin.testing)"
            )

    return tuple(NotBuilt for _ in range(n))


def export(cls):
    """The classes componentize-py looks for in the built module, for the
    plugin class ``cls``. Assign them at the bottom of ``app.py``:

    - a ``Preprocessor``: ``Plugin, Preprocess = export(Cls)``
    - a ``Featurizer``: ``Plugin, Featurize = export(Cls)``
    - a ``FittedFeaturizer``: ``Plugin, Fit, Featurize = export(Cls)``
    - a ``Selector``: ``Plugin, Select = export(Cls)``

    Only this function needs the generated bindings (``wit_world``), which
    exist only while ``cloister plugin build`` runs componentize-py. Run
    natively (``python3``, a unit test importing ``app``), it checks ``cls``
    and returns stand-ins that refuse to be used, so the plugin module
    imports and its class can be tested (``cloister_plugin.testing``).
    """
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError("export() takes a plugin class")
    kind = getattr(cls, "KIND", None)
    if kind not in ("preprocessor", "featurizer", "selector"):
        raise TypeError("a plugin class derives from Preprocessor, Featurizer, FittedFeaturizer or Selector")
    fitted = issubclass(cls, FittedFeaturizer)
    try:
        from componentize_py_types import Err
        from wit_world import exports
        from wit_world.imports import types
    except ModuleNotFoundError as e:
        if e.name not in ("componentize_py_types", "wit_world", "wit_world.imports"):
            raise
        return _native_stand_ins(cls, 3 if fitted else 2)
    codes = {
        "invalid-config": types.ErrorCode.INVALID_CONFIG,
        "invalid-input": types.ErrorCode.INVALID_INPUT,
        "unsupported": types.ErrorCode.UNSUPPORTED,
        "internal": types.ErrorCode.INTERNAL,
    }
    kinds = {
        "preprocessor": types.PluginKind.PREPROCESSOR,
        "featurizer": types.PluginKind.FEATURIZER,
        "selector": types.PluginKind.SELECTOR,
    }

    def guarded(f):
        """Call ``f``; a ``PluginError`` becomes the interface's error, any
        other exception an ``internal`` one with its traceback as detail."""

        def call(*args):
            try:
                return f(*args)
            except PluginError as e:
                raise Err(types.PluginError(code=codes[e.code], key=e.key, detail=e.detail))
            except Exception as e:
                raise Err(types.PluginError(code=types.ErrorCode.INTERNAL, key=None, detail=describe_exception(e)))

        return call

    def record_in(r):
        numerics = {}
        for f in r.numerics:
            v = f.value
            numerics[f.name] = list(v.value) if isinstance(v, types.Numeric_Vector) else v.value
        return Record(r.id, {f.name: f.value for f in r.texts}, numerics, r.label)

    def record_out(r):
        if not isinstance(r, Record):
            raise Internal(f"process returned {type(r).__name__}, not a Record")
        numerics = []
        for name, v in r.numerics.items():
            if isinstance(v, (list, tuple)):
                value = types.Numeric_Vector([float(x) for x in v])
            else:
                value = types.Numeric_Scalar(float(v))
            numerics.append(types.NumericField(name=name, value=value))
        return types.DataRecord(
            id=r.id,
            texts=[types.TextField(name=n, value=v) for n, v in r.texts.items()],
            numerics=numerics,
            label=None,
        )

    def verdict_out(item, v):
        if not isinstance(v, Verdict):
            raise Internal(f"select returned {type(v).__name__}, not a Verdict")
        if v.action == "auto-accept":
            action = types.Action_AutoAccept(v.index)
        elif v.action == "human-review":
            action = types.Action_HumanReview()
        elif v.action == "skip":
            action = types.Action_Skip()
        else:
            raise Internal(f"a verdict with the unknown action {v.action!r}")
        return types.Decision(id=item.id, action=action, priority=v.priority)

    world = "fitted-featurizer" if fitted else kind
    interface = {"preprocessor": "Preprocess", "selector": "Select"}.get(kind, "Featurize")
    if not hasattr(exports, interface) or hasattr(exports, "Fit") != fitted:
        raise TypeError(f"{cls.__name__} is a {world} plugin: build it with --world {world}")

    class PluginExport(exports.Plugin):
        def describe(self):
            return types.Metadata(
                name=cls.NAME,
                version=cls.VERSION,
                kind=kinds[kind],
                description=cls.DESCRIPTION,
                config=[
                    types.ConfigKey(name=k.name, default_value=k.default_value, description=k.description)
                    for k in cls.CONFIG
                ],
            )

        @guarded
        def configure(self, config):
            _INSTANCE[:] = [cls(Config(cls.CONFIG, config))]

    if kind == "preprocessor":

        class PreprocessExport(exports.Preprocess):
            @guarded
            def process(self, batch):
                kept = _instance().process_batch([record_in(r) for r in batch])
                return [record_out(r) for r in kept]

        return PluginExport, PreprocessExport

    if kind == "selector":

        class SelectExport(exports.Select):
            @guarded
            def select(self, classes, batch):
                verdicts = _instance().select_batch(list(classes), batch)
                if len(verdicts) != len(batch):
                    raise Internal(f"{len(verdicts)} verdicts for {len(batch)} items")
                return [verdict_out(item, v) for item, v in zip(batch, verdicts)]

        return PluginExport, SelectExport

    class FeaturizeExport(exports.Featurize):
        def dimension(self):
            try:
                return int(_instance().dimension())
            except Exception:
                return 0

        @guarded
        def featurize(self, batch):
            out = Features()
            _instance().featurize_batch([record_in(r) for r in batch], out)
            return types.SparseBatch(offsets=out.offsets, indices=out.indices, values=out.values)

    if not fitted:
        return PluginExport, FeaturizeExport

    class FitExport(exports.Fit):
        @guarded
        def terms(self, item):
            return [int(k) & _MASK for k in _instance().terms(record_in(item))]

        @guarded
        def load(self, vocabulary):
            _instance().load(
                Vocabulary(vocabulary.documents, vocabulary.keys, vocabulary.document_frequencies)
            )

    return PluginExport, FitExport, FeaturizeExport
