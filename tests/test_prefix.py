"""Prefix tuning (autopeft/methods/prefix.py) on the tiny BERT, Llama (grouped-query attention, rotary
positions) and GPT-2 (fused c_attn): the prefix really is extra keys and values every layer attends to,
padding stays masked, the parameter count follows the formula, and batches of 1 and more agree."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from autopeft import adapter_io
from autopeft.methods import MethodContext, get
from autopeft.methods.prefix import attention_modules
from autopeft.models import count_parameters, load_classifier

FAMILIES = ("bert", "llama", "gpt2")
IMPLEMENTATIONS = ("sdpa", "eager")
# (layers, key/value heads, head dim) of the tiny models in autopeft.models._tiny_config
GEOMETRY = {"bert": (2, 2, 16), "llama": (2, 2, 8), "gpt2": (2, 2, 16)}
DIRECT = {"num_virtual_tokens": 3, "reparameterize": False, "hidden": 8}
TEXTS = ["a gripping, funny film that never lets go", "dull", "warm and wise"]


def _adapted(folder: Path, params: dict, implementation: str = "sdpa", task_type: str = "SEQ_CLS"):
    if task_type == "SEQ_CLS":
        base, tokenizer = load_classifier(str(folder), 2, seed=0)
    else:
        base, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "left"  # as decoders are batched here
    base.set_attn_implementation(implementation)
    torch.manual_seed(0)
    return adapter_io.attach(base, "prefix", params, MethodContext(task_type)).eval(), tokenizer


class _Recorder:
    """A stand-in cache that keeps each layer's keys and values."""

    def __init__(self) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.kv.append((key, value))
        return key, value


@torch.no_grad()
def _context_keys_values(base, context: torch.Tensor, positions: torch.Tensor) -> list[tuple]:
    """Every layer's keys and values for `context` alone, as the (unadapted) base computes them."""
    modules = dict(base.named_modules())
    recorder = _Recorder()
    handles = [modules[name].register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "cache": recorder}),
                                                       with_kwargs=True) for name in attention_modules(base)]
    base(input_ids=context, position_ids=positions)
    for handle in handles:
        handle.remove()
    return recorder.kv


def _set_prefix(model, kv: list[tuple]) -> None:
    """Make the (direct) prefix equal to the given per-layer keys and values of one row."""
    encoder = model.prefix_encoder
    flat = torch.stack([torch.stack([key[0], value[0]]) for key, value in kv])  # layers, 2, heads, P, dim
    encoder.embedding.data.copy_(flat.permute(3, 0, 1, 2, 4).reshape(encoder.num_tokens, -1))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_prefix_acts_exactly_like_a_context_every_layer_attends_to(tiny_models, family,
                                                                        implementation) -> None:
    """Reference: the base model reading [C, X] with a custom mask in which C attends to C only and X to C
    and X. With the prefix set to C's own keys and values, X's outputs must be the reference's."""
    model, _ = _adapted(tiny_models[family], DIRECT, implementation)
    reference, _ = load_classifier(str(tiny_models[family]), 2, seed=0)
    reference.eval()
    n, length = DIRECT["num_virtual_tokens"], 5
    generator = torch.Generator().manual_seed(1)
    context = torch.randint(1000, 2000, (1, n), generator=generator)
    inputs = torch.randint(1000, 2000, (2, length), generator=generator)
    # Absolute positions: C takes 0..n-1 and X follows. Rotary: the prefix sits just before each row's first
    # token, wherever that is (here position 4), so its keys are C's computed at positions -n..-1.
    first = 4 if family == "llama" else n
    context_positions = torch.arange(first - n, first)[None]
    input_positions = torch.arange(first, first + length)[None]
    captured_positions = context_positions - first if family == "llama" else context_positions
    _set_prefix(model, _context_keys_values(reference, context, captured_positions))

    causal = family != "bert"
    total = n + length
    allowed = torch.ones(total, total, dtype=torch.bool)
    allowed = allowed.tril() if causal else allowed
    allowed[:n, n:] = False  # C never sees X
    with torch.no_grad():
        expected = reference(input_ids=torch.cat([context.expand(2, -1), inputs], 1),
                             attention_mask=allowed[None, None].expand(2, 1, -1, -1),
                             position_ids=torch.cat([context_positions, input_positions], 1),
                             output_hidden_states=True).hidden_states
        got = model(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                    position_ids=input_positions, output_hidden_states=True)
    assert got.hidden_states[-1].shape == (2, length, 32)  # queries do not grow: outputs keep the length
    for layer, (want, have) in enumerate(zip(expected, got.hidden_states)):
        assert torch.allclose(have, want[:, n:], atol=1e-5), f"hidden states of layer {layer} differ"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prefix_changes_outputs_from_the_start(tiny_models, family) -> None:
    base, tokenizer = load_classifier(str(tiny_models[family]), 2, seed=0)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = base.eval()(**batch).logits
    model, _ = _adapted(tiny_models[family], {**DIRECT, "reparameterize": True})
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, before, atol=1e-3)


def _with_pad_ids(batch: dict, pad_id: int) -> dict:
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad_id)
    return {"input_ids": ids, "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_real_positions_do_not_see_what_the_pads_are(tiny_models, family, implementation) -> None:
    model, tokenizer = _adapted(tiny_models[family], {**DIRECT, "reparameterize": True}, implementation)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)  # BERT pads right, decoders left
    assert (batch["attention_mask"] == 0).any()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        one = model(**_with_pad_ids(batch, tokenizer.pad_token_id), output_hidden_states=True)
        other = model(**_with_pad_ids(batch, 1999), output_hidden_states=True)
    assert torch.allclose(one.logits, other.logits, atol=1e-6)
    assert torch.allclose(one.hidden_states[-1][real], other.hidden_states[-1][real], atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ("bert", "llama"))
def test_a_row_alone_and_padded_in_a_batch_agree(tiny_models, family, implementation) -> None:
    """Batch size 1 vs > 1. Llama's rotary scores depend only on distances, so the base model ignores how
    much a row is left-padded; the prefix must not change that (it is placed at each row's first real
    position). GPT-2 is not in this test: its absolute positions count the left pads, in the base too."""
    model, tokenizer = _adapted(tiny_models[family], {**DIRECT, "reparameterize": True}, implementation)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model(**batch, output_hidden_states=True)
        for row, text in enumerate(TEXTS):
            alone = model(**tokenizer([text], return_tensors="pt"), output_hidden_states=True)
            real = batch["attention_mask"][row].bool()
            assert torch.allclose(together.logits[row], alone.logits[0], atol=1e-5)
            hidden = together.hidden_states[-1][row][real]
            assert torch.allclose(hidden, alone.hidden_states[-1][0], atol=1e-5)


@pytest.mark.parametrize("reparameterize", (False, True))
@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_follows_the_formula(tiny_models, family, reparameterize) -> None:
    tokens, hidden = 5, 12
    model, _ = _adapted(tiny_models[family], {"num_virtual_tokens": tokens, "reparameterize": reparameterize,
                                              "hidden": hidden})
    layers, kv_heads, head_dim = GEOMETRY[family]
    width = layers * 2 * kv_heads * head_dim  # every layer's keys and values of one virtual token
    expected = tokens * width if not reparameterize else (
        tokens * hidden + (hidden * hidden + hidden) + (hidden * width + width))  # embedding, 2 linear layers
    own = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "prefix_" in n)
    assert own == expected
    head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "score"))
    assert count_parameters(model)[0] == expected + head


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_a_causal_lm_decodes_step_by_step_as_it_reads_at_once(tiny_causal_models, family) -> None:
    """With the model's own cache (generation): the prefix is added in front of the cached keys at every
    step, so the last token's logits match a full forward pass, on a left-padded batch."""
    model, tokenizer = _adapted(tiny_causal_models[family], {**DIRECT, "reparameterize": True},
                                task_type="CAUSAL_LM")
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, cache=cache).logits[:, -1]
    assert torch.allclose(step, full, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_models) -> None:
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = _adapted(tiny_models["llama"], {**DIRECT, "reparameterize": True})
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "prefix_" in n]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_deep_copy_has_its_own_prefix(tiny_models) -> None:
    model, tokenizer = _adapted(tiny_models["gpt2"], DIRECT)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        before = model(**batch).logits
        assert torch.equal(twin(**batch).logits, before)
        twin.prefix_encoder.embedding.mul_(3.0)
        assert torch.equal(model(**batch).logits, before)
        assert not torch.allclose(twin(**batch).logits, before)


def test_bad_input_and_unsupported_attention_say_why(tiny_models) -> None:
    base, _ = load_classifier(str(tiny_models["bert"]), 2, seed=0)
    with pytest.raises(ValueError, match="prefix: num_virtual_tokens=0"):
        adapter_io.attach(base, "prefix", {**DIRECT, "num_virtual_tokens": 0}, MethodContext())
    base.config._attn_implementation = "flash_attention_2"  # as a model loaded that way reports it
    problem = get("prefix").problem(base)
    assert problem and "prefix" in problem and "flash_attention_2" in problem


class _Layer(torch.nn.Module):
    """An attention layer as transformers 5.17 calls one: its cache comes as `past_key_values`."""

    def forward(self, hidden: torch.Tensor, past_key_values=None) -> torch.Tensor:
        if past_key_values is not None:
            past_key_values.update(hidden * 2, hidden * 3, 0)
        return hidden


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": 50, "max_position_embeddings": 16})()
        self.embed, self.attn = torch.nn.Embedding(50, 4), _Layer()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.attn(self.embed(input_ids), past_key_values=DynamicCache())


def test_the_prefix_scale_is_read_from_a_layer_that_takes_past_key_values() -> None:
    """transformers renamed the cache argument (`past_key_values` in 5.17, `cache` in 5.24); the recorder
    went in as `cache` alone, which a 5.17 layer never reads, so prefix tuning failed to start there."""
    from autopeft.methods.prefix import activation_scale

    model = _Model()
    scale = activation_scale(model, ["attn"], length=8)
    hidden = model.embed(torch.randint(50, (1, 8), generator=torch.Generator().manual_seed(0)))
    assert scale.shape == (1, 2)
    assert torch.allclose(scale[0], torch.stack([(hidden * 2).std(), (hidden * 3).std()]), rtol=1e-5)
