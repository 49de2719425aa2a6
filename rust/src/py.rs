//! PyO3 glue: the private `dpo_fast._native` module. Validation, docs and the public API live in Python.
//!
//! Options arrive already validated by `dpo_fast.packing.PackOptions` (the one place they are checked,
//! with the wording users see), as plain values. The core re-checks its own invariants (it is a Rust API
//! too); a failure there is reported as an internal error, never reworded for users. No panic and no
//! allocation failure crosses into the interpreter: the core allocates its outputs fallibly
//! (`PackErrorKind::OutOfMemory` -> MemoryError) and every call into it runs under `catch_unwind`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::pack::{self, Mode, PackErrorKind, PackOptions, Ragged, TokenId, Truncation};

/// (values, offsets) or (items, bin_starts): two int64 numpy arrays.
type ArrayPair<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);

/// Build facts of the native module: crate version and the Python ABI it targets.
#[pyfunction]
fn build_info() -> (String, String) {
    (crate::VERSION.to_string(), "abi3-py310".to_string())
}

fn pack_err(e: pack::PackError) -> PyErr {
    match e.kind {
        PackErrorKind::Invalid => PyValueError::new_err(e.message),
        PackErrorKind::OutOfMemory { .. } => PyMemoryError::new_err(e.message),
    }
}

/// Run `f`, turning a panic (a bug) into a Python RuntimeError instead of unwinding into the interpreter.
fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> PyResult<R> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        PyRuntimeError::new_err(format!("dpo_fast internal error in the native {what} (please report it): {msg}"))
    })
}

/// Borrow a C-contiguous 1-D numpy array as a slice (the Python front makes them contiguous).
fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, arg: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{arg} must be a C-contiguous 1-D array")))
}

fn to_dict<'py>(py: Python<'py>, b: pack::PackedBatch) -> PyResult<Bound<'py, PyDict>> {
    // Every Vec is handed to numpy as the array's buffer: no copy.
    let shape = (b.num_rows, b.row_len);
    let two_d = |v: Vec<i32>| Array2::from_shape_vec(shape, v).map(|a| a.into_pyarray(py));
    let shape_err = |_| PyValueError::new_err("internal error: output shape mismatch");
    let d = PyDict::new(py);
    d.set_item("input_ids", two_d(b.input_ids).map_err(shape_err)?)?;
    d.set_item("labels", two_d(b.labels).map_err(shape_err)?)?;
    d.set_item("position_ids", two_d(b.position_ids).map_err(shape_err)?)?;
    d.set_item(
        "attention_mask",
        Array2::from_shape_vec(shape, b.attention_mask).map_err(shape_err)?.into_pyarray(py),
    )?;
    d.set_item("cu_seqlens", b.cu_seqlens.into_pyarray(py))?;
    let n_pairs = b.example_index.len();
    d.set_item("pairs", Array2::from_shape_vec((n_pairs, 2), b.pairs).map_err(shape_err)?.into_pyarray(py))?;
    d.set_item("example_index", b.example_index.into_pyarray(py))?;
    d.set_item("seq_lens", b.seq_lens.into_pyarray(py))?;
    d.set_item("completion_lens", b.completion_lens.into_pyarray(py))?;
    d.set_item("max_seqlen", b.max_seqlen)?;
    d.set_item("num_truncated", b.num_truncated)?;
    Ok(d)
}

#[allow(clippy::too_many_arguments)]
fn pack_typed<'py, T: TokenId + numpy::Element>(
    py: Python<'py>,
    values: [&Bound<'py, PyAny>; 3],
    offsets: [PyReadonlyArray1<'py, i64>; 3],
    opts: &PackOptions,
) -> PyResult<Bound<'py, PyDict>> {
    const ARGS: [&str; 3] = ["prompt_ids", "chosen_ids", "rejected_ids"];
    let mut vals = Vec::with_capacity(3);
    for (v, arg) in values.iter().zip(ARGS) {
        vals.push(v.extract::<PyReadonlyArray1<'py, T>>().map_err(|_| {
            PyTypeError::new_err(format!("{arg} values must be a 1-D numpy array of one integer dtype shared by all three inputs"))
        })?);
    }
    let v: Vec<&[T]> = vals.iter().zip(ARGS).map(|(a, arg)| slice(a, arg)).collect::<PyResult<_>>()?;
    let o: Vec<&[i64]> = offsets.iter().zip(ARGS).map(|(a, arg)| slice(a, arg)).collect::<PyResult<_>>()?;
    // The slices borrow numpy buffers that the readonly borrows keep alive and unaliased; nothing in
    // the closure touches a Python object, so the GIL can go.
    let result = py.detach(|| {
        no_panic("packer", || {
            pack::pack(Ragged::new(v[0], o[0]), Ragged::new(v[1], o[1]), Ragged::new(v[2], o[2]), opts)
        })
    })?;
    to_dict(py, result.map_err(pack_err)?)
}

/// The packing options from `PackOptions.native()`'s plain values (validated in Python already: a bad
/// mode or truncation name here is an internal error).
fn native_options(
    max_tokens: usize,
    mode: &str,
    pad_token_id: i64,
    truncation: &str,
    pad_to_multiple_of: Option<usize>,
    vocab_size: Option<i64>,
) -> PyResult<PackOptions> {
    let internal = |e: pack::PackError| PyValueError::new_err(format!("internal error: unvalidated option: {e}"));
    Ok(PackOptions {
        max_tokens,
        mode: Mode::parse(mode).map_err(internal)?,
        pad_token_id,
        truncation: Truncation::parse(truncation).map_err(internal)?,
        pad_to_multiple_of,
        vocab_size,
    })
}

/// Pack flat (values, offsets) inputs. `values` are 1-D int32 or int64 arrays (all three the same
/// dtype), `offsets` 1-D int64 arrays of P + 1 entries. The options are `PackOptions.native()`: already
/// validated. Returns a dict of numpy arrays (see `dpo_fast.packing.PackedBatch`). Raises ValueError on
/// bad data, MemoryError when an output buffer cannot be allocated.
#[pyfunction]
#[pyo3(signature = (
    prompt_values, prompt_offsets, chosen_values, chosen_offsets, rejected_values, rejected_offsets,
    *, max_tokens, mode, pad_token_id, truncation, pad_to_multiple_of, vocab_size
))]
#[allow(clippy::too_many_arguments)]
fn pack_flat<'py>(
    py: Python<'py>,
    prompt_values: &Bound<'py, PyAny>,
    prompt_offsets: PyReadonlyArray1<'py, i64>,
    chosen_values: &Bound<'py, PyAny>,
    chosen_offsets: PyReadonlyArray1<'py, i64>,
    rejected_values: &Bound<'py, PyAny>,
    rejected_offsets: PyReadonlyArray1<'py, i64>,
    max_tokens: usize,
    mode: &str,
    pad_token_id: i64,
    truncation: &str,
    pad_to_multiple_of: Option<usize>,
    vocab_size: Option<i64>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = native_options(max_tokens, mode, pad_token_id, truncation, pad_to_multiple_of, vocab_size)?;
    let values = [prompt_values, chosen_values, rejected_values];
    let offsets = [prompt_offsets, chosen_offsets, rejected_offsets];
    let is_i32 = prompt_values.cast::<PyArray1<i32>>().is_ok();
    if is_i32 {
        pack_typed::<i32>(py, values, offsets, &opts)
    } else {
        pack_typed::<i64>(py, values, offsets, &opts)
    }
}

fn seqs_to_dict<'py>(py: Python<'py>, b: pack::PackedSequences) -> PyResult<Bound<'py, PyDict>> {
    // Every Vec is handed to numpy as the array's buffer: no copy.
    let shape = (b.num_rows, b.row_len);
    let shape_err = |_| PyValueError::new_err("internal error: output shape mismatch");
    let d = PyDict::new(py);
    d.set_item("input_ids", Array2::from_shape_vec(shape, b.input_ids).map_err(shape_err)?.into_pyarray(py))?;
    d.set_item("position_ids", Array2::from_shape_vec(shape, b.position_ids).map_err(shape_err)?.into_pyarray(py))?;
    d.set_item(
        "attention_mask",
        Array2::from_shape_vec(shape, b.attention_mask).map_err(shape_err)?.into_pyarray(py),
    )?;
    d.set_item("cu_seqlens", b.cu_seqlens.into_pyarray(py))?;
    d.set_item("example_index", b.example_index.into_pyarray(py))?;
    d.set_item("seq_lens", b.seq_lens.into_pyarray(py))?;
    d.set_item("max_seqlen", b.max_seqlen)?;
    d.set_item("num_truncated", b.num_truncated)?;
    Ok(d)
}

fn pack_sequences_typed<'py, T: TokenId + numpy::Element>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    offsets: PyReadonlyArray1<'py, i64>,
    opts: &PackOptions,
) -> PyResult<Bound<'py, PyDict>> {
    let vals = values.extract::<PyReadonlyArray1<'py, T>>().map_err(|_| {
        PyTypeError::new_err("sequences values must be a 1-D int32 or int64 numpy array")
    })?;
    let v = slice(&vals, "sequences values")?;
    let o = slice(&offsets, "sequences offsets")?;
    // As in pack_typed: the slices borrow numpy buffers kept alive by the readonly borrows; the closure
    // touches no Python object, so the GIL can go.
    let result = py.detach(|| no_panic("sequence packer", || pack::pack_sequences(Ragged::new(v, o), opts)))?;
    seqs_to_dict(py, result.map_err(pack_err)?)
}

/// Pack single sequences given flat: `values` 1-D int32 or int64, `offsets` 1-D int64 of S + 1
/// entries. The options are `PackOptions.native()`: already validated. Returns a dict of numpy arrays
/// (see `dpo_fast.packing.PackedSequences`). Raises ValueError on bad data, MemoryError when an output
/// buffer cannot be allocated.
#[pyfunction]
#[pyo3(signature = (values, offsets, *, max_tokens, mode, pad_token_id, truncation, pad_to_multiple_of, vocab_size))]
#[allow(clippy::too_many_arguments)]
fn pack_sequences_flat<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    offsets: PyReadonlyArray1<'py, i64>,
    max_tokens: usize,
    mode: &str,
    pad_token_id: i64,
    truncation: &str,
    pad_to_multiple_of: Option<usize>,
    vocab_size: Option<i64>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = native_options(max_tokens, mode, pad_token_id, truncation, pad_to_multiple_of, vocab_size)?;
    if values.cast::<PyArray1<i32>>().is_ok() {
        pack_sequences_typed::<i32>(py, values, offsets, &opts)
    } else {
        pack_sequences_typed::<i64>(py, values, offsets, &opts)
    }
}

fn int_at(item: &Bound<'_, PyAny>, arg: &str, i: usize, j: usize) -> PyResult<i64> {
    item.extract::<i64>().map_err(|_| {
        let ty = item.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("{arg}[{i}][{j}] must be an int token id, got {ty}"))
    })
}

/// Flatten a list/tuple of sequences of Python ints into (values int64, offsets int64), the layout
/// `pack_flat` takes. One pass, holding the GIL (it reads Python objects); measured faster than
/// `numpy.fromiter(itertools.chain(...))` (see benches/bench_packing.py).
#[pyfunction]
fn flatten_int_seqs<'py>(
    py: Python<'py>,
    seqs: &Bound<'py, PyAny>,
    arg: &str,
) -> PyResult<ArrayPair<'py>> {
    let outer: Vec<Bound<'py, PyAny>> = if let Ok(l) = seqs.cast::<PyList>() {
        l.iter().collect()
    } else if let Ok(t) = seqs.cast::<PyTuple>() {
        t.iter().collect()
    } else {
        return Err(PyTypeError::new_err(format!(
            "{arg} must be a list of token-id sequences, got {}",
            seqs.get_type().name()?
        )));
    };
    let mut values: Vec<i64> = Vec::new();
    let mut offsets: Vec<i64> = Vec::with_capacity(outer.len() + 1);
    offsets.push(0);
    for (i, s) in outer.iter().enumerate() {
        if let Ok(l) = s.cast::<PyList>() {
            values.reserve(l.len());
            for (j, x) in l.iter().enumerate() {
                values.push(int_at(&x, arg, i, j)?);
            }
        } else if let Ok(t) = s.cast::<PyTuple>() {
            for (j, x) in t.iter().enumerate() {
                values.push(int_at(&x, arg, i, j)?);
            }
        } else if s.is_instance_of::<PyString>() || s.is_instance_of::<PyBytes>() {
            return Err(PyTypeError::new_err(format!(
                "{arg}[{i}] must be a sequence of int token ids, got {}",
                s.get_type().name()?
            )));
        } else {
            let it = s.try_iter().map_err(|_| {
                let ty = s.get_type().name().map(|n| n.to_string()).unwrap_or_default();
                PyTypeError::new_err(format!("{arg}[{i}] must be a sequence of int token ids, got {ty}"))
            })?;
            for (j, x) in it.enumerate() {
                values.push(int_at(&x?, arg, i, j)?);
            }
        }
        offsets.push(values.len() as i64);
    }
    Ok((values.into_pyarray(py), offsets.into_pyarray(py)))
}

/// Best-fit-decreasing bins of `capacity` for items of the given sizes (1-D int64, each in
/// [0, capacity]). Returns (items int64: item indices in output order, bin_starts int64: B + 1
/// offsets into items). Same rule as the packed mode of `pack_flat` and `pack_sequences_flat`.
#[pyfunction]
fn best_fit_bins<'py>(
    py: Python<'py>,
    sizes: PyReadonlyArray1<'py, i64>,
    capacity: i64,
) -> PyResult<ArrayPair<'py>> {
    let s = slice(&sizes, "sizes")?;
    if capacity < 1 {
        return Err(PyValueError::new_err(format!("capacity must be >= 1, got {capacity}")));
    }
    if let Some((i, &v)) = s.iter().enumerate().find(|&(_, &v)| v < 0 || v > capacity) {
        return Err(PyValueError::new_err(format!(
            "sizes[{i}] = {v} is out of range: it must be in [0, capacity={capacity}]"
        )));
    }
    let sizes: Vec<usize> = s.iter().map(|&v| v as usize).collect();
    let (items, starts) = py.detach(|| no_panic("best-fit planner", || pack::best_fit_decreasing(&sizes, capacity as usize)))?;
    let items: Vec<i64> = items.into_iter().map(i64::from).collect();
    let starts: Vec<i64> = starts.into_iter().map(|v| v as i64).collect();
    Ok((items.into_pyarray(py), starts.into_pyarray(py)))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(pack_flat, m)?)?;
    m.add_function(wrap_pyfunction!(pack_sequences_flat, m)?)?;
    m.add_function(wrap_pyfunction!(flatten_int_seqs, m)?)?;
    m.add_function(wrap_pyfunction!(best_fit_bins, m)?)?;
    m.add("__version__", crate::VERSION)?;
    m.add("IGNORE_INDEX", pack::IGNORE_INDEX)?;
    m.add("ID_LIMIT", pack::ID_LIMIT)?;
    m.add("PAD_MULTIPLE_FLOOR", pack::PAD_MULTIPLE_FLOOR)?;
    Ok(())
}
