//! Small numeric helpers for selectors.

/// Index and value of the largest probability (first on ties); `None` when
/// `p` is empty or holds a NaN.
pub fn argmax(p: &[f32]) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in p.iter().enumerate() {
        if v.is_nan() {
            return None;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best
}

/// Shannon entropy in nats, ignoring zero probabilities.
pub fn entropy(p: &[f32]) -> f32 {
    p.iter().filter(|&&v| v > 0.0).map(|&v| -v * v.ln()).sum()
}

/// The element-wise mean of several distributions of equal length; `None`
/// when there are none or their lengths differ.
pub fn mean_distribution(models: &[Vec<f32>]) -> Option<Vec<f32>> {
    let first = models.first()?;
    let mut mean = vec![0.0f32; first.len()];
    for m in models {
        if m.len() != mean.len() {
            return None;
        }
        for (acc, &v) in mean.iter_mut().zip(m) {
            *acc += v;
        }
    }
    let n = models.len() as f32;
    mean.iter_mut().for_each(|v| *v /= n);
    Some(mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(argmax(&[0.1, 0.7, 0.2]), Some((1, 0.7)));
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[0.5, f32::NAN]), None);
        assert!((entropy(&[0.5, 0.5]) - std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(entropy(&[1.0, 0.0]), 0.0);
        assert_eq!(
            mean_distribution(&[vec![1.0, 0.0], vec![0.0, 1.0]]),
            Some(vec![0.5, 0.5])
        );
    }
}
