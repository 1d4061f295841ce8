//! Reads the base model's config.json from object storage, for the GPU-memory check.

use super::validate::ModelShape;
use crate::tenant_storage::tenant_credentials;
use kubetune_storage::Storage;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// The config.json fields that decide memory use, as HF writes them.
#[derive(Deserialize)]
struct HfConfig {
    hidden_size: u64,
    intermediate_size: u64,
    num_hidden_layers: u64,
    num_attention_heads: u64,
    num_key_value_heads: Option<u64>,
    vocab_size: u64,
    #[serde(default)]
    tie_word_embeddings: bool,
}

/// Parses a Llama-family config.json.
pub fn parse_model_shape(json: &[u8]) -> Result<ModelShape, serde_json::Error> {
    let c: HfConfig = serde_json::from_slice(json)?;
    Ok(ModelShape {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        vocab_size: c.vocab_size,
        tie_word_embeddings: c.tie_word_embeddings,
    })
}

/// Model shapes by base-model URI, read once: a model's config.json does not change under a URI
/// the way kubetune uses them, and reading it on every reconcile would load the store.
#[derive(Default)]
pub struct ModelShapes(Mutex<HashMap<String, ModelShape>>);

impl ModelShapes {
    /// The shape of the model at `uri`, reading `<uri>/config.json` with what the operator may
    /// use of the job's storage Secret (see [`tenant_credentials`]). None when it cannot or may
    /// not be read: the check then cannot run, and the trainer, in the tenant's own pod, reports
    /// the model problem itself with the file and cause.
    pub async fn get(
        &self,
        uri: &str,
        secret: Option<&str>,
        secret_data: BTreeMap<String, String>,
        allowed_endpoints: &[String],
    ) -> Option<ModelShape> {
        if let Some(shape) = self.0.lock().ok()?.get(uri) {
            return Some(shape.clone());
        }
        if uri.starts_with("hf://") || uri.starts_with("pvc://") {
            return None;
        }
        let credentials = match tenant_credentials(uri, "spec.baseModel.uri", secret, secret_data, allowed_endpoints) {
            Ok(c) => c,
            Err(refused) => {
                tracing::info!(%uri, %refused, "not reading config.json for a tenant; skipping the GPU-memory check");
                return None;
            }
        };
        let storage = match Storage::from_uri(uri, &credentials) {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%uri, error = %e, "cannot open the base model's store; skipping the GPU-memory check");
                return None;
            }
        };
        let bytes = match tokio::time::timeout(Duration::from_secs(5), storage.get_bytes("config.json")).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::info!(%uri, error = %e, "cannot read config.json; skipping the GPU-memory check");
                return None;
            }
            Err(_) => {
                tracing::info!(%uri, "reading config.json timed out; skipping the GPU-memory check");
                return None;
            }
        };
        match parse_model_shape(&bytes) {
            Ok(shape) => {
                if let Ok(mut map) = self.0.lock() {
                    map.insert(uri.to_string(), shape.clone());
                }
                Some(shape)
            }
            Err(e) => {
                tracing::info!(%uri, error = %e, "config.json is not a Llama-family config; skipping the GPU-memory check");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_gqa_config_and_defaults_kv_heads() {
        let qwen =
            br#"{"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": true, "model_type": "qwen2"}"#;
        let s = parse_model_shape(qwen).expect("valid");
        assert_eq!((s.num_key_value_heads, s.tie_word_embeddings), (2, true));
        let llama2 = br#"{"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000}"#;
        assert_eq!(parse_model_shape(llama2).expect("valid").num_key_value_heads, 32);
        assert!(parse_model_shape(b"{\"hidden_size\": 1}").is_err());
    }

    #[tokio::test]
    async fn reads_config_json_from_a_file_uri_once() {
        let dir = std::env::temp_dir().join(format!("kubetune-model-facts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = br#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}"#;
        std::fs::write(dir.join("config.json"), config).expect("write");
        let uri = format!("file://{}", dir.display());
        let shapes = ModelShapes::default();
        let files = ["file://".to_string()];
        let shape = shapes.get(&uri, None, BTreeMap::new(), &files).await.expect("read");
        assert_eq!(shape.hidden_size, 64);
        std::fs::remove_file(dir.join("config.json")).expect("remove");
        assert_eq!(
            shapes.get(&uri, None, BTreeMap::new(), &files).await,
            Some(shape),
            "served from memory"
        );
        let missing = "file:///nonexistent/kubetune-model";
        assert_eq!(shapes.get(missing, None, BTreeMap::new(), &files).await, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn config_json_is_not_read_where_the_platform_did_not_allow_the_operator_to_go() {
        let dir = std::env::temp_dir().join(format!("kubetune-model-facts-denied-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = br#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512}"#;
        std::fs::write(dir.join("config.json"), config).expect("write");
        let shapes = ModelShapes::default();
        // The operator's own file system, not listed: not read for a tenant.
        let uri = format!("file://{}", dir.display());
        assert_eq!(shapes.get(&uri, None, BTreeMap::new(), &[]).await, None);
        // An endpoint from the tenant's Secret that is not listed: no request is sent (a
        // listening socket would have answered; nothing listens on port 9, so a sent request
        // would only time out, but the refusal comes back at once).
        let secret = BTreeMap::from([("AWS_ENDPOINT_URL".to_string(), "http://127.0.0.1:9".to_string())]);
        let started = std::time::Instant::now();
        assert_eq!(
            shapes.get("s3://models/tiny", Some("team-a/s3"), secret, &[]).await,
            None
        );
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
