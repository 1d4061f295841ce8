//! Work in chunks of rows (the gated backward, the LoRA products forward and backward), so its
//! f32 temporaries have a fixed size.
//!
//! A custom backward that widens its inputs to f32 makes several copies of them at once: the
//! gated activation's made six f32 copies of the intermediate activations, 264 MiB at once for
//! a 2048-token layer of the large benchmark shape (e2e/bench/step-memory.sh), more than that
//! layer's whole graph. Under checkpointing on a GPU a layer is rebuilt for up to 8192 tokens,
//! so these temporaries grew with the part, not with what the step keeps. Rows are
//! independent in these backwards, so they run a chunk at a time, and each chunk's outputs
//! are written into the whole outputs in place. What sums over chunks instead (a loss, a
//! weight's gradient, attention's dK and dV) adds each chunk's part with [`accumulate`].

use candle_core::{Result, Tensor};

/// Values of one f32 temporary of a chunk (16 MiB). Large enough that a GPU's kernels
/// over a chunk outlast their launch, small enough to hold a few at once.
const CHUNK_VALUES: usize = 1 << 22;

/// Rows per chunk for rows of `width` values (the widest tensor a chunk widens to f32).
pub(crate) fn rows_per_chunk(width: usize) -> usize {
    (chunk_values() / width.max(1)).max(1)
}

#[cfg(not(test))]
fn chunk_values() -> usize {
    CHUNK_VALUES
}

#[cfg(test)]
thread_local! {
    static TEST_CHUNK_VALUES: std::cell::Cell<usize> = const { std::cell::Cell::new(CHUNK_VALUES) };
}

#[cfg(test)]
fn chunk_values() -> usize {
    TEST_CHUNK_VALUES.get()
}

/// Runs `f` with chunks of `values` values on this thread, so a test's small tensors take
/// several chunks.
#[cfg(test)]
pub(crate) fn with_chunk_values<T>(values: usize, f: impl FnOnce() -> T) -> T {
    let before = TEST_CHUNK_VALUES.replace(values);
    let out = f();
    TEST_CHUNK_VALUES.set(before);
    out
}

/// Calls `chunk(start, len)` for consecutive chunks of `rows` rows, `per` at a time, and
/// returns its outputs joined along the rows (dimension 0). A single chunk's outputs are
/// returned as made; otherwise each chunk's outputs are copied into whole-sized tensors as they
/// come, so the chunks' outputs are never held all at once beside their concatenation.
pub(crate) fn by_rows<const M: usize>(
    rows: usize,
    per: usize,
    mut chunk: impl FnMut(usize, usize) -> Result<[Tensor; M]>,
) -> Result<[Tensor; M]> {
    let per = per.max(1);
    if rows <= per {
        return chunk(0, rows);
    }
    let mut whole: Option<[Tensor; M]> = None;
    for start in (0..rows).step_by(per) {
        let parts = chunk(start, per.min(rows - start))?;
        let outputs = match &whole {
            Some(outputs) => outputs,
            None => {
                let made = parts
                    .iter()
                    .map(|p| {
                        let mut dims = p.dims().to_vec();
                        dims[0] = rows;
                        Tensor::zeros(dims, p.dtype(), p.device())
                    })
                    .collect::<Result<Vec<_>>>()?;
                whole.insert(made.try_into().expect("M outputs"))
            }
        };
        for (output, part) in outputs.iter().zip(&parts) {
            output.slice_set(part, 0, start)?;
        }
    }
    Ok(whole.expect("at least two chunks"))
}

/// Adds `part` to the running `sum`, which the first part starts.
pub(crate) fn accumulate(sum: &mut Option<Tensor>, part: Tensor) -> Result<()> {
    *sum = Some(match sum.take() {
        Some(s) => (s + part)?,
        None => part,
    });
    Ok(())
}

/// `base + part(start, len)` for consecutive chunks of `rows` rows, `per` at a time. `base`
/// must be a tensor made for this sum, held nowhere else: with more than one chunk each
/// chunk's sum is written back into it in place, so only one chunk's part exists at a time.
pub(crate) fn add_by_rows(
    base: Tensor,
    rows: usize,
    per: usize,
    mut part: impl FnMut(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let per = per.max(1);
    if rows <= per {
        return base + part(0, rows)?;
    }
    let base = base.contiguous()?;
    for start in (0..rows).step_by(per) {
        let len = per.min(rows - start);
        let sum = (base.narrow(0, start, len)? + part(start, len)?)?;
        base.slice_set(&sum, 0, start)?;
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Three chunks of 4, 4 and 2 rows give the same outputs as one call over all ten rows.
    #[test]
    fn chunked_outputs_equal_one_pass_over_all_rows() -> Result<()> {
        let x = Tensor::arange(0f32, 30.0, &Device::Cpu)?.reshape((10, 3))?;
        let f = |start: usize, len: usize| -> Result<[Tensor; 2]> {
            let part = x.narrow(0, start, len)?;
            Ok([(&part * 2.0)?, part.sum_keepdim(1)?.to_dtype(DType::BF16)?])
        };
        let [whole_double, whole_sum] = by_rows(10, 10, f)?;
        let mut calls = Vec::new();
        let [double, sum] = by_rows(10, 4, |start, len| {
            calls.push((start, len));
            f(start, len)
        })?;
        assert_eq!(calls, [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(double.to_vec2::<f32>()?, whole_double.to_vec2::<f32>()?);
        assert_eq!(sum.dtype(), DType::BF16);
        assert_eq!(
            sum.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            whole_sum.to_dtype(DType::F32)?.to_vec2::<f32>()?
        );
        Ok(())
    }

    /// Adding three chunks in place gives the sum of one pass.
    #[test]
    fn chunked_sums_equal_one_sum_over_all_rows() -> Result<()> {
        let x = Tensor::arange(0f32, 30.0, &Device::Cpu)?.reshape((10, 3))?;
        let part = |start: usize, len: usize| x.narrow(0, start, len)?.sqr();
        let want = add_by_rows((&x + 1.0)?, 10, 10, part)?;
        let got = add_by_rows((&x + 1.0)?, 10, 4, part)?;
        assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        assert_eq!(got.to_vec2::<f32>()?[9], [757.0, 813.0, 871.0]);
        Ok(())
    }
}
