//! Multi-shot pruning schedules: the target sparsity after each shot, and how many of `total` units
//! are removed by then.
//!
//! With `T` shots, a final sparsity `f` (`0 <= f < 1`) and `u = t / T` for shot `t = 1..=T`:
//! - `linear`: density falls linearly from 1 to `1 - f`: `s_t = f * u`;
//! - `cubic`: gradual pruning (fast first, slow last): `s_t = f * (1 - (1 - u)^3)`;
//! - `exponential`: density is geometric from 1 to `1 - f`: `s_t = 1 - (1 - f)^u`.
//!
//! The last shot's target is exactly `f`; targets are clamped to be non-decreasing and at most `f`.
//! Unit counts are `floor(s * total + 1e-9)` (the small epsilon keeps products such as
//! `0.3 * 10 = 2.9999999999999996` from losing a unit), capped at the final count
//! `floor(f * total + 1e-9)`, made non-decreasing, and exactly the final count at the last shot.

use crate::error::{KernelError, KernelResult};

/// Most shots a schedule may have.
pub const MAX_SHOTS: u64 = 1_000_000;

/// Added to `sparsity * total` before rounding down to a count of units.
pub const COUNT_EPSILON: f64 = 1e-9;

/// Shape of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Linear,
    Cubic,
    Exponential,
}

impl Kind {
    /// Parses `"linear"`, `"cubic"` or `"exponential"`.
    pub fn parse(name: &str) -> KernelResult<Kind> {
        match name {
            "linear" => Ok(Kind::Linear),
            "cubic" => Ok(Kind::Cubic),
            "exponential" => Ok(Kind::Exponential),
            other => Err(KernelError::invalid(format!(
                "unknown schedule kind '{other}' (expected 'linear', 'cubic' or 'exponential')"
            ))),
        }
    }
}

fn check(final_sparsity: f64, shots: u64) -> KernelResult<()> {
    if !(0.0..1.0).contains(&final_sparsity) {
        return Err(KernelError::invalid(format!(
            "final_sparsity must satisfy 0 <= final_sparsity < 1, got {final_sparsity}"
        )));
    }
    if !(1..=MAX_SHOTS).contains(&shots) {
        return Err(KernelError::invalid(format!(
            "shots must be between 1 and {MAX_SHOTS}, got {shots}"
        )));
    }
    Ok(())
}

fn raw_target(kind: Kind, f: f64, t: u64, shots: u64) -> f64 {
    if t == shots {
        return f;
    }
    let u = t as f64 / shots as f64;
    match kind {
        Kind::Linear => f * u,
        Kind::Cubic => {
            let v = 1.0 - u;
            f * (1.0 - v * v * v)
        }
        Kind::Exponential => 1.0 - (1.0 - f).powf(u),
    }
}

/// Target sparsity after each of the `shots` shots (see the module docs).
pub fn schedule(final_sparsity: f64, shots: u64, kind: Kind) -> KernelResult<Vec<f64>> {
    check(final_sparsity, shots)?;
    let mut out = Vec::with_capacity(shots as usize);
    let mut previous = 0.0f64;
    for t in 1..=shots {
        let s = raw_target(kind, final_sparsity, t, shots)
            .max(previous)
            .min(final_sparsity);
        out.push(s);
        previous = s;
    }
    Ok(out)
}

/// Units of `total` that a sparsity `fraction` removes: `min(total, floor(fraction * total + 1e-9))`.
pub fn count_of(fraction: f64, total: u64) -> u64 {
    let c = (fraction * total as f64 + COUNT_EPSILON).floor();
    if c <= 0.0 {
        0
    } else {
        (c as u64).min(total)
    }
}

/// Units removed after each shot (cumulative; see the module docs).
pub fn cumulative_counts(
    total: u64,
    final_sparsity: f64,
    shots: u64,
    kind: Kind,
) -> KernelResult<Vec<u64>> {
    let targets = schedule(final_sparsity, shots, kind)?;
    let last = count_of(final_sparsity, total);
    let mut out = Vec::with_capacity(targets.len());
    let mut previous = 0u64;
    for (t, s) in targets.iter().enumerate() {
        let c = if t + 1 == targets.len() {
            last
        } else {
            count_of(*s, total).min(last).max(previous)
        };
        out.push(c);
        previous = c;
    }
    Ok(out)
}

/// Units to remove in shot `shot` (0-based), given `removed_so_far`: the cumulative count of that
/// shot minus what is already removed, never negative (and so never above the final count).
pub fn next_count(
    removed_so_far: u64,
    shot: u64,
    total: u64,
    final_sparsity: f64,
    shots: u64,
    kind: Kind,
) -> KernelResult<u64> {
    check(final_sparsity, shots)?;
    if shot >= shots {
        return Err(KernelError::invalid(format!(
            "shot must satisfy 0 <= shot < shots ({shots}), got {shot}"
        )));
    }
    let counts = cumulative_counts(total, final_sparsity, shots, kind)?;
    Ok(counts[shot as usize].saturating_sub(removed_so_far))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [Kind; 3] = [Kind::Linear, Kind::Cubic, Kind::Exponential];

    #[test]
    fn ends_at_final_and_is_monotone() {
        for kind in KINDS {
            for f in [0.0, 0.1, 0.3, 0.5, 0.9, 0.999_999] {
                for shots in [1, 2, 3, 7, 40, 1000] {
                    let s = schedule(f, shots, kind).unwrap();
                    assert_eq!(s.len() as u64, shots);
                    assert_eq!(*s.last().unwrap(), f);
                    assert!(s[0] >= 0.0);
                    assert!(s.windows(2).all(|w| w[0] <= w[1]));
                    for total in [0u64, 1, 10, 135_000_000, 7_000_000_000] {
                        let c = cumulative_counts(total, f, shots, kind).unwrap();
                        let last = count_of(f, total);
                        assert_eq!(*c.last().unwrap(), last);
                        assert!(c.windows(2).all(|w| w[0] <= w[1]));
                        assert!(c.iter().all(|&x| x <= last));
                    }
                }
            }
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(
            schedule(0.5, 4, Kind::Linear).unwrap(),
            vec![0.125, 0.25, 0.375, 0.5]
        );
        let cubic = schedule(0.8, 2, Kind::Cubic).unwrap();
        assert!((cubic[0] - 0.8 * (1.0 - 0.125)).abs() < 1e-15);
        let exp = schedule(0.75, 2, Kind::Exponential).unwrap();
        assert!((exp[0] - 0.5).abs() < 1e-15);
        assert_eq!(count_of(0.3, 10), 3);
        assert_eq!(
            cumulative_counts(10, 0.3, 3, Kind::Linear).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(
            cumulative_counts(10, 0.0, 3, Kind::Cubic).unwrap(),
            vec![0, 0, 0]
        );
    }

    #[test]
    fn next_count_follows_the_counts() {
        for kind in KINDS {
            let counts = cumulative_counts(1000, 0.6, 7, kind).unwrap();
            let mut removed = 0;
            for shot in 0..7 {
                removed += next_count(removed, shot, 1000, 0.6, 7, kind).unwrap();
                assert_eq!(removed, counts[shot as usize]);
            }
            assert_eq!(next_count(10_000, 3, 1000, 0.6, 7, kind).unwrap(), 0);
        }
    }

    #[test]
    fn errors() {
        assert!(schedule(1.0, 3, Kind::Linear).is_err());
        assert!(schedule(-0.1, 3, Kind::Linear).is_err());
        assert!(schedule(f64::NAN, 3, Kind::Linear).is_err());
        assert!(schedule(0.5, 0, Kind::Linear).is_err());
        assert!(schedule(0.5, MAX_SHOTS + 1, Kind::Linear).is_err());
        assert!(Kind::parse("quadratic").is_err());
        assert!(next_count(0, 3, 10, 0.5, 3, Kind::Linear).is_err());
    }
}
