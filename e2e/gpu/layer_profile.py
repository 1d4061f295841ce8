"""The pieces of one decoder layer's forward and backward in PyTorch + PEFT, each timed alone:
the reference for `kubetune-device-check --profile` (model/src/profile.rs), with the same
names, shapes and flags. Base in bf16, LoRA r=16 on all seven projections in f32 (PEFT's
mixed precision), attention through PyTorch's scaled_dot_product_attention as transformers
runs it. Prints one JSON object; e2e/gpu/check.sh runs both and report.py compares them.

  layer_profile.py --device cuda [--batch 4 --seq 512 --hidden 2048 --intermediate 5632 --heads 16
                            --kv-heads 8 --vocab 16384 --reps 20]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEAD_ROWS = 256


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    for name, default in [("batch", 4), ("seq", 512), ("hidden", 2048), ("intermediate", 5632), ("heads", 16),
                          ("kv-heads", 8), ("vocab", 16384), ("reps", 20)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=1, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(a.seq, 16), attn_implementation="sdpa")
    layer = llama.LlamaDecoderLayer(cfg, 0).to(dev, torch.bfloat16)
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS), layer)
    for name, param in layer.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
        param.requires_grad_("lora_" in name)
    adapters = [q for n, q in layer.named_parameters() if "lora_" in n]
    rotary = llama.LlamaRotaryEmbedding(cfg).to(dev)
    norm = llama.LlamaRMSNorm(a.hidden, eps=cfg.rms_norm_eps).to(dev, torch.bfloat16)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False).to(dev, torch.bfloat16).requires_grad_(False)

    b, t, d = a.batch, a.seq, a.hidden // a.heads

    def leaf(*dims):
        return torch.randn(*dims, device=dev, dtype=torch.bfloat16).requires_grad_()

    def constant(*dims):
        return torch.randn(*dims, device=dev, dtype=torch.bfloat16)

    x, h = leaf(b, t, a.hidden), leaf(b, t, a.intermediate)
    q, k, v = leaf(b, a.heads, t, d), leaf(b, a.kv_heads, t, d), leaf(b, a.kv_heads, t, d)
    gate, up = leaf(b, t, a.intermediate), leaf(b, t, a.intermediate)
    g_hidden, g_inter, g_q = constant(b, t, a.hidden), constant(b, t, a.intermediate), constant(b, a.heads, t, d)
    pos = torch.arange(t, device=dev)[None]
    cos, sin = rotary(x, pos)
    rows_n = min(HEAD_ROWS, b * t)
    targets = (torch.arange(rows_n, device=dev) * 31) % a.vocab
    leaves = [x, h, q, k, v, gate, up] + adapters

    def back(y, g):
        if isinstance(y, tuple):
            y = y[0]
        (y * g).sum().backward()

    def attention():
        groups = a.heads // a.kv_heads
        out = F.scaled_dot_product_attention(q, llama.repeat_kv(k, groups), llama.repeat_kv(v, groups), is_causal=True)
        return out.transpose(1, 2).reshape(b, t, a.hidden)

    def q_proj_rope():
        qh = layer.self_attn.q_proj(x).view(b, t, a.heads, d).transpose(1, 2)
        return llama.apply_rotary_pos_emb(qh, qh, cos, sin)[0]

    def head_chunk():
        rows = x.detach().flatten(0, 1)[:rows_n].clone().requires_grad_()
        logits = head(norm(rows)).float()
        F.cross_entropy(logits, targets, reduction="sum").backward()

    pieces = {
        "layer": lambda: back(layer(hidden_states=x, attention_mask=None, position_ids=pos,
                                    position_embeddings=(cos, sin)), g_hidden),
        "rms_norm": lambda: back(layer.input_layernorm(x), g_hidden),
        "q_proj_rope": lambda: back(q_proj_rope(), g_q),
        "o_proj": lambda: back(layer.self_attn.o_proj(x), g_hidden),
        "attention": lambda: back(attention(), g_hidden),
        "gate_proj": lambda: back(layer.mlp.gate_proj(x), g_inter),
        "down_proj": lambda: back(layer.mlp.down_proj(h), g_hidden),
        "gated_silu": lambda: back(F.silu(gate) * up, g_inter),
        "head_chunk": head_chunk,
    }

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run(f):
        for t_ in leaves:
            t_.grad = None
        f()

    ms = {}
    for name, f in pieces.items():
        for _ in range(2):
            run(f)
        sync()
        start = time.perf_counter()
        for _ in range(max(a.reps, 1)):
            run(f)
        sync()
        ms[name] = (time.perf_counter() - start) * 1000 / max(a.reps, 1)
    print(json.dumps({"device": str(dev), "torch": torch.__version__, "reps": a.reps, "ms": ms}))


if __name__ == "__main__":
    main()
