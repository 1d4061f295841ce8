//! Retries with exponential backoff. There is exactly one retry layer: the object_store
//! clients are built with their own retries off, so a flaky request is not retried
//! 10 x 5 times and the attempt count in the final error is the true one.

use std::future::Future;
use std::time::Duration;

use crate::error::{Result, StorageError};

/// How often and how patiently to retry transient failures.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total attempts, including the first (1 = no retries).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles after each failure.
    pub initial_backoff: Duration,
    /// Upper bound for one wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// The outcome of one failed attempt.
pub(crate) enum Attempt {
    /// Worth trying again (timeouts, connection resets, 5xx, truncated bodies).
    Transient(Box<dyn std::error::Error + Send + Sync>),
    /// Retrying cannot help; returned as is.
    Permanent(StorageError),
}

impl From<StorageError> for Attempt {
    fn from(e: StorageError) -> Self {
        Attempt::Permanent(e)
    }
}

/// Runs `f` until it succeeds, fails permanently, or the attempts are used up; the final error
/// names `operation`, `uri`, the number of attempts and the last cause.
pub(crate) async fn with_retry<T, F, Fut>(
    policy: &RetryPolicy,
    operation: &'static str,
    uri: &str,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, Attempt>>,
{
    let max = policy.max_attempts.max(1);
    let mut backoff = policy.initial_backoff;
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(Attempt::Permanent(e)) => return Err(e),
            Err(Attempt::Transient(source)) if attempt >= max => {
                return Err(StorageError::Transfer {
                    operation,
                    uri: uri.to_string(),
                    attempts: attempt,
                    source,
                })
            }
            Err(Attempt::Transient(source)) => {
                tracing::warn!(operation, uri, attempt, error = %source, "transient failure, retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(policy.max_backoff);
                attempt += 1;
            }
        }
    }
}

/// Classifies an object_store error for `uri`.
pub(crate) fn classify(operation: &'static str, uri: &str, e: object_store::Error) -> Attempt {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Attempt::Permanent(StorageError::NotFound { uri: uri.to_string() }),
        E::AlreadyExists { .. } => Attempt::Permanent(StorageError::AlreadyExists { uri: uri.to_string() }),
        // Generic covers network errors, timeouts and 5xx answers: the retryable kind.
        E::Generic { .. } | E::JoinError { .. } => Attempt::Transient(Box::new(e)),
        other => Attempt::Permanent(StorageError::Transfer {
            operation,
            uri: uri.to_string(),
            attempts: 1,
            source: Box::new(other),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let v = with_retry(&fast(5), "get", "s3://b/k", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(Attempt::Transient("connection reset".into()))
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!((v, calls.load(Ordering::SeqCst)), (7, 3));
    }

    #[tokio::test]
    async fn gives_up_with_uri_cause_and_attempts() {
        let err = with_retry(&fast(3), "get", "s3://b/k", || async {
            Err::<(), _>(Attempt::Transient("connection reset".into()))
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("s3://b/k") && err.contains("3 attempt") && err.contains("connection reset"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let err = with_retry(&fast(5), "get", "s3://b/k", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Attempt::Permanent(StorageError::NotFound { uri: "s3://b/k".into() }))
        })
        .await
        .unwrap_err();
        assert!(matches!(err, StorageError::NotFound { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
