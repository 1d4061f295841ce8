//! The CPU thread count, settled once per process.
//!
//! candle asks for its thread count on every matmul, and when RAYON_NUM_THREADS is unset it
//! counts physical cores by reading /proc/cpuinfo each time: about a hundred reads per decoded
//! token, a third of a token's time on two cores. Setting the variable once at start-up keeps
//! candle's choice and makes the lookup an environment read. rayon's pool, which candle and
//! gemm share, is sized from the same variable.

/// Sets RAYON_NUM_THREADS to candle's own choice unless the user set it. Call first thing in
/// `main`, before any other thread exists (setting the environment is not thread-safe).
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let threads = candle_core::utils::get_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}
