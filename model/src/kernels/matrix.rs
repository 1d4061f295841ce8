//! Strided f32 matrices over slices, and their products through the `gemm` crate (the kernels
//! behind candle's CPU matmul), for code that runs outside candle's graph: the hand-written
//! training step of [`crate::layer_grad`].
//!
//! A view has a row and a column stride, so a transpose, or one attention head's columns of a
//! wider matrix, is a product with no copy. A product can add into its destination, so a sum
//! of products, or a residual plus a product, needs no extra pass and no zero-filled buffer.

use crate::error::{ModelError, Result};

/// A read-only matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// `rows` x `cols` stored row after row.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Columns `first..first + cols` of a row-major matrix whose rows are `stride` apart.
    pub(crate) fn columns(data: &'a [f32], rows: usize, stride: usize, first: usize, cols: usize) -> Self {
        Self {
            data: data.get(first..).unwrap_or(&[]),
            rows,
            cols,
            rs: stride,
            cs: 1,
        }
    }

    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `first..first + rows` of this view.
    pub(crate) fn rows(self, first: usize, rows: usize) -> Self {
        Self {
            data: self.data.get(first * self.rs..).unwrap_or(&[]),
            rows,
            ..self
        }
    }

    fn fits(&self) -> bool {
        fits(self.data.len(), self.rows, self.cols, self.rs, self.cs)
    }
}

/// A writable matrix, laid out as [`View`].
pub(crate) struct ViewMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> ViewMut<'a> {
    pub(crate) fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// As [`View::columns`].
    pub(crate) fn columns(data: &'a mut [f32], rows: usize, stride: usize, first: usize, cols: usize) -> Self {
        let data = match data.get_mut(first..) {
            Some(d) => d,
            None => &mut [],
        };
        Self {
            data,
            rows,
            cols,
            rs: stride,
            cs: 1,
        }
    }

    /// As [`View::rows`].
    pub(crate) fn rows(self, first: usize, rows: usize) -> Self {
        let start = first * self.rs;
        let data = match self.data.get_mut(start..) {
            Some(d) => d,
            None => &mut [],
        };
        Self { data, rows, ..self }
    }

    fn fits(&self) -> bool {
        fits(self.data.len(), self.rows, self.cols, self.rs, self.cs)
    }
}

fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// Whether a product adds to its destination or overwrites it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dst {
    Overwrite,
    Add,
}

/// Whether a product splits its work across rayon's pool (large products) or runs on the
/// calling thread (products that are themselves one of many parallel tasks).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    Pool,
    Caller,
}

/// `dst = scale * a b`, or `dst += scale * a b` with [`Dst::Add`].
pub(crate) fn matmul(dst: ViewMut, a: View, b: View, scale: f32, mode: Dst, threads: Threads) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst.rows != m || dst.cols != n || !a.fits() || !b.fits() || !dst.fits() {
        return Err(ModelError::ShapeMismatch(format!(
            "matmul: ({m} x {k}) times ({} x {n}) into ({} x {}), or a view past its data",
            b.rows, dst.rows, dst.cols
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // gemm leaves the destination as it is for an empty sum; an overwrite must still zero it.
        if mode == Dst::Overwrite {
            for i in 0..m {
                for j in 0..n {
                    dst.data[i * dst.rs + j * dst.cs] = 0.0;
                }
            }
        }
        return Ok(());
    }
    let parallelism = match threads {
        Threads::Pool => gemm::Parallelism::Rayon(0),
        Threads::Caller => gemm::Parallelism::None,
    };
    // SAFETY: the checks above keep every element gemm touches inside its slice (fits), and
    // `dst` is borrowed mutably so nothing else reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            mode == Dst::Add,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        (0..m * n)
            .map(|idx| (0..k).map(|p| a[idx / n * k + p] * b[p * n + idx % n]).sum())
            .collect()
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + seed).sin() * 10.0).round() / 4.0)
            .collect()
    }

    #[test]
    fn products_of_transposed_and_column_views_equal_the_naive_product() -> Result<()> {
        let (m, k, n) = (5, 3, 4);
        let a = values(m * k, 0.1);
        let b = values(k * n, 0.7);
        let want = naive(&a, &b, m, k, n);

        let mut out = vec![f32::NAN; m * n];
        matmul(
            ViewMut::new(&mut out, m, n),
            View::new(&a, m, k),
            View::new(&b, k, n),
            1.0,
            Dst::Overwrite,
            Threads::Pool,
        )?;
        assert_eq!(out, want);

        // b given as its transpose (n x k), read through a transposed view.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut out2 = vec![1.0; m * n];
        matmul(
            ViewMut::new(&mut out2, m, n),
            View::new(&a, m, k),
            View::new(&bt, n, k).t(),
            2.0,
            Dst::Add,
            Threads::Caller,
        )?;
        assert_eq!(out2, want.iter().map(|v| 1.0 + 2.0 * v).collect::<Vec<_>>());

        // a as columns 2..5 of a wider matrix; the product into columns 1..5 of a wider one.
        let wide: Vec<f32> = (0..m)
            .flat_map(|i| {
                [9.0, 9.0]
                    .into_iter()
                    .chain(a[i * k..(i + 1) * k].iter().copied())
                    .chain([9.0])
            })
            .collect();
        let mut dst = vec![0.0; m * 6];
        matmul(
            ViewMut::columns(&mut dst, m, 6, 1, n),
            View::columns(&wide, m, 6, 2, k),
            View::new(&b, k, n),
            1.0,
            Dst::Overwrite,
            Threads::Pool,
        )?;
        for i in 0..m {
            assert_eq!(dst[i * 6], 0.0);
            assert_eq!(&dst[i * 6 + 1..i * 6 + 5], &want[i * n..(i + 1) * n]);
        }
        Ok(())
    }

    #[test]
    fn mismatched_or_overrunning_views_are_errors() {
        let a = vec![0.0; 6];
        let mut out = vec![0.0; 4];
        let e = matmul(
            ViewMut::new(&mut out, 2, 2),
            View::new(&a, 2, 3),
            View::new(&a, 2, 3),
            1.0,
            Dst::Overwrite,
            Threads::Caller,
        );
        assert!(e.is_err());
        let e = matmul(
            ViewMut::new(&mut out, 2, 2),
            View::new(&a, 2, 3),
            View::new(&a, 3, 3),
            1.0,
            Dst::Overwrite,
            Threads::Caller,
        );
        assert!(e.is_err(), "a 3 x 3 view of 6 values overruns");
        let e = matmul(
            ViewMut::new(&mut out, 2, 2),
            View::columns(&a, 2, 3, 2, 2),
            View::new(&a, 2, 2),
            1.0,
            Dst::Overwrite,
            Threads::Caller,
        );
        assert!(e.is_err(), "columns 2..4 of 3-wide rows overrun");
    }

    #[test]
    fn an_empty_sum_overwrites_with_zeros_and_adds_nothing() -> Result<()> {
        let mut out = vec![3.0; 4];
        matmul(
            ViewMut::new(&mut out, 2, 2),
            View::new(&[], 2, 0),
            View::new(&[], 0, 2),
            1.0,
            Dst::Add,
            Threads::Caller,
        )?;
        assert_eq!(out, vec![3.0; 4]);
        matmul(
            ViewMut::new(&mut out, 2, 2),
            View::new(&[], 2, 0),
            View::new(&[], 0, 2),
            1.0,
            Dst::Overwrite,
            Threads::Caller,
        )?;
        assert_eq!(out, vec![0.0; 4]);
        Ok(())
    }
}
