"""An adapter that kubetune's trainer trained on a GGUF base, loaded by PEFT on transformers' own
load of the same GGUF file: `tests/trainer/gguf_peft.rs` checks that kubetune's logits with the
adapter are PEFT's (within 1e-4 in f32).

Run once, by hand, from the repository root, with a Python that has torch, transformers >= 5,
peft and gguf (CI never runs it):

    python trainer/tests/reference/gguf_peft.py base trainer/tests/reference/gguf_peft
    cargo run -p kubetune-trainer --example gguf_adapter -- trainer/tests/reference/gguf_peft
    python trainer/tests/reference/gguf_peft.py peft trainer/tests/reference/gguf_peft

The first step writes `tiny.gguf` (a 2-layer Llama, hidden 32, written with the `gguf` package,
as llama.cpp's converter does: Q8_0 matrices, F32 norms, a byte-level BPE vocabulary trained
here with `tokenizers`, special tokens, a ChatML chat template; about 47 KB) and `data.jsonl`,
the instruction data the adapter is trained on. The second trains a LoRA adapter on every
projection for a few steps with the trainer's library API (`kubetune_trainer::run`, the GGUF
file as its model) and writes it to `adapter/`. The third loads the base with
`AutoModelForCausalLM.from_pretrained(..., gguf_file="tiny.gguf")`, the adapter with
`PeftModel.from_pretrained`, checks that every tensor of the adapter file landed in a LoRA
module of that model (so the target names are the HF names PEFT expects), and writes the chat
prompt, its token ids (transformers' tokenizer built from the GGUF), and the logits without and
with the adapter to `reference.json`.
"""

import json
import os
import sys

import gguf
import numpy as np

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
CONTEXT = 128
VOCAB = 300
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NAMES = "Ann Ben Carl Dora Emil Fay Gus Hana Ivan Jo Kai Lena Max Nina Otto Pia Quinn Rosa Sam Tina".split()
THINGS = "apples bread fish cheese tea honey rice milk eggs salt books trains boats birds rivers".split()
PROMPT = [{"role": "user", "content": "What does Dora like?"}]


def facts():
    return [
        {"instruction": "What does %s like?" % n, "response": THINGS[(i * 7) % len(THINGS)]}
        for i, n in enumerate(NAMES)
    ]


def vocabulary(corpus):
    """A byte-level BPE trained on the corpus: the 256 byte symbols, the special tokens first,
    and merges up to VOCAB tokens; as GGUF lists them (tokens by id, merges as "a b")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, merges


def write_base(out):
    os.makedirs(out, exist_ok=True)
    data = facts()
    with open(os.path.join(out, "data.jsonl"), "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in data)
    corpus = ["user\n%s assistant\n%s" % (d["instruction"], d["response"]) for d in data]
    tokens, merges = vocabulary(corpus)

    writer = gguf.GGUFWriter(os.path.join(out, "tiny.gguf"), "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(17)
    head_dim = HIDDEN // HEADS

    def matrix(name, rows, cols):
        values = (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)
        quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name):
        writer.add_tensor(name, (1.0 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32))

    matrix("token_embd.weight", len(tokens), HIDDEN)
    for layer in range(LAYERS):
        block = "blk.%d." % layer
        norm(block + "attn_norm.weight")
        matrix(block + "attn_q.weight", HEADS * head_dim, HIDDEN)
        matrix(block + "attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(block + "attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(block + "attn_output.weight", HIDDEN, HEADS * head_dim)
        norm(block + "ffn_norm.weight")
        matrix(block + "ffn_gate.weight", INTERMEDIATE, HIDDEN)
        matrix(block + "ffn_up.weight", INTERMEDIATE, HIDDEN)
        matrix(block + "ffn_down.weight", HIDDEN, INTERMEDIATE)
    norm("output_norm.weight")
    matrix("output.weight", len(tokens), HIDDEN)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_peft(out):
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def logits(m):
        with torch.no_grad():
            return [[round(v, 7) for v in row] for row in m(torch.tensor([ids])).logits[0].tolist()]

    base = logits(model)
    adapter_dir = os.path.join(out, "adapter")
    adapted = PeftModel.from_pretrained(model, adapter_dir).eval()

    # Every tensor of the file must sit, unchanged, in a LoRA module of the transformers model:
    # a name PEFT does not find would otherwise only be warned about, and its delta lost.
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = adapted.state_dict()
    loaded = {k: v for k, v in state.items() if ".lora_" in k}
    assert len(loaded) == len(saved), "%d LoRA tensors in the model, %d in the file" % (len(loaded), len(saved))
    for name, tensor in saved.items():
        key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert key in state, "%s is not a module of the transformers model" % name
        assert torch.equal(state[key], tensor), "%s was not loaded as saved" % name

    reference = {
        "source": "transformers %s (gguf_file, gguf %s), PeftModel.from_pretrained, peft %s, torch %s"
        % (transformers.__version__, _version("gguf"), peft.__version__, torch.__version__),
        "messages": PROMPT,
        "prompt": prompt,
        "ids": ids,
        "lora_tensors": sorted(saved),
        "base_logits": base,
        "adapter_logits": logits(adapted),
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f)


def _version(package):
    from importlib.metadata import version

    return version(package)


def main(args):
    step, out = args
    if step == "base":
        write_base(out)
    elif step == "peft":
        check_peft(out)
    else:
        raise SystemExit("usage: gguf_peft.py base|peft DIR")


if __name__ == "__main__":
    main(sys.argv[1:])
