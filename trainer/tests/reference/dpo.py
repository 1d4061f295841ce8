"""The DPO loss and its gradient on one batch of the tiny model, computed with TRL's formulas
written out in plain PyTorch, for `tests/trainer/dpo_reference.rs`.

TRL's DPOTrainer with PEFT: the reference is the same model with the adapter disabled, the
per-sequence log-probability is the sum over the answer's tokens (for loss_type "ipo" divided by
their count, as TRL's concatenated_forward does), and

    margin  = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    sigmoid = -logsigmoid(beta * margin) * (1 - ls) - logsigmoid(-beta * margin) * ls
    ipo     = (margin - 1 / (2 * beta)) ** 2
    rewards = beta * (pi - ref), accuracy = mean(chosen reward > rejected reward)

with the loss averaged over the pairs. The adapter is LoRA written by hand (delta = scale * B A x
on each projection), so only torch, transformers and safetensors are needed, not TRL or PEFT.

Run once, by hand, when the formulas or the tiny model change (CI never runs it: it needs
PyTorch; the tests read the committed outputs), from the repository root:

    cargo run -p kubetune-model --bin kubetune-tiny-model -- --out /tmp/tiny
    python trainer/tests/reference/dpo.py /tmp/tiny trainer/tests/reference/dpo

It writes adapter_config.json and adapter_model.safetensors (a random adapter, seeded, so the
policy differs from the reference) and reference.json: the batch's token ids and answer masks,
and for each loss the per-pair log-probs, the loss, the rewards and every adapter gradient.
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

R, ALPHA = 4, 8.0
MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
LOSSES = {
    "sigmoid": dict(beta=0.5, loss="sigmoid", labelSmoothing=0.1),
    "ipo": dict(beta=0.5, loss="ipo", labelSmoothing=0.0),
}


def peft_name(layer, module, which):
    return f"base_model.model.model.layers.{layer}.{MODULES[module]}.{module}.lora_{which}.weight"


def make_adapter(model, gen):
    """A and B for every projection, small random values (B is not zero, unlike a fresh PEFT
    adapter, so the policy is not the reference)."""
    tensors = {}
    for layer, block in enumerate(model.model.layers):
        for module, parent in MODULES.items():
            linear = getattr(getattr(block, parent), module)
            out_f, in_f = linear.weight.shape
            a = torch.randn(R, in_f, generator=gen) * 0.2
            b = torch.randn(out_f, R, generator=gen) * 0.2
            tensors[peft_name(layer, module, "A")] = a.requires_grad_()
            tensors[peft_name(layer, module, "B")] = b.requires_grad_()
    return tensors


def attach(model, tensors, enabled):
    """Adds scale * B A x to each projection's output while `enabled[0]` is true."""
    scale = ALPHA / R
    for layer, block in enumerate(model.model.layers):
        for module, parent in MODULES.items():
            linear = getattr(getattr(block, parent), module)
            a, b = tensors[peft_name(layer, module, "A")], tensors[peft_name(layer, module, "B")]

            def hook(_mod, inputs, output, a=a, b=b):
                if not enabled[0]:
                    return output
                return output + (inputs[0] @ a.T * scale) @ b.T

            linear.register_forward_hook(hook)


def make_batch(gen, vocab):
    """Two pairs; each sequence is prompt + answer token ids, padded on the right with EOS (1)."""
    pairs = []
    for prompt_len, chosen_len, rejected_len in [(5, 4, 6), (3, 7, 2)]:
        prompt = torch.randint(2, vocab, (prompt_len,), generator=gen).tolist()
        seq = lambda n: prompt + torch.randint(2, vocab, (n,), generator=gen).tolist()
        pairs.append(
            dict(
                chosen=dict(ids=seq(chosen_len), trained=[False] * prompt_len + [True] * chosen_len),
                rejected=dict(ids=seq(rejected_len), trained=[False] * prompt_len + [True] * rejected_len),
            )
        )
    return pairs


def sequence_logps(model, seqs, average):
    """Per sequence, the log-probs of its answer tokens, summed (or averaged)."""
    length = max(len(s["ids"]) for s in seqs)
    ids = torch.tensor([s["ids"] + [1] * (length - len(s["ids"])) for s in seqs])
    mask = torch.tensor([s["trained"] + [False] * (length - len(s["trained"])) for s in seqs])
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:].unsqueeze(2)).squeeze(2)
    m = mask[:, 1:].float()
    sums = (logp * m).sum(-1)
    return sums / m.sum(-1) if average else sums


def dpo(model, tensors, enabled, pairs, beta, loss, labelSmoothing):
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    n = len(pairs)
    average = loss == "ipo"
    with torch.no_grad():
        enabled[0] = False
        ref = sequence_logps(model, seqs, average)
        enabled[0] = True
    pi = sequence_logps(model, seqs, average)
    margin = (pi[:n] - ref[:n]) - (pi[n:] - ref[n:])
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1 - labelSmoothing) - F.logsigmoid(-beta * margin) * labelSmoothing
    else:
        losses = (margin - 1 / (2 * beta)) ** 2
    total = losses.mean()
    for t in tensors.values():
        t.grad = None
    total.backward()
    chosen_rewards = beta * (pi[:n] - ref[:n]).detach()
    rejected_rewards = beta * (pi[n:] - ref[n:]).detach()
    return dict(
        settings=dict(beta=beta, loss=loss, labelSmoothing=labelSmoothing),
        policy_logps=pi.detach().tolist(),
        reference_logps=ref.tolist(),
        loss=total.item(),
        rewards_chosen=chosen_rewards.mean().item(),
        rewards_rejected=rejected_rewards.mean().item(),
        rewards_accuracies=(chosen_rewards > rejected_rewards).float().mean().item(),
        gradients={k: [float(f"{x:.8g}") for x in t.grad.flatten().tolist()] for k, t in tensors.items()},
    )


def main(model_dir, out_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(20)
    tensors = make_adapter(model, gen)
    enabled = [True]
    attach(model, tensors, enabled)
    pairs = make_batch(gen, model.config.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: t.detach().contiguous() for k, t in tensors.items()}, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(
            dict(
                peft_type="LORA",
                task_type="CAUSAL_LM",
                r=R,
                lora_alpha=ALPHA,
                lora_dropout=0.0,
                target_modules=sorted(MODULES),
                base_model_name_or_path="kubetune/tiny-llama",
                bias="none",
            ),
            f,
            indent=2,
        )
    results = {name: dpo(model, tensors, enabled, pairs, **s) for name, s in LOSSES.items()}
    assert all(math.isfinite(r["loss"]) for r in results.values())
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(dict(pairs=pairs, losses=results), f)
        f.write("\n")
    for name, r in results.items():
        print(f"{name}: loss {r['loss']:.6f}, rewards/chosen {r['rewards_chosen']:.6f}, accuracy {r['rewards_accuracies']}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
