//! Serving metrics: per deployment, variant and minute, what the variant
//! answered (docs/deployment.md).
//!
//! Kept in [`Space::ServingMetrics`] under `deployment \0 role \0 model \0
//! minute` (role: `champion`, `candidate` or `shadow`; the minute as u64
//! big-endian minutes since the epoch), so a range scan reads a variant's
//! window in time order, and a model's figures as a candidate stay apart
//! from its figures as the champion. Only aggregates are stored: counts, a
//! latency histogram, the predicted-class counts, sums of confidence and
//! of agreement with the champion. No input, no output, no key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{Space, Storage, StoreError, WriteBatch};

/// Latency histogram buckets: bucket `i` holds latencies up to
/// `LATENCY_BASE_US · 2^(i/4)` µs (four buckets per doubling, about 19%
/// wide), from 50 µs to beyond 10 minutes; the last is open.
pub const LATENCY_BUCKETS: usize = 96;
const LATENCY_BASE_US: f64 = 50.0;

/// The upper bound of latency bucket `i`, in µs.
pub fn bucket_upper_us(i: usize) -> f64 {
    LATENCY_BASE_US * 2f64.powf(i as f64 / 4.0)
}

fn bucket_of(us: u64) -> usize {
    let x = (us.max(1) as f64 / LATENCY_BASE_US).log2() * 4.0;
    (x.ceil().max(0.0) as usize).min(LATENCY_BUCKETS - 1)
}

/// One variant's counters for one minute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests it answered (or, for a shadow, received a copy of).
    pub requests: u64,
    /// Requests that ended in an error.
    pub errors: u64,
    /// Records predicted.
    pub records: u64,
    /// Latency histogram (see [`LATENCY_BUCKETS`]), requests per bucket.
    pub latency: Vec<u64>,
    /// Predicted records per class.
    pub classes: BTreeMap<String, u64>,
    /// Sum of the top-class probability over predicted records.
    pub confidence_sum: f64,
    /// Records also predicted by the champion (shadow and candidates:
    /// only when the champion ran on the same request, i.e. the shadow).
    pub compared: u64,
    /// Of those, records where both chose the same class.
    pub agreed: u64,
    /// Records whose true label arrived through feedback.
    #[serde(default)]
    pub labeled: u64,
    /// Of those, records it predicted right.
    #[serde(default)]
    pub correct: u64,
    /// Of those, records the champion predicted right on the same request
    /// (candidates and the shadow; for the champion, equal to `correct`):
    /// the paired comparison the accuracy guard reads.
    #[serde(default)]
    pub champion_correct: u64,
}

/// What one request did on one variant.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Whether it failed.
    pub error: bool,
    /// Wall-clock time in µs.
    pub latency_us: u64,
    /// The predicted class of each record.
    pub classes: Vec<String>,
    /// The top-class probability of each record.
    pub confidences: Vec<f32>,
    /// `(compared, agreed)` records against the champion.
    pub agreement: Option<(u64, u64)>,
}

impl Counters {
    /// Adds one request's observation.
    pub fn add(&mut self, o: &Observation) {
        if self.latency.len() != LATENCY_BUCKETS {
            self.latency.resize(LATENCY_BUCKETS, 0);
        }
        self.requests += 1;
        self.errors += u64::from(o.error);
        self.records += o.classes.len() as u64;
        self.latency[bucket_of(o.latency_us)] += 1;
        for c in &o.classes {
            *self.classes.entry(c.clone()).or_default() += 1;
        }
        self.confidence_sum += o.confidences.iter().map(|&c| f64::from(c)).sum::<f64>();
        if let Some((c, a)) = o.agreement {
            self.compared += c;
            self.agreed += a;
        }
    }

    /// Adds another minute's counters.
    pub fn merge(&mut self, other: &Counters) {
        if self.latency.len() != LATENCY_BUCKETS {
            self.latency.resize(LATENCY_BUCKETS, 0);
        }
        self.requests += other.requests;
        self.errors += other.errors;
        self.records += other.records;
        for (i, n) in other.latency.iter().enumerate().take(LATENCY_BUCKETS) {
            self.latency[i] += n;
        }
        for (c, n) in &other.classes {
            *self.classes.entry(c.clone()).or_default() += n;
        }
        self.confidence_sum += other.confidence_sum;
        self.compared += other.compared;
        self.agreed += other.agreed;
        self.labeled += other.labeled;
        self.correct += other.correct;
        self.champion_correct += other.champion_correct;
    }

    /// Adds one labeled record's outcome: whether this variant and the
    /// champion predicted it right.
    pub fn add_feedback(&mut self, correct: bool, champion_correct: bool) {
        self.labeled += 1;
        self.correct += u64::from(correct);
        self.champion_correct += u64::from(champion_correct);
    }

    /// Online accuracy, and the champion's on the same records.
    pub fn accuracy(&self) -> Option<(f64, f64)> {
        (self.labeled > 0).then(|| {
            (
                self.correct as f64 / self.labeled as f64,
                self.champion_correct as f64 / self.labeled as f64,
            )
        })
    }

    /// The latency at quantile `q` (0..=1), in ms, as its bucket's upper
    /// bound; `None` without requests.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(bucket_upper_us(i) / 1000.0);
            }
        }
        Some(bucket_upper_us(LATENCY_BUCKETS - 1) / 1000.0)
    }
}

/// A variant's figures over a window, as `deploy status` and the API show
/// them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The model.
    pub model: String,
    /// `champion`, `candidate` or `shadow`.
    pub role: String,
    /// Its traffic weight in basis points (the shadow's: its sample).
    pub weight: u32,
    /// Requests in the window.
    pub requests: u64,
    /// Error rate (0 without requests).
    pub error_rate: f64,
    /// Records predicted.
    pub records: u64,
    /// Latency quantiles in ms (bucket upper bounds).
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Predicted records per class.
    pub classes: BTreeMap<String, u64>,
    /// Mean top-class probability.
    pub mean_confidence: Option<f64>,
    /// Share of compared records where it chose the champion's class.
    pub agreement: Option<f64>,
    /// Records labeled through feedback.
    pub labeled: u64,
    /// Online accuracy on those records.
    pub accuracy: Option<f64>,
    /// The champion's accuracy on the same records.
    pub champion_accuracy: Option<f64>,
}

impl Summary {
    /// The figures of `c` for a variant.
    pub fn of(model: &str, role: &str, weight: u32, c: &Counters) -> Self {
        Summary {
            model: model.to_string(),
            role: role.to_string(),
            weight,
            requests: c.requests,
            error_rate: if c.requests == 0 {
                0.0
            } else {
                c.errors as f64 / c.requests as f64
            },
            records: c.records,
            p50_ms: c.latency_ms(0.50),
            p95_ms: c.latency_ms(0.95),
            p99_ms: c.latency_ms(0.99),
            classes: c.classes.clone(),
            mean_confidence: (c.records > 0).then(|| c.confidence_sum / c.records as f64),
            agreement: (c.compared > 0).then(|| c.agreed as f64 / c.compared as f64),
            labeled: c.labeled,
            accuracy: c.accuracy().map(|a| a.0),
            champion_accuracy: c.accuracy().map(|a| a.1),
        }
    }
}

impl Summary {
    /// The figures as `deploy status` and the console's deployment page
    /// show them, column by column (header, text); role and model are
    /// each front end's own.
    pub fn columns(&self) -> Vec<(&'static str, String)> {
        let opt =
            |v: Option<f64>, p: usize| v.map_or_else(|| "–".to_string(), |x| format!("{x:.p$}"));
        let accuracy = match (self.accuracy, self.champion_accuracy) {
            (Some(a), Some(c)) if self.role != "champion" => format!(
                "{:.1} (champion {:.1}) on {}",
                a * 100.0,
                c * 100.0,
                self.labeled
            ),
            (Some(a), _) => format!("{:.1} on {}", a * 100.0, self.labeled),
            _ => "–".into(),
        };
        vec![
            ("share", format!("{:.2}%", f64::from(self.weight) / 100.0)),
            ("requests", self.requests.to_string()),
            ("errors", format!("{:.2}%", self.error_rate * 100.0)),
            ("p50 ms", opt(self.p50_ms, 1)),
            ("p95 ms", opt(self.p95_ms, 1)),
            ("p99 ms", opt(self.p99_ms, 1)),
            ("confidence", opt(self.mean_confidence, 3)),
            ("agreement %", opt(self.agreement.map(|a| a * 100.0), 1)),
            ("online accuracy % (labeled)", accuracy),
            (
                "classes",
                self.classes
                    .iter()
                    .map(|(c, n)| format!("{c} {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ]
    }
}

fn prefix(deployment: &str, role: &str, model: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(deployment.len() + role.len() + model.len() + 3);
    for part in [deployment, role, model] {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k
}

fn key(deployment: &str, role: &str, model: &str, minute: u64) -> Vec<u8> {
    let mut k = prefix(deployment, role, model);
    k.extend_from_slice(&minute.to_be_bytes());
    k
}

/// The minute of `now_ms` (ms since the epoch).
pub fn minute(now_ms: u64) -> u64 {
    now_ms / 60_000
}

/// Adds `c` to the stored counters of a variant's `minute`. Written
/// without waiting for the disk (metrics are not the record of what
/// happened; the audit log is): the next durable commit or the store's own
/// flush makes them durable. A read-modify-write: callers serialize it.
pub fn add(
    store: &dyn Storage,
    deployment: &str,
    role: &str,
    model: &str,
    minute: u64,
    c: &Counters,
) -> Result<(), StoreError> {
    let k = key(deployment, role, model, minute);
    // Another process serving the same deployment may add to the same
    // minute: the sum is written only over what was read.
    crate::store::stage_update(store, &[(Space::ServingMetrics, &k)], |values| {
        let mut total: Counters = match &values[0] {
            Some(v) => serde_json::from_slice(v).unwrap_or_default(),
            None => Counters::default(),
        };
        total.merge(c);
        let mut b = WriteBatch::new();
        b.put(
            Space::ServingMetrics,
            k.clone(),
            serde_json::to_vec(&total).unwrap_or_default(),
        );
        Ok::<_, StoreError>((b, ()))
    })
}

/// The variant's counters summed over the minutes from `since_ms` on.
pub fn window(
    store: &dyn Storage,
    deployment: &str,
    role: &str,
    model: &str,
    since_ms: u64,
) -> Result<Counters, StoreError> {
    let mut total = Counters::default();
    for (_, c) in series(store, deployment, role, model, since_ms)? {
        total.merge(&c);
    }
    Ok(total)
}

/// The variant's counters per minute from `since_ms` on, oldest first
/// (minutes without traffic are absent).
pub fn series(
    store: &dyn Storage,
    deployment: &str,
    role: &str,
    model: &str,
    since_ms: u64,
) -> Result<Vec<(u64, Counters)>, StoreError> {
    let p = prefix(deployment, role, model);
    let from = since_ms / 60_000;
    let mut out = Vec::new();
    for item in store.scan_from(Space::ServingMetrics, &key(deployment, role, model, from)) {
        let (k, v) = item?;
        if !k.starts_with(&p) {
            break;
        }
        let Some(minute) = k
            .get(p.len()..)
            .and_then(|m| <[u8; 8]>::try_from(m).ok())
            .map(u64::from_be_bytes)
        else {
            continue;
        };
        if let Ok(c) = serde_json::from_slice::<Counters>(&v) {
            out.push((minute, c));
        }
    }
    Ok(out)
}

/// The deletes of every metric of a deployment.
pub fn delete_all(
    store: &dyn Storage,
    batch: &mut WriteBatch,
    deployment: &str,
) -> Result<(), StoreError> {
    crate::store::delete_prefixed(
        store,
        batch,
        Space::ServingMetrics,
        &[deployment.as_bytes(), b"\0"].concat(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_histogram() {
        let mut c = Counters::default();
        for us in 1..=1000u64 {
            c.add(&Observation {
                latency_us: us * 100,
                classes: vec!["a".into()],
                confidences: vec![0.5],
                ..Observation::default()
            });
        }
        let p50 = c.latency_ms(0.5).unwrap();
        let p99 = c.latency_ms(0.99).unwrap();
        // 50 ms and 99 ms, within a bucket's width (19%).
        assert!((50.0..50.0 * 1.2).contains(&p50), "{p50}");
        assert!((99.0..99.0 * 1.2).contains(&p99), "{p99}");
        let s = Summary::of("m", "champion", 10_000, &c);
        assert_eq!(s.records, 1000);
        assert_eq!(s.classes["a"], 1000);
        assert!((s.mean_confidence.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(s.agreement, None);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }
}
