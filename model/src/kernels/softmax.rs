//! Softmax over rows of f32, in place: sixteen lanes at a time with a vector exponential where
//! the CPU has AVX-512. `f32::exp` is a libm call per element (3% of a 16-sequence decode run,
//! 2 to 3% of a prefill or a training step); decode attention and the fused causal attention
//! of prefill and training both take their softmax from here.

/// Softmax over each row of `n` values of `p`, in place.
pub(crate) fn softmax_rows(p: &mut [f32], n: usize) {
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            unsafe { avx512::softmax_rows(p, n) };
            return;
        }
    }
    portable(p, n)
}

/// `out[i] = 1 / (1 + e^-x[i])` for slices of the same length.
pub(crate) fn sigmoid(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            unsafe { avx512::sigmoid(x, out) };
            return;
        }
    }
    for (o, v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + (-v).exp());
    }
}

/// The weighted negative log-likelihood of `target` under `softmax(row)`, returned, and
/// `row` overwritten with its gradient times `scale`: `scale * weight * (softmax(row) -
/// onehot(target))`. A row of weight 0 becomes zeros. `target` must be inside the row.
pub(crate) fn nll_grad_row(row: &mut [f32], target: usize, weight: f32, scale: f32) -> f64 {
    if weight == 0.0 {
        row.fill(0.0);
        return 0.0;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512::nll_grad_row(row, target, weight, scale) };
        }
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    let log_sum = max + sum.ln();
    let loss = f64::from(weight) * f64::from(log_sum - row[target]);
    let g = scale * weight;
    for v in row.iter_mut() {
        *v = g * (*v - log_sum).exp();
    }
    row[target] -= g;
    loss
}

/// [`softmax_rows`] with scalar code.
fn portable(p: &mut [f32], n: usize) {
    for probs in p.chunks_exact_mut(n) {
        let max = probs.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
        let mut sum = 0.0;
        probs.iter_mut().for_each(|s| {
            *s = (*s - max).exp();
            sum += *s;
        });
        probs.iter_mut().for_each(|s| *s /= sum);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::portable`] sixteen lanes at a time, with [`exp16`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_rows(p: &mut [f32], n: usize) {
        if n == 0 {
            return;
        }
        let lanes = |j: usize| -> __mmask16 {
            if n - j >= 16 {
                !0
            } else {
                (1u16 << (n - j)) - 1
            }
        };
        for row in p.chunks_exact_mut(n) {
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for j in (0..n).step_by(16) {
                // SAFETY: the mask keeps the load within the row.
                let v = unsafe { _mm512_mask_loadu_ps(max, lanes(j), row.as_ptr().add(j)) };
                max = _mm512_max_ps(max, v);
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
            let mut sum = _mm512_setzero_ps();
            for j in (0..n).step_by(16) {
                let m = lanes(j);
                // SAFETY: as above, for the load and the store.
                unsafe {
                    let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row.as_ptr().add(j)), max));
                    sum = _mm512_mask_add_ps(sum, m, sum, e);
                    _mm512_mask_storeu_ps(row.as_mut_ptr().add(j), m, e);
                }
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            for j in (0..n).step_by(16) {
                let m = lanes(j);
                // SAFETY: as above.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(m, row.as_ptr().add(j));
                    _mm512_mask_storeu_ps(row.as_mut_ptr().add(j), m, _mm512_mul_ps(v, inv));
                }
            }
        }
    }

    /// [`super::sigmoid`]: e = e^-|x| keeps the exponential's argument at or below 0, and
    /// sigmoid(x) is 1 / (1 + e) for x >= 0, e / (1 + e) below.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sigmoid(x: &[f32], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let one = _mm512_set1_ps(1.0);
        for j in (0..n).step_by(16) {
            let m: __mmask16 = if n - j >= 16 { !0 } else { (1u16 << (n - j)) - 1 };
            // SAFETY: the mask keeps the load and the store within both slices.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(j));
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
                let denominator = _mm512_add_ps(one, e);
                let positive = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, _mm512_setzero_ps());
                let s = _mm512_mask_blend_ps(positive, _mm512_div_ps(e, denominator), _mm512_div_ps(one, denominator));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), m, s);
            }
        }
    }

    /// [`super::nll_grad_row`] sixteen lanes at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn nll_grad_row(row: &mut [f32], target: usize, weight: f32, scale: f32) -> f64 {
        let n = row.len();
        let lanes = |j: usize| -> __mmask16 {
            if n - j >= 16 {
                !0
            } else {
                (1u16 << (n - j)) - 1
            }
        };
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..n).step_by(16) {
            // SAFETY: the mask keeps the load within the row.
            max = _mm512_max_ps(max, unsafe { _mm512_mask_loadu_ps(max, lanes(j), row.as_ptr().add(j)) });
        }
        let max = _mm512_reduce_max_ps(max);
        let mut sum = _mm512_setzero_ps();
        for j in (0..n).step_by(16) {
            let m = lanes(j);
            // SAFETY: as above.
            let v = unsafe { _mm512_maskz_loadu_ps(m, row.as_ptr().add(j)) };
            sum = _mm512_mask_add_ps(sum, m, sum, exp16(_mm512_sub_ps(v, _mm512_set1_ps(max))));
        }
        let log_sum = max + _mm512_reduce_add_ps(sum).ln();
        let loss = f64::from(weight) * f64::from(log_sum - row[target]);
        let g = scale * weight;
        for j in (0..n).step_by(16) {
            let m = lanes(j);
            // SAFETY: as above, for the load and the store. v - log_sum <= 0 as exp16 wants.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, row.as_ptr().add(j));
                let p = exp16(_mm512_sub_ps(v, _mm512_set1_ps(log_sum)));
                _mm512_mask_storeu_ps(row.as_mut_ptr().add(j), m, _mm512_mul_ps(p, _mm512_set1_ps(g)));
            }
        }
        row[target] -= g;
        loss
    }

    /// e^x for x <= 0 (a score minus its row's maximum): e^r * 2^n with n = round(x log2 e)
    /// and r = x - n ln 2 (ln 2 in two parts, so r keeps its low bits), |r| <= ln 2 / 2, from
    /// its degree-7 Taylor polynomial (error about 1e-8); scalef applies 2^n, down to 0 for x
    /// far below -87.
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp16(x: __m512) -> __m512 {
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const C: [f32; 8] = [
            1.0,
            1.0,
            1.0 / 2.0,
            1.0 / 6.0,
            1.0 / 24.0,
            1.0 / 120.0,
            1.0 / 720.0,
            1.0 / 5040.0,
        ];
        let x = _mm512_max_ps(x, _mm512_set1_ps(-150.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(C[7]);
        for c in C[..7].iter().rev() {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        _mm512_scalef_ps(p, n)
    }
}

#[cfg(test)]
mod tests {
    /// The vector exponential stays within a few f32 roundings of `f32::exp`, and the vector
    /// softmax equals the portable one, for rows shorter and longer than a vector.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_and_softmax_match_the_portable_ones() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for i in 0..4000 {
            let x = -(i as f32) * 0.025 - if i % 7 == 0 { 0.0 } else { 1e-3 };
            // SAFETY: the CPU has AVX-512F (checked above).
            let got = unsafe {
                let mut out = [0f32; 16];
                _mm512_storeu_ps(out.as_mut_ptr(), super::avx512::exp16(_mm512_set1_ps(x)));
                out[0]
            };
            let want = x.exp();
            assert!(
                (got - want).abs() <= 4e-7 * want + f32::MIN_POSITIVE,
                "exp({x}) = {got}, want {want}"
            );
        }
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 2.3).collect();
        let mut sig = vec![0f32; xs.len()];
        // SAFETY: as above.
        unsafe { super::avx512::sigmoid(&xs, &mut sig) };
        for (x, s) in xs.iter().zip(&sig) {
            let want = 1.0 / (1.0 + (-x).exp());
            assert!(
                (s - want).abs() <= 1e-6 * want.max(1e-30) + 1e-37,
                "sigmoid({x}) = {s}, want {want}"
            );
        }
        for n in [1, 7, 16, 33, 300] {
            let logits: Vec<f32> = (0..n).map(|i| ((i * 53 % 29) as f32 - 14.0) * 0.9).collect();
            let (mut ours, mut portable) = (logits.clone(), logits);
            let target = n / 3;
            // SAFETY: as above.
            let loss = unsafe { super::avx512::nll_grad_row(&mut ours, target, 0.5, 0.1) };
            let mut row = portable.clone();
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let log_sum = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            let want_loss = 0.5 * f64::from(log_sum - row[target]);
            row.iter_mut().for_each(|v| *v = 0.05 * (*v - log_sum).exp());
            row[target] -= 0.05;
            portable.copy_from_slice(&row);
            assert!(
                (loss - want_loss).abs() <= 1e-6 * want_loss.abs().max(1.0),
                "n {n}: loss {loss} vs {want_loss}"
            );
            for (a, b) in ours.iter().zip(&portable) {
                assert!((a - b).abs() <= 1e-7, "n {n}: {a} vs {b}");
            }
        }
        for n in [1, 5, 16, 17, 40] {
            let scores: Vec<f32> = (0..3 * n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7).collect();
            let (mut ours, mut portable) = (scores.clone(), scores);
            // SAFETY: as above.
            unsafe { super::avx512::softmax_rows(&mut ours, n) };
            super::portable(&mut portable, n);
            for (a, b) in ours.iter().zip(&portable) {
                assert!((a - b).abs() <= 1e-6, "n {n}: {a} vs {b}");
            }
        }
    }
}
