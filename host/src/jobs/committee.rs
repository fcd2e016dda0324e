//! Pure helpers of a committee: mean probabilities, the predicted
//! class, class-balanced picks, stable ids of final models.

use std::collections::HashMap;

use super::spec::ModelUse;
use crate::digest::Digest;

pub(crate) fn mean_probs(per_model: &[Vec<f32>]) -> Vec<f32> {
    let n = per_model.len().max(1) as f32;
    let mut out = vec![0f32; per_model.first().map_or(0, Vec::len)];
    for p in per_model {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v / n;
        }
    }
    out
}

/// The committee's prediction for one record: the class with the highest
/// mean probability over the models, the first on ties.
pub(crate) fn predicted_class(models: &[Vec<f32>]) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (c, p) in mean_probs(models).into_iter().enumerate() {
        if p > best.1 {
            best = (c, p);
        }
    }
    best.0
}

/// Up to `take` of `review` (sorted most urgent first; entries are
/// priority, row, predicted class), spread over the predicted classes: one
/// from each class in turn, classes in the order of their most urgent
/// record, and within a class most urgent first.
pub(crate) fn balance_by_class(review: &[(f32, usize, usize)], take: usize) -> Vec<(f32, usize)> {
    let mut order: Vec<usize> = Vec::new();
    let mut by_class: HashMap<usize, Vec<(f32, usize)>> = HashMap::new();
    for &(p, i, c) in review {
        let group = by_class.entry(c).or_insert_with(|| {
            order.push(c);
            Vec::new()
        });
        group.push((p, i));
    }
    let want = take.min(review.len());
    let mut out = Vec::with_capacity(want);
    let mut rank = 0;
    while out.len() < want {
        for c in &order {
            if out.len() == want {
                break;
            }
            if let Some(&item) = by_class.get(c).and_then(|g| g.get(rank)) {
                out.push(item);
            }
        }
        rank += 1;
    }
    out
}

/// Deterministic model ids for a job's final models, so a finish step that
/// is redone after a crash finds the models it already saved.
pub(crate) fn final_model_id(job: &str, k: usize) -> String {
    let d = Digest::of(format!("{job}/final/{k}").as_bytes()).to_hex();
    format!("m-{}", &d[..12])
}

pub(crate) fn model_label(m: &ModelUse) -> String {
    if m.sets.is_empty() {
        m.template.clone()
    } else {
        let sets: Vec<String> = m.sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}({})", m.template, sets.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_picks_take_one_per_predicted_class_in_turn() {
        // Sorted most urgent first: class 3 dominates the top.
        let review = [
            (0.9, 10, 3),
            (0.8, 11, 3),
            (0.7, 12, 3),
            (0.6, 20, 1),
            (0.5, 13, 3),
            (0.4, 30, 2),
            (0.3, 21, 1),
        ];
        let rows = |v: Vec<(f32, usize)>| v.into_iter().map(|(_, i)| i).collect::<Vec<_>>();
        assert_eq!(rows(balance_by_class(&review, 4)), [10, 20, 30, 11]);
        assert_eq!(
            rows(balance_by_class(&review, 7)),
            [10, 20, 30, 11, 21, 12, 13]
        );
        assert_eq!(balance_by_class(&review, 100).len(), 7);
        assert!(balance_by_class(&review, 0).is_empty());
        assert!(balance_by_class(&[], 5).is_empty());
        assert_eq!(
            predicted_class(&[vec![0.2, 0.5, 0.3], vec![0.1, 0.3, 0.6]]),
            2
        );
    }

    #[test]
    fn final_model_ids_are_stable() {
        assert_eq!(final_model_id("j-1", 0), final_model_id("j-1", 0));
        assert_ne!(final_model_id("j-1", 0), final_model_id("j-1", 1));
        assert_eq!(final_model_id("j-1", 0).len(), 14);
    }
}
