use candle_core::{Device, Tensor};
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (m, k, n) in [(1024, 512, 1408), (1024, 1408, 512), (1024,512,512), (512, 512, 1408), (512, 1408, 512), (512,512,512)] {
        let a = Tensor::randn(0f32, 1., (m, k), &d)?;
        let b = Tensor::randn(0f32, 1., (n, k), &d)?.t()?;
        for _ in 0..3 { a.matmul(&b)?; }
        let t = std::time::Instant::now();
        let reps = 20;
        for _ in 0..reps { a.matmul(&b)?; }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        println!("{m}x{k}x{n} (B^T) {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
        let b2 = Tensor::randn(0f32, 1., (k, n), &d)?;
        for _ in 0..3 { a.matmul(&b2)?; }
        let t = std::time::Instant::now();
        for _ in 0..reps { a.matmul(&b2)?; }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        println!("{m}x{k}x{n} (B) {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
    }
    Ok(())
}
