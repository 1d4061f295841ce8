//! GGUF tensors as HF safetensors: names mapped, quantized blocks dequantized to f32, and
//! llama.cpp's q/k row permutation undone.
//!
//! The output is split into shards of about [`SHARD_BYTES`] with an index, as transformers saves
//! large checkpoints, so that an import holds one shard's tensors in memory at a time.

use super::metadata::Layout;
use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

const SHARD_BYTES: usize = 2 << 30;

pub(crate) struct Written {
    pub tensors: usize,
    pub parameters: usize,
    pub shards: usize,
}

/// The HF name of a GGUF tensor, or None for one this crate does not know.
pub(crate) fn hf_name(gguf: &str) -> Option<String> {
    let global = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = global {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if !matches!(param, "weight" | "bias") {
        return None;
    }
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        // Qwen3's per-head RMS norms of queries and keys.
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

/// Undoes llama.cpp's permutation of q or k rows for `heads` heads: it stores each head's two
/// rotated halves interleaved (pairs of rows), where HF keeps the first half, then the second.
pub(crate) fn unpermute_rows(tensor: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    Ok(tensor
        .reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Dequantizes every tensor and writes `model.safetensors`, or shards and their index when the
/// model is larger than one shard.
pub(crate) fn write_safetensors<R: Read + Seek>(
    path: &Path,
    reader: &mut R,
    content: &Content,
    layout: &Layout,
    dir: &Path,
) -> Result<Written> {
    let mut names: Vec<(&str, String)> = Vec::new();
    for gguf in content.tensor_infos.keys() {
        // A q/k norm in an architecture without them would be dropped at load: refused too.
        let head_norm = |hf: &String| hf.ends_with(".q_norm.weight") || hf.ends_with(".k_norm.weight");
        let placed = hf_name(gguf).filter(|hf| layout.model_type == "qwen3" || !head_norm(hf));
        let hf = placed.ok_or_else(|| ModelError::InvalidConfig {
            path: path.into(),
            field: gguf.clone(),
            reason: format!(
                "is a tensor kubetune does not know how to place in a `{}` model",
                layout.architecture
            ),
        })?;
        names.push((gguf, hf));
    }
    names.sort_by(|a, b| a.1.cmp(&b.1));
    let shards = plan_shards(&names, content);
    let count = shards.len();
    let file_name = |i: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    let mut parameters = 0;
    for (i, shard) in shards.iter().enumerate() {
        let mut tensors = HashMap::new();
        for &(gguf, ref hf) in shard {
            let tensor = dequantize(path, reader, content, layout, gguf)?;
            parameters += tensor.elem_count();
            weight_map.insert(hf.clone(), json!(file_name(i)));
            tensors.insert(hf.clone(), tensor);
        }
        let out = dir.join(file_name(i));
        candle_core::safetensors::save(&tensors, &out).map_err(|source| ModelError::Weights { path: out, source })?;
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": parameters * 4}, "weight_map": weight_map});
        super::write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    Ok(Written {
        tensors: names.len(),
        parameters,
        shards: count,
    })
}

/// Groups tensors, in name order, into shards of at most SHARD_BYTES of f32 (a larger tensor
/// gets a shard of its own).
fn plan_shards<'a>(names: &'a [(&'a str, String)], content: &Content) -> Vec<Vec<(&'a str, String)>> {
    let mut shards: Vec<Vec<(&str, String)>> = vec![Vec::new()];
    let mut bytes = 0;
    for (gguf, hf) in names {
        let size = content.tensor_infos[*gguf].shape.elem_count() * 4;
        if bytes > 0 && bytes + size > SHARD_BYTES {
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        shards.last_mut().expect("one shard at least").push((gguf, hf.clone()));
    }
    shards
}

fn dequantize<R: Read + Seek>(
    path: &Path,
    reader: &mut R,
    content: &Content,
    layout: &Layout,
    gguf: &str,
) -> Result<Tensor> {
    let weights = |source| ModelError::Weights {
        path: path.into(),
        source,
    };
    let quantized = content.tensor(reader, gguf, &Device::Cpu).map_err(weights)?;
    let tensor = quantized.dequantize(&Device::Cpu).map_err(weights)?;
    let heads = if gguf.contains(".attn_q.") {
        Some(layout.heads)
    } else if gguf.contains(".attn_k.") {
        Some(layout.kv_heads)
    } else {
        None
    };
    match heads {
        Some(heads) if layout.permutes_qk() => unpermute_rows(&tensor, heads),
        _ => Ok(tensor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_the_hf_names_of_the_same_weights() {
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(
            hf_name("blk.12.attn_q.bias").as_deref(),
            Some("model.layers.12.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_q_norm.weight").as_deref(),
            Some("model.layers.0.self_attn.q_norm.weight")
        );
        assert_eq!(hf_name("blk.0.post_ffw_norm.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermuting_restores_the_rows_llama_cpp_interleaved() {
        // llama.cpp's converter: rows (heads, 2, half) -> (heads, half, 2).
        let (heads, half, cols) = (3, 4, 2);
        let hf = Tensor::arange(0f32, (heads * 2 * half * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * 2 * half, cols))
            .unwrap();
        let permuted = hf
            .reshape((heads, 2, half, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * 2 * half, cols))
            .unwrap();
        assert_ne!(permuted.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let restored = unpermute_rows(&permuted, heads).unwrap();
        assert_eq!(restored.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }
}
