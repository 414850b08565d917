//! Native kernels of `surgeon`: global thresholds and ranking over many host-side cost arrays,
//! N:M selection, and pruning-schedule bookkeeping.
//!
//! The algorithms live in plain Rust modules ([`threshold`], [`ranking`], [`nm`], [`schedule`]);
//! this file only converts NumPy arrays (zero-copy), releases the GIL while the work runs, and turns
//! errors into Python `ValueError`s. Python code should call these through `surgeon._backend`,
//! which validates arguments, accepts torch tensors and falls back to the torch twins in
//! `surgeon.kernels`.

pub mod error;
pub mod nm;
pub mod ranking;
pub mod schedule;
mod simd;
pub mod threshold;

use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::error::KernelError;

fn value_error(err: KernelError, names: Option<&[String]>) -> PyErr {
    PyValueError::new_err(err.message(names))
}

fn check_names(names: Option<&[String]>, n_arrays: usize) -> PyResult<()> {
    match names {
        Some(n) if n.len() != n_arrays => Err(PyValueError::new_err(format!(
            "names has {} entries for {} arrays",
            n.len(),
            n_arrays
        ))),
        _ => Ok(()),
    }
}

/// Borrows every array as a contiguous slice (no copy).
fn slices<'a>(arrays: &'a [PyReadonlyArray1<'_, f32>]) -> PyResult<Vec<&'a [f32]>> {
    arrays
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.as_slice()
                .map_err(|_| PyValueError::new_err(format!("cost array {i} is not contiguous")))
        })
        .collect()
}

/// Selects the longest prefix of the global order (cost, then array index, then position) whose
/// total weight is at most ``k``; every entry of ``arrays[i]`` weighs ``weights[i]`` (1 by default).
/// Returns ``(threshold, counts)``: the cost of the last selected entry (``-inf`` when nothing is
/// selected) and the number of selected entries per array. ``-0.0`` equals ``0.0``; NaN is an error
/// naming the array (and ``names[i]`` when given).
#[pyfunction]
#[pyo3(signature = (arrays, k, weights=None, names=None))]
fn global_threshold(
    py: Python<'_>,
    arrays: Vec<PyReadonlyArray1<'_, f32>>,
    k: u64,
    weights: Option<Vec<u64>>,
    names: Option<Vec<String>>,
) -> PyResult<(f32, Vec<u64>)> {
    check_names(names.as_deref(), arrays.len())?;
    let views = slices(&arrays)?;
    py.detach(|| threshold::global_threshold(&views, k, weights.as_deref()))
        .map_err(|e| value_error(e, names.as_deref()))
}

/// Positions selected in each array by the rule of ``global_threshold``, as one int64 array per
/// input array, in ascending position order.
#[pyfunction]
#[pyo3(signature = (arrays, k, weights=None, names=None))]
fn select_smallest<'py>(
    py: Python<'py>,
    arrays: Vec<PyReadonlyArray1<'py, f32>>,
    k: u64,
    weights: Option<Vec<u64>>,
    names: Option<Vec<String>>,
) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
    check_names(names.as_deref(), arrays.len())?;
    let views = slices(&arrays)?;
    let selected = py
        .detach(|| ranking::select_smallest(&views, k, weights.as_deref()))
        .map_err(|e| value_error(e, names.as_deref()))?;
    Ok(selected
        .into_iter()
        .map(|v| PyArray1::from_vec(py, v))
        .collect())
}

/// Positions of the ``min(k, len(costs))`` cheapest entries of ``costs``, ordered by cost and then
/// by position (int64).
#[pyfunction]
fn rank<'py>(
    py: Python<'py>,
    costs: PyReadonlyArray1<'py, f32>,
    k: u64,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let view = costs
        .as_slice()
        .map_err(|_| PyValueError::new_err("costs are not contiguous"))?;
    let order = py
        .detach(|| ranking::rank(view, k))
        .map_err(|e| value_error(e, None))?;
    Ok(PyArray1::from_vec(py, order))
}

/// Keep-mask (bool, ``True`` = keep) of a 2-D float32 score matrix: in every group of ``m``
/// consecutive entries of a row, the ``n`` highest scores are kept; ties keep the lower position.
#[pyfunction]
fn nm_mask<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    n: usize,
    m: usize,
) -> PyResult<Bound<'py, PyArray2<bool>>> {
    let shape = scores.shape();
    let (rows, cols) = (shape[0], shape[1]);
    let view = scores
        .as_slice()
        .map_err(|_| PyValueError::new_err("scores are not C-contiguous"))?;
    let keep = py
        .detach(|| nm::nm_mask(view, rows, cols, n, m))
        .map_err(|e| value_error(e, None))?;
    let keep = Array2::from_shape_vec((rows, cols), keep)
        .map_err(|e| PyValueError::new_err(format!("N:M mask has the wrong shape: {e}")))?;
    Ok(keep.into_pyarray(py))
}

/// Target sparsity after each shot: ``linear`` (``s_t = f*t/T``), ``cubic``
/// (``s_t = f*(1-(1-t/T)**3)``) or ``exponential`` (``s_t = 1-(1-f)**(t/T)``); non-decreasing,
/// exactly ``final_sparsity`` at the last shot. ``0 <= final_sparsity < 1``, ``1 <= shots <= 1e6``.
#[pyfunction]
#[pyo3(name = "schedule")]
fn schedule_targets(final_sparsity: f64, shots: u64, kind: &str) -> PyResult<Vec<f64>> {
    let kind = schedule::Kind::parse(kind).map_err(|e| value_error(e, None))?;
    schedule::schedule(final_sparsity, shots, kind).map_err(|e| value_error(e, None))
}

/// Units of ``total`` removed after each shot (int64): ``floor(s_t*total + 1e-9)`` capped at the
/// final count ``floor(final_sparsity*total + 1e-9)``, non-decreasing, exactly the final count at
/// the last shot.
#[pyfunction]
fn cumulative_counts<'py>(
    py: Python<'py>,
    total: u64,
    final_sparsity: f64,
    shots: u64,
    kind: &str,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let kind = schedule::Kind::parse(kind).map_err(|e| value_error(e, None))?;
    let counts = schedule::cumulative_counts(total, final_sparsity, shots, kind)
        .map_err(|e| value_error(e, None))?;
    let counts: Vec<i64> = counts
        .into_iter()
        .map(i64::try_from)
        .collect::<Result<_, _>>()
        .map_err(|_| PyValueError::new_err("total does not fit in int64"))?;
    Ok(PyArray1::from_vec(py, counts))
}

/// Units to remove in shot ``shot`` (0-based) given ``removed_so_far``: the shot's cumulative
/// count minus what is already removed, never negative.
#[pyfunction]
fn next_count(
    removed_so_far: u64,
    shot: u64,
    total: u64,
    final_sparsity: f64,
    shots: u64,
    kind: &str,
) -> PyResult<u64> {
    let kind = schedule::Kind::parse(kind).map_err(|e| value_error(e, None))?;
    schedule::next_count(removed_so_far, shot, total, final_sparsity, shots, kind)
        .map_err(|e| value_error(e, None))
}

/// Native kernels of surgeon (global threshold, ranking, N:M selection, schedules).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(global_threshold, m)?)?;
    m.add_function(wrap_pyfunction!(select_smallest, m)?)?;
    m.add_function(wrap_pyfunction!(rank, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask, m)?)?;
    m.add_function(wrap_pyfunction!(schedule_targets, m)?)?;
    m.add_function(wrap_pyfunction!(cumulative_counts, m)?)?;
    m.add_function(wrap_pyfunction!(next_count, m)?)?;
    Ok(())
}
