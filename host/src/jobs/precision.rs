//! The precision gate of automatic labels.
//!
//! A pipeline may state the precision its automatic labels need
//! (`[auto_label] target_precision`, at a `confidence`). Each round the
//! host runs the selector over the committee's predictions on the
//! validation split — records with a human (or, in oracle mode, gold)
//! label the committee did not train on — and so learns, for every
//! confidence score, how often the automatic label the selector would have
//! given there is right. It accepts automatic labels in the pool only at
//! or above the lowest threshold whose one-sided Clopper–Pearson lower
//! bound on that precision reaches the target.
//!
//! Choosing "the lowest threshold that passes" among many is a multiple
//! test; the gate controls it with fixed-sequence testing ("learn then
//! test"): candidate thresholds are ordered from the most to the least
//! confident, an order fixed by the scores alone (never by whether a label
//! is right), and tested in that order at the full level until the first
//! one fails. The first candidate is the smallest set that could pass at
//! all (`n_min` records with no error), the next ones grow geometrically,
//! so an early unlucky error does not end the sequence too soon.
//!
//! What the guarantee assumes, stated for the user: calibration records
//! and pool records are exchangeable given their scores (a random split
//! gives that; the models' early stopping looks at validation loss, a mild
//! optimism), and per class the statement holds for each class at the
//! stated confidence.

use serde::{Deserialize, Serialize};

/// What a pipeline asks of its automatic labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrecisionTarget {
    /// The precision automatic labels must reach, in (0, 1).
    pub target_precision: f64,
    /// The confidence of the lower bound, in (0, 1), e.g. 0.95.
    pub confidence: f64,
    /// One threshold per predicted class (each class's precision is
    /// bounded) rather than one overall.
    pub per_class: bool,
    /// Share of each round's automatic labels sent to people as spot
    /// checks, in [0, 1).
    pub spot_check: f64,
}

/// One calibration record: the score the gate thresholds on, the class
/// the selector would have given, and whether that is the true label.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// The least committee confidence in the proposed class.
    pub score: f32,
    /// The proposed class.
    pub class: usize,
    /// Whether the proposed class is the record's label.
    pub correct: bool,
}

/// The threshold found for one group (a class, or all classes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupGate {
    /// The class, or `None` for the overall gate.
    pub class: Option<usize>,
    /// Calibration records the selector would label automatically.
    pub candidates: u64,
    /// Automatic labels are accepted at scores >= this; `None`: none are.
    pub threshold: Option<f32>,
    /// Calibration records at or above the threshold.
    pub covered: u64,
    /// Of those, right.
    pub correct: u64,
    /// The one-sided lower bound on their precision.
    pub lower: f64,
    /// Why nothing is accepted, when nothing is.
    pub reason: Option<String>,
    /// After an earlier round's automatic labels were revoked (its spot
    /// checks failed), automatic labels must score above that round's
    /// threshold too.
    #[serde(default)]
    pub floor: Option<f32>,
}

/// A round's gate, for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    /// The target precision.
    pub target_precision: f64,
    /// The confidence of its bound.
    pub confidence: f64,
    /// Labeled validation records the selector was run on.
    pub calibration: u64,
    /// One per class (or one overall).
    pub groups: Vec<GroupGate>,
    /// Automatic labels the selector proposed in the pool below the
    /// thresholds: left in the pool.
    pub held_back: u64,
    /// Precision of the calibration records the thresholds cover (an
    /// estimate of the precision of this round's automatic labels).
    pub estimate: Option<f64>,
    /// Two-sided Clopper–Pearson interval of `estimate` at `confidence`.
    pub interval: Option<(f64, f64)>,
    /// Validation records this round's gate passed: later rounds leave
    /// them out of calibration, as the pool records it passed leave the
    /// pool.
    #[serde(default)]
    pub mirrored: Vec<String>,
}

impl GateReport {
    /// Summarizes `groups`.
    pub fn new(target: &PrecisionTarget, calibration: u64, groups: Vec<GroupGate>) -> Self {
        let (covered, correct) = groups
            .iter()
            .filter(|g| g.threshold.is_some())
            .fold((0, 0), |(n, x), g| (n + g.covered, x + g.correct));
        let alpha = (1.0 - target.confidence) / 2.0;
        let (estimate, interval) = if covered > 0 {
            (
                Some(correct as f64 / covered as f64),
                Some((
                    clopper_pearson_lower(correct, covered, alpha),
                    clopper_pearson_upper(correct, covered, alpha),
                )),
            )
        } else {
            (None, None)
        };
        GateReport {
            target_precision: target.target_precision,
            confidence: target.confidence,
            calibration,
            groups,
            held_back: 0,
            estimate,
            interval,
            mirrored: Vec::new(),
        }
    }

    /// One line for people: the thresholds and the estimate, or why the
    /// round accepts no automatic label.
    pub fn summary(&self, classes: &[String]) -> String {
        let g = self;
        if let Some(why) = g.closed_reason(classes) {
            return format!(
                "no automatic labels (target {} at confidence {}): {why}",
                g.target_precision, g.confidence
            );
        }
        let thresholds: Vec<String> = g
            .groups
            .iter()
            .map(|t| {
                let name = t
                    .class
                    .and_then(|c| classes.get(c))
                    .map_or("all", String::as_str);
                match t.threshold {
                    Some(v) => format!("{name} >= {v:.3}"),
                    None => format!("{name} closed"),
                }
            })
            .collect();
        let est = match (g.estimate, g.interval) {
            (Some(e), Some((lo, hi))) => format!(
                "estimated precision {e:.3} [{lo:.3}, {hi:.3}] from {} of {} calibration labels",
                g.covered(),
                g.calibration
            ),
            _ => "no estimate".into(),
        };
        format!(
            "thresholds {}; {est}; {} proposals held back",
            thresholds.join(", "),
            g.held_back
        )
    }

    /// Calibration records above the thresholds.
    pub fn covered(&self) -> u64 {
        self.groups
            .iter()
            .filter(|g| g.threshold.is_some())
            .map(|g| g.covered)
            .sum()
    }

    /// Why the round accepts no automatic label, when no group has a
    /// threshold.
    pub fn closed_reason(&self, classes: &[String]) -> Option<String> {
        if self.groups.iter().any(|g| g.threshold.is_some()) {
            return None;
        }
        let first = self.groups.iter().find_map(|g| {
            g.reason.as_ref().map(|r| match g.class {
                Some(c) => format!("class {}: {r}", classes.get(c).map_or("?", String::as_str)),
                None => r.clone(),
            })
        });
        Some(first.unwrap_or_else(|| "no calibration records".into()))
    }
}

/// Smallest number of calibration records that can certify `target` at
/// `confidence` when all of them are right: `target^n <= 1 - confidence`.
pub fn min_records(target: f64, confidence: f64) -> u64 {
    let alpha = 1.0 - confidence;
    if !(0.0..1.0).contains(&target) || !(0.0..1.0).contains(&alpha) || alpha == 0.0 {
        return u64::MAX;
    }
    if target == 0.0 {
        return 1;
    }
    let n = (alpha.ln() / target.ln()).ceil();
    // Guard the rounding at exact powers.
    let mut n = n.max(1.0) as u64;
    while n > 1 && target.powi((n - 1) as i32) <= alpha {
        n -= 1;
    }
    n
}

/// Finds each group's threshold. `classes` is the number of classes.
pub fn gate(target: &PrecisionTarget, classes: usize, cal: &[Calibration]) -> Vec<GroupGate> {
    if target.per_class {
        (0..classes)
            .map(|c| {
                let group: Vec<Calibration> =
                    cal.iter().copied().filter(|r| r.class == c).collect();
                group_gate(target, Some(c), group)
            })
            .collect()
    } else {
        vec![group_gate(target, None, cal.to_vec())]
    }
}

/// The gate that applies to a record proposed for `class`.
fn group_of(gates: &[GroupGate], class: usize) -> Option<&GroupGate> {
    gates
        .iter()
        .find(|g| g.class.is_none() || g.class == Some(class))
}

/// The threshold that applies to a record proposed for `class`, if any.
pub fn threshold_for(gates: &[GroupGate], class: usize) -> Option<f32> {
    group_of(gates, class).and_then(|g| g.threshold)
}

/// Whether an automatic label of `class` at `score` passes the gate.
pub fn accepts(gates: &[GroupGate], class: usize, score: f32) -> bool {
    group_of(gates, class).is_some_and(|g| {
        g.threshold.is_some_and(|t| score >= t) && g.floor.is_none_or(|f| score > f)
    })
}

/// Raises `gates` above the thresholds of a round whose automatic labels
/// were revoked.
pub fn raise(gates: &mut [GroupGate], revoked: &[GroupGate]) {
    for g in gates.iter_mut() {
        let old = match g.class {
            Some(c) => threshold_for(revoked, c),
            // One overall gate: above every class's old threshold.
            None => revoked
                .iter()
                .filter_map(|r| r.threshold)
                .max_by(f32::total_cmp),
        };
        if let Some(t) = old {
            g.floor = Some(g.floor.map_or(t, |f| f.max(t)));
        }
    }
}

fn group_gate(
    target: &PrecisionTarget,
    class: Option<usize>,
    mut group: Vec<Calibration>,
) -> GroupGate {
    group.sort_by(|a, b| b.score.total_cmp(&a.score));
    let n = group.len();
    let need = min_records(target.target_precision, target.confidence);
    let mut out = GroupGate {
        class,
        candidates: n as u64,
        threshold: None,
        covered: 0,
        correct: 0,
        lower: 0.0,
        reason: None,
        floor: None,
    };
    if (n as u64) < need {
        out.reason = Some(format!(
            "{n} calibration records would be labeled automatically; at least {need} are needed to \
             certify precision {} at confidence {}",
            target.target_precision, target.confidence
        ));
        return out;
    }
    // prefix[k] = right answers among the k most confident
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0u64);
    for r in &group {
        let last = prefix.last().copied().unwrap_or(0);
        prefix.push(last + u64::from(r.correct));
    }
    let alpha = 1.0 - target.confidence;
    let mut k = need as usize;
    let mut first = true;
    loop {
        // A threshold between two distinct scores: extend over ties.
        while k < n && group[k].score == group[k - 1].score {
            k += 1;
        }
        let right = prefix[k];
        let lower = clopper_pearson_lower(right, k as u64, alpha);
        if lower < target.target_precision {
            if first {
                out.covered = k as u64;
                out.correct = right;
                out.lower = lower;
                out.reason = Some(format!(
                    "the {k} most confident calibration records are {right} right: the lower bound \
                     {lower:.4} on their precision is below the target {}",
                    target.target_precision
                ));
            }
            return out;
        }
        first = false;
        out.threshold = Some(group[k - 1].score);
        out.covered = k as u64;
        out.correct = right;
        out.lower = lower;
        if k >= n {
            return out;
        }
        k = (((k as f64) * 1.25).ceil() as usize).clamp(k + 1, n);
    }
}

/// The one-sided Clopper–Pearson lower bound at level `alpha` on a
/// binomial proportion with `x` successes in `n` trials: the `p` with
/// P(X >= x | n, p) = alpha (0 when x = 0).
pub fn clopper_pearson_lower(x: u64, n: u64, alpha: f64) -> f64 {
    if n == 0 || x == 0 {
        return 0.0;
    }
    let x = x.min(n);
    if x == n {
        // P(X >= n) = p^n.
        return alpha.powf(1.0 / n as f64);
    }
    // The tail grows with p; bisect on [0, x/n].
    let (mut lo, mut hi) = (0.0f64, x as f64 / n as f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if upper_tail(x, n, mid) < alpha {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-12 {
            break;
        }
    }
    lo
}

/// The one-sided Clopper–Pearson upper bound at level `alpha`.
pub fn clopper_pearson_upper(x: u64, n: u64, alpha: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    1.0 - clopper_pearson_lower(n - x.min(n), n, alpha)
}

/// P(X >= x) for X ~ Binomial(n, p), for 0 < x <= n and p <= x/n (where
/// the terms fall from k = x on, so the sum is taken relative to the
/// first and cannot underflow before it matters).
fn upper_tail(x: u64, n: u64, p: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let ln_first = ln_choose(n, x) + (x as f64) * p.ln() + ((n - x) as f64) * (1.0 - p).ln();
    let ratio = p / (1.0 - p);
    let (mut term, mut sum) = (1.0f64, 1.0f64);
    for k in x..n {
        term *= ((n - k) as f64) / ((k + 1) as f64) * ratio;
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    (ln_first + sum.ln()).exp()
}

fn ln_choose(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    (0..k)
        .map(|i| (((n - i) as f64) / ((i + 1) as f64)).ln())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(p: f64, per_class: bool) -> PrecisionTarget {
        PrecisionTarget {
            target_precision: p,
            confidence: 0.95,
            per_class,
            spot_check: 0.0,
        }
    }

    #[test]
    fn clopper_pearson_matches_known_values() {
        // Values from the Beta quantile: lower = Beta(alpha; x, n-x+1).
        // (Reference values from scipy.stats.beta.ppf.)
        // 0 errors in 299: 0.05^(1/299) = 0.990031
        assert!((clopper_pearson_lower(299, 299, 0.05) - 0.990_031).abs() < 1e-5);
        // 9 of 10 at one-sided 0.05: Beta(0.05; 9, 2) = 0.605837
        assert!((clopper_pearson_lower(9, 10, 0.05) - 0.605_837).abs() < 1e-5);
        // 50 of 100 at one-sided 0.025: 0.398_3 (two-sided 95% interval
        // [0.3983, 0.6017]).
        assert!((clopper_pearson_lower(50, 100, 0.025) - 0.398_3).abs() < 1e-3);
        assert!((clopper_pearson_upper(50, 100, 0.025) - 0.601_7).abs() < 1e-3);
        assert_eq!(clopper_pearson_lower(0, 10, 0.05), 0.0);
        assert_eq!(clopper_pearson_upper(10, 10, 0.05), 1.0);
        // Monotone in x.
        let mut last = 0.0;
        for x in 0..=200 {
            let l = clopper_pearson_lower(x, 200, 0.05);
            assert!(l >= last, "x={x}");
            last = l;
        }
    }

    #[test]
    fn the_bound_holds_in_simulation() {
        // For a true p, the lower bound exceeds p in at most ~alpha of the
        // draws (Clopper-Pearson is conservative).
        let mut rng = crate::train::model::Rng::new(7);
        let (p, n, draws) = (0.9, 120u64, 2000);
        let mut above = 0;
        for _ in 0..draws {
            let x = (0..n).filter(|_| rng.unit() < p as f32).count() as u64;
            if clopper_pearson_lower(x, n, 0.05) > p {
                above += 1;
            }
        }
        assert!(above <= draws * 6 / 100, "{above} of {draws}");
    }

    #[test]
    fn min_records_is_the_zero_error_sample_size() {
        assert_eq!(min_records(0.99, 0.95), 299);
        assert_eq!(min_records(0.95, 0.95), 59);
        assert_eq!(min_records(0.9, 0.9), 22);
        // And that many zero-error records do pass.
        assert!(clopper_pearson_lower(299, 299, 0.05) >= 0.99);
        assert!(clopper_pearson_lower(298, 298, 0.05) < 0.99);
    }

    fn cal(score: f32, class: usize, correct: bool) -> Calibration {
        Calibration {
            score,
            class,
            correct,
        }
    }

    #[test]
    fn the_threshold_stops_where_errors_begin() {
        // 400 records: the 300 most confident are right, the rest are
        // right only half of the time.
        let mut v = Vec::new();
        for i in 0..400 {
            let score = 1.0 - i as f32 / 1000.0;
            let correct = i < 300 || i % 2 == 0;
            v.push(cal(score, 0, correct));
        }
        let g = gate(&target(0.95, false), 2, &v);
        assert_eq!(g.len(), 1);
        let t = g[0].threshold.expect("a threshold");
        assert!(g[0].lower >= 0.95);
        // Everything above the threshold is mostly right, and it does not
        // reach deep into the noisy tail.
        assert!(t > 1.0 - 360.0 / 1000.0, "threshold {t}");
        assert!(g[0].covered >= 59);
        assert_eq!(threshold_for(&g, 1), Some(t));
    }

    #[test]
    fn too_few_or_too_wrong_calibration_records_accept_nothing() {
        let few: Vec<_> = (0..30)
            .map(|i| cal(0.99 - i as f32 * 1e-3, 0, true))
            .collect();
        let g = gate(&target(0.95, false), 2, &few);
        assert_eq!(g[0].threshold, None);
        assert!(g[0].reason.as_deref().is_some_and(|r| r.contains("59")));
        let wrong: Vec<_> = (0..200)
            .map(|i| cal(0.99 - i as f32 * 1e-3, 0, i % 5 != 0))
            .collect();
        let g = gate(&target(0.95, false), 2, &wrong);
        assert_eq!(g[0].threshold, None);
        assert!(g[0].reason.as_deref().is_some_and(|r| r.contains("below")));
    }

    #[test]
    fn per_class_gates_do_not_let_a_good_class_cover_a_bad_one() {
        let mut v = Vec::new();
        for i in 0..300 {
            v.push(cal(0.99 - i as f32 * 1e-4, 0, true));
            v.push(cal(0.95 - i as f32 * 1e-4, 1, i % 4 != 0));
        }
        let overall = gate(&target(0.85, false), 2, &v);
        assert!(overall[0].threshold.is_some());
        let per = gate(&target(0.85, true), 2, &v);
        assert!(threshold_for(&per, 0).is_some());
        assert_eq!(threshold_for(&per, 1), None);
    }

    #[test]
    fn a_revoked_round_raises_the_floor() {
        let v: Vec<_> = (0..300)
            .map(|i| cal(0.99 - i as f32 * 1e-3, i % 2, true))
            .collect();
        let old = gate(&target(0.95, true), 2, &v);
        let t0 = threshold_for(&old, 0).unwrap();
        let mut new = gate(&target(0.95, true), 2, &v);
        assert!(accepts(&new, 0, t0));
        raise(&mut new, &old);
        assert!(!accepts(&new, 0, t0));
        assert!(accepts(&new, 0, t0 + 1e-3));
        let mut overall = gate(&target(0.95, false), 2, &v);
        raise(&mut overall, &old);
        let top = threshold_for(&old, 0)
            .unwrap()
            .max(threshold_for(&old, 1).unwrap());
        assert_eq!(overall[0].floor, Some(top));
    }

    #[test]
    fn ties_are_never_split() {
        let v: Vec<_> = (0..100).map(|i| cal(0.9, 0, i != 99)).collect();
        let g = gate(&target(0.95, false), 1, &v);
        // One block of ties is tested as a whole: 99 of 100.
        assert_eq!(g[0].covered, 100);
        assert_eq!(g[0].correct, 99);
    }
}
