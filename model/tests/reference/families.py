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

A fourth step, added after the checkpoints were made, gives each family a tokenizer and its chat
template as transformers 5 saves them, without touching the weights or the reference values:

    python model/tests/reference/families.py chat model/tests/reference/families [FAMILY...]

It builds a tiny BPE tokenizer of the checkpoint's 128 ids (the family's special tokens first, so
that 1 is BOS and 2 and 3 are the stop tokens of generation_config.json; the rest trained with the
`tokenizers` library on the conversations below), sets a chat template modelled on the family's
own (Llama 3, Llama 2, Mistral's [INST], Qwen2's ChatML with a default system turn, Qwen3's with
its think blocks, Gemma 2's and Gemma 3's turns, Phi-3's tags), saves it with
`PreTrainedTokenizerFast.save_pretrained` (tokenizer.json, tokenizer_config.json and
`chat_template.jinja`, the template in its own file), and adds to reference.json a `chat` entry:
each conversation, the prompt `apply_chat_template` renders from the saved files (with and without
the generation prompt) and its token ids. The rest of reference.json is written back unchanged.
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


# Chat templates modelled on each family's own (as its instruct models ship them, tools left out),
# with the special tokens they use. The first four ids are <unk>-like, BOS, and the two stop
# tokens of generation_config.json ([2, 3]).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

LLAMA3_TOKENS = ["<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
LLAMA2_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
MISTRAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
QWEN_TOKENS = ["<unk>", "<|begin|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>"]
GEMMA_TOKENS = ["<pad>", "<bos>", "<eos>", "<end_of_turn>", "<start_of_turn>"]
PHI3_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# (template, special tokens by id, bos, eos, unk, pad, whether a system turn is allowed)
CHATS = {
    "llama3": (LLAMA3_TEMPLATE, LLAMA3_TOKENS, "<|begin_of_text|>", "<|eot_id|>", None, None, True),
    "llama-bias": (LLAMA2_TEMPLATE, LLAMA2_TOKENS, "<s>", "</s>", "<unk>", None, True),
    "mistral": (MISTRAL_TEMPLATE, MISTRAL_TOKENS, "<s>", "</s>", "<unk>", None, False),
    "qwen2": (QWEN2_TEMPLATE, QWEN_TOKENS, None, "<|im_end|>", None, "<|endoftext|>", True),
    "qwen3": (QWEN3_TEMPLATE, QWEN_TOKENS + ["<think>", "</think>"], None, "<|im_end|>", None, "<|endoftext|>", True),
    "gemma2": (GEMMA2_TEMPLATE, GEMMA_TOKENS, "<bos>", "<eos>", None, "<pad>", False),
    "gemma3": (GEMMA3_TEMPLATE, GEMMA_TOKENS, "<bos>", "<eos>", None, "<pad>", True),
    "phi3": (PHI3_TEMPLATE, PHI3_TOKENS, "<s>", "<|endoftext|>", "<unk>", None, True),
}

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
CONVERSATION = [
    {"role": "user", "content": "  Which river runs through Paris?\n"},
    {"role": "assistant", "content": "The Seine runs through Paris."},
    {"role": "user", "content": "And through London?"},
]
# Qwen3 keeps the reasoning of the turn after the last user message and drops earlier ones.
THINKING = [
    {"role": "user", "content": "Is 7 prime?"},
    {"role": "assistant", "content": "<think>\nIt has no divisors but 1 and 7.\n</think>\n\nYes, 7 is prime."},
]


def conversations(name, with_system):
    first = [SYSTEM] + CONVERSATION if with_system else CONVERSATION
    cases = [(first, True), (CONVERSATION[:2], False)]
    if name == "qwen3":
        cases.append((THINKING, False))
    return cases


# Qwen2's split rule: transformers 5 loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer,
# which puts this rule, byte-level BPE and NFC in place of what tokenizer.json says.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def chat_tokenizer(specials, corpus, byte_level):
    """A BPE tokenizer of VOCAB ids: `specials` first (by id), then the corpus's characters and
    merges, trained with the `tokenizers` library: byte-level with Qwen2's split rule (the Qwen
    families), or Metaspace as sentencepiece-style models (the others)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if byte_level:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=specials[0]))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    vocab = tokenizer.get_vocab()
    assert len(vocab) <= VOCAB and all(vocab[t] == i for i, t in enumerate(specials)), vocab
    return tokenizer


def add_chat(name, out):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    template, specials, bos, eos, unk, pad, with_system = CHATS[name]
    directory = os.path.join(out, name)
    cases = conversations(name, with_system)
    # Train on the rendered conversations, so every character they use is in the vocabulary.
    from jinja2 import Template

    corpus = [m["content"] for messages, _ in cases for m in messages]
    corpus += [Template(template).render(messages=m, add_generation_prompt=g, bos_token="", eos_token="", raise_exception=print) for m, g in cases]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=chat_tokenizer(specials, corpus, byte_level=name.startswith("qwen")),
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
    )
    fast.chat_template = template
    fast.save_pretrained(directory)
    # Saved again by the class AutoTokenizer picks for the family (Qwen2Tokenizer for qwen2), so
    # that tokenizer.json holds the pipeline transformers tokenizes with.
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)

    # Render and tokenize with what was saved, as a user of the checkpoint would.
    from tokenizers import Tokenizer

    saved = AutoTokenizer.from_pretrained(directory)
    plain = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    assert saved.chat_template == template
    chats = []
    for messages, generation_prompt in cases:
        prompt = saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        ids = saved.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        assert ids == saved(prompt, add_special_tokens=False)["input_ids"]
        assert ids == plain.encode(prompt, add_special_tokens=False).ids, "tokenizer.json tokenizes as transformers does"
        assert all(i < VOCAB for i in ids)
        chats.append({"messages": messages, "add_generation_prompt": generation_prompt, "prompt": prompt, "ids": ids})

    path = os.path.join(directory, "reference.json")
    with open(path) as f:
        reference = json.load(f)
    reference["chat"] = {
        "source": "PreTrainedTokenizerFast.save_pretrained and apply_chat_template, transformers %s, tokenizers %s"
        % (transformers.__version__, _version("tokenizers")),
        "cases": chats,
    }
    with open(path, "w") as f:
        json.dump(reference, f)


def _version(package):
    from importlib.metadata import version

    return version(package)


def main(args):
    step = args[0] if args[0] in ("peft", "chat") else None
    if step:
        args = args[1:]
    out, names = args[0], args[1:] or list(FAMILIES)
    for name in names:
        if step == "peft":
            check_peft(name, out)
        elif step == "chat":
            add_chat(name, out)
        else:
            cls, extra = FAMILIES[name]
            make(name, cls, extra, out)


if __name__ == "__main__":
    main(sys.argv[1:])
