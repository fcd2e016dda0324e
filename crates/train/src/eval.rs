//! Evaluation: accuracy, F1 (macro and micro), per-class precision, recall,
//! F1 and support, the confusion matrix, calibration (ECE, reliability
//! bins) and the badcases (misclassified record ids — never texts).

use serde::{Deserialize, Serialize};

/// Metrics of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Class name.
    pub class: String,
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F1.
    pub f1: f64,
    /// True instances.
    pub support: u64,
}

/// One reliability bin: predictions whose confidence fell in
/// `[lower, upper)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower bound of the confidence.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
    /// Predictions in the bin.
    pub count: u64,
    /// Their mean confidence.
    pub confidence: f64,
    /// Their accuracy.
    pub accuracy: f64,
}

/// A misclassified record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Badcase {
    /// Record id.
    pub id: String,
    /// The true class.
    pub truth: String,
    /// The predicted class.
    pub predicted: String,
    /// The model's confidence in its prediction.
    pub confidence: f64,
}

/// Everything `model show` reports about a test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Records evaluated.
    pub records: u64,
    /// Accuracy.
    pub accuracy: f64,
    /// Unweighted mean of per-class F1.
    pub macro_f1: f64,
    /// F1 over all decisions (equals accuracy for single-label tasks).
    pub micro_f1: f64,
    /// Per class, in class order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[truth][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Expected calibration error over [`Evaluation::reliability`].
    pub ece: f64,
    /// Ten equal-width confidence bins.
    pub reliability: Vec<ReliabilityBin>,
    /// Misclassified records, most confident first.
    pub badcases: Vec<Badcase>,
    /// Per predicted class, the ids of records wrongly predicted as that
    /// class (its false positives), most confident first.
    #[serde(default)]
    pub false_positives: std::collections::BTreeMap<String, Vec<String>>,
}

/// The predicted class of one probability row and its probability: the
/// first largest entry (`(0, f32::MIN)` for an empty row).
pub fn top_class(row: &[f32]) -> (usize, f32) {
    row.iter().enumerate().fold(
        (0, f32::MIN),
        |best, (j, &p)| if p > best.1 { (j, p) } else { best },
    )
}

/// Evaluates predictions. `probs` is row-major `ids.len() × classes.len()`;
/// `truth` holds class indices.
pub fn evaluate(classes: &[String], ids: &[String], truth: &[usize], probs: &[f32]) -> Evaluation {
    let k = classes.len().max(1);
    let n = truth.len();
    let mut confusion = vec![vec![0u64; k]; k];
    let bins = 10usize;
    let mut bin_count = vec![0u64; bins];
    let mut bin_conf = vec![0f64; bins];
    let mut bin_correct = vec![0u64; bins];
    let mut badcases = Vec::new();
    let mut correct = 0u64;
    for i in 0..n {
        let row = &probs[i * k..(i + 1) * k];
        let (pred, conf) = top_class(row);
        let t = truth[i].min(k - 1);
        confusion[t][pred] += 1;
        let b = ((f64::from(conf) * bins as f64) as usize).min(bins - 1);
        bin_count[b] += 1;
        bin_conf[b] += f64::from(conf);
        if pred == t {
            correct += 1;
            bin_correct[b] += 1;
        } else {
            badcases.push(Badcase {
                id: ids[i].clone(),
                truth: classes[t].clone(),
                predicted: classes[pred].clone(),
                confidence: f64::from(conf),
            });
        }
    }
    badcases.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut per_class = Vec::with_capacity(k);
    for (c, row) in confusion.iter().enumerate() {
        let tp = row[c] as f64;
        let predicted: u64 = confusion.iter().map(|r| r[c]).sum();
        let support: u64 = row.iter().sum();
        let precision = if predicted > 0 {
            tp / predicted as f64
        } else {
            0.0
        };
        let recall = if support > 0 {
            tp / support as f64
        } else {
            0.0
        };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        per_class.push(ClassMetrics {
            class: classes.get(c).cloned().unwrap_or_default(),
            precision,
            recall,
            f1,
            support,
        });
    }
    let present: Vec<&ClassMetrics> = per_class.iter().filter(|m| m.support > 0).collect();
    let macro_f1 = if present.is_empty() {
        0.0
    } else {
        present.iter().map(|m| m.f1).sum::<f64>() / present.len() as f64
    };
    let accuracy = if n > 0 {
        correct as f64 / n as f64
    } else {
        0.0
    };
    let mut ece = 0.0;
    let reliability = (0..bins)
        .map(|b| {
            let count = bin_count[b];
            let (confidence, acc) = if count > 0 {
                (
                    bin_conf[b] / count as f64,
                    bin_correct[b] as f64 / count as f64,
                )
            } else {
                (0.0, 0.0)
            };
            if n > 0 {
                ece += count as f64 / n as f64 * (acc - confidence).abs();
            }
            ReliabilityBin {
                lower: b as f64 / bins as f64,
                upper: (b + 1) as f64 / bins as f64,
                count,
                confidence,
                accuracy: acc,
            }
        })
        .collect();
    let mut false_positives: std::collections::BTreeMap<String, Vec<String>> =
        std::collections::BTreeMap::new();
    for b in &badcases {
        false_positives
            .entry(b.predicted.clone())
            .or_default()
            .push(b.id.clone());
    }
    Evaluation {
        false_positives,
        records: n as u64,
        accuracy,
        macro_f1,
        micro_f1: accuracy,
        per_class,
        confusion,
        ece,
        reliability,
        badcases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_computed_example() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let ids: Vec<String> = (0..4).map(|i| format!("r{i}")).collect();
        // truth a a b b; predicted a b b b with confidences .95 .65 .85 .75
        // (mid-bin values: 0.7f32 is just below 0.7 and would fall in bin 6)
        let probs = [0.95, 0.05, 0.35, 0.65, 0.15, 0.85, 0.25, 0.75];
        let e = evaluate(&classes, &ids, &[0, 0, 1, 1], &probs);
        assert_eq!(e.accuracy, 0.75);
        assert_eq!(e.confusion, vec![vec![1, 1], vec![0, 2]]);
        assert_eq!(e.per_class[0].precision, 1.0);
        assert_eq!(e.per_class[0].recall, 0.5);
        assert!((e.per_class[1].precision - 2.0 / 3.0).abs() < 1e-12);
        let f1a = 2.0 * 0.5 / 1.5;
        let f1b = 2.0 * (2.0 / 3.0) / (2.0 / 3.0 + 1.0);
        assert!((e.macro_f1 - (f1a + f1b) / 2.0).abs() < 1e-12);
        assert_eq!(e.badcases.len(), 1);
        assert_eq!(
            (e.badcases[0].id.as_str(), e.badcases[0].predicted.as_str()),
            ("r1", "b")
        );
        assert_eq!(e.false_positives.len(), 1);
        assert_eq!(e.false_positives["b"], ["r1"]);
        // one per bin: .65 (wrong), .75, .85, .95 (right)
        let expected_ece = 0.25 * (0.65 + 0.25 + 0.15 + 0.05);
        assert!((e.ece - expected_ece).abs() < 1e-6, "{}", e.ece);
        assert_eq!(e.reliability.iter().map(|b| b.count).sum::<u64>(), 4);
    }
}
