"""QLoRA's 4-bit base (NF4 Linear4bit layers at ~0.5 bytes per weight, GPT-2's Conv1D converted exactly,
merging to a plain fp32 model) and AdaLoRA's rank schedule (the budget falls from init_r to target_r,
impossible schedules fail the trial with a reason, pruned adapters reload), on the tiny models."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest
import torch
from tests_support import tiny_config, train_steps
from torch import nn

from autopeft import adapter_io, memory, methods
from autopeft.errors import TrialFailed
from autopeft.methods import MethodContext
from autopeft.methods.qlora import BLOCK_ROLES, dequantized_weight, quantize_layer
from autopeft.models import load_classifier, modules_for_roles
from autopeft.search import run_search

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "qv", "use_rslora": False}
QLORA = {**LORA, "double_quant": True, "compute_dtype": "fp32"}
ADALORA = {"init_r": 8, "target_r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all_linear",
           "warmup_fraction": 0.2, "final_fraction": 0.3, "update_every": 2}
TEXTS = ["a gripping, funny film", "dull and far too long", "one of the best of the year", "a mess",
         "warm and wise", "i want my money back", "quietly brilliant", "tedious"]


@pytest.fixture()
def bnb():
    """bitsandbytes, for the qlora tests (skipped without it; the AdaLoRA tests do not need it)."""
    return pytest.importorskip("bitsandbytes")


def _attach(folder: Path, name: str, params: dict, steps: int = 40, seed: int = 0):
    base, tokenizer = load_classifier(str(folder), 2, seed=seed)
    torch.manual_seed(0)
    return adapter_io.attach(base, name, params, MethodContext("SEQ_CLS", steps)), tokenizer


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([1, 0] * 4)}


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_stores_every_block_linear_in_nf4_at_half_a_byte_per_weight(bnb, tiny_models,
                                                                          double_quant) -> None:
    model, _ = _attach(tiny_models["llama"], "qlora", {**QLORA, "double_quant": double_quant})
    names = modules_for_roles(model.get_base_model(), BLOCK_ROLES)
    assert len(names) == 2 * 7  # all of them, not only LoRA's q and v
    for name in names:
        module = model.get_base_model().get_submodule(name)
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        assert isinstance(layer, bnb.nn.Linear4bit), name
        weight = layer.weight
        assert weight.quant_type == "nf4" and weight.compress_statistics is double_quant
        assert weight.quant_state.nested is double_quant
        assert not weight.requires_grad
        packed = weight.numel() * weight.element_size()
        assert packed / (layer.in_features * layer.out_features) == 0.5
    # The search's memory estimate (what a --memory-budget prunes on) sees the saving: 3.5 bytes per weight.
    lora, _ = _attach(tiny_models["llama"], "lora", LORA)
    block_weights = sum(m.weight.numel() for n, m in lora.get_base_model().named_modules()
                        if n in names and hasattr(m, "weight"))
    sizes = [memory.estimate(m, optimizer="adamw", precision="fp32", micro_batch_size=8, seq_len=16).weights
             for m in (lora, model)]
    assert sizes[0] - sizes[1] == 3.5 * block_weights


@pytest.mark.parametrize(("double_quant", "low", "high"), [(True, 0.5, 0.52), (False, 0.56, 0.57)])
def test_qlora_bytes_per_weight_including_the_block_scales(bnb, double_quant, low, high) -> None:
    """A 1024x1024 layer, so the fixed code tables do not dominate: 4 bits per weight plus a scale per
    64-weight block (fp32: +0.0625 bytes; double-quantized to 8 bits: +0.0156 and a little)."""
    layer = nn.Linear(1024, 1024)
    quantized = quantize_layer(layer, double_quant=double_quant, compute_dtype=torch.float32)
    stats = quantized.weight.quant_state.as_dict(packed=True)
    size = quantized.weight.numel() * quantized.weight.element_size()
    size += sum(v.numel() * v.element_size() for v in stats.values() if isinstance(v, torch.Tensor))
    assert low <= size / layer.weight.numel() <= high


def _worst_block_error(original: torch.Tensor, dequantized: torch.Tensor) -> float:
    """Largest error in a 64-weight block, as a fraction of that block's largest weight. NF4's widest gap
    (-1 to -0.696) bounds it by about 0.15 (a little more with 8-bit double-quantized scales)."""
    blocks = original.detach().reshape(-1, 64)
    errors = (dequantized.detach().reshape(-1, 64) - blocks).abs().max(1).values
    return float((errors / blocks.abs().max(1).values).max())


@pytest.mark.parametrize("shape", [(1024, 1024), (96, 32), (16, 32), (32, 96)])
def test_qlora_4bit_weights_are_within_nf4_error_whatever_the_row_length(bnb, shape) -> None:
    """Rows shorter than a block, or not whole blocks (the tiny models), included: bitsandbytes 0.50.2's
    native CPU dequantization gets those wrong (errors ~0.48), which qlora's own path avoids."""
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0])
    quantized = quantize_layer(layer, double_quant=True, compute_dtype=torch.float32)
    dense = dequantized_weight(quantized)
    assert _worst_block_error(layer.weight, dense) < 0.16
    x = torch.randn(3, 5, shape[1])
    assert torch.allclose(quantized(x), x @ dense.t() + layer.bias, atol=1e-5)


def test_qlora_turns_gpt2_conv1d_into_an_equivalent_4bit_linear(bnb) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 32)  # nf=96 outputs, nx=32 inputs: weight stored 32 x 96
    nn.init.normal_(conv.bias)
    quantized = quantize_layer(conv, double_quant=True, compute_dtype=torch.float32)
    dense = dequantized_weight(quantized)
    x = torch.randn(3, 5, 32)
    assert (quantized.in_features, quantized.out_features) == (32, 96)
    assert torch.allclose(quantized(x), x @ dense.t() + conv.bias, atol=1e-5)
    assert _worst_block_error(conv.weight.t().contiguous(), dense) < 0.16


def test_qlora_bf16_compute_trains_and_leaves_the_4bit_base_unchanged(bnb, tiny_models) -> None:
    model, tokenizer = _attach(tiny_models["bert"], "qlora", {**QLORA, "compute_dtype": "bf16"})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    layer = model.get_base_model().bert.encoder.layer[0].attention.self.query.get_base_layer()
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    train_steps(model, _batch(tokenizer), 1e-2, 3)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert torch.isfinite(_logits(model, _batch(tokenizer))).all()


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_qlora_merges_into_a_plain_fp32_model_of_the_original_architecture(bnb, tiny_models, family) -> None:
    from transformers.pytorch_utils import Conv1D

    model, tokenizer = _attach(tiny_models[family], "qlora", {**QLORA, "target_modules": "attention"})
    batch = _batch(tokenizer)
    train_steps(model, batch, 1e-2, 5)
    logits = _logits(model, batch)
    merged = adapter_io.merge(model).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert not hasattr(merged, "is_loaded_in_4bit") and not hasattr(merged, "peft_config")
    layers = [merged.get_submodule(n) for n in modules_for_roles(merged, BLOCK_ROLES)]
    assert all(type(m) is (Conv1D if family == "gpt2" else nn.Linear) for m in layers)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert torch.allclose(_logits(merged, batch), logits, atol=1e-4)


def test_qlora_refuses_an_already_quantized_base_with_a_reason(bnb, tiny_models) -> None:
    model, _ = _attach(tiny_models["bert"], "qlora", QLORA)
    problem = methods.get("qlora").problem(model.get_base_model())
    assert problem is not None and problem.startswith("qlora cannot quantize") and "NF4Linear" in problem


def test_qlora_saves_in_autopeft_format_and_reloads_a_requantized_base(bnb, tiny_models, tmp_path) -> None:
    model, tokenizer = _attach(tiny_models["gpt2"], "qlora", QLORA)
    batch = _batch(tokenizer)
    train_steps(model, batch, 1e-2, 3)
    adapter_io.save(model, tmp_path / "a")
    assert (tmp_path / "a" / adapter_io.OWN_CONFIG).is_file()
    fresh, _ = load_classifier(str(tiny_models["gpt2"]), 2, seed=1)
    reloaded = adapter_io.load(fresh, tmp_path / "a").eval()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules()) == 2 * 4
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))


def _kept(model: nn.Module) -> int:
    """Singular values still in use: nonzero entries of every lora_E."""
    return sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)


def test_adalora_budget_falls_from_init_r_to_target_r(tiny_models) -> None:
    model, tokenizer = _attach(tiny_models["bert"], "adalora", ADALORA, steps=40)
    config = model.peft_config["default"]
    assert (config.tinit, config.tfinal, config.deltaT, config.total_step) == (8, 12, 2, 40)
    layers = sum("lora_E" in n for n, _ in model.named_parameters())
    assert layers == 2 * 6
    budgets: dict[int, int] = {}  # step -> singular values kept right after that step's allocation

    def after_step(m: nn.Module, step: int) -> None:
        methods.get("adalora").after_step(m, step)
        budgets[step] = _kept(m)

    train_steps(model, _batch(tokenizer), 1e-2, 40, after_step=after_step)
    init, target = 8 * layers, 4 * layers
    assert all(budgets[s] == init for s in range(1, 9))  # warm-up: every triplet trains
    masked = [budgets[s] for s in range(10, 29, 2)]  # the budget phase re-allocates every 2 steps
    assert all(a >= b for a, b in itertools.pairwise(masked)), masked
    assert target < budgets[16] < init
    assert all(budgets[s] == target for s in range(28, 41))  # final phase: the target budget, fixed
    pattern = config.rank_pattern
    ranks = [sum(kept) for kept in pattern.values()]
    assert len(ranks) == layers and sum(ranks) == target and max(ranks) <= 8


def test_adalora_pruned_adapter_reloads_and_merges(tiny_models, tmp_path) -> None:
    model, tokenizer = _attach(tiny_models["bert"], "adalora", {**ADALORA, "warmup_fraction": 0.1,
                                                                 "final_fraction": 0.1}, steps=12)
    batch = _batch(tokenizer)
    train_steps(model, batch, 1e-2, 12, after_step=methods.get("adalora").after_step)
    logits = _logits(model, batch)
    adapter_io.save(model, tmp_path / "a")
    fresh, _ = load_classifier(str(tiny_models["bert"]), 2, seed=1)
    reloaded = adapter_io.load(fresh, tmp_path / "a").eval()
    ranks = [p.shape[0] for n, p in reloaded.named_parameters() if "lora_E" in n]
    assert sum(ranks) == 4 * 12 and max(ranks) <= 8  # the pruned triplets are dropped, not stored as zeros
    assert torch.allclose(_logits(reloaded, batch), logits, atol=1e-5)
    assert torch.allclose(_logits(adapter_io.merge(model).eval(), batch), logits, atol=1e-4)


@pytest.mark.parametrize(("change", "reason"), [
    ({"warmup_fraction": 0.6, "final_fraction": 0.4}, "leave no steps to reallocate"),
    ({"warmup_fraction": 0.5, "final_fraction": 0.5}, "leave no steps to reallocate"),
    ({"target_r": 8}, "target_r \\(8\\) must be below init_r \\(8\\)"),
])
def test_adalora_impossible_schedules_fail_the_trial_with_a_reason(tiny_models, change, reason) -> None:
    with pytest.raises(TrialFailed, match=f"adalora: .*{reason}"):
        _attach(tiny_models["bert"], "adalora", {**ADALORA, **change}, steps=10)


@pytest.mark.parametrize(("steps", "final_fraction"), [(1, 0.0), (2, 0.5), (4, 0.7)])
def test_adalora_with_no_step_to_score_ranks_before_fixing_them_fails_with_a_reason(
        tiny_models, steps: int, final_fraction: float) -> None:
    """peft fixes the ranks at step total - tfinal from the scores of the steps before it: at step 1 there were
    none, and the trial failed with a KeyError from inside peft (every AdaLoRA trial of a 1-step search)."""
    params = {**ADALORA, "warmup_fraction": 0.0, "final_fraction": final_fraction}
    with pytest.raises(TrialFailed, match="before the ranks are fixed; AdaLoRA needs at least 2"):
        _attach(tiny_models["bert"], "adalora", params, steps=steps)


def test_adalora_trains_when_one_step_scores_the_ranks_before_they_are_fixed(tiny_models) -> None:
    model, tokenizer = _attach(tiny_models["bert"], "adalora", {**ADALORA, "warmup_fraction": 0.0,
                                                                 "final_fraction": 0.5}, steps=4)
    assert train_steps(model, _batch(tokenizer), 1e-2, 4, after_step=methods.get("adalora").after_step)


@pytest.mark.parametrize("method", ["qlora", "adalora"])
def test_a_whole_search_trial_runs(tmp_path: Path, tiny_bert: Path, method: str) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    space = tmp_path / "one.yaml"
    space.write_text(f"method: {method}\ntraining:\n  micro_batch_size: 8\n")
    study = run_search(tiny_config(tmp_path, tiny_bert, trials=1, max_steps=6, space=str(space))).study
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert adapter_io.is_saved_adapter(Path(trial.user_attrs["adapter_dir"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_quantized_on_cpu_trains_and_reloads_on_cuda(bnb, tiny_models, tmp_path) -> None:
    """The search builds on the CPU and then moves the model: the 4-bit weights must survive the move."""
    model, tokenizer = _attach(tiny_models["llama"], "qlora", {**QLORA, "compute_dtype": "bf16"})
    model = model.to("cuda")
    batch = {k: v.cuda() for k, v in _batch(tokenizer).items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, batch, 1e-2, 5)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    adapter_io.save(model, tmp_path / "a")
    fresh, _ = load_classifier(str(tiny_models["llama"]), 2, seed=1)
    reloaded = adapter_io.load(fresh, tmp_path / "a").to("cuda").eval()
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))
