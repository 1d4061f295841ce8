//! Crash- and race-safe filesystem primitives shared by the cache, the hub downloads, the stores
//! and the registry: temporary siblings that are renamed into place, exclusive file locks, and
//! directories filled exactly once. They live apart from [`crate::Cache`] so that the modules
//! that use them do not depend on each other through it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, StorageError};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name for a temporary sibling of `dest`, unique across processes (pid) and threads (counter).
pub(crate) fn temp_sibling(dest: &Path) -> PathBuf {
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("download");
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dest.with_file_name(format!(".{name}.part-{}-{n}", std::process::id()))
}

/// Returns `final_path`, building it with `fill` first if it does not exist. The lock lives in
/// `<cache_root>/locks/<lock_name>.lock` and the temporary directory in `<cache_root>/tmp/`, on
/// the same filesystem as `final_path` so that the final rename is atomic. `fill` gets
/// an empty temporary directory; on success it is renamed to `final_path`.
pub(crate) async fn fill_once<F, Fut>(cache_root: &Path, lock_name: &str, final_path: &Path, fill: F) -> Result<PathBuf>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    if final_path.exists() {
        return Ok(final_path.to_path_buf());
    }
    let lock_path = cache_root.join("locks").join(format!("{lock_name}.lock"));
    let _lock = lock_exclusive(lock_path).await?;
    // Whoever held the lock before us may have filled it.
    if final_path.exists() {
        return Ok(final_path.to_path_buf());
    }
    let tmp = temp_sibling(&cache_root.join("tmp").join(lock_name));
    tokio::fs::create_dir_all(&tmp)
        .await
        .map_err(|e| StorageError::io("creating", &tmp, e))?;
    let result = match fill(tmp.clone()).await {
        Ok(()) => {
            if let Some(parent) = final_path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| StorageError::io("creating", parent, e))?;
            }
            tokio::fs::rename(&tmp, final_path)
                .await
                .map_err(|e| StorageError::io("renaming cache entry into place at", final_path, e))
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = tokio::fs::remove_dir_all(&tmp).await;
    }
    result.map(|()| final_path.to_path_buf())
}

/// A held exclusive lock; released when dropped (or when the process dies).
pub(crate) struct LockGuard(#[allow(dead_code)] std::fs::File);

/// Takes an exclusive flock on `path`, waiting on a blocking thread so the runtime is not stalled.
pub(crate) async fn lock_exclusive(path: PathBuf) -> Result<LockGuard> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StorageError::io("opening lock file", &path, e))?;
        file.lock().map_err(|e| StorageError::io("locking", &path, e))?;
        Ok(LockGuard(file))
    })
    .await
    .map_err(|e| StorageError::io("locking", PathBuf::from("cache"), std::io::Error::other(e)))?
}
