//! Positions of the selected entries, and ranking of one array, in the global order of
//! [`crate::threshold`].

use rayon::prelude::*;

use crate::error::KernelResult;
use crate::simd::multiversion;
use crate::threshold::{clamp_chunk, find_cut_chunked, order_key, DEFAULT_CHUNK};

multiversion! {
    /// Entries of `data` with a key below `stop`, and with key `stop`.
    fn count_piece(data: &[f32], stop: u32) -> (u64, u64) {
        let (mut below, mut equal) = (0u32, 0u32);
        for &x in data {
            let key = order_key(x);
            below += u32::from(key < stop);
            equal += u32::from(key == stop);
        }
        (u64::from(below), u64::from(equal))
    }
}

multiversion! {
    /// Writes into `out` (exactly as long as the selection) the positions `base + j` of the
    /// entries with a key below `stop` and of the first `budget` entries with key `stop`.
    fn fill_piece(data: &[f32], base: i64, stop: u32, budget: u64, out: &mut [i64]) -> usize {
        // Branch-free compaction: write every position, advance only past selected ones.
        let mut left = budget;
        let mut n = 0usize;
        for (j, &x) in data.iter().enumerate() {
            let key = order_key(x);
            let tie = key == stop && left > 0;
            let take = key < stop || tie;
            if let Some(slot) = out.get_mut(n) {
                *slot = base + j as i64;
            }
            n += usize::from(take);
            left -= u64::from(tie);
        }
        n
    }
}

/// Positions (ascending) in `data` of the entries with a key below `stop`, plus the first `ties`
/// entries (by position) whose key equals `stop`; every position when `stop` is `None`.
fn positions(data: &[f32], stop: Option<u32>, ties: u64, chunk: usize) -> Vec<i64> {
    let Some(stop) = stop else {
        return (0..data.len() as i64).collect();
    };
    let chunk = clamp_chunk(chunk);
    let counts: Vec<(u64, u64)> = data
        .par_chunks(chunk)
        .map(|c| count_piece(c, stop))
        .collect();
    // Each chunk takes the next tied entries while any of the `ties` are left (position order).
    let mut left = ties;
    let plan: Vec<(u64, usize)> = counts
        .iter()
        .map(|&(below, equal)| {
            let take = equal.min(left);
            left -= take;
            (take, (below + take) as usize)
        })
        .collect();
    let total: usize = plan.iter().map(|&(_, len)| len).sum();
    let mut out = vec![0i64; total];
    let mut slots: Vec<&mut [i64]> = Vec::with_capacity(plan.len());
    let mut rest: &mut [i64] = &mut out;
    for &(_, len) in &plan {
        let (head, tail) = rest.split_at_mut(len);
        slots.push(head);
        rest = tail;
    }
    data.par_chunks(chunk)
        .zip(plan.par_iter())
        .zip(slots.into_par_iter())
        .enumerate()
        .for_each(|(c, ((values, &(budget, _)), slot))| {
            fill_piece(values, (c * chunk) as i64, stop, budget, slot);
        });
    out
}

/// Like [`select_smallest`], with `chunk` entries per task.
pub fn select_smallest_chunked(
    arrays: &[&[f32]],
    k: u64,
    weights: Option<&[u64]>,
    chunk: usize,
) -> KernelResult<Vec<Vec<i64>>> {
    let cut = find_cut_chunked(arrays, k, weights, chunk)?;
    let stop = cut.stop_key;
    Ok(arrays
        .par_iter()
        .zip(cut.ties.par_iter())
        .map(|(data, &ties)| positions(data, stop, ties, chunk))
        .collect())
}

/// Positions selected in each array by the rule of [`crate::threshold::global_threshold`]
/// (same `k`, same weights), each list in ascending position order.
pub fn select_smallest(
    arrays: &[&[f32]],
    k: u64,
    weights: Option<&[u64]>,
) -> KernelResult<Vec<Vec<i64>>> {
    select_smallest_chunked(arrays, k, weights, DEFAULT_CHUNK)
}

/// Positions of the `min(k, len)` cheapest entries of `costs`, ordered by (cost, position).
pub fn rank(costs: &[f32], k: u64) -> KernelResult<Vec<i64>> {
    rank_chunked(costs, k, DEFAULT_CHUNK)
}

/// Like [`rank`], with `chunk` entries per task.
pub fn rank_chunked(costs: &[f32], k: u64, chunk: usize) -> KernelResult<Vec<i64>> {
    let selected = select_smallest_chunked(&[costs], k, None, chunk)?;
    let positions = selected.into_iter().next().unwrap_or_default();
    let mut keyed: Vec<(u32, i64)> = positions
        .par_iter()
        .map(|&p| (order_key(costs[p as usize]), p))
        .collect();
    keyed.par_sort_unstable();
    Ok(keyed.into_iter().map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::KernelError;
    use crate::threshold::tests::Rng;

    /// Slow oracle: every (cost, array, position) sorted, the weighted prefix walked.
    fn oracle(arrays: &[&[f32]], k: u64, weights: &[u64]) -> Vec<Vec<i64>> {
        let mut all: Vec<(u32, usize, usize)> = Vec::new();
        for (i, a) in arrays.iter().enumerate() {
            for (p, &x) in a.iter().enumerate() {
                all.push((order_key(x), i, p));
            }
        }
        all.sort();
        let mut out = vec![Vec::new(); arrays.len()];
        let mut used = 0u64;
        for (_, i, p) in all {
            if used + weights[i] > k {
                break;
            }
            used += weights[i];
            out[i].push(p as i64);
        }
        for o in &mut out {
            o.sort();
        }
        out
    }

    #[test]
    fn select_matches_oracle() {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        for case in 0..300 {
            let n_arrays = (rng.next() % 5) as usize;
            let arrays: Vec<Vec<f32>> = (0..n_arrays)
                .map(|_| (0..rng.next() % 30).map(|_| rng.cost()).collect())
                .collect();
            let views: Vec<&[f32]> = arrays.iter().map(|a| a.as_slice()).collect();
            let weights: Vec<u64> = (0..n_arrays).map(|_| 1 + rng.next() % 3).collect();
            let total: u64 = arrays
                .iter()
                .zip(&weights)
                .map(|(a, w)| a.len() as u64 * w)
                .sum();
            let k = rng.next() % (total + 2);
            let want = oracle(&views, k, &weights);
            for chunk in [1, 2, 7, DEFAULT_CHUNK] {
                let got = select_smallest_chunked(&views, k, Some(&weights), chunk).unwrap();
                assert_eq!(got, want, "case {case} chunk {chunk}");
            }
        }
    }

    #[test]
    fn rank_orders_by_cost_then_position() {
        let costs = [
            2.0f32,
            -0.0,
            1.0,
            0.0,
            1.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ];
        assert_eq!(rank(&costs, 0).unwrap(), Vec::<i64>::new());
        assert_eq!(rank(&costs, 4).unwrap(), vec![5, 1, 3, 2]);
        assert_eq!(rank(&costs, 5).unwrap(), vec![5, 1, 3, 2, 4]);
        assert_eq!(rank(&costs, 100).unwrap(), vec![5, 1, 3, 2, 4, 0, 6]);
        for chunk in [1, 2, 3] {
            assert_eq!(rank_chunked(&costs, 5, chunk).unwrap(), vec![5, 1, 3, 2, 4]);
        }
        assert_eq!(rank(&[], 3).unwrap(), Vec::<i64>::new());
        assert_eq!(
            rank(&[1.0, f32::NAN], 1),
            Err(KernelError::NanCost { array: 0 })
        );
    }

    #[test]
    fn rank_matches_sort() {
        let mut rng = Rng(77);
        for _ in 0..200 {
            let costs: Vec<f32> = (0..rng.next() % 50).map(|_| rng.cost()).collect();
            let k = rng.next() % (costs.len() as u64 + 2);
            let mut order: Vec<usize> = (0..costs.len()).collect();
            order.sort_by_key(|&p| (order_key(costs[p]), p));
            let want: Vec<i64> = order.iter().take(k as usize).map(|&p| p as i64).collect();
            assert_eq!(rank_chunked(&costs, k, 4).unwrap(), want);
        }
    }
}
