//! N:M semi-structured selection: in every group of `m` consecutive entries of a row, keep the `n`
//! entries with the highest scores.
//!
//! Ties keep the lower position. `-0.0` and `0.0` are equal scores; `-inf` and `+inf` are ordinary
//! scores; NaN is an error.

use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::simd::multiversion;
use crate::threshold::order_key;

/// Largest group for which the pairwise comparison is used instead of a sort.
const PAIRWISE_MAX: usize = 32;

/// Checks `n`, `m` and the shape of a row-major `rows x cols` score matrix.
pub fn check_nm(len: usize, rows: usize, cols: usize, n: usize, m: usize) -> KernelResult<()> {
    if !(0 < n && n < m) {
        return Err(KernelError::invalid(format!(
            "N:M needs 0 < n < m, got n={n}, m={m}"
        )));
    }
    if cols % m != 0 {
        return Err(KernelError::invalid(format!(
            "N:M needs m to divide the row length, got m={m} for rows of {cols}"
        )));
    }
    if rows.checked_mul(cols) != Some(len) {
        return Err(KernelError::invalid(format!(
            "scores hold {len} entries, not {rows} x {cols}"
        )));
    }
    Ok(())
}

/// Marks in `keep` the `n` highest of one group of `M` (ties: lower position first), comparing
/// every pair: entry `j` is kept when fewer than `n` entries beat it.
#[inline(always)]
fn keep_group_fixed<const M: usize>(scores: &[f32; M], keep: &mut [bool; M], n: usize) {
    for j in 0..M {
        let s = scores[j];
        let mut ahead = 0usize;
        for (l, &t) in scores.iter().enumerate() {
            ahead += usize::from(t > s || (t == s && l < j));
        }
        keep[j] = ahead < n;
    }
}

/// Same as [`keep_group_fixed`] for any group size.
#[inline(always)]
fn keep_group(scores: &[f32], keep: &mut [bool], n: usize) {
    let m = scores.len();
    if m <= PAIRWISE_MAX {
        for j in 0..m {
            let s = scores[j];
            let mut ahead = 0usize;
            for (l, &t) in scores.iter().enumerate() {
                ahead += usize::from(t > s || (t == s && l < j));
            }
            keep[j] = ahead < n;
        }
    } else {
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_unstable_by_key(|&j| (std::cmp::Reverse(order_key(scores[j])), j));
        keep.iter_mut().for_each(|k| *k = false);
        for &j in &order[..n] {
            keep[j] = true;
        }
    }
}

#[inline(always)]
fn row_fixed<const M: usize>(row: &[f32], keep: &mut [bool], n: usize) {
    for (k, s) in keep.chunks_exact_mut(M).zip(row.chunks_exact(M)) {
        if let (Ok(k), Ok(s)) = (<&mut [bool; M]>::try_from(k), <&[f32; M]>::try_from(s)) {
            keep_group_fixed(s, k, n);
        }
    }
}

multiversion! {
    /// Marks the kept entries of one row; `true` when the row holds a NaN (then nothing is marked).
    fn nm_row(row: &[f32], keep: &mut [bool], n: usize, m: usize) -> bool {
        if row.iter().any(|x| x.is_nan()) {
            return true;
        }
        match m {
            4 => row_fixed::<4>(row, keep, n),
            8 => row_fixed::<8>(row, keep, n),
            16 => row_fixed::<16>(row, keep, n),
            _ => {
                for (k, s) in keep.chunks_exact_mut(m).zip(row.chunks_exact(m)) {
                    keep_group(s, k, n);
                }
            }
        }
        false
    }
}

/// The N:M keep-mask (row-major, `true` = keep) of a row-major `rows x cols` score matrix.
pub fn nm_mask(
    scores: &[f32],
    rows: usize,
    cols: usize,
    n: usize,
    m: usize,
) -> KernelResult<Vec<bool>> {
    check_nm(scores.len(), rows, cols, n, m)?;
    let mut keep = vec![false; scores.len()];
    if scores.is_empty() {
        return Ok(keep);
    }
    // Several rows per task when rows are short.
    let rows_per_task = (4096 / cols).max(1);
    let nan_row = keep
        .par_chunks_mut(cols * rows_per_task)
        .zip(scores.par_chunks(cols * rows_per_task))
        .enumerate()
        .filter_map(|(t, (keep_rows, score_rows))| {
            keep_rows
                .chunks_mut(cols)
                .zip(score_rows.chunks(cols))
                .position(|(k, s)| nm_row(s, k, n, m))
                .map(|r| t * rows_per_task + r)
        })
        .min();
    match nan_row {
        Some(row) => Err(KernelError::NanScore { row }),
        None => Ok(keep),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threshold::tests::Rng;

    fn oracle(scores: &[f32], cols: usize, n: usize, m: usize) -> Vec<bool> {
        let mut keep = vec![false; scores.len()];
        for (g, group) in scores.chunks(m).enumerate() {
            let _ = cols;
            let mut order: Vec<usize> = (0..m).collect();
            // Stable sort, descending score: equal scores stay in position order.
            order.sort_by(|&a, &b| group[b].partial_cmp(&group[a]).unwrap());
            for &j in &order[..n] {
                keep[g * m + j] = true;
            }
        }
        keep
    }

    #[test]
    fn two_four() {
        let s = [1.0f32, 3.0, 2.0, 0.5, 5.0, 5.0, 5.0, -1.0];
        let k = nm_mask(&s, 2, 4, 2, 4).unwrap();
        assert_eq!(k, [false, true, true, false, true, true, false, false]);
        let z = [-0.0f32, 0.0, 0.0, -0.0];
        assert_eq!(
            nm_mask(&z, 1, 4, 1, 4).unwrap(),
            [true, false, false, false]
        );
    }

    #[test]
    fn matches_oracle() {
        let mut rng = Rng(4242);
        for (n, m) in [
            (1, 2),
            (2, 4),
            (3, 4),
            (2, 8),
            (5, 8),
            (7, 16),
            (3, 5),
            (1, 33),
            (20, 40),
        ] {
            for _ in 0..30 {
                let rows = (rng.next() % 4) as usize;
                let cols = m * (rng.next() % 4) as usize;
                let s: Vec<f32> = (0..rows * cols).map(|_| rng.cost()).collect();
                let got = nm_mask(&s, rows, cols, n, m).unwrap();
                assert_eq!(got, oracle(&s, cols, n, m), "{n}:{m}");
                for row in got.chunks(m) {
                    assert_eq!(row.iter().filter(|&&k| k).count(), n);
                }
            }
        }
    }

    #[test]
    fn errors() {
        let s = [1.0f32; 8];
        assert!(matches!(
            nm_mask(&s, 2, 4, 0, 4),
            Err(KernelError::Invalid(_))
        ));
        assert!(matches!(
            nm_mask(&s, 2, 4, 4, 4),
            Err(KernelError::Invalid(_))
        ));
        assert!(matches!(
            nm_mask(&s, 2, 4, 2, 0),
            Err(KernelError::Invalid(_))
        ));
        assert!(matches!(
            nm_mask(&s, 1, 8, 2, 3),
            Err(KernelError::Invalid(_))
        ));
        assert!(matches!(
            nm_mask(&s, 3, 4, 2, 4),
            Err(KernelError::Invalid(_))
        ));
        let mut t = [1.0f32; 12];
        t[9] = f32::NAN;
        t[5] = f32::NAN;
        assert_eq!(
            nm_mask(&t, 3, 4, 2, 4),
            Err(KernelError::NanScore { row: 1 })
        );
        assert_eq!(nm_mask(&[], 0, 4, 2, 4).unwrap(), Vec::<bool>::new());
        assert_eq!(nm_mask(&[], 5, 0, 2, 4).unwrap(), Vec::<bool>::new());
    }
}
