"""
Our checkpoints <-> the HuggingFace `transformers` NanoChat format (model_type "nanochat"), and our
checkpoints -> MLX-LM's `nanochat` model (the same files under our own weight names; see mlx_config).

transformers' NanoChatForCausalLM computes exactly our function: embedding -> RMSNorm -> blocks of
(RMSNorm -> attention with RoPE then QK-norm, GQA) + (RMSNorm -> fc1, relu², fc2) -> RMSNorm ->
untied lm_head -> tanh soft-cap 15. Its rotate_half is cat(x2, -x1), so its rotation of the pair
(x1, x2) is (x1 cos + x2 sin, x2 cos - x1 sin): the same sign convention as our apply_rotary_emb,
and q/k weights map unchanged. (The usual Llama rotate_half, cat(-x2, x1), would be the transpose
rotation; a model exported for that would need q/k rows permuted. The tests plant that bug.)
Norms have no weights on either side; our RMSNorm eps is torch's default for fp32, which we write
as rms_norm_eps. Of GPTConfig's optional additions only rope_base has an equivalent (rope_theta, both
ways); a model using any other (value embeddings, residual mixing, smear, backout, a q/k scale, sliding
windows) is refused with one line naming them, never exported as a different function.

The tokenizer becomes a `tokenizers` byte-level BPE (tokenizer.json): our split regex, every token
as GPT-2 byte-to-unicode text under its own id, merges recovered from the ranks, our special tokens
as added tokens, and `ignore_merges` on (tiktoken, which encodes our ids, takes a whole pre-token
that is itself a token without merging); encoding a text with special tokens puts BOS first, as our
server does with a raw prompt. The chat template renders a conversation to the same ids as
render_conversation, with contents as str or as OpenAI-style lists of text parts. This file reads
nothing from transformers or mlx: export needs only safetensors.
"""

import json
import os

import torch
from safetensors.torch import load_file, save

from nanochat.common import atomic_write
from nanochat.gpt import LOGIT_SOFTCAP, GPTConfig, layer_windows
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

ROPE_THETA = GPTConfig.rope_base  # the default base (a config.json without one means it)
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm(eps=None) on fp32 inputs


class NotExportable(ValueError):
    """The checkpoint's architecture has no transformers NanoChat equivalent."""


# -------------------------------------------------------------------------------------------------
# weights

def check_exportable(config):
    """Refuses (one line) a model using an optional addition that transformers' and mlx_lm's NanoChat cannot compute."""
    uses = [(f"{name}=True", f"without --{name.replace('_', '-')}")  # (the field in use, how to train without it)
            for name in ("value_embeds", "resid_mix", "smear", "backout") if getattr(config, name)]
    if config.qk_scale != GPTConfig.qk_scale:
        uses.append((f"qk_scale={config.qk_scale!r}", "with --qk-scale 1"))
    if any(w is not None for w in layer_windows(config)):
        uses.append((f"window_pattern={config.window_pattern!r}", "with --window-pattern L"))
    if uses:
        raise NotExportable(f"this model uses {', '.join(u for u, _ in uses)}, which transformers' NanoChat (and "
                            f"mlx_lm's) cannot compute (rope_base exports); train an exportable model "
                            f"{', '.join(how for _, how in uses)} (speedrun.sh: NANOCHAT_EXPORTABLE=1)")


def shape_fields(config):
    """The config.json fields that give the network's shape, named as transformers and mlx_lm both read them."""
    return {"model_type": "nanochat", "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
            "intermediate_size": 4 * config.n_embd, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
            "max_position_embeddings": config.sequence_len}


def hf_config(config, tokenizer):
    bos = tokenizer.get_bos_token_id()
    return {
        "architectures": ["NanoChatForCausalLM"],
        **shape_fields(config),
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "final_logit_softcapping": LOGIT_SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": [tokenizer.encode_special("<|assistant_end|>"), bos],
        "pad_token_id": bos,
        "use_cache": True,
        "dtype": "float32",
    }


def key_map(n_layer):
    """Our state-dict keys -> transformers' (vocabulary-sized tensors are cut/padded separately)."""
    mapping = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        for a, b in (("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"), ("attn.c_v", "self_attn.v_proj"),
                     ("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            mapping[f"{ours}{a}.weight"] = f"{theirs}{b}.weight"
    return mapping


def to_hf_state_dict(state_dict, config):
    """Our weights as transformers names them, vocabulary padding rows removed; refuses what does not map."""
    check_exportable(config)
    if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
        raise NotExportable(f"heads do not divide the width: n_embd {config.n_embd}, n_head {config.n_head}, "
                            f"n_kv_head {config.n_kv_head}")
    mapping = key_map(config.n_layer)
    state = state_dict
    unknown, missing = sorted(set(state) - set(mapping)), sorted(set(mapping) - set(state))
    if unknown or missing:
        raise NotExportable(f"this model's parameters do not match the NanoChat architecture "
                            f"(no HF equivalent for {unknown[:5]}{'...' if len(unknown) > 5 else ''}; "
                            f"missing {missing[:5]}); only the stock nanochat GPT can be exported")
    out = {}
    for ours, theirs in mapping.items():
        tensor = state[ours]
        if ours in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:config.vocab_size]  # the real vocabulary: HF can never sample a padding id
        out[theirs] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def from_hf_config(hf):
    if hf.get("model_type") != "nanochat":
        raise NotExportable(f"model_type is {hf.get('model_type')!r}, not 'nanochat'")
    checks = {"hidden_act": "relu2", "attention_bias": False, "tie_word_embeddings": False}
    for key, want in checks.items():
        if hf.get(key, want) != want:
            raise NotExportable(f"{key} = {hf.get(key)!r}; our GPT needs {want!r}")
    if hf.get("final_logit_softcapping") != LOGIT_SOFTCAP:
        raise NotExportable(f"final_logit_softcapping = {hf.get('final_logit_softcapping')}; ours is {LOGIT_SOFTCAP}")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", ROPE_THETA)}
    if rope.get("rope_type", "default") != "default" or not float(rope.get("rope_theta", ROPE_THETA)) > 1:
        raise NotExportable(f"rope {rope}; ours is default RoPE (any theta > 1)")
    if hf["intermediate_size"] != 4 * hf["hidden_size"]:
        raise NotExportable(f"intermediate_size {hf['intermediate_size']} != 4 x hidden_size {hf['hidden_size']}")
    return GPTConfig(sequence_len=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                     n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                     n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
                     rope_base=float(rope.get("rope_theta", ROPE_THETA)))


def from_hf_state_dict(tensors, config):
    """transformers' weights -> our state dict (vocabulary rows padded with zeros to our padded size)."""
    padded = -(-config.vocab_size // 64) * 64  # GPT pads its vocabulary to a multiple of 64
    inverse = {theirs: ours for ours, theirs in key_map(config.n_layer).items()}
    unknown = sorted(set(tensors) - set(inverse))
    missing = sorted(set(inverse) - set(tensors))
    if unknown or missing:
        raise NotExportable(f"unexpected tensors {unknown[:5]} / missing {missing[:5]} for a NanoChat model")
    out = {}
    for theirs, tensor in tensors.items():
        ours = inverse[theirs]
        tensor = tensor.to(torch.float32)
        if ours in ("transformer.wte.weight", "lm_head.weight"):
            if tensor.size(0) != config.vocab_size:
                raise NotExportable(f"{theirs} has {tensor.size(0)} rows, vocab_size is {config.vocab_size}")
            tensor = torch.cat([tensor, tensor.new_zeros(padded - tensor.size(0), tensor.size(1))])
        out[ours] = tensor.contiguous()
    return out


# -------------------------------------------------------------------------------------------------
# MLX-LM

MLX_RMS_NORM_EPS = 1e-5  # mlx_lm/models/nanochat.py's rms_norm: a constant, read from no config field


def mlx_config(config, tokenizer):
    """
    config.json for mlx_lm's own `nanochat` model (mlx_lm/models/nanochat.py), which takes these fields
    and our own weight names. It computes our function (same RoPE sign convention, QK-norm after RoPE,
    relu², soft-cap 15) except that its RMSNorm eps is 1e-5 where ours is ~1.2e-7: the norms' inputs
    have mean squares of ~1 or more in a trained model, so logits move by ~1e-4 (a trained d2 over 1024
    positions: 1.3e-4 at most, every argmax the same), enough to flip a greedy token only at a near-tie.
    """
    bos = tokenizer.get_bos_token_id()
    return {
        **shape_fields(config),
        "rope_theta": float(config.rope_base),
        "bos_token_id": bos,
        "eos_token_id": [tokenizer.encode_special("<|assistant_end|>"), bos],
    }


def to_mlx_state_dict(state_dict, config):
    """Our weights under our own names (as mlx_lm's nanochat model reads them), padding rows removed."""
    inverse = {theirs: ours for ours, theirs in key_map(config.n_layer).items()}
    return {inverse[theirs]: tensor for theirs, tensor in to_hf_state_dict(state_dict, config).items()}


# -------------------------------------------------------------------------------------------------
# tokenizer

def bytes_to_unicode():
    """GPT-2's byte -> printable character table used by byte-level BPE files."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_ranks(ranks):
    """
    Every (left, right) pair of earlier tokens whose concatenation is token r, ordered by r: tiktoken
    merges any adjacent pair whose bytes form a token (lowest rank first), not only the pair training
    created, so the HF file needs a rule for each such split.
    """
    rank_of = {token: r for r, token in enumerate(ranks)}
    merges = []
    for r, token in enumerate(ranks):
        if r < 256:
            continue
        for i in range(1, len(token)):
            left, right = rank_of.get(token[:i]), rank_of.get(token[i:])
            if left is not None and right is not None and left < r and right < r:
                merges.append((token[:i], token[i:]))
    return merges


def chat_template():
    """
    Jinja that renders {'messages': [...]} exactly as RustBPETokenizer.render_conversation (BOS included).
    A message's content may also be a list of parts, as OpenAI clients send it: system and user parts
    are {'type': 'text', 'text': ...} and are concatenated (as mlx_lm's server joins them); assistant
    parts may also be python / python_output. The loops read m['content'] itself, which is how vLLM
    recognises a template that takes lists (else it flattens them itself, joined by newlines).
    """
    def text_parts(role):  # a system or user message's content: a str, or text parts concatenated
        return ("{%- if m['content'] is string -%}{{- m['content'] -}}"
                "{%- else -%}{%- for part in m['content'] -%}"
                "{%- if part['type'] != 'text' -%}"
                "{{- raise_exception('ROLE content parts must be of type text, not ' + part['type']) -}}"
                "{%- endif -%}{{- part['text'] -}}{%- endfor -%}{%- endif -%}").replace("ROLE", role)
    return (
        "{{- '<|bos|>' -}}"
        "{%- set first = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
        "{%- for m in messages -%}"
        "{%- set expected = ['user', 'assistant'][(loop.index0 - first) % 2] -%}"
        "{%- if m['role'] in ['user', 'assistant'] and m['role'] != expected -%}"
        "{{- raise_exception('after an optional system message, roles alternate user/assistant') -}}{%- endif -%}"
        # the model has no system role: the system prompt heads the first user turn (render_conversation's rule)
        "{%- if m['role'] == 'system' -%}"
        "{%- if not loop.first or messages | length < 2 -%}"
        "{{- raise_exception('a system message may only come first, followed by a user message') -}}{%- endif -%}"
        "{{- '<|user_start|>' -}}" + text_parts("system") + "{{- '\\n\\n' -}}"
        "{%- elif m['role'] == 'user' -%}"
        "{%- if not (loop.index0 == 1 and first) -%}{{- '<|user_start|>' -}}{%- endif -%}"
        + text_parts("user") + "{{- '<|user_end|>' -}}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{- '<|assistant_start|>' -}}"
        "{%- if m['content'] is string -%}{{- m['content'] -}}"
        "{%- else -%}{%- for part in m['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
        "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
        "{%- else -%}{{- raise_exception('unknown assistant part type ' + part['type']) -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|assistant_end|>' -}}"
        "{%- else -%}{{- raise_exception('unknown role ' + m['role'] + '; use system, user or assistant') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
    )


def tokenizer_files(tokenizer, model_max_length):
    """(tokenizer.json, tokenizer_config.json) contents for `tokenizer`."""
    table = bytes_to_unicode()
    text = lambda token: "".join(table[b] for b in token)  # noqa: E731
    ranks = tokenizer.get_mergeable_ranks()
    vocab = {text(token): r for r, token in enumerate(ranks)}
    bos = tokenizer.get_bos_token_id()
    bos_at = lambda type_id: {"SpecialToken": {"id": "<|bos|>", "type_id": type_id}}  # noqa: E731
    seq = lambda name, type_id: {"Sequence": {"id": name, "type_id": type_id}}  # noqa: E731
    added = [{"id": tokenizer.encode_special(name), "content": name, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for name in SPECIAL_TOKENS]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.get_pattern()}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        # encode(text) puts BOS first, as our server does to a raw-text prompt (vLLM's and mlx_lm's
        # /v1/completions encode with special tokens); chat templates are encoded without, the BOS is in the text
        "post_processor": {"type": "TemplateProcessing", "single": [bos_at(0), seq("A", 0)],
                           "pair": [bos_at(0), seq("A", 0), bos_at(1), seq("B", 1)],  # as transformers builds it
                           "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [bos], "tokens": ["<|bos|>"]}}},
        # a Sequence of one ByteLevel decoder decodes as ByteLevel does, but mlx_lm then streams text with its
        # generic detokenizer: its byte-level one drops the first space of every reply
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [[text(a), text(b)] for a, b in merges_from_ranks(ranks)]},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "add_bos_token": True,  # what the post-processor does (some tokenizer classes rebuild it from this flag)
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template(),
    }
    return tokenizer_json, config


def tokenizer_from_json(tokenizer_json):
    """Our tokenizer from a tokenizers byte-level BPE file whose ids are ranks (as export writes them)."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise NotExportable(f"tokenizer model is {model.get('type')!r}, not a byte-level BPE")
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    by_id = {}
    for piece, token_id in model["vocab"].items():
        try:
            by_id[token_id] = bytes(inverse[c] for c in piece)
        except KeyError:
            raise NotExportable(f"vocabulary entry {piece!r} is not byte-level BPE text") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise NotExportable("the BPE ids are not contiguous from 0")
    specials = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    expected = {name: len(by_id) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        raise NotExportable(f"special tokens {specials} differ from ours {expected}")
    pattern = None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            pattern = p["pattern"].get("Regex")
    if not pattern:
        raise NotExportable("the tokenizer has no Split pre-tokenizer regex")
    return RustBPETokenizer(pattern, [by_id[i] for i in range(len(by_id))])


# -------------------------------------------------------------------------------------------------
# folders

def export_folder(model, tokenizer, out_dir, folder_format="hf"):
    """
    Writes config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json:
    for transformers (and vLLM, SGLang) with folder_format "hf", for mlx_lm with "mlx" (the same files,
    with our weight names and mlx_config; transformers cannot load that folder).
    """
    config = model.config
    if folder_format not in ("hf", "mlx"):
        raise ValueError(f"folder_format is 'hf' or 'mlx', not {folder_format!r}")
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise NotExportable(f"the tokenizer has {tokenizer.get_vocab_size()} ids, the model {config.vocab_size}")
    if folder_format == "hf":
        tensors, cfg = to_hf_state_dict(model.state_dict(), config), hf_config(config, tokenizer)
    else:
        tensors, cfg = to_mlx_state_dict(model.state_dict(), config), mlx_config(config, tokenizer)
    with atomic_write(os.path.join(out_dir, "model.safetensors"), "wb") as f:  # a crash leaves no half file
        f.write(save(tensors, metadata={"format": "pt"}))
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
                  "pad_token_id": cfg["bos_token_id"]}
    tok_json, tok_config = tokenizer_files(tokenizer, config.sequence_len)
    for name, payload in (("config.json", cfg), ("generation_config.json", generation),
                          ("tokenizer.json", tok_json), ("tokenizer_config.json", tok_config)):
        text = json.dumps(payload, ensure_ascii=False, indent=1 if name != "tokenizer.json" else None)
        with atomic_write(os.path.join(out_dir, name), "wb") as f:
            f.write(text.encode("utf-8"))
    return out_dir


def import_folder(folder):
    """(model state dict, GPTConfig, tokenizer) from a transformers NanoChat folder."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder} has no {name}: not a transformers NanoChat model folder")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = from_hf_config(json.load(f))
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        tokenizer = tokenizer_from_json(json.load(f))
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise NotExportable(f"tokenizer has {tokenizer.get_vocab_size()} ids, config.vocab_size is {config.vocab_size}")
    state = from_hf_state_dict(load_file(os.path.join(folder, "model.safetensors")), config)
    return state, config, tokenizer
