//! The regression gate: a candidate model against a deployment's champion
//! on fresh labeled data (docs/deployment.md, "Regression gate").
//!
//! Both models predict the same records. The report holds, for each,
//! accuracy, macro-F1, per-class recall, expected calibration error and
//! the Brier score; for the pair, the accuracy difference with a paired
//! bootstrap interval, McNemar's exact test on the records exactly one of
//! them got right, and the population stability index of the candidate's
//! predicted classes against the champion's on the unlabeled records. The
//! verdict applies fixed, documented thresholds ([`Thresholds`]): the
//! accuracy check is a non-inferiority test (the interval's lower end
//! against a margin), so a large sample's tiny but significant difference
//! does not fail a candidate, and a small sample cannot pass one whose
//! drop it cannot bound; the
//! report is signed with the environment's key and stored, and the
//! policies read its verdict before a candidate gets more than a small
//! share of the traffic.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::store::{Space, Storage, StoreError, WriteBatch};

/// What the verdict requires. Fixed: the gate is a policy input, so its
/// thresholds are not a flag an operator turns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Fewest labeled records a verdict is given on.
    pub min_labeled: u64,
    /// Non-inferiority margin: the lower end of the 95% interval of the
    /// accuracy difference (candidate − champion) must not fall below
    /// minus this.
    pub max_accuracy_drop: f64,
    /// Largest macro-F1 drop that passes.
    pub max_macro_f1_drop: f64,
    /// Largest per-class recall drop that passes, for classes with at least
    /// `recall_min_support` labeled records.
    pub max_recall_drop: f64,
    /// Classes with fewer labeled records are reported, not judged.
    pub recall_min_support: u64,
    /// Largest rise of the expected calibration error that passes.
    pub max_ece_increase: f64,
    /// Largest population stability index of the predicted classes (0.25
    /// is the usual "significant shift" line).
    pub max_psi: f64,
    /// The level McNemar's test is read at (reported; the verdict reads
    /// the interval, which also bounds how large a difference is).
    pub alpha: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_labeled: 30,
            max_accuracy_drop: 0.01,
            max_macro_f1_drop: 0.02,
            max_recall_drop: 0.05,
            recall_min_support: 10,
            max_ece_increase: 0.05,
            max_psi: 0.25,
            alpha: 0.05,
        }
    }
}

/// One model's figures on the labeled records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFigures {
    /// The model id.
    pub model: String,
    /// Share of labeled records predicted right (a record the model's
    /// chain dropped counts as wrong).
    pub accuracy: f64,
    /// Unweighted mean of the per-class F1 over the classes in the labels
    /// or the predictions.
    pub macro_f1: f64,
    /// Recall per true class.
    pub recall: BTreeMap<String, f64>,
    /// Expected calibration error: 15 equal-width confidence bins, the
    /// record-weighted mean of |accuracy − mean confidence|.
    pub ece: f64,
    /// Mean over records of Σ_k (p_k − y_k)², over the model's classes.
    pub brier: f64,
}

/// McNemar's exact test on the discordant records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    /// Records the champion got right and the candidate wrong.
    pub champion_only: u64,
    /// Records the candidate got right and the champion wrong.
    pub candidate_only: u64,
    /// Two-sided exact binomial p-value.
    pub p_value: f64,
}

/// The regression report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegressionReport {
    /// The deployment.
    pub deployment: String,
    /// The candidate's figures.
    pub candidate: ModelFigures,
    /// The champion's figures on the same records.
    pub champion: ModelFigures,
    /// The dataset versions the records came from (`name@version`).
    pub datasets: Vec<String>,
    /// Labeled records compared.
    pub labeled: u64,
    /// Unlabeled records the drift was measured on.
    pub unlabeled: u64,
    /// Labeled records per true class.
    pub support: BTreeMap<String, u64>,
    /// Candidate accuracy minus champion accuracy.
    pub accuracy_delta: f64,
    /// Paired bootstrap 95% interval of the difference (1,000 resamples,
    /// fixed seed).
    pub accuracy_delta_ci: (f64, f64),
    /// Candidate macro-F1 minus champion macro-F1.
    pub macro_f1_delta: f64,
    /// McNemar's test.
    pub mcnemar: McNemar,
    /// PSI of the candidate's predicted classes against the champion's on
    /// the unlabeled records (`None` without unlabeled records).
    pub psi: Option<f64>,
    /// The thresholds applied.
    pub thresholds: Thresholds,
    /// `pass` or `fail`.
    pub verdict: String,
    /// Why it failed (empty on a pass).
    pub reasons: Vec<String>,
    /// Who ran it.
    pub by: String,
    /// When, ms since the epoch.
    pub created_ms: u64,
    /// Ed25519 signature (hex) over [`signed_message`] of
    /// [`RegressionReport::body`].
    pub signature: String,
    /// The public key (hex) that made it.
    pub key: String,
}

/// One labeled record's outcome for both models: the true class and each
/// model's class probabilities (`None`: the model's chain dropped it).
#[derive(Debug, Clone)]
pub struct Paired<'a> {
    /// The true label.
    pub truth: &'a str,
    /// The candidate's probabilities, by class.
    pub candidate: Option<&'a BTreeMap<String, f32>>,
    /// The champion's.
    pub champion: Option<&'a BTreeMap<String, f32>>,
}

fn top(p: &BTreeMap<String, f32>) -> Option<(&str, f32)> {
    let mut best: Option<(&str, f32)> = None;
    for (c, &v) in p {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((c, v));
        }
    }
    best
}

/// The figures of one model (`pick` chooses its probabilities).
fn figures<'a>(
    model: &str,
    records: &[Paired<'a>],
    pick: &dyn Fn(&Paired<'a>) -> Option<&'a BTreeMap<String, f32>>,
) -> ModelFigures {
    let n = records.len().max(1) as f64;
    let mut correct = 0u64;
    let mut tp: BTreeMap<&str, u64> = BTreeMap::new();
    let mut predicted: BTreeMap<&str, u64> = BTreeMap::new();
    let mut actual: BTreeMap<&str, u64> = BTreeMap::new();
    const BINS: usize = 15;
    let mut bins = [(0u64, 0f64, 0u64); BINS];
    let mut brier = 0f64;
    for r in records {
        *actual.entry(r.truth).or_default() += 1;
        let Some(p) = pick(r) else {
            brier += 1.0;
            continue;
        };
        if let Some((c, conf)) = top(p) {
            *predicted.entry(c).or_default() += 1;
            let right = c == r.truth;
            if right {
                correct += 1;
                *tp.entry(c).or_default() += 1;
            }
            let b = ((conf.clamp(0.0, 1.0) as f64 * BINS as f64) as usize).min(BINS - 1);
            bins[b].0 += 1;
            bins[b].1 += f64::from(conf);
            bins[b].2 += u64::from(right);
        }
        let mut s = 0f64;
        for (c, &v) in p {
            let y = if c == r.truth { 1.0 } else { 0.0 };
            s += (f64::from(v) - y).powi(2);
        }
        if !p.contains_key(r.truth) {
            s += 1.0;
        }
        brier += s;
    }
    let classes: BTreeSet<&str> = actual.keys().chain(predicted.keys()).copied().collect();
    let mut f1_sum = 0f64;
    let mut recall = BTreeMap::new();
    for c in &classes {
        let t = *tp.get(c).unwrap_or(&0) as f64;
        let pr = *predicted.get(c).unwrap_or(&0) as f64;
        let ac = *actual.get(c).unwrap_or(&0) as f64;
        let f1 = if pr + ac > 0.0 {
            2.0 * t / (pr + ac)
        } else {
            0.0
        };
        f1_sum += f1;
        if ac > 0.0 {
            recall.insert(c.to_string(), t / ac);
        }
    }
    let ece = bins
        .iter()
        .filter(|b| b.0 > 0)
        .map(|&(k, conf, right)| {
            let k = k as f64;
            (k / n) * (right as f64 / k - conf / k).abs()
        })
        .sum();
    ModelFigures {
        model: model.to_string(),
        accuracy: correct as f64 / n,
        macro_f1: if classes.is_empty() {
            0.0
        } else {
            f1_sum / classes.len() as f64
        },
        recall,
        ece,
        brier: brier / n,
    }
}

/// Two-sided exact binomial test of `k` successes of `n` at p = 1/2:
/// min(1, 2·P(X ≤ min(k, n−k))).
pub fn mcnemar_p(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let ln2n = n as f64 * std::f64::consts::LN_2;
    let mut ln_choose = 0f64;
    let mut tail = 0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose - ln2n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// A paired bootstrap 95% interval of the mean of `d` (1,000 resamples).
fn bootstrap_ci(d: &[i8], seed: u64) -> (f64, f64) {
    if d.is_empty() {
        return (0.0, 0.0);
    }
    let mut state = seed;
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let n = d.len() as u64;
    let mut means: Vec<f64> = (0..1000)
        .map(|_| {
            let mut s = 0i64;
            for _ in 0..n {
                s += i64::from(d[(next() % n) as usize]);
            }
            s as f64 / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    (means[24], means[974])
}

/// The population stability index between two class counts (each class's
/// share smoothed by 1e-4 so an empty class stays finite).
pub fn psi(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> f64 {
    let na = a.values().sum::<u64>().max(1) as f64;
    let nb = b.values().sum::<u64>().max(1) as f64;
    let classes: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    classes
        .into_iter()
        .map(|c| {
            let pa = (*a.get(c).unwrap_or(&0) as f64 / na).max(1e-4);
            let pb = (*b.get(c).unwrap_or(&0) as f64 / nb).max(1e-4);
            (pa - pb) * (pa / pb).ln()
        })
        .sum()
}

/// Everything a report is computed from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The deployment.
    pub deployment: &'a str,
    /// The candidate model.
    pub candidate: &'a str,
    /// The champion model.
    pub champion: &'a str,
    /// The dataset versions.
    pub datasets: Vec<String>,
    /// The labeled records' outcomes.
    pub labeled: Vec<Paired<'a>>,
    /// Predicted classes on the unlabeled records: candidate's, champion's.
    pub unlabeled: (BTreeMap<String, u64>, BTreeMap<String, u64>),
    /// Unlabeled records.
    pub unlabeled_records: u64,
    /// Who runs it.
    pub by: &'a str,
    /// When.
    pub now_ms: u64,
}

/// Computes the (unsigned) report and its verdict.
pub fn evaluate(i: Inputs<'_>) -> RegressionReport {
    let t = Thresholds::default();
    let cand = figures(i.candidate, &i.labeled, &|r| r.candidate);
    let champ = figures(i.champion, &i.labeled, &|r| r.champion);
    let right = |p: Option<&BTreeMap<String, f32>>, truth: &str| {
        p.and_then(top).is_some_and(|(c, _)| c == truth)
    };
    let mut support: BTreeMap<String, u64> = BTreeMap::new();
    let (mut b, mut c) = (0u64, 0u64);
    let d: Vec<i8> = i
        .labeled
        .iter()
        .map(|r| {
            *support.entry(r.truth.to_string()).or_default() += 1;
            let x = right(r.candidate, r.truth);
            let y = right(r.champion, r.truth);
            match (x, y) {
                (true, false) => {
                    c += 1;
                    1
                }
                (false, true) => {
                    b += 1;
                    -1
                }
                _ => 0,
            }
        })
        .collect();
    let p = mcnemar_p(b, c);
    let ci = bootstrap_ci(&d, 0x5EED);
    let labeled = i.labeled.len() as u64;
    let psi = (i.unlabeled_records > 0).then(|| psi(&i.unlabeled.0, &i.unlabeled.1));
    let mut reasons = Vec::new();
    if labeled < t.min_labeled {
        reasons.push(format!(
            "only {labeled} labeled records; the gate needs at least {}",
            t.min_labeled
        ));
    }
    let acc_delta = cand.accuracy - champ.accuracy;
    if ci.0 < -t.max_accuracy_drop {
        reasons.push(format!(
            "accuracy {:.4} against the champion's {:.4}: the 95% interval of the difference reaches {:+.4}, so a drop of more than {} is not ruled out (McNemar p = {p:.4}: {b} records only the champion got right, {c} only the candidate)",
            cand.accuracy, champ.accuracy, ci.0, t.max_accuracy_drop
        ));
    }
    let f1_delta = cand.macro_f1 - champ.macro_f1;
    if f1_delta < -t.max_macro_f1_drop {
        reasons.push(format!(
            "macro-F1 {:.4} is {:.4} below the champion's {:.4} (at most {} allowed)",
            cand.macro_f1, -f1_delta, champ.macro_f1, t.max_macro_f1_drop
        ));
    }
    for (class, &n) in &support {
        if n < t.recall_min_support {
            continue;
        }
        let rc = cand.recall.get(class).copied().unwrap_or(0.0);
        let rh = champ.recall.get(class).copied().unwrap_or(0.0);
        if rh - rc > t.max_recall_drop {
            reasons.push(format!(
                "recall of class `{class}` {rc:.4} is {:.4} below the champion's {rh:.4} over {n} records (at most {} allowed)",
                rh - rc,
                t.max_recall_drop
            ));
        }
    }
    if cand.ece - champ.ece > t.max_ece_increase {
        reasons.push(format!(
            "calibration error {:.4} is {:.4} above the champion's {:.4} (at most {} allowed)",
            cand.ece,
            cand.ece - champ.ece,
            champ.ece,
            t.max_ece_increase
        ));
    }
    if let Some(v) = psi
        && v > t.max_psi
    {
        reasons.push(format!(
            "its predicted classes drift from the champion's on {} unlabeled records: PSI {v:.4} > {}",
            i.unlabeled_records, t.max_psi
        ));
    }
    RegressionReport {
        deployment: i.deployment.to_string(),
        candidate: cand,
        champion: champ,
        datasets: i.datasets,
        labeled,
        unlabeled: i.unlabeled_records,
        support,
        accuracy_delta: acc_delta,
        accuracy_delta_ci: ci,
        macro_f1_delta: f1_delta,
        mcnemar: McNemar {
            champion_only: b,
            candidate_only: c,
            p_value: p,
        },
        psi,
        thresholds: t,
        verdict: if reasons.is_empty() { "pass" } else { "fail" }.into(),
        reasons,
        by: i.by.to_string(),
        created_ms: i.now_ms,
        signature: String::new(),
        key: String::new(),
    }
}

impl RegressionReport {
    /// The report's JSON without its signature: the bytes it is signed
    /// and stored as.
    pub fn body(&self) -> String {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        serde_json::to_string(&unsigned).unwrap_or_default()
    }

    /// Whether the signature verifies under `key` over [`Self::body`] (for
    /// a report in memory; a stored one is verified over its stored bytes
    /// by [`get`] and [`list`]).
    pub fn verifies(&self, key: &[u8; 32]) -> bool {
        verify(&self.body(), &self.signature, &self.key, key)
    }
}

/// The message a report's signature covers.
pub fn signed_message(body: &str) -> Vec<u8> {
    let mut m = b"cloister regression report v1\n".to_vec();
    m.extend_from_slice(body.as_bytes());
    m
}

fn verify(body: &str, signature: &str, signer: &str, key: &[u8; 32]) -> bool {
    let Ok(sig) = hex::decode(signature) else {
        return false;
    };
    signer == hex::encode(key)
        && ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(&signed_message(body), &sig)
            .is_ok()
}

/// A report as stored: the exact bytes signed, and the signature.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    body: String,
    signature: String,
    key: String,
}

fn key(deployment: &str, candidate: &str) -> Vec<u8> {
    let mut k = deployment.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(candidate.as_bytes());
    k
}

/// The write of a signed report (`body` is [`RegressionReport::body`],
/// `signature` over [`signed_message`] of it); it replaces the
/// candidate's last one.
pub fn put(batch: &mut WriteBatch, r: &RegressionReport, body: String) {
    let stored = Stored {
        body,
        signature: r.signature.clone(),
        key: r.key.clone(),
    };
    batch.put(
        Space::RegressionReports,
        key(&r.deployment, &r.candidate.model),
        serde_json::to_vec(&stored).unwrap_or_default(),
    );
}

/// A stored report and whether its signature verifies under `signer`
/// (`None` for the report when its bytes do not decode at all).
fn decode(v: &[u8], signer: &[u8; 32]) -> Option<(RegressionReport, bool)> {
    let s: Stored = serde_json::from_slice(v).ok()?;
    let ok = verify(&s.body, &s.signature, &s.key, signer);
    let mut r: RegressionReport = serde_json::from_str(&s.body).ok()?;
    r.signature = s.signature;
    r.key = s.key;
    Some((r, ok))
}

/// The candidate's last report and whether it verifies under `signer`;
/// `Err(Corrupted)` when it does not decode.
pub fn get(
    store: &dyn Storage,
    deployment: &str,
    candidate: &str,
    signer: &[u8; 32],
) -> Result<Option<(RegressionReport, bool)>, StoreError> {
    store
        .get(Space::RegressionReports, &key(deployment, candidate))?
        .map(|v| {
            decode(&v, signer).ok_or_else(|| {
                StoreError::Corrupted(format!(
                    "the regression report of `{candidate}` on `{deployment}` does not decode"
                ))
            })
        })
        .transpose()
}

/// Every report of a deployment that decodes, with whether it verifies.
pub fn list(
    store: &dyn Storage,
    deployment: &str,
    signer: &[u8; 32],
) -> Result<Vec<(RegressionReport, bool)>, StoreError> {
    let mut p = deployment.as_bytes().to_vec();
    p.push(0);
    let mut out = Vec::new();
    for item in store.scan(Space::RegressionReports, &p) {
        let (_, v) = item?;
        if let Some(r) = decode(&v, signer) {
            out.push(r);
        }
    }
    Ok(out)
}

/// The deletes of a deployment's reports.
pub fn delete_all(
    store: &dyn Storage,
    batch: &mut WriteBatch,
    deployment: &str,
) -> Result<(), StoreError> {
    crate::store::delete_prefixed(
        store,
        batch,
        Space::RegressionReports,
        &[deployment.as_bytes(), b"\0"].concat(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs(c: &str, p: f32) -> BTreeMap<String, f32> {
        let other = if c == "a" { "b" } else { "a" };
        BTreeMap::from([(c.to_string(), p), (other.to_string(), 1.0 - p)])
    }

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // 10 discordant, 1 vs 9: 2·(1 + 10)/1024.
        assert!((mcnemar_p(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_p(5, 5), 1.0);
        assert_eq!(mcnemar_p(0, 0), 1.0);
        // Large counts stay finite.
        let p = mcnemar_p(4_000, 5_000);
        assert!(p > 0.0 && p < 1e-10, "{p}");
    }

    #[test]
    fn a_worse_candidate_fails_and_an_equal_one_passes() {
        let a = probs("a", 0.9);
        let b = probs("b", 0.9);
        let truth: Vec<&str> = (0..200)
            .map(|i| if i % 2 == 0 { "a" } else { "b" })
            .collect();
        let right = |t: &str| if t == "a" { &a } else { &b };
        let wrong = |t: &str| if t == "a" { &b } else { &a };
        let inputs = |cand_wrong_every: usize| Inputs {
            deployment: "d",
            candidate: "c",
            champion: "h",
            datasets: vec!["x@1".into()],
            labeled: truth
                .iter()
                .enumerate()
                .map(|(i, t)| Paired {
                    truth: t,
                    candidate: Some(if cand_wrong_every > 0 && i % cand_wrong_every == 0 {
                        wrong(t)
                    } else {
                        right(t)
                    }),
                    champion: Some(right(t)),
                })
                .collect(),
            unlabeled: (BTreeMap::new(), BTreeMap::new()),
            unlabeled_records: 0,
            by: "op",
            now_ms: 0,
        };
        let same = evaluate(inputs(0));
        assert_eq!(same.verdict, "pass", "{:?}", same.reasons);
        assert_eq!(same.accuracy_delta, 0.0);
        let worse = evaluate(inputs(5));
        assert_eq!(worse.verdict, "fail");
        assert!(
            worse
                .reasons
                .iter()
                .any(|r| r.contains("not ruled out") && r.contains("McNemar p = 0.0000"))
        );
        assert!(worse.mcnemar.p_value < 1e-9);
        assert!(worse.reasons.iter().any(|r| r.contains("recall of class")));
        assert!(worse.accuracy_delta_ci.1 < 0.0);
        // Too few labeled records: no pass.
        let mut few = inputs(0);
        few.labeled.truncate(10);
        assert_eq!(evaluate(few).verdict, "fail");
        // Drift on the unlabeled records fails.
        let mut drift = inputs(0);
        drift.unlabeled = (
            BTreeMap::from([("a".into(), 90)]),
            BTreeMap::from([("a".into(), 10), ("b".into(), 80)]),
        );
        drift.unlabeled_records = 90;
        let r = evaluate(drift);
        assert!(r.psi.unwrap() > 0.25);
        assert_eq!(r.verdict, "fail");
    }
}
