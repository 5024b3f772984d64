//! Percentiles and sustained rates.

use serde::Serialize;

/// Latency percentiles in milliseconds (nearest rank), over `n` samples.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// From durations in seconds.
    pub fn of(seconds: &[f64]) -> Self {
        let mut sorted: Vec<f64> = seconds.iter().copied().filter(|s| s.is_finite()).collect();
        if sorted.is_empty() {
            return Self::default();
        }
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[index] * 1000.0
        };
        Self {
            n: sorted.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1] * 1000.0,
        }
    }
}

/// Events per second between the 10th and the 90th percentile of their times (seconds):
/// the steady part of a run, without the ramp-up and the tail.
pub fn sustained_rate(times: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = times.iter().copied().filter(|t| t.is_finite()).collect();
    if sorted.len() < 10 {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let low = sorted.len() / 10;
    let high = sorted.len() * 9 / 10;
    let span = sorted[high] - sorted[low];
    if span <= 0.0 {
        return f64::NAN;
    }
    (high - low) as f64 / span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(|i| f64::from(i) / 1000.0).collect();
        let p = Percentiles::of(&samples);
        assert_eq!(p.n, 100);
        assert!((p.p50 - 50.0).abs() < 1e-9);
        assert!((p.p99 - 99.0).abs() < 1e-9);
        assert!((p.max - 100.0).abs() < 1e-9);
    }

    #[test]
    fn sustained_rate_of_an_even_stream() {
        let times: Vec<f64> = (0..1000).map(|i| f64::from(i) / 100.0).collect();
        assert!((sustained_rate(&times) - 100.0).abs() < 1e-6);
    }
}
