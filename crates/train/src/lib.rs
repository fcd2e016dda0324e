//! Training: templates, the training loop with early stopping, evaluation
//! and model weights as safetensors.
//!
//! The pipeline that feeds it (approved plugins over a stored dataset) and
//! the model registry live in `cloister_host::service` and `cloister_host::models`.

pub mod disclosure;
pub mod eval;
pub mod model;

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use cloister_types::types::SparseBatch;
use model::{DenseStack, KernelError, Rng, SparseLinear, softmax, softmax_xent_grad};

/// The templates shipped with this build, from `templates/`.
pub const BUILTIN_TEMPLATES: [(&str, &str); 2] = [
    ("logreg", include_str!("../../../templates/logreg.toml")),
    ("mlp", include_str!("../../../templates/mlp.toml")),
];

/// Errors of training.
#[derive(Debug, Error)]
pub enum TrainError {
    /// No template of that name.
    #[error("no template `{0}` (see `cloister template list`)")]
    UnknownTemplate(String),
    /// A template file is malformed.
    #[error("templates/{file}: {message}")]
    BadTemplate {
        /// File.
        file: String,
        /// What is wrong (with the line, and the key or table, where one
        /// line is to blame).
        message: String,
    },
    /// A `--set` or template key is unknown.
    #[error("unknown hyper-parameter `{key}` for template `{template}` (known: {known})")]
    UnknownKey {
        /// Template.
        template: String,
        /// The key.
        key: String,
        /// The keys it has.
        known: String,
    },
    /// A value is malformed or out of range.
    #[error("hyper-parameter `{key}`: {problem}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// Too little data to train and validate.
    #[error("{0}")]
    NotEnoughData(String),
    /// A kernel failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The model's training state would not fit the environment's budget.
    /// (The size depends on the featurizer's declared dimension, so the
    /// message states only the budget.)
    #[error(
        "training this model would need more memory than the environment's training budget of {budget_mb} MiB; choose a featurizer configuration with fewer dimensions or a smaller first hidden layer, or ask an administrator to raise [training] memory_budget_mb in limits.toml"
    )]
    OverBudget {
        /// The budget in MiB.
        budget_mb: u64,
    },
}

/// Model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Softmax regression.
    Logreg,
    /// Sparse-input MLP.
    Mlp,
}

/// Hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    /// Maximum epochs.
    pub epochs: u32,
    /// Records per step.
    pub batch_size: usize,
    /// Adam step size.
    pub learning_rate: f32,
    /// L2 weight decay.
    pub l2: f32,
    /// Weight classes inversely to their frequency.
    pub class_weight: bool,
    /// Epochs without improvement before stopping.
    pub patience: u32,
    /// Seed for shuffling, initialisation, dropout and the split.
    pub seed: u64,
    /// Hidden layer widths (MLP).
    pub hidden: Vec<usize>,
    /// Dropout on the first hidden layer (MLP).
    pub dropout: f32,
    /// Input features that fewer than this many training records have are
    /// not learned (their input rows stay zero), like a document-frequency
    /// floor: a weight only a handful of records move carries those
    /// records (docs/disclosure.md). The default matches the disclosure
    /// check's `k`; 0 or 1 learns every feature. Manifests written before
    /// this key existed read as 0.
    #[serde(default)]
    pub min_support: u32,
    /// Whether the inputs are standardized on the training split before
    /// training ([`Standardize`]). Manifests written before this key
    /// existed read as `off`, which is how those models were trained.
    #[serde(default = "Standardize::off")]
    pub standardize: Standardize,
}

/// Standardizing the inputs: each input position shifted by its mean and
/// divided by its standard deviation over the training records (a record
/// without the position counts as 0 there), as a scaler in front of the
/// model would — numeric features of very different scales otherwise train
/// badly. The figures never leave the training run: after the last epoch
/// they are folded into the first layer (`W'ᵢ = Wᵢ / σᵢ`,
/// `b' = b − Σᵢ μᵢ · W'ᵢ`), so the stored model takes the raw features and
/// computes what the standardized one did, up to rounding. Only dense
/// inputs are standardized: subtracting a mean makes every position of
/// every record non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standardize {
    /// When the training records have, on average, at least half of at most
    /// [`STANDARDIZE_MAX_DIM`] input positions (numeric features); never
    /// for sparse ones (text).
    Auto,
    /// Always (refused for inputs wider than [`STANDARDIZE_MAX_DIM`]).
    On,
    /// Never: the features as the featurizer gives them.
    Off,
}

impl Standardize {
    fn off() -> Self {
        Standardize::Off
    }

    /// The setting's name, as in a template.
    pub fn as_str(self) -> &'static str {
        match self {
            Standardize::Auto => "auto",
            Standardize::On => "on",
            Standardize::Off => "off",
        }
    }
}

/// The widest input that is standardized: every training record becomes a
/// dense row of this many values.
pub const STANDARDIZE_MAX_DIM: usize = 4096;

const KEYS: [&str; 11] = [
    "epochs",
    "batch_size",
    "learning_rate",
    "l2",
    "class_weight",
    "patience",
    "seed",
    "hidden",
    "dropout",
    "min_support",
    "standardize",
];

impl Hyper {
    fn defaults() -> Self {
        Hyper {
            epochs: 30,
            batch_size: 64,
            learning_rate: 0.01,
            l2: 0.0,
            class_weight: true,
            patience: 3,
            seed: 0,
            hidden: vec![128],
            dropout: 0.0,
            min_support: 10,
            standardize: Standardize::Auto,
        }
    }

    /// Sets one key from its text form (as given to `--set key=value`).
    pub fn set(
        &mut self,
        template: &str,
        kind: Kind,
        key: &str,
        value: &str,
    ) -> Result<(), TrainError> {
        let bad = |problem: &str| TrainError::BadValue {
            key: key.to_string(),
            problem: problem.to_string(),
        };
        let mlp_only = ["hidden", "dropout"];
        if !KEYS.contains(&key) || (kind == Kind::Logreg && mlp_only.contains(&key)) {
            let known: Vec<&str> = KEYS
                .iter()
                .copied()
                .filter(|k| kind == Kind::Mlp || !mlp_only.contains(k))
                .collect();
            return Err(TrainError::UnknownKey {
                template: template.into(),
                key: key.into(),
                known: known.join(", "),
            });
        }
        let int = |lo: u64, hi: u64| -> Result<u64, TrainError> {
            value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|v| (lo..=hi).contains(v))
                .ok_or_else(|| {
                    bad(&format!(
                        "expected an integer from {lo} to {hi}, got `{value}`"
                    ))
                })
        };
        let float = |lo: f32, hi: f32| -> Result<f32, TrainError> {
            value
                .trim()
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite() && (lo..=hi).contains(v))
                .ok_or_else(|| {
                    bad(&format!(
                        "expected a number from {lo} to {hi}, got `{value}`"
                    ))
                })
        };
        match key {
            "epochs" => self.epochs = int(1, 10_000)? as u32,
            "batch_size" => self.batch_size = int(1, 65_536)? as usize,
            "learning_rate" => self.learning_rate = float(1e-7, 10.0)?,
            "l2" => self.l2 = float(0.0, 10.0)?,
            "patience" => self.patience = int(1, 1000)? as u32,
            "seed" => self.seed = int(0, u64::MAX)?,
            "dropout" => self.dropout = float(0.0, 0.95)?,
            "min_support" => self.min_support = int(0, 1_000_000)? as u32,
            "class_weight" => {
                self.class_weight = match value.trim().trim_matches('"') {
                    "balanced" => true,
                    "none" => false,
                    _ => {
                        return Err(bad(&format!(
                            "expected `balanced` or `none`, got `{value}`"
                        )));
                    }
                }
            }
            "standardize" => {
                self.standardize = match value.trim().trim_matches('"') {
                    "auto" => Standardize::Auto,
                    "on" => Standardize::On,
                    "off" => Standardize::Off,
                    _ => {
                        return Err(bad(&format!(
                            "expected `auto`, `on` or `off`, got `{value}`"
                        )));
                    }
                }
            }
            "hidden" => {
                let inner = value.trim().trim_start_matches('[').trim_end_matches(']');
                let widths: Option<Vec<usize>> = inner
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse().ok().filter(|w| (1..=4096).contains(w)))
                    .collect();
                match widths {
                    Some(w) if !w.is_empty() && w.len() <= 4 => self.hidden = w,
                    _ => {
                        return Err(bad(&format!(
                            "expected one to four widths from 1 to 4096, like `[128]` or `256,64`, got `{value}`"
                        )));
                    }
                }
            }
            // Every key of KEYS is matched above, and unknown keys were
            // refused before the match.
            _ => {}
        }
        Ok(())
    }
}

/// A training template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    /// Name (`--template NAME`).
    pub name: String,
    /// Model family.
    pub kind: Kind,
    /// One line for `template list`.
    pub description: String,
    /// Hyper-parameters.
    pub hyper: Hyper,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    name: String,
    kind: Kind,
    description: String,
    hyper: toml::Table,
}

impl Template {
    /// Parses a template file; errors name the file, and the line and the
    /// key or table where one line is to blame.
    pub fn parse(file: &str, text: &str) -> Result<Self, TrainError> {
        let bad = |message: String| TrainError::BadTemplate {
            file: file.to_string(),
            message,
        };
        let f: TemplateFile = toml::from_str(text).map_err(|e| {
            bad(cloister_types::toml_problem::TomlProblem::of(text, &e).to_string())
        })?;
        let mut hyper = Hyper::defaults();
        for (key, value) in &f.hyper {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            hyper
                .set(&f.name, f.kind, key, &text)
                .map_err(|e| bad(e.to_string()))?;
        }
        Ok(Template {
            name: f.name,
            kind: f.kind,
            description: f.description,
            hyper,
        })
    }
}

/// The built-in templates.
pub fn templates() -> Result<Vec<Template>, TrainError> {
    BUILTIN_TEMPLATES
        .iter()
        .map(|(name, text)| Template::parse(&format!("{name}.toml"), text))
        .collect()
}

/// A template by name, with `--set key=value` overrides applied.
pub fn template(name: &str, sets: &[(String, String)]) -> Result<Template, TrainError> {
    let mut t = templates()?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| TrainError::UnknownTemplate(name.to_string()))?;
    for (k, v) in sets {
        t.hyper.set(&t.name, t.kind, k, v)?;
    }
    Ok(t)
}

/// One epoch of the training curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 1-based epoch.
    pub epoch: u32,
    /// Mean training loss.
    pub train_loss: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation accuracy.
    pub val_accuracy: f64,
    /// Training samples per second in this epoch.
    pub samples_per_s: f64,
    /// Seconds since training started, at the end of this epoch
    /// (validation included).
    pub elapsed_s: f64,
}

/// The trained network.
#[derive(Debug)]
pub enum Network {
    /// Softmax regression.
    Logreg(SparseLinear),
    /// MLP: sparse first layer, then the dense stack.
    Mlp(SparseLinear, DenseStack),
}

/// A trained model ready to predict.
#[derive(Debug)]
pub struct Trained {
    /// Input dimension.
    pub dim: usize,
    /// Number of classes.
    pub classes: usize,
    /// The network.
    pub net: Network,
}

impl Trained {
    fn new(kind: Kind, dim: usize, classes: usize, hyper: &Hyper) -> Result<Self, TrainError> {
        let mut rng = Rng::new(hyper.seed);
        let net = match kind {
            Kind::Logreg => Network::Logreg(SparseLinear::new(dim, classes, None)),
            Kind::Mlp => {
                let first = SparseLinear::new(dim, hyper.hidden[0], Some(&mut rng));
                let mut widths = hyper.hidden.clone();
                widths.push(classes);
                Network::Mlp(first, DenseStack::new(&widths, &mut rng)?)
            }
        };
        Ok(Self { dim, classes, net })
    }

    /// Class probabilities for `rows` of `x`, row-major.
    pub fn predict(&self, x: &SparseBatch, rows: &[usize]) -> Result<Vec<f32>, TrainError> {
        let mut out = Vec::with_capacity(rows.len() * self.classes);
        let mut buf = Vec::new();
        for chunk in rows.chunks(1024) {
            match &self.net {
                Network::Logreg(l) => {
                    l.check(x)?;
                    l.forward(x, chunk, &mut buf);
                    for row in buf.chunks_mut(self.classes) {
                        softmax(row);
                    }
                    out.extend_from_slice(&buf);
                }
                Network::Mlp(first, dense) => {
                    first.check(x)?;
                    first.forward(x, chunk, &mut buf);
                    buf.iter_mut().for_each(|h| *h = h.max(0.0));
                    out.extend(dense.predict(&buf, chunk.len())?);
                }
            }
        }
        Ok(out)
    }

    /// Copies the weights into `best`, reusing its buffers (so keeping
    /// the best epoch costs a copy, not an allocation and a serialization).
    fn save_into(&self, best: &mut Best) -> Result<(), TrainError> {
        let first = match &self.net {
            Network::Logreg(l) | Network::Mlp(l, _) => l,
        };
        best.w.clear();
        best.w.extend_from_slice(&first.w);
        best.b.clear();
        best.b.extend_from_slice(&first.b);
        best.dense.clear();
        if let Network::Mlp(_, dense) = &self.net {
            for (w, b) in &dense.layers {
                best.dense.push((
                    w.as_tensor()
                        .flatten_all()
                        .and_then(|t| t.to_vec1())
                        .map_err(KernelError::from)?,
                    b.as_tensor().to_vec1().map_err(KernelError::from)?,
                ));
            }
        }
        Ok(())
    }

    /// Puts the weights saved in `best` back, and drops the optimizer's
    /// state: the model is done training.
    fn restore(&mut self, best: &Best) -> Result<(), TrainError> {
        let first = match &mut self.net {
            Network::Logreg(l) | Network::Mlp(l, _) => l,
        };
        first.w.copy_from_slice(&best.w);
        first.b.copy_from_slice(&best.b);
        first.finish();
        if let Network::Mlp(_, dense) = &mut self.net {
            let dev = dense.device().clone();
            for ((w, b), (wv, bv)) in dense.layers.iter_mut().zip(&best.dense) {
                let t = candle_core::Tensor::from_slice(wv, w.as_tensor().dims(), &dev)
                    .map_err(KernelError::from)?;
                w.set(&t).map_err(KernelError::from)?;
                let t = candle_core::Tensor::from_slice(bv, bv.len(), &dev)
                    .map_err(KernelError::from)?;
                b.set(&t).map_err(KernelError::from)?;
            }
        }
        Ok(())
    }

    /// The weights as safetensors bytes.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, TrainError> {
        let mut named: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let first = match &self.net {
            Network::Logreg(l) | Network::Mlp(l, _) => l,
        };
        named.push((
            "sparse.weight".into(),
            vec![first.dim, first.out],
            first.w.clone(),
        ));
        named.push(("sparse.bias".into(), vec![first.out], first.b.clone()));
        if let Network::Mlp(_, dense) = &self.net {
            for (i, (w, b)) in dense.layers.iter().enumerate() {
                let wt = w.as_tensor();
                named.push((
                    format!("dense.{i}.weight"),
                    wt.dims().to_vec(),
                    wt.flatten_all()
                        .and_then(|t| t.to_vec1())
                        .map_err(KernelError::from)?,
                ));
                named.push((
                    format!("dense.{i}.bias"),
                    b.as_tensor().dims().to_vec(),
                    b.as_tensor().to_vec1().map_err(KernelError::from)?,
                ));
            }
        }
        let bytes: Vec<Vec<u8>> = named
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = named
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| KernelError::Weights(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(safetensors::tensor::serialize(views, None)
            .map_err(|e| KernelError::Weights(e.to_string()))?)
    }

    /// Rebuilds a model from [`Trained::to_safetensors`].
    pub fn from_safetensors(kind: Kind, bytes: &[u8]) -> Result<Self, TrainError> {
        let bad = |m: String| TrainError::Kernel(KernelError::Weights(m));
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>), TrainError> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("missing tensor {name}")))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("{name} is not f32")));
            }
            let data = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((t.shape().to_vec(), data))
        };
        let (ws, w) = get("sparse.weight")?;
        let (_, b) = get("sparse.bias")?;
        let [dim, out] = ws[..] else {
            return Err(bad("sparse.weight is not 2-D".into()));
        };
        let mut first = SparseLinear::new(dim, out, None);
        first.w = w;
        first.b = b;
        match kind {
            Kind::Logreg => Ok(Self {
                dim,
                classes: out,
                net: Network::Logreg(first),
            }),
            Kind::Mlp => {
                let mut widths = vec![out];
                let mut tensors = Vec::new();
                let mut i = 0;
                while let Ok((shape, w)) = get(&format!("dense.{i}.weight")) {
                    let (_, b) = get(&format!("dense.{i}.bias"))?;
                    widths.push(shape.get(1).copied().unwrap_or(0));
                    tensors.push((shape, w, b));
                    i += 1;
                }
                let mut stack = DenseStack::new(&widths, &mut Rng::new(0))?;
                let dev = stack.device().clone();
                for ((w, b), (shape, wv, bv)) in stack.layers.iter_mut().zip(tensors) {
                    w.set(
                        &candle_core::Tensor::from_vec(wv, (shape[0], shape[1]), &dev)
                            .map_err(KernelError::from)?,
                    )
                    .map_err(KernelError::from)?;
                    let n = bv.len();
                    b.set(&candle_core::Tensor::from_vec(bv, n, &dev).map_err(KernelError::from)?)
                        .map_err(KernelError::from)?;
                }
                let classes = *widths.last().unwrap_or(&0);
                Ok(Self {
                    dim,
                    classes,
                    net: Network::Mlp(first, stack),
                })
            }
        }
    }
}

/// The weights of the best epoch so far (see [`Trained::save_into`]).
#[derive(Debug, Default)]
struct Best {
    w: Vec<f32>,
    b: Vec<f32>,
    dense: Vec<(Vec<f32>, Vec<f32>)>,
}

/// What [`fit`] returns.
#[derive(Debug)]
pub struct Fitted {
    /// The model at its best validation epoch.
    pub model: Trained,
    /// The training curve.
    pub curve: Vec<EpochStats>,
    /// The epoch whose weights were kept.
    pub best_epoch: u32,
    /// Wall time, seconds.
    pub seconds: f64,
}

fn class_weights(y: &[usize], rows: &[usize], classes: usize, balanced: bool) -> Vec<f32> {
    if !balanced {
        return vec![1.0; classes];
    }
    let mut counts = vec![0usize; classes];
    for &r in rows {
        counts[y[r]] += 1;
    }
    counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                rows.len() as f32 / (classes * c) as f32
            }
        })
        .collect()
}

fn loss_and_accuracy(
    model: &Trained,
    x: &SparseBatch,
    y: &[usize],
    rows: &[usize],
) -> Result<(f64, f64), TrainError> {
    let probs = model.predict(x, rows)?;
    let k = model.classes;
    let mut loss = 0f64;
    let mut correct = 0usize;
    for (i, &r) in rows.iter().enumerate() {
        let p = &probs[i * k..(i + 1) * k];
        loss -= f64::from(p[y[r]].max(1e-12)).ln();
        let best = p
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (j, &v)| if v > b.1 { (j, v) } else { b })
            .0;
        correct += usize::from(best == y[r]);
    }
    let n = rows.len().max(1) as f64;
    Ok((loss / n, correct as f64 / n))
}

/// The data [`fit`] trains on.
#[derive(Debug, Clone, Copy)]
pub struct TrainingSet<'a> {
    /// Features, one row per record.
    pub x: &'a SparseBatch,
    /// Input dimension.
    pub dim: usize,
    /// Class index per row.
    pub y: &'a [usize],
    /// Number of classes.
    pub classes: usize,
    /// Training rows.
    pub train: &'a [usize],
    /// Validation rows (early stopping).
    pub val: &'a [usize],
    /// Bytes the model's training state may take ([`state_bytes`]);
    /// checked before anything is allocated.
    pub budget_bytes: u64,
}

/// Bytes the training state of a model takes, estimated from above: the
/// sparse input layer's weights, Adam's first moment (the second is one
/// float per row), the gradient accumulator, the best-epoch copy, and the
/// copy and bytes of the result's serialization (at most six
/// `dim × width` f32 arrays), plus the dense stack's layers four times.
pub fn state_bytes(kind: Kind, dim: usize, classes: usize, hyper: &Hyper) -> u64 {
    let (first, dense) = match kind {
        Kind::Logreg => (classes as u64, 0u64),
        Kind::Mlp => {
            let mut widths = hyper.hidden.clone();
            widths.push(classes);
            let dense: u64 = widths
                .windows(2)
                .map(|w| (w[0] as u64 + 1).saturating_mul(w[1] as u64))
                .sum();
            (hyper.hidden.first().copied().unwrap_or(0) as u64, dense)
        }
    };
    (dim as u64)
        .saturating_mul(first)
        .saturating_mul(6 * 4)
        .saturating_add(dense.saturating_mul(4 * 4))
        .saturating_add(dim as u64)
}

/// Trains on `train` rows with early stopping on `val` rows. `progress` is
/// called after each epoch.
pub fn fit(
    template: &Template,
    data: TrainingSet<'_>,
    progress: &mut dyn FnMut(&EpochStats),
) -> Result<Fitted, TrainError> {
    let TrainingSet {
        x,
        dim,
        y,
        classes,
        train,
        val,
        budget_bytes,
    } = data;
    let h = &template.hyper;
    if state_bytes(template.kind, dim, classes, h) > budget_bytes {
        return Err(TrainError::OverBudget {
            budget_mb: budget_bytes / (1024 * 1024),
        });
    }
    if train.is_empty() || val.is_empty() || classes < 2 {
        return Err(TrainError::NotEnoughData(format!(
            "training needs at least two classes and records in both the training and validation splits (have {classes} classes, {} training and {} validation records)",
            train.len(),
            val.len()
        )));
    }
    let started = Instant::now();
    let mut model = Trained::new(template.kind, dim, classes, h)?;
    match &model.net {
        Network::Logreg(l) | Network::Mlp(l, _) => l.check(x)?,
    }
    // Features too few training records have are dropped from the input
    // and their rows zeroed, so no step ever moves them.
    let supported;
    let x = if h.min_support > 1 {
        let support = disclosure::feature_support(x, train, dim);
        let first = match &mut model.net {
            Network::Logreg(l) | Network::Mlp(l, _) => l,
        };
        let out = first.out;
        for (row, &s) in support.iter().enumerate() {
            if s < h.min_support {
                first.w[row * out..(row + 1) * out].fill(0.0);
            }
        }
        supported = keep_supported(x, &support, h.min_support);
        &supported
    } else {
        x
    };
    let scaling = match h.standardize {
        Standardize::Off => None,
        Standardize::On if dim > STANDARDIZE_MAX_DIM => {
            return Err(TrainError::BadValue {
                key: "standardize".into(),
                problem: format!(
                    "`on` needs inputs of at most {STANDARDIZE_MAX_DIM} positions; this featurizer's are wider (use `auto` or `off`)"
                ),
            });
        }
        Standardize::On => Some(Scaling::of(x, train, dim)),
        Standardize::Auto => {
            let entries: usize = train.iter().map(|&r| x.row(r).0.len()).sum();
            (dim <= STANDARDIZE_MAX_DIM && 2 * entries >= train.len() * dim)
                .then(|| Scaling::of(x, train, dim))
        }
    };
    let standardized;
    let x = match &scaling {
        Some(s) => {
            standardized = s.apply(x);
            &standardized
        }
        None => x,
    };
    let cw = class_weights(y, train, classes, h.class_weight);
    let mut rng = Rng::new(h.seed.wrapping_add(1));
    let mut order = train.to_vec();
    let mut curve = Vec::new();
    let mut best: Option<(f64, f64, u32)> = None;
    let mut best_weights = Best::default();
    let mut since_best = 0;
    let mut buf = Vec::new();
    let parallel = match &model.net {
        Network::Logreg(l) => l.splits(),
        Network::Mlp(..) => true,
    };
    for epoch in 1..=h.epochs {
        let t = Instant::now();
        rng.shuffle(&mut order);
        let steps = Epoch {
            x,
            y,
            classes,
            order: &order,
            cw: &cw,
            h,
        };
        // Steps with parallel work (a wide sparse layer's blocks, candle's
        // matrix products) run on a thread of the pool that work goes to,
        // so each step hands its blocks to the other core directly instead
        // of parking this thread and waking it again twice a step
        // (docs/BENCHMARKS.md, "The training loop on the pool's thread").
        // Steps without any stay on this thread: on the pool they would
        // only hold one of its threads from the other work it is given (a
        // committee member training at the same time). Either way the same
        // steps in the same order: the weights do not change.
        let (loss_sum, batches) = if parallel {
            rayon::scope(|_| train_epoch(&mut model, &steps, &mut rng, &mut buf))
        } else {
            train_epoch(&mut model, &steps, &mut rng, &mut buf)
        }?;
        let seconds = t.elapsed().as_secs_f64();
        let (val_loss, val_accuracy) = loss_and_accuracy(&model, x, y, val)?;
        let stats = EpochStats {
            epoch,
            train_loss: loss_sum / batches.max(1) as f64,
            val_loss,
            val_accuracy,
            samples_per_s: train.len() as f64 / seconds.max(1e-9),
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        progress(&stats);
        curve.push(stats);
        let better = match &best {
            None => true,
            Some((acc, loss, _)) => {
                val_accuracy > *acc || (val_accuracy == *acc && val_loss < *loss)
            }
        };
        if better {
            model.save_into(&mut best_weights)?;
            best = Some((val_accuracy, val_loss, epoch));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= h.patience {
                break;
            }
        }
    }
    let (_, _, best_epoch) =
        best.ok_or_else(|| TrainError::NotEnoughData("no epoch ran".into()))?;
    model.restore(&best_weights)?;
    if let Some(s) = &scaling {
        match &mut model.net {
            Network::Logreg(l) | Network::Mlp(l, _) => s.fold(l),
        }
    }
    Ok(Fitted {
        model,
        curve,
        best_epoch,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What one epoch's steps read: the inputs, labels and class weights, the
/// training records in this epoch's order, and the hyper-parameters.
struct Epoch<'a> {
    x: &'a SparseBatch,
    y: &'a [usize],
    classes: usize,
    order: &'a [usize],
    cw: &'a [f32],
    h: &'a Hyper,
}

/// One epoch's steps over `e.order`, in mini-batches: the summed training
/// loss and the number of batches.
fn train_epoch(
    model: &mut Trained,
    e: &Epoch<'_>,
    rng: &mut Rng,
    buf: &mut Vec<f32>,
) -> Result<(f64, usize), TrainError> {
    let Epoch {
        x,
        y,
        classes,
        order,
        cw,
        h,
    } = *e;
    let mut loss_sum = 0f64;
    let mut batches = 0usize;
    for rows in order.chunks(h.batch_size) {
        let labels: Vec<usize> = rows.iter().map(|&r| y[r]).collect();
        let weights: Vec<f32> = labels.iter().map(|&c| cw[c]).collect();
        match &mut model.net {
            Network::Logreg(l) => {
                l.forward_train(x, rows, buf);
                loss_sum += f64::from(softmax_xent_grad(buf, classes, &labels, &weights));
                l.step(buf, h.learning_rate, h.l2, None)?;
            }
            Network::Mlp(first, dense) => {
                let width = first.out;
                first.forward_train(x, rows, buf);
                let keep = 1.0 - h.dropout;
                let mask: Vec<f32> = buf
                    .iter()
                    .map(|&z| {
                        if z <= 0.0 || (h.dropout > 0.0 && rng.unit() < h.dropout) {
                            0.0
                        } else {
                            1.0 / keep
                        }
                    })
                    .collect();
                let act: Vec<f32> = buf.iter().zip(&mask).map(|(z, m)| z * m).collect();
                let (loss, mut dh) =
                    dense.step(&act, rows.len(), &labels, &weights, h.learning_rate, h.l2)?;
                loss_sum += f64::from(loss);
                for (d, m) in dh.iter_mut().zip(&mask) {
                    *d *= m;
                }
                debug_assert_eq!(dh.len(), rows.len() * width);
                first.step(&dh, h.learning_rate, h.l2, None)?;
            }
        }
        batches += 1;
    }
    Ok((loss_sum, batches))
}

/// The training split's mean and standard deviation of each input position
/// that some training record has ([`Standardize`]).
#[derive(Debug)]
struct Scaling {
    /// Per position: `Some((mean, std))` (a constant position has std 1,
    /// so it only moves by its mean), `None` for one no training record
    /// has — such a position is not learned from, and stays absent.
    at: Vec<Option<(f32, f32)>>,
}

impl Scaling {
    /// The figures of `x`'s `train` rows, summed in f64.
    fn of(x: &SparseBatch, train: &[usize], dim: usize) -> Self {
        let mut sums = vec![(0u32, 0f64, 0f64); dim];
        for &r in train {
            let (idx, vals) = x.row(r);
            for (&i, &v) in idx.iter().zip(vals) {
                if let Some(s) = sums.get_mut(i as usize) {
                    s.0 += 1;
                    s.1 += f64::from(v);
                    s.2 += f64::from(v) * f64::from(v);
                }
            }
        }
        let n = train.len().max(1) as f64;
        let at = sums
            .into_iter()
            .map(|(present, sum, squares)| {
                (present > 0).then(|| {
                    let mean = sum / n;
                    let var = (squares / n - mean * mean).max(0.0);
                    let std = var.sqrt();
                    // Below single precision's resolution of the mean, the
                    // spread is rounding, not signal: a constant.
                    let std = if std > 1e-6 * mean.abs() && (std as f32).is_normal() {
                        std
                    } else {
                        1.0
                    };
                    (mean as f32, std as f32)
                })
            })
            .collect();
        Scaling { at }
    }

    /// Every row of `x` standardized, and made dense over the positions
    /// the training split has (an absent one is a 0 before scaling).
    fn apply(&self, x: &SparseBatch) -> SparseBatch {
        let kept: Vec<(u32, f32, f32)> = self
            .at
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.map(|(m, s)| (i as u32, m, s)))
            .collect();
        let mut out = SparseBatch {
            offsets: Vec::with_capacity(x.offsets.len()),
            indices: Vec::with_capacity(x.rows() * kept.len()),
            values: Vec::with_capacity(x.rows() * kept.len()),
        };
        out.offsets.push(0);
        let mut dense = vec![0f32; self.at.len()];
        for r in 0..x.rows() {
            let (idx, vals) = x.row(r);
            for (&i, &v) in idx.iter().zip(vals) {
                if let Some(d) = dense.get_mut(i as usize) {
                    *d = v;
                }
            }
            for &(i, m, s) in &kept {
                out.indices.push(i);
                out.values.push((dense[i as usize] - m) / s);
            }
            for &i in idx {
                if let Some(d) = dense.get_mut(i as usize) {
                    *d = 0.0;
                }
            }
            out.offsets.push(out.indices.len() as u32);
        }
        out
    }

    /// Folds the scaling into the first layer, so that it takes the raw
    /// inputs: `W'ᵢ = Wᵢ / σᵢ`, `b' = b − Σᵢ μᵢ · W'ᵢ` (summed in f64).
    fn fold(&self, first: &mut SparseLinear) {
        let out = first.out;
        let mut shift = vec![0f64; out];
        for (i, a) in self.at.iter().enumerate() {
            let Some((m, s)) = *a else { continue };
            let Some(row) = first.w.get_mut(i * out..(i + 1) * out) else {
                continue;
            };
            for (w, d) in row.iter_mut().zip(&mut shift) {
                *w /= s;
                *d += f64::from(m) * f64::from(*w);
            }
        }
        for (b, d) in first.b.iter_mut().zip(&shift) {
            *b = (f64::from(*b) - d) as f32;
        }
    }
}

/// `x` without the entries of features whose support is below `min`.
fn keep_supported(x: &SparseBatch, support: &[u32], min: u32) -> SparseBatch {
    let mut out = SparseBatch {
        offsets: Vec::with_capacity(x.offsets.len()),
        indices: Vec::with_capacity(x.indices.len()),
        values: Vec::with_capacity(x.values.len()),
    };
    out.offsets.push(0);
    for r in 0..x.rows() {
        let (idx, vals) = x.row(r);
        for (&i, &v) in idx.iter().zip(vals) {
            if support.get(i as usize).is_some_and(|&s| s >= min) {
                out.indices.push(i);
                out.values.push(v);
            }
        }
        out.offsets.push(out.indices.len() as u32);
    }
    out
}

/// Maps label strings to class indices (sorted class names).
pub fn class_index(labels: &[String]) -> (Vec<String>, HashMap<String, usize>) {
    let mut classes: Vec<String> = labels.to_vec();
    classes.sort();
    classes.dedup();
    let index = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i))
        .collect();
    (classes, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_templates_parse() {
        let all = templates().expect("templates");
        assert_eq!(
            all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["logreg", "mlp"]
        );
    }

    #[test]
    fn overrides_are_checked_with_clear_errors() {
        let t = template(
            "mlp",
            &[
                ("hidden".into(), "[64, 32]".into()),
                ("dropout".into(), "0.5".into()),
            ],
        )
        .expect("ok");
        assert_eq!(t.hyper.hidden, vec![64, 32]);
        let e = template("logreg", &[("hidden".into(), "4".into())]).expect_err("mlp only");
        assert!(
            e.to_string().contains("unknown hyper-parameter `hidden`"),
            "{e}"
        );
        let e = template("logreg", &[("learning_rate".into(), "fast".into())]).expect_err("bad");
        assert!(
            e.to_string()
                .starts_with("hyper-parameter `learning_rate`: expected a number"),
            "{e}"
        );
        assert!(matches!(
            template("svm", &[]),
            Err(TrainError::UnknownTemplate(_))
        ));
        let e = Template::parse(
            "x.toml",
            "name = \"x\"\nkind = \"logreg\"\ndescription = \"d\"\n[hyper]\nepochs = -1\n",
        )
        .expect_err("bad");
        assert!(e.to_string().contains("epochs"), "{e}");
        let e = Template::parse("x.toml", "name = \"x\"\nkind = \"tree\"\n").expect_err("bad");
        assert!(e.to_string().starts_with("templates/x.toml: line 2"), "{e}");
        // A field the whole file lacks is not blamed on line 1.
        let e = Template::parse("x.toml", "name = \"x\"\nkind = \"logreg\"\n").expect_err("bad");
        assert_eq!(
            e.to_string(),
            "templates/x.toml: missing field `description`"
        );
    }

    #[test]
    fn training_over_the_memory_budget_is_refused_before_allocating() {
        let (x, y) = toy();
        let train: Vec<usize> = (0..300).collect();
        let val: Vec<usize> = (300..400).collect();
        let t = template("mlp", &[]).expect("template");
        // 2^31 inputs × 128 hidden units would be terabytes: refused at once.
        let data = TrainingSet {
            x: &x,
            dim: 1 << 31,
            y: &y,
            classes: 2,
            train: &train,
            val: &val,
            budget_bytes: 4 << 30,
        };
        let e = fit(&t, data, &mut |_| {}).expect_err("over budget");
        assert!(
            matches!(e, TrainError::OverBudget { budget_mb: 4096 }),
            "{e}"
        );
        assert!(!e.to_string().contains("2147483648"), "{e}");
        let need = state_bytes(Kind::Logreg, 1 << 20, 20, &t.hyper);
        assert!(need >= (1u64 << 20) * 20 * 4 * 4, "{need}");
    }

    fn toy() -> (SparseBatch, Vec<usize>) {
        // Two classes; class c rows carry feature 10+c plus noise features.
        let mut rng = Rng::new(3);
        let mut b = SparseBatch {
            offsets: vec![0],
            indices: vec![],
            values: vec![],
        };
        let mut y = Vec::new();
        for i in 0..400 {
            let c = i % 2;
            let mut idx = vec![10 + c as u32, (rng.next_u64() % 8) as u32];
            idx.sort();
            idx.dedup();
            for j in &idx {
                b.indices.push(*j);
                b.values.push(1.0);
            }
            b.offsets.push(b.indices.len() as u32);
            y.push(c);
        }
        (b, y)
    }

    #[test]
    fn both_templates_fit_a_toy_problem_deterministically_and_round_trip() {
        let (x, y) = toy();
        let train: Vec<usize> = (0..300).collect();
        let val: Vec<usize> = (300..400).collect();
        for name in ["logreg", "mlp"] {
            let t = template(name, &[]).expect("template");
            let data = TrainingSet {
                x: &x,
                dim: 16,
                y: &y,
                classes: 2,
                train: &train,
                val: &val,
                budget_bytes: 1 << 30,
            };
            let a = fit(&t, data, &mut |_| {}).expect("fit");
            let b = fit(&t, data, &mut |_| {}).expect("fit");
            assert!(
                a.curve.last().expect("epochs").val_accuracy > 0.99,
                "{name}: {:?}",
                a.curve
            );
            let pa = a.model.predict(&x, &val).expect("predict");
            assert_eq!(
                pa,
                b.model.predict(&x, &val).expect("predict"),
                "{name} is deterministic"
            );
            let bytes = a.model.to_safetensors().expect("save");
            let back = Trained::from_safetensors(t.kind, &bytes).expect("load");
            assert_eq!(
                back.predict(&x, &val).expect("predict"),
                pa,
                "{name} round-trips"
            );
        }
    }

    /// 600 records of 6 numeric positions at scales from 1e-3 to 1e4; the
    /// class shows in positions 0 and 1, position 5 only in `rare`
    /// training records (else absent).
    fn scaled(rare: usize) -> (SparseBatch, Vec<usize>) {
        let mut rng = Rng::new(7);
        let mut x = SparseBatch {
            offsets: vec![0],
            indices: vec![],
            values: vec![],
        };
        let mut y = Vec::new();
        let scales = [1e4f32, 1e-3, 1.0, 50.0, 3.0];
        for i in 0..600 {
            let c = i % 2;
            let sign = if c == 1 { 1.0 } else { -1.0 };
            for (j, s) in scales.iter().enumerate() {
                let noise = rng.unit() * 2.0 - 1.0;
                let signal = if j < 2 { 0.8 * sign } else { 0.0 };
                x.indices.push(j as u32);
                x.values.push(s * (signal + noise) + 5.0 * s);
            }
            if i < rare {
                x.indices.push(5);
                x.values.push(100.0);
            }
            x.offsets.push(x.indices.len() as u32);
            y.push(c);
        }
        (x, y)
    }

    #[test]
    fn standardizing_is_folded_into_the_first_layer_exactly() {
        let (x, _) = scaled(40);
        let train: Vec<usize> = (0..400).collect();
        let s = Scaling::of(&x, &train, 6);
        let z = s.apply(&x);
        assert_eq!(z.rows(), x.rows());
        assert_eq!(z.row(500).0, [0, 1, 2, 3, 4, 5], "dense over the positions");
        let mut rng = Rng::new(1);
        let mut layer = SparseLinear::new(6, 3, Some(&mut rng));
        layer.b = vec![0.5, -0.25, 1.0];
        let rows: Vec<usize> = (0..600).collect();
        let mut want = Vec::new();
        layer.forward(&z, &rows, &mut want);
        s.fold(&mut layer);
        let mut got = Vec::new();
        layer.forward(&x, &rows, &mut got);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} against {w}");
        }
    }

    #[test]
    fn dense_inputs_are_standardized_on_the_training_split_and_sparse_ones_never() {
        let (x, y) = scaled(3);
        let train: Vec<usize> = (0..400).collect();
        let val: Vec<usize> = (400..600).collect();
        let data = TrainingSet {
            x: &x,
            dim: 6,
            y: &y,
            classes: 2,
            train: &train,
            val: &val,
            budget_bytes: 1 << 30,
        };
        for name in ["logreg", "mlp"] {
            let run = |value: &str| {
                let t = template(name, &[("standardize".into(), value.into())]).expect("template");
                fit(&t, data, &mut |_| {}).expect("fit")
            };
            let (auto, on, off) = (run("auto"), run("on"), run("off"));
            let acc = |f: &Fitted| f.curve[f.best_epoch as usize - 1].val_accuracy;
            assert!(acc(&auto) > 0.9, "{name}: {:?}", auto.curve);
            assert!(
                acc(&auto) > acc(&off),
                "{name}: {} against {}",
                acc(&auto),
                acc(&off)
            );
            assert_eq!(
                auto.model.predict(&x, &val).expect("predict"),
                on.model.predict(&x, &val).expect("predict"),
                "{name}: auto standardizes dense inputs"
            );
            // Position 5 is in 3 training records, under min_support: its
            // row stays zero through the fold as well.
            let first = match &auto.model.net {
                Network::Logreg(l) | Network::Mlp(l, _) => l,
            };
            let k = first.out;
            assert!(first.w[5 * k..6 * k].iter().all(|&w| w == 0.0), "{name}");
        }
        // Sparse inputs (two of sixteen positions per record): `auto`
        // leaves them as they are, bit for bit.
        let (x, y) = toy();
        let (train, val): (Vec<usize>, Vec<usize>) = ((0..300).collect(), (300..400).collect());
        let data = TrainingSet {
            x: &x,
            dim: 16,
            y: &y,
            train: &train,
            val: &val,
            ..data
        };
        let run = |value: &str| {
            let t = template("logreg", &[("standardize".into(), value.into())]).expect("template");
            fit(&t, data, &mut |_| {})
                .expect("fit")
                .model
                .predict(&x, &val)
                .expect("predict")
        };
        assert_eq!(run("auto"), run("off"));
        let data = TrainingSet {
            dim: STANDARDIZE_MAX_DIM + 1,
            ..data
        };
        let t = template("logreg", &[("standardize".into(), "on".into())]).expect("template");
        let e = fit(&t, data, &mut |_| {}).expect_err("too wide");
        assert!(
            e.to_string()
                .starts_with("hyper-parameter `standardize`: `on` needs"),
            "{e}"
        );
        let e = template("logreg", &[("standardize".into(), "yes".into())]).expect_err("bad");
        assert_eq!(
            e.to_string(),
            "hyper-parameter `standardize`: expected `auto`, `on` or `off`, got `yes`"
        );
        // Manifests from before the key: trained without it.
        let text = toml::to_string(&Hyper::defaults()).expect("toml");
        assert!(text.contains("standardize = \"auto\""), "{text}");
        let old: String = text
            .lines()
            .filter(|l| !l.starts_with("standardize"))
            .map(|l| format!("{l}\n"))
            .collect();
        let h: Hyper = toml::from_str(&old).expect("reads");
        assert_eq!(h.standardize, Standardize::Off);
    }

    #[test]
    fn features_below_min_support_are_never_learned() {
        // The toy problem plus feature 14 on 5 training rows (each a
        // class-1 row) and feature 15 on 12: with min_support = 10 row 14
        // stays zero in both templates, row 15 is learned; with 0 both are.
        let (base, y) = toy();
        let mut x = SparseBatch {
            offsets: vec![0],
            indices: vec![],
            values: vec![],
        };
        for (r, &c) in y.iter().enumerate() {
            let (idx, vals) = base.row(r);
            x.indices.extend_from_slice(idx);
            x.values.extend_from_slice(vals);
            if c == 1 && r < 10 {
                x.indices.push(14);
                x.values.push(1.0);
            }
            if c == 1 && r < 24 {
                x.indices.push(15);
                x.values.push(1.0);
            }
            x.offsets.push(x.indices.len() as u32);
        }
        let train: Vec<usize> = (0..300).collect();
        let val: Vec<usize> = (300..400).collect();
        let support = disclosure::feature_support(&x, &train, 16);
        assert_eq!((support[14], support[15]), (5, 12));
        let row = |m: &Trained, r: usize| -> bool {
            let l = match &m.net {
                Network::Logreg(l) | Network::Mlp(l, _) => l,
            };
            l.w[r * l.out..(r + 1) * l.out].iter().any(|w| *w != 0.0)
        };
        for name in ["logreg", "mlp"] {
            for (min, learned14) in [("10", false), ("0", true)] {
                let t = template(name, &[("min_support".into(), min.into())]).expect("template");
                let data = TrainingSet {
                    x: &x,
                    dim: 16,
                    y: &y,
                    classes: 2,
                    train: &train,
                    val: &val,
                    budget_bytes: 1 << 30,
                };
                let m = fit(&t, data, &mut |_| {}).expect("fit").model;
                assert_eq!(row(&m, 14), learned14, "{name}, min_support {min}");
                assert!(row(&m, 15), "{name}, min_support {min}");
            }
        }
    }
}
