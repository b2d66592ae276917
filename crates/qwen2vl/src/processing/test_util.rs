//! Helpers the unit tests of the processing modules share.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Whether `r` is a bad-input error.
pub(crate) fn is_bad_input(r: &Result<impl std::fmt::Debug>) -> bool {
    matches!(r, Err(Error::BadInput { .. }))
}

/// The `what` and `allowed` of a bad-input error; panics on anything else.
pub(crate) fn bad(r: Result<impl std::fmt::Debug>) -> (String, String) {
    match r {
        Err(Error::BadInput { what, allowed, .. }) => (what, allowed),
        other => panic!("expected BadInput, got {other:?}"),
    }
}

/// `tests/fixtures/resize`, written by `tools/reference/make_resize_fixtures.py`.
pub(crate) fn resize_fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/resize")
}

/// That directory's `cases.json`.
pub(crate) fn resize_cases() -> serde_json::Value {
    let p = resize_fixture_dir().join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// A JSON array of whole numbers (a fixture's indices, grid or size).
pub(crate) fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

/// The largest `|a - b|` over two equally long runs of values.
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}
