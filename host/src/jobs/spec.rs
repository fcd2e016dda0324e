//! Pipeline specifications: the TOML file `cloister run` takes.
//!
//! Parsing checks the shape (unknown keys, wrong types, out-of-range
//! values) and names the file, line and key of the first problem. What
//! needs the environment (does the dataset exist, is the plugin approved,
//! does its config accept these keys) is checked by
//! [`crate::service::Cloister::start_job`] before anything runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::JobError;
use super::precision::PrecisionTarget;

/// A plugin and the configuration it is started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginUse {
    /// A registered plugin's name, or a digest (prefix).
    pub plugin: String,
    /// Config keys and values handed to the plugin's `configure`.
    pub config: Vec<(String, String)>,
}

/// One model of the committee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUse {
    /// Template name (`cloister template list`).
    pub template: String,
    /// Hyper-parameter overrides, as `--set` would give them.
    pub sets: Vec<(String, String)>,
}

/// How records are chosen for humans (and for automatic labels).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SelectorUse {
    /// A selector plugin decides.
    Plugin(PluginUse),
    /// The built-in baseline: records drawn uniformly at random, no
    /// automatic labels.
    Random,
}

/// A metric the loop can stop at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Accuracy.
    Accuracy,
    /// Unweighted mean of per-class F1.
    MacroF1,
}

impl Metric {
    /// The metric's name in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::MacroF1 => "macro_f1",
        }
    }
}

/// Where human answers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Oracle {
    /// From the dataset's gold labels, which are hidden from training until
    /// the oracle "labels" a record (for measurement and the demo).
    Gold,
}

/// The loop's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopSettings {
    /// Records labeled by hand before the first round (drawn at random).
    pub seed_labels: usize,
    /// Records sent to humans per round.
    pub per_round: usize,
    /// Rounds at most.
    pub max_rounds: u32,
    /// Manual labels at most (the seed included).
    pub budget: usize,
    /// Stop when the committee reaches this on the validation split.
    pub target: Option<(Metric, f64)>,
    /// Misclassified validation records sent for review per round.
    pub badcases_per_round: usize,
    /// Price of one manual label, for the cost report.
    pub price_per_label: f64,
    /// Automatic labels accepted per round at most, most confident first;
    /// the rest stay in the pool for better models to decide. `None`: no cap.
    #[serde(default)]
    pub max_auto_per_round: Option<usize>,
    /// Spread each round's human picks over the committee's predicted
    /// classes (round-robin, most urgent first within a class) instead of
    /// taking the most urgent records overall.
    #[serde(default)]
    pub balance_classes: bool,
    /// The precision automatic labels must reach (`[auto_label]`): the
    /// host accepts a selector's automatic labels only above thresholds
    /// certified on the validation split. `None`: the selector alone
    /// decides.
    #[serde(default)]
    pub auto_label: Option<PrecisionTarget>,
}

/// A validated pipeline specification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineSpec {
    /// A name for people.
    pub name: String,
    /// `NAME` or `NAME@VERSION`.
    pub dataset: String,
    /// Seed of the train/validation/test split.
    pub split_seed: u64,
    /// Preprocessors, in order.
    pub preprocess: Vec<PluginUse>,
    /// The featurizer.
    pub features: PluginUse,
    /// The committee: two or more models.
    pub models: Vec<ModelUse>,
    /// The selector.
    pub selector: SelectorUse,
    /// The loop.
    pub settings: LoopSettings,
    /// Labelers the human queue is assigned to, in turn.
    pub labelers: Vec<String>,
    /// Simulated humans, if any.
    pub oracle: Option<Oracle>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    dataset: String,
    #[serde(default)]
    split_seed: u64,
    #[serde(default)]
    preprocess: Vec<RawPlugin>,
    features: RawPlugin,
    model: Vec<RawModel>,
    selector: RawSelector,
    #[serde(rename = "loop")]
    settings: RawLoop,
    #[serde(default)]
    labelers: Vec<String>,
    #[serde(default)]
    oracle: Option<Oracle>,
    #[serde(default)]
    auto_label: Option<RawAutoLabel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoLabel {
    target_precision: f64,
    #[serde(default = "default_confidence")]
    confidence: f64,
    #[serde(default = "default_per_class")]
    per_class: bool,
    #[serde(default = "default_spot_check")]
    spot_check: f64,
}

fn default_confidence() -> f64 {
    0.95
}

fn default_per_class() -> bool {
    true
}

fn default_spot_check() -> f64 {
    0.02
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPlugin {
    Name(String),
    Full(RawPluginFull),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPluginFull {
    plugin: String,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    template: String,
    #[serde(default)]
    set: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    #[serde(default)]
    plugin: Option<String>,
    #[serde(default)]
    builtin: Option<String>,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoop {
    #[serde(default)]
    seed_labels: usize,
    per_round: usize,
    max_rounds: u32,
    budget: usize,
    #[serde(default)]
    target: Option<RawTarget>,
    #[serde(default = "default_badcases")]
    badcases_per_round: usize,
    #[serde(default)]
    price_per_label: f64,
    #[serde(default)]
    max_auto_per_round: Option<usize>,
    #[serde(default)]
    balance_classes: bool,
}

fn default_badcases() -> usize {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    metric: Metric,
    value: f64,
}

/// A TOML value as the text a plugin's config or `--set` takes.
fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(value_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn pairs(map: BTreeMap<String, toml::Value>) -> Vec<(String, String)> {
    map.into_iter().map(|(k, v)| (k, value_text(&v))).collect()
}

impl RawPlugin {
    fn into_use(self) -> PluginUse {
        match self {
            RawPlugin::Name(plugin) => PluginUse {
                plugin,
                config: Vec::new(),
            },
            RawPlugin::Full(f) => PluginUse {
                plugin: f.plugin,
                config: pairs(f.config),
            },
        }
    }
}

/// Finds the line of `key = ` in `text` (first occurrence), for errors
/// about values the TOML parser accepted.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            t.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// What a spec lacks when it lacks top-level `part`, said the way the
/// spec is written.
fn top_level_part(part: &str) -> String {
    match part {
        "loop" => "the [loop] table (per_round, max_rounds and budget at least)".into(),
        "selector" => "the [selector] table (plugin = \"NAME\", or builtin = \"random\")".into(),
        "model" => "the [[model]] tables (two or more, each with a template)".into(),
        "features" => "`features` (features = { plugin = \"NAME\" })".into(),
        other => format!("`{other}`"),
    }
}

impl PipelineSpec {
    /// Parses and checks a spec. `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, JobError> {
        let err = |line: Option<usize>, message: String| JobError::Spec {
            file: file.to_string(),
            line,
            message,
        };
        let raw: RawSpec = toml::from_str(text).map_err(|e| {
            let problem = cloister_types::toml_problem::TomlProblem::of(text, &e);
            match problem.missing {
                // A part missing from the whole spec, said the way the
                // spec is written.
                Some(part) => err(None, format!("missing {}", top_level_part(&part))),
                None => err(problem.line, problem.message),
            }
        })?;
        let at = |key: &str| line_of(text, key);
        let check_name = |what: &str, v: &str| {
            if v.trim().is_empty() {
                Err(err(at(what), format!("`{what}` must not be empty")))
            } else {
                Ok(())
            }
        };
        check_name("name", &raw.name)?;
        check_name("dataset", &raw.dataset)?;
        if raw.model.len() < 2 {
            return Err(err(
                None,
                format!(
                    "the committee needs at least two [[model]] tables, found {}",
                    raw.model.len()
                ),
            ));
        }
        if raw.model.len() > 8 {
            return Err(err(None, "at most eight [[model]] tables".into()));
        }
        let selector = match (raw.selector.plugin, raw.selector.builtin.as_deref()) {
            (Some(plugin), None) => SelectorUse::Plugin(PluginUse {
                plugin,
                config: pairs(raw.selector.config),
            }),
            (None, Some("random")) => {
                if !raw.selector.config.is_empty() {
                    return Err(err(
                        at("config"),
                        "[selector] builtin = \"random\" takes no config".into(),
                    ));
                }
                SelectorUse::Random
            }
            (None, Some(other)) => {
                return Err(err(
                    at("builtin"),
                    format!("[selector] builtin: unknown `{other}` (the only one is `random`)"),
                ));
            }
            _ => {
                return Err(err(
                    None,
                    "[selector] needs exactly one of `plugin` or `builtin`".into(),
                ));
            }
        };
        let l = raw.settings;
        if l.per_round == 0 || l.per_round > 100_000 {
            return Err(err(
                at("per_round"),
                format!(
                    "[loop] per_round: expected 1 to 100000, got {}",
                    l.per_round
                ),
            ));
        }
        if l.max_rounds == 0 || l.max_rounds > 1000 {
            return Err(err(
                at("max_rounds"),
                format!(
                    "[loop] max_rounds: expected 1 to 1000, got {}",
                    l.max_rounds
                ),
            ));
        }
        if l.budget == 0 {
            return Err(err(
                at("budget"),
                "[loop] budget: must be at least 1".into(),
            ));
        }
        if l.seed_labels > l.budget {
            return Err(err(
                at("seed_labels"),
                format!(
                    "[loop] seed_labels ({}) exceeds the budget ({})",
                    l.seed_labels, l.budget
                ),
            ));
        }
        if !(l.price_per_label.is_finite() && l.price_per_label >= 0.0) {
            return Err(err(
                at("price_per_label"),
                "[loop] price_per_label: expected a number ≥ 0".into(),
            ));
        }
        if l.max_auto_per_round == Some(0) {
            return Err(err(
                at("max_auto_per_round"),
                "[loop] max_auto_per_round: must be at least 1 (leave it out for no cap; \
                 use a selector without automatic labels for none)"
                    .into(),
            ));
        }
        let target = match l.target {
            None => None,
            Some(t) => {
                if !(t.value > 0.0 && t.value <= 1.0) {
                    return Err(err(
                        at("value"),
                        format!(
                            "[loop.target] value: expected a number in (0, 1], got {}",
                            t.value
                        ),
                    ));
                }
                Some((t.metric, t.value))
            }
        };
        let auto_label = match raw.auto_label {
            None => None,
            Some(a) => {
                let open = |v: f64| v.is_finite() && v > 0.0 && v < 1.0;
                if !open(a.target_precision) {
                    return Err(err(
                        at("target_precision"),
                        format!(
                            "[auto_label] target_precision: expected a number in (0, 1), got {}",
                            a.target_precision
                        ),
                    ));
                }
                if !open(a.confidence) {
                    return Err(err(
                        at("confidence"),
                        format!(
                            "[auto_label] confidence: expected a number in (0, 1), got {}",
                            a.confidence
                        ),
                    ));
                }
                if !(a.spot_check.is_finite() && (0.0..0.5).contains(&a.spot_check)) {
                    return Err(err(
                        at("spot_check"),
                        format!(
                            "[auto_label] spot_check: expected a share in [0, 0.5), got {}",
                            a.spot_check
                        ),
                    ));
                }
                if matches!(selector, SelectorUse::Random) {
                    return Err(err(
                        at("target_precision"),
                        "[auto_label] needs a selector plugin: the random baseline gives no \
                         automatic labels"
                            .into(),
                    ));
                }
                Some(PrecisionTarget {
                    target_precision: a.target_precision,
                    confidence: a.confidence,
                    per_class: a.per_class,
                    spot_check: a.spot_check,
                })
            }
        };
        let mut labelers = raw.labelers;
        labelers.dedup();
        Ok(PipelineSpec {
            name: raw.name,
            dataset: raw.dataset,
            split_seed: raw.split_seed,
            preprocess: raw
                .preprocess
                .into_iter()
                .map(RawPlugin::into_use)
                .collect(),
            features: raw.features.into_use(),
            models: raw
                .model
                .into_iter()
                .map(|m| ModelUse {
                    template: m.template,
                    sets: pairs(m.set),
                })
                .collect(),
            selector,
            settings: LoopSettings {
                seed_labels: l.seed_labels,
                per_round: l.per_round,
                max_rounds: l.max_rounds,
                budget: l.budget,
                target,
                badcases_per_round: l.badcases_per_round,
                price_per_label: l.price_per_label,
                max_auto_per_round: l.max_auto_per_round,
                balance_classes: l.balance_classes,
                auto_label,
            },
            labelers,
            oracle: raw.oracle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "spam"
dataset = "spam"
preprocess = ["text-normalize"]
features = { plugin = "hashed-ngrams", config = { buckets = 65536 } }

[[model]]
template = "logreg"

[[model]]
template = "mlp"
set = { hidden = [32] }

[selector]
plugin = "dual-agree"
config = { threshold = 0.97 }

[loop]
seed_labels = 50
per_round = 50
max_rounds = 8
budget = 500
target = { metric = "accuracy", value = 0.98 }
"#;

    #[test]
    fn the_shipped_pipelines_parse() {
        for (file, text) in [
            (
                "spam-active-learning.toml",
                include_str!("../../../pipelines/spam-active-learning.toml"),
            ),
            (
                "spam-active-learning-capped.toml",
                include_str!("../../../pipelines/spam-active-learning-capped.toml"),
            ),
            (
                "spam-active-learning-precise.toml",
                include_str!("../../../pipelines/spam-active-learning-precise.toml"),
            ),
        ] {
            let s = PipelineSpec::parse(file, text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.dataset, "spamassassin", "{file}");
        }
    }

    #[test]
    fn a_good_spec_parses_with_config_as_text() {
        let s = PipelineSpec::parse("p.toml", GOOD).unwrap();
        assert_eq!(s.features.config, [("buckets".into(), "65536".into())]);
        assert_eq!(s.models[1].sets, [("hidden".into(), "32".into())]);
        assert_eq!(
            s.selector,
            SelectorUse::Plugin(PluginUse {
                plugin: "dual-agree".into(),
                config: vec![("threshold".into(), "0.97".into())]
            })
        );
        assert_eq!(s.settings.target, Some((Metric::Accuracy, 0.98)));
        assert_eq!(s.settings.badcases_per_round, 10);
    }

    #[test]
    fn a_missing_part_is_named_as_the_spec_writes_it() {
        // The whole spec lacks a table: no line 1, and not `name`.
        // GOOD without the lines from `from` up to (not including) `to`.
        let cut = |from: &str, to: &str| {
            let (a, rest) = GOOD.split_once(from).unwrap();
            let b = if to.is_empty() {
                String::new()
            } else {
                format!("{to}{}", rest.split_once(to).unwrap().1)
            };
            format!("{a}{b}")
        };
        let e = PipelineSpec::parse("p.toml", &cut("[loop]", ""))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "p.toml: missing the [loop] table (per_round, max_rounds and budget at least)"
        );
        let e = PipelineSpec::parse("p.toml", &cut("[selector]", "[loop]"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.toml: missing the [selector] table"), "{e}");
        // A table that lacks a key: the table's line, no other key blamed.
        let e = PipelineSpec::parse("p.toml", &GOOD.replace("budget = 500\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `budget`"), "{e}");
        assert!(!e.contains("`seed_labels`"), "{e}");
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let bad = GOOD.replace("per_round = 50", "per_round = 50\nrounds = 3");
        let e = PipelineSpec::parse("p.toml", &bad).unwrap_err().to_string();
        assert!(e.starts_with("p.toml:"), "{e}");
        assert!(e.contains("rounds"), "{e}");

        let bad = GOOD.replace("budget = 500", "budget = 0");
        let e = PipelineSpec::parse("p.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("p.toml:22:"), "{e}");
        assert!(e.contains("budget"), "{e}");

        let bad = GOOD.replace("budget = 500", "budget = 500\nmax_auto_per_round = 0");
        let e = PipelineSpec::parse("p.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("p.toml:23:"), "{e}");
        assert!(e.contains("max_auto_per_round"), "{e}");
        let capped = GOOD.replace("budget = 500", "budget = 500\nmax_auto_per_round = 300");
        let s = PipelineSpec::parse("p.toml", &capped).unwrap();
        assert_eq!(s.settings.max_auto_per_round, Some(300));
        assert_eq!(
            PipelineSpec::parse("p.toml", GOOD)
                .unwrap()
                .settings
                .max_auto_per_round,
            None
        );

        let balanced = GOOD.replace("budget = 500", "budget = 500\nbalance_classes = true");
        assert!(
            PipelineSpec::parse("p.toml", &balanced)
                .unwrap()
                .settings
                .balance_classes
        );
        assert!(
            !PipelineSpec::parse("p.toml", GOOD)
                .unwrap()
                .settings
                .balance_classes
        );
        let bad = GOOD.replace("budget = 500", "budget = 500\nbalance_classes = \"yes\"");
        let e = PipelineSpec::parse("p.toml", &bad).unwrap_err().to_string();
        assert!(
            e.contains("p.toml:23:") && e.contains("balance_classes"),
            "{e}"
        );

        let gated = format!("{GOOD}\n[auto_label]\ntarget_precision = 0.98\n");
        let a = PipelineSpec::parse("p.toml", &gated)
            .unwrap()
            .settings
            .auto_label
            .expect("the gate");
        assert_eq!(
            (a.target_precision, a.confidence, a.per_class, a.spot_check),
            (0.98, 0.95, true, 0.02)
        );
        for (bad, key) in [
            ("target_precision = 1.0", "target_precision"),
            ("target_precision = 0.9\nconfidence = 0", "confidence"),
            ("target_precision = 0.9\nspot_check = 0.7", "spot_check"),
        ] {
            let text = format!("{GOOD}\n[auto_label]\n{bad}\n");
            let e = PipelineSpec::parse("p.toml", &text)
                .unwrap_err()
                .to_string();
            let line = text.lines().position(|l| l.starts_with(key)).unwrap() + 1;
            assert!(
                e.contains(&format!("p.toml:{line}:")) && e.contains(key),
                "{e}"
            );
        }
        let typo = format!("{GOOD}\n[auto_label]\ntarget_precison = 0.9\n");
        let e = PipelineSpec::parse("p.toml", &typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("target_precison"), "{e}");

        let bad = GOOD.replace("value = 0.98", "value = 1.5");
        let e = PipelineSpec::parse("p.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("value"), "{e}");

        let one = GOOD.replace("[[model]]\ntemplate = \"mlp\"\nset = { hidden = [32] }", "");
        let e = PipelineSpec::parse("p.toml", &one).unwrap_err().to_string();
        assert!(e.contains("at least two"), "{e}");

        let both = GOOD.replace(
            "plugin = \"dual-agree\"",
            "plugin = \"x\"\nbuiltin = \"random\"",
        );
        let e = PipelineSpec::parse("p.toml", &both)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one"), "{e}");
    }
}
