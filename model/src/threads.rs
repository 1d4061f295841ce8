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

/// Runs `f` on a worker thread of rayon's global pool, or inline when already on one.
///
/// The parallel ops of a forward (our kernels, gemm, candle's rayon loops) all use that pool.
/// Called from a thread outside it, each op hands its work to the pool and puts the caller to
/// sleep until the work is done: two context switches per op, and on two cores a third thread
/// competing with the two workers. At one decoded sequence that was half of a step's time
/// (4.4 against 2.4 ms with int8 weights). Inside the pool the caller is one of the workers
/// and shares the op's work with the other.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}
