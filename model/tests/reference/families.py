"""Tiny random checkpoints of each model family kubetune runs, saved the way transformers 5 saves
them, with reference logits and greedy tokens: `tests/model/families.rs` checks the model crate against
them (logits within 1e-4 in f32), and holds the adapter kubetune writes for each family to the logits
PEFT computes with it.

Run once, by hand, when a family is added (CI never runs it; it needs PyTorch and PEFT), from the
repository root, with any Python that has torch, transformers >= 5 and peft:

    python model/tests/reference/families.py model/tests/reference/families [FAMILY...]
    cargo run -p kubetune-model --example family_adapter -- model/tests/reference/families/FAMILY...
    python model/tests/reference/families.py peft model/tests/reference/families [FAMILY...]

The first step gives each family a directory with config.json (rope settings in
`rope_parameters`, as transformers 5 writes them), generation_config.json, model.safetensors (f32,
about 100 KB) and reference.json. The second writes `adapter/` with kubetune's PEFT writer (the
trainer's). The third loads that adapter into the transformers model with
`PeftModel.from_pretrained`, which fails on any name, shape or config key PEFT does not accept, and
writes PEFT's logits to `adapter/reference.json`. Naming families limits a step to them.
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

VOCAB = 128
SEQ = 24
NEW_TOKENS = 8

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    # Llama 3.1/3.2's frequency-dependent RoPE scaling, with a context short enough that the
    # scaled and unscaled bands both occur.
    "llama3": (
        transformers.LlamaConfig,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            tie_word_embeddings=False,
        ),
    ),
    # Biases on q, k, v, o and the MLP, and an explicit head_dim wider than hidden/heads.
    "llama-bias": (
        transformers.LlamaConfig,
        dict(attention_bias=True, mlp_bias=True, head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    ),
    # A sliding window shorter than the prompt, so that it changes the logits.
    "mistral": (
        transformers.MistralConfig,
        dict(sliding_window=8, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
    # q/k/v biases, tied embeddings, no sliding window.
    "qwen2": (
        transformers.Qwen2Config,
        dict(use_sliding_window=False, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
    # RMS norms of each query and key head before RoPE, an explicit head_dim wider than
    # hidden/heads, biases on q, k, v and o (attention_bias), tied embeddings.
    "qwen3": (
        transformers.Qwen3Config,
        dict(
            head_dim=16,
            attention_bias=True,
            use_sliding_window=False,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    # Gemma 2: soft-capped attention scores and logits (caps low enough to bite at these
    # scales), alternating sliding and full layers with one RoPE, (1 + w) norms around
    # attention and MLP, GeGLU, query_pre_attn_scalar.
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            num_hidden_layers=3,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
    # Gemma 3 (text): embeddings scaled by sqrt(hidden), (1 + w) norms before and after both
    # attention and MLP, q/k norms, GeGLU (tanh GELU), attention scaled by
    # query_pre_attn_scalar, sliding-window layers beside full ones, each kind with its own
    # RoPE (linear scaling on the full layers, as the 4B and larger models have).
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            num_hidden_layers=3,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters=dict(
                full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
                sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            ),
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
    # q, k and v fused in one qkv_proj and gate and up in one gate_up_proj (kubetune splits them
    # as they load and writes adapters on the fused modules), a sliding window shorter than the
    # prompt (Phi-3 applies it with no switch), GQA, an untied head. Phi3Config's default pad id
    # (32000) is outside the tiny vocabulary.
    "phi3": (
        transformers.Phi3Config,
        dict(
            sliding_window=8,
            tie_word_embeddings=False,
            pad_token_id=None,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
}


def make(name, cls, extra, out):
    torch.manual_seed(sum(map(ord, name)))
    config = cls(**{**COMMON, **extra})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0, which would hide a wrong norm or bias:
    # perturb every parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory = os.path.join(out, name)
    model.save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 3]).save_pretrained(directory)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, VOCAB, (SEQ,), generator=generator).tolist() for _ in range(2)]
    cases = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0]
            sequence = list(ids)
            greedy = []
            for _ in range(NEW_TOKENS):
                token = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
                greedy.append(token)
                sequence.append(token)
            cases.append({"ids": ids, "logits": [[round(v, 7) for v in row] for row in logits.tolist()], "greedy": greedy})
    with open(os.path.join(directory, "reference.json"), "w") as f:
        json.dump({"source": "transformers %s, torch %s" % (transformers.__version__, torch.__version__), "cases": cases}, f)


def check_peft(name, out):
    import peft
    from peft import PeftModel

    directory = os.path.join(out, name)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(model, os.path.join(directory, "adapter")).eval()
    with open(os.path.join(directory, "reference.json")) as f:
        prompts = [case["ids"] for case in json.load(f)["cases"]]
    cases = []
    with torch.no_grad():
        for ids in prompts:
            logits = adapted(torch.tensor([ids])).logits[0]
            cases.append({"ids": ids, "logits": [[round(v, 7) for v in row] for row in logits.tolist()]})
    source = "PeftModel.from_pretrained, peft %s, transformers %s, torch %s" % (
        peft.__version__,
        transformers.__version__,
        torch.__version__,
    )
    with open(os.path.join(directory, "adapter", "reference.json"), "w") as f:
        json.dump({"source": source, "cases": cases}, f)


def main(args):
    check = args[0] == "peft"
    if check:
        args = args[1:]
    out, names = args[0], args[1:] or list(FAMILIES)
    for name in names:
        if check:
            check_peft(name, out)
        else:
            cls, extra = FAMILIES[name]
            make(name, cls, extra, out)


if __name__ == "__main__":
    main(sys.argv[1:])
