//! Global threshold over many cost arrays, without concatenating them.
//!
//! # Global order
//! Every entry of every array has a place in one global order: by cost ascending, then by array
//! index ascending, then by position ascending. `-0.0` and `0.0` are the same cost (ties between them
//! go by array index and position); `-inf` and `+inf` are ordinary costs; NaN is an error.
//!
//! # Selection rule
//! Every entry of array `i` weighs `weights[i]` (a positive integer, 1 by default). A budget `k`
//! selects the longest prefix of the global order whose total weight is at most `k`. With unit weights
//! that is exactly `min(k, total)` entries. The prefix stops at the first entry that does not fit,
//! even when a later, lighter entry would.
//!
//! # Algorithm
//! Costs are mapped to order-preserving `u32` keys. A weighted histogram of the top 16 bits (one
//! parallel pass) finds the bucket holding the first entry that does not fit; a second pass over the
//! same data histograms the low 16 bits of that bucket, which gives the exact key of that entry; a
//! third pass counts, per array, the entries below that key and at it. Ties at the key are taken array
//! by array, in index order, as far as the budget goes. Memory is a few histograms per thread.

use rayon::prelude::*;

use crate::error::{KernelError, KernelResult};
use crate::simd::multiversion;

/// Number of entries one task handles at a time.
pub const DEFAULT_CHUNK: usize = 1 << 20;

const RADIX_BITS: u32 = 16;
const RADIX: usize = 1 << RADIX_BITS;
const LOW_MASK: u32 = (1 << RADIX_BITS) - 1;

/// Maps a non-NaN `f32` to a `u32` whose unsigned order is the order of the costs.
///
/// `-0.0` maps to the key of `0.0`. NaN maps to some key; callers reject NaN separately.
#[inline(always)]
pub fn order_key(x: f32) -> u32 {
    let x = if x == 0.0 { 0.0 } else { x };
    let bits = x.to_bits();
    let mask = (((bits as i32) >> 31) as u32) | 0x8000_0000;
    bits ^ mask
}

/// Inverse of [`order_key`] (for keys of non-NaN costs; the key of zero gives `+0.0`).
#[inline]
pub fn key_value(key: u32) -> f32 {
    let bits = if key & 0x8000_0000 != 0 {
        key & 0x7FFF_FFFF
    } else {
        !key
    };
    f32::from_bits(bits)
}

/// Where the selected prefix of the global order ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    /// Key of the first entry that does not fit, or `None` when every entry fits.
    pub stop_key: Option<u32>,
    /// Per array: entries with a key below `stop_key` (all entries when `stop_key` is `None`).
    pub below: Vec<u64>,
    /// Per array: entries with key `stop_key` that are selected (the first ones by position).
    pub ties: Vec<u64>,
    /// Cost of the last selected entry; `-inf` when nothing is selected.
    pub threshold: f32,
}

impl Cut {
    /// Selected entries per array.
    pub fn counts(&self) -> Vec<u64> {
        self.below
            .iter()
            .zip(&self.ties)
            .map(|(b, t)| b + t)
            .collect()
    }
}

/// Entries per task, kept between 1 and `2**30` so that per-piece counters fit in `u32`.
pub(crate) fn clamp_chunk(chunk: usize) -> usize {
    chunk.clamp(1, 1 << 30)
}

/// One contiguous piece of one array.
#[derive(Clone, Copy)]
pub(crate) struct Piece<'a> {
    pub array: usize,
    pub data: &'a [f32],
}

pub(crate) fn pieces<'a>(arrays: &[&'a [f32]], chunk: usize) -> Vec<Piece<'a>> {
    let chunk = clamp_chunk(chunk);
    arrays
        .iter()
        .enumerate()
        .flat_map(|(array, data)| data.chunks(chunk).map(move |data| Piece { array, data }))
        .collect()
}

/// Checks the weights (one positive integer per array) and returns them, ones by default.
pub fn check_weights(n_arrays: usize, weights: Option<&[u64]>) -> KernelResult<Vec<u64>> {
    match weights {
        None => Ok(vec![1; n_arrays]),
        Some(w) => {
            if w.len() != n_arrays {
                return Err(KernelError::invalid(format!(
                    "weights has {} entries for {} arrays",
                    w.len(),
                    n_arrays
                )));
            }
            if let Some(i) = w.iter().position(|&x| x == 0) {
                return Err(KernelError::invalid(format!(
                    "weights must be positive integers, weights[{i}] is 0"
                )));
            }
            Ok(w.to_vec())
        }
    }
}

/// Largest total weight accepted (`2**63 - 1`, so that every count and weight fits in an int64).
pub const MAX_TOTAL_WEIGHT: u64 = i64::MAX as u64;

/// Total weight of all entries; an error when it exceeds [`MAX_TOTAL_WEIGHT`].
pub fn total_weight(arrays: &[&[f32]], weights: &[u64]) -> KernelResult<u64> {
    let total: u128 = arrays
        .iter()
        .zip(weights)
        .map(|(a, &w)| a.len() as u128 * w as u128)
        .sum();
    if total > MAX_TOTAL_WEIGHT as u128 {
        return Err(KernelError::invalid(format!(
            "total weight {total} must be below 2**63"
        )));
    }
    Ok(total as u64)
}

fn min_index(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Splits the pieces into a few groups per thread (one histogram per group).
fn groups<'p, 'a>(pieces: &'p [Piece<'a>]) -> rayon::slice::Chunks<'p, Piece<'a>> {
    let tasks = rayon::current_num_threads().max(1) * 4;
    let per = pieces.len().div_ceil(tasks).max(1);
    pieces.par_chunks(per)
}

fn new_hist() -> Box<[u64; RADIX]> {
    // Built on the heap: half a megabyte is too much for a worker thread's stack.
    let hist: Box<[u64]> = vec![0u64; RADIX].into_boxed_slice();
    match hist.try_into() {
        Ok(hist) => hist,
        Err(_) => unreachable!("the histogram has RADIX buckets"),
    }
}

fn add_hist(mut a: Box<[u64; RADIX]>, b: Box<[u64; RADIX]>) -> Box<[u64; RADIX]> {
    for (x, y) in a.iter_mut().zip(b.iter()) {
        *x += y;
    }
    a
}

multiversion! {
    /// Adds `w` to `hist[key >> 16]` for every entry; whether an entry is NaN.
    fn hist_high_piece(data: &[f32], hist: &mut [u64; RADIX], w: u64) -> bool {
        let mut nan = false;
        // Keys of a whole block first (vectorised), then the increments.
        let mut blocks = data.chunks_exact(8);
        for block in &mut blocks {
            let mut buckets = [0u32; 8];
            for (b, &x) in buckets.iter_mut().zip(block) {
                nan |= x.is_nan();
                *b = order_key(x) >> RADIX_BITS;
            }
            for b in buckets {
                hist[b as usize] += w;
            }
        }
        for &x in blocks.remainder() {
            nan |= x.is_nan();
            hist[(order_key(x) >> RADIX_BITS) as usize] += w;
        }
        nan
    }
}

multiversion! {
    /// Adds `w` to `hist[key & 0xFFFF]` for every entry whose key has top bits `high`; returns how
    /// many entries did.
    fn hist_low_piece(data: &[f32], hist: &mut [u64; RADIX], w: u64, high: u32) -> u64 {
        let mut inside = 0u64;
        // Most blocks hold no entry of the bucket: test a block at once (vectorised), then scan.
        let mut blocks = data.chunks_exact(16);
        for block in &mut blocks {
            if block.iter().fold(false, |hit, &x| hit | (order_key(x) >> RADIX_BITS == high)) {
                for &x in block {
                    let key = order_key(x);
                    if key >> RADIX_BITS == high {
                        hist[(key & LOW_MASK) as usize] += w;
                        inside += 1;
                    }
                }
            }
        }
        for &x in blocks.remainder() {
            let key = order_key(x);
            if key >> RADIX_BITS == high {
                hist[(key & LOW_MASK) as usize] += w;
                inside += 1;
            }
        }
        inside
    }
}

multiversion! {
    /// Entries with a key below `stop`, entries at `stop`, the largest key below `stop` (0 when
    /// none: no non-NaN cost has key 0), and whether an entry is NaN.
    fn stats_piece(data: &[f32], stop: u32) -> (u32, u32, u32, bool) {
        let (mut below, mut equal, mut max_below, mut nan) = (0u32, 0u32, 0u32, false);
        for &x in data {
            nan |= x.is_nan();
            let key = order_key(x);
            let less = key < stop;
            below += u32::from(less);
            equal += u32::from(key == stop);
            max_below = max_below.max(if less { key } else { 0 });
        }
        (below, equal, max_below, nan)
    }
}

multiversion! {
    /// The largest key, and whether an entry is NaN.
    fn max_piece(data: &[f32]) -> (u32, bool) {
        let (mut max, mut nan) = (0u32, false);
        for &x in data {
            nan |= x.is_nan();
            max = max.max(order_key(x));
        }
        (max, nan)
    }
}

/// Pass 1: weighted histogram of the top 16 bits of the keys; the lowest array index holding NaN.
fn histogram_high(pieces: &[Piece<'_>], weights: &[u64]) -> (Box<[u64; RADIX]>, Option<usize>) {
    groups(pieces)
        .map(|group| {
            let mut hist = new_hist();
            let mut nan = None;
            for piece in group {
                if hist_high_piece(piece.data, &mut hist, weights[piece.array]) {
                    nan = min_index(nan, Some(piece.array));
                }
            }
            (hist, nan)
        })
        .reduce(
            || (new_hist(), None),
            |(a, na), (b, nb)| (add_hist(a, b), min_index(na, nb)),
        )
}

/// Pass 2: weighted histogram of the low 16 bits of the keys whose top 16 bits are `high`.
fn histogram_low(pieces: &[Piece<'_>], weights: &[u64], high: u32) -> Box<[u64; RADIX]> {
    groups(pieces)
        .map(|group| {
            let mut hist = new_hist();
            for piece in group {
                hist_low_piece(piece.data, &mut hist, weights[piece.array], high);
            }
            hist
        })
        .reduce(new_hist, add_hist)
}

/// First bucket at which the running weight (starting at `start <= k`) goes over `k`, with the
/// weight of the buckets before it.
fn first_over(hist: &[u64], k: u64, start: u64) -> Option<(usize, u64)> {
    let mut cum = start;
    for (bucket, &w) in hist.iter().enumerate() {
        if w > k - cum {
            return Some((bucket, cum));
        }
        cum += w;
    }
    None
}

/// Per-piece statistics of pass 3.
struct PieceStats {
    below: u64,
    equal: u64,
    /// Largest key below the stop key, if any.
    max_below: Option<u32>,
    nan: bool,
}

/// Pass 3: per piece, entries below and at `stop` (`None`: every entry is below).
fn stats_at(pieces: &[Piece<'_>], stop: Option<u32>) -> Vec<PieceStats> {
    pieces
        .par_iter()
        .map(|piece| match stop {
            Some(stop) => {
                let (below, equal, max_below, nan) = stats_piece(piece.data, stop);
                PieceStats {
                    below: u64::from(below),
                    equal: u64::from(equal),
                    max_below: (below > 0).then_some(max_below),
                    nan,
                }
            }
            None => {
                let (max, nan) = max_piece(piece.data);
                PieceStats {
                    below: piece.data.len() as u64,
                    equal: 0,
                    max_below: (!piece.data.is_empty()).then_some(max),
                    nan,
                }
            }
        })
        .collect()
}

/// Finds where the selected prefix ends (see the module docs), using `chunk` entries per task.
pub fn find_cut_chunked(
    arrays: &[&[f32]],
    k: u64,
    weights: Option<&[u64]>,
    chunk: usize,
) -> KernelResult<Cut> {
    let weights = check_weights(arrays.len(), weights)?;
    let total = total_weight(arrays, &weights)?;
    let pieces = pieces(arrays, chunk);

    let stop_key = if total <= k {
        None
    } else {
        let (high_hist, nan) = histogram_high(&pieces, &weights);
        if let Some(array) = nan {
            return Err(KernelError::NanCost { array });
        }
        let (high, before) = first_over(&high_hist[..], k, 0)
            .ok_or_else(|| KernelError::invalid("internal error: histogram lost weight"))?;
        let low_hist = histogram_low(&pieces, &weights, high as u32);
        let (low, _) = first_over(&low_hist[..], k, before)
            .ok_or_else(|| KernelError::invalid("internal error: histogram lost weight"))?;
        Some(((high as u32) << RADIX_BITS) | low as u32)
    };
    let stats = stats_at(&pieces, stop_key);
    let n = arrays.len();
    let mut below = vec![0u64; n];
    let mut equal = vec![0u64; n];
    let mut max_below: Option<u32> = None;
    let mut nan = None;
    for (piece, s) in pieces.iter().zip(&stats) {
        below[piece.array] += s.below;
        equal[piece.array] += s.equal;
        max_below = max_below.max(s.max_below);
        if s.nan {
            nan = min_index(nan, Some(piece.array));
        }
    }
    if let Some(array) = nan {
        return Err(KernelError::NanCost { array });
    }

    // Ties at the stop key, array by array, as long as the budget lasts.
    let used: u128 = below
        .iter()
        .zip(&weights)
        .map(|(&b, &w)| b as u128 * w as u128)
        .sum();
    let mut left = (k as u128).saturating_sub(used);
    let mut ties = vec![0u64; n];
    if stop_key.is_some() {
        for i in 0..n {
            let w = weights[i] as u128;
            let take = (equal[i] as u128).min(left / w);
            ties[i] = take as u64;
            left -= take * w;
            if (take as u64) < equal[i] {
                break;
            }
        }
    }

    let threshold = match (stop_key, max_below) {
        (Some(key), _) if ties.iter().any(|&t| t > 0) => key_value(key),
        (_, Some(key)) => key_value(key),
        (_, None) => f32::NEG_INFINITY,
    };
    Ok(Cut {
        stop_key,
        below,
        ties,
        threshold,
    })
}

/// Finds where the selected prefix ends (see the module docs).
pub fn find_cut(arrays: &[&[f32]], k: u64, weights: Option<&[u64]>) -> KernelResult<Cut> {
    find_cut_chunked(arrays, k, weights, DEFAULT_CHUNK)
}

/// The global threshold: `(threshold, counts)`.
///
/// `counts[i]` is how many entries of array `i` are selected; `threshold` is the cost of the last
/// selected entry in the global order, or `-inf` when nothing is selected (`counts` tells that case
/// apart from a prefix of `-inf` costs).
pub fn global_threshold(
    arrays: &[&[f32]],
    k: u64,
    weights: Option<&[u64]>,
) -> KernelResult<(f32, Vec<u64>)> {
    let cut = find_cut(arrays, k, weights)?;
    Ok((cut.threshold, cut.counts()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Slow oracle: sort (cost, array, position) and walk the weighted prefix.
    pub(crate) fn oracle(arrays: &[&[f32]], k: u64, weights: &[u64]) -> (f32, Vec<u64>) {
        let mut all: Vec<(u32, usize, usize)> = Vec::new();
        for (i, a) in arrays.iter().enumerate() {
            for (p, &x) in a.iter().enumerate() {
                all.push((order_key(x), i, p));
            }
        }
        all.sort();
        let mut counts = vec![0u64; arrays.len()];
        let mut used = 0u64;
        let mut threshold = f32::NEG_INFINITY;
        for (key, i, _) in all {
            if used + weights[i] > k {
                break;
            }
            used += weights[i];
            counts[i] += 1;
            threshold = key_value(key);
        }
        (threshold, counts)
    }

    /// Small deterministic generator (xorshift), so the tests need no extra crate.
    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn cost(&mut self) -> f32 {
            const POOL: [f32; 12] = [
                f32::NEG_INFINITY,
                -1.0,
                -0.0,
                0.0,
                1e-45,
                1.0,
                1.0,
                2.5,
                f32::MAX,
                f32::MIN,
                f32::INFINITY,
                f32::MIN_POSITIVE,
            ];
            if self.next() % 2 == 0 {
                POOL[(self.next() % POOL.len() as u64) as usize]
            } else {
                f32::from_bits(self.next() as u32 & 0xBFFF_FFFF) // never NaN: exponent < 255
            }
        }
    }

    #[test]
    fn keys_preserve_order() {
        let xs = [
            f32::NEG_INFINITY,
            f32::MIN,
            -1.0,
            -1e-45,
            0.0,
            1e-45,
            f32::MIN_POSITIVE,
            1.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{} < {}", w[0], w[1]);
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
        for &x in &xs {
            assert_eq!(key_value(order_key(x)).to_bits(), x.to_bits());
        }
    }

    #[test]
    fn matches_oracle_on_random_inputs() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..400 {
            let n_arrays = (rng.next() % 5) as usize;
            let arrays: Vec<Vec<f32>> = (0..n_arrays)
                .map(|_| {
                    let len = (rng.next() % 40) as usize;
                    (0..len).map(|_| rng.cost()).collect()
                })
                .collect();
            let views: Vec<&[f32]> = arrays.iter().map(|a| a.as_slice()).collect();
            let weights: Vec<u64> = (0..n_arrays).map(|_| 1 + rng.next() % 4).collect();
            let total: u64 = arrays
                .iter()
                .zip(&weights)
                .map(|(a, w)| a.len() as u64 * w)
                .sum();
            let k = rng.next() % (total + 3);
            for chunk in [1, 3, DEFAULT_CHUNK] {
                let cut = find_cut_chunked(&views, k, Some(&weights), chunk).unwrap();
                let (t, c) = oracle(&views, k, &weights);
                assert_eq!(cut.counts(), c, "case {case} chunk {chunk}");
                assert_eq!(cut.threshold.to_bits(), t.to_bits(), "case {case}");
            }
        }
    }

    #[test]
    fn unit_weights_select_min_k_total() {
        let a = [3.0f32, 1.0, 2.0];
        let b = [1.0f32, 0.5];
        let arrays: Vec<&[f32]> = vec![&a, &b];
        assert_eq!(
            global_threshold(&arrays, 0, None).unwrap(),
            (f32::NEG_INFINITY, vec![0, 0])
        );
        assert_eq!(
            global_threshold(&arrays, 1, None).unwrap(),
            (0.5, vec![0, 1])
        );
        // The tie at 1.0 goes to the lower array index first.
        assert_eq!(
            global_threshold(&arrays, 2, None).unwrap(),
            (1.0, vec![1, 1])
        );
        assert_eq!(
            global_threshold(&arrays, 3, None).unwrap(),
            (1.0, vec![1, 2])
        );
        assert_eq!(
            global_threshold(&arrays, 99, None).unwrap(),
            (3.0, vec![3, 2])
        );
        assert_eq!(
            global_threshold(&arrays, u64::MAX, None).unwrap(),
            (3.0, vec![3, 2])
        );
    }

    #[test]
    fn prefix_stops_at_first_entry_that_does_not_fit() {
        let a = [1.0f32];
        let b = [2.0f32];
        let arrays: Vec<&[f32]> = vec![&a, &b];
        // a weighs 5, b weighs 1: with k = 4 the first entry (a) does not fit, so nothing is selected.
        let (t, c) = global_threshold(&arrays, 4, Some(&[5, 1])).unwrap();
        assert_eq!(c, vec![0, 0]);
        assert_eq!(t, f32::NEG_INFINITY);
        let (t, c) = global_threshold(&arrays, 6, Some(&[5, 1])).unwrap();
        assert_eq!((t, c), (2.0, vec![1, 1]));
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(
            global_threshold(&[], 5, None).unwrap(),
            (f32::NEG_INFINITY, vec![])
        );
        let e: [f32; 0] = [];
        let arrays: Vec<&[f32]> = vec![&e, &e];
        assert_eq!(
            global_threshold(&arrays, 0, None).unwrap(),
            (f32::NEG_INFINITY, vec![0, 0])
        );
    }

    #[test]
    fn errors() {
        let a = [1.0f32, f32::NAN];
        let b = [f32::NAN];
        let ok = [1.0f32];
        let arrays: Vec<&[f32]> = vec![&ok, &a, &b];
        for k in [0, 1, 100] {
            assert_eq!(
                global_threshold(&arrays, k, None),
                Err(KernelError::NanCost { array: 1 })
            );
        }
        let arrays: Vec<&[f32]> = vec![&ok];
        assert!(matches!(
            global_threshold(&arrays, 1, Some(&[0])),
            Err(KernelError::Invalid(_))
        ));
        assert!(matches!(
            global_threshold(&arrays, 1, Some(&[1, 2])),
            Err(KernelError::Invalid(_))
        ));
        assert!(matches!(
            global_threshold(&arrays, 1, Some(&[MAX_TOTAL_WEIGHT])),
            Ok((_, _))
        ));
        assert!(matches!(
            global_threshold(&arrays, 1, Some(&[MAX_TOTAL_WEIGHT + 1])),
            Err(KernelError::Invalid(_))
        ));
        let arrays: Vec<&[f32]> = vec![&ok, &ok];
        assert!(matches!(
            global_threshold(&arrays, 1, Some(&[u64::MAX, u64::MAX])),
            Err(KernelError::Invalid(_))
        ));
    }
}
