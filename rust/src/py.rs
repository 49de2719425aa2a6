//! PyO3 glue: the private `dpo_fast._native` module. Validation, docs and the public API live in Python.

use pyo3::prelude::*;

/// Build facts of the native module: crate version and the Python ABI it targets.
#[pyfunction]
fn build_info() -> (String, String) {
    (crate::VERSION.to_string(), "abi3-py310".to_string())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add("__version__", crate::VERSION)?;
    Ok(())
}
