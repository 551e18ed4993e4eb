"""MoRA's maths: size rule, shapes, exact identity at the start, merged delta == forward delta, high rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from autopeft import adapter_io
from autopeft.methods import MethodContext
from autopeft.methods.mora import COMPRESSIONS, MoRALayer, merge, square_side
from autopeft.models import load_classifier

D_IN, D_OUT = 24, 40  # d_in != d_out, neither a multiple of r_hat


def _layer(kind: str, d_in: int = D_IN, d_out: int = D_OUT) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)


def _with_random_m(layer: nn.Module, r: int, compression: str) -> MoRALayer:
    wrapped = MoRALayer(layer, r, compression)
    with torch.no_grad():
        wrapped.mora_M.normal_(generator=torch.Generator().manual_seed(1))
    return wrapped


@pytest.mark.parametrize(("d_in", "d_out", "r"), [(768, 768, 8), (768, 3072, 8), (4096, 4096, 256),
                                                   (32, 96, 4), (32, 32, 2), (24, 40, 3)])
def test_r_hat_spends_at_most_and_nearly_loras_parameter_count(d_in: int, d_out: int, r: int) -> None:
    side, budget = square_side(d_in, d_out, r), (d_in + d_out) * r
    assert side * side <= budget < (side + 1) ** 2  # the largest square within LoRA's budget
    assert square_side(768, 768, 8) == 110  # sqrt(1536 * 8) = 110.85


def test_r_hat_is_capped_by_the_smaller_side_and_refuses_bad_r() -> None:
    assert square_side(16, 64, 32) == 16  # sqrt(80 * 32) = 50 > 16: more would add parameters, not rank
    with pytest.raises(ValueError, match="mora"):
        square_side(16, 16, 0)
    with pytest.raises(ValueError, match="compression"):
        MoRALayer(nn.Linear(4, 4), 1, "hashing")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_output_shapes_and_dtype(kind: str, compression: str) -> None:
    wrapped = _with_random_m(_layer(kind), 3, compression)
    x = torch.randn(2, 5, D_IN)
    assert wrapped(x).shape == (2, 5, D_OUT)
    assert wrapped.compress(x).shape == (2, 5, wrapped.slots, wrapped.side)
    assert wrapped.mora_M.shape == (wrapped.side, wrapped.side) and wrapped.mora_M.dtype == torch.float32


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize(("d_in", "d_out"), [(D_IN, D_OUT), (D_OUT, D_IN), (32, 96), (64, 32)])
def test_merged_delta_equals_the_forward_delta(kind: str, compression: str, d_in: int, d_out: int) -> None:
    wrapped = _with_random_m(_layer(kind, d_in, d_out), 3, compression)
    x = torch.randn(7, d_in)
    with torch.no_grad():
        forward = wrapped(x)
        merged = wrapped.merged()(x)
    assert isinstance(merged, torch.Tensor)
    assert torch.allclose(merged, forward, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("compression", ["sharing", "decoupling", "rotation"])
def test_a_random_m_gives_an_update_of_rank_above_r(kind: str, compression: str) -> None:
    r = 2
    wrapped = _with_random_m(_layer(kind, 32, 32), r, compression)
    rank = int(torch.linalg.matrix_rank(wrapped.delta_weight()))
    assert wrapped.side == 11 and rank >= wrapped.side > r  # LoRA with r = 2 would stop at rank 2


def test_sharing_tiles_m_over_the_weight() -> None:
    wrapped = _with_random_m(_layer("linear"), 3, "sharing")
    delta, m, side = wrapped.delta_weight(), wrapped.mora_M.double(), wrapped.side
    rows, cols = torch.arange(D_OUT) % side, torch.arange(D_IN) % side
    assert torch.equal(delta, m[rows][:, cols])


def test_decoupling_of_a_square_layer_is_block_diagonal() -> None:
    wrapped = _with_random_m(_layer("linear", 32, 32), 2, "decoupling")
    side, m = wrapped.side, wrapped.mora_M.double()
    blocks = -(-32 // side)
    expected = torch.block_diag(*[m] * blocks)[:32, :32]
    assert torch.equal(wrapped.delta_weight(), expected)


def _rotation(angle_per_pair: torch.Tensor, side: int) -> torch.Tensor:
    """The paper's block rotation: pair (j, j + side // 2) turned by its angle; an odd last one stays."""
    half, rot = side // 2, torch.eye(side, dtype=torch.float64)
    for j, angle in enumerate(angle_per_pair.tolist()):
        c, s = torch.tensor(angle).cos(), torch.tensor(angle).sin()
        rot[j, j], rot[j, j + half], rot[j + half, j], rot[j + half, j + half] = c, -s, s, c
    return rot


def test_rotation_turns_each_input_block_by_its_position() -> None:
    wrapped = _with_random_m(_layer("linear", 33, 33), 2, "rotation")  # side 11: three whole blocks
    side, m = wrapped.side, wrapped.mora_M.double()
    theta = 10000.0 ** (-2.0 * torch.arange(side // 2, dtype=torch.float64) / side)
    expected = torch.block_diag(*[m @ _rotation(a * theta, side) for a in range(3)])
    assert torch.allclose(wrapped.delta_weight(), expected, atol=1e-12)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_attaching_mora_leaves_the_base_models_logits_exactly_unchanged(tiny_models, family: str,
                                                                         compression: str) -> None:
    base, tokenizer = load_classifier(str(tiny_models[family]), 2, seed=0)
    base.eval()
    batch = tokenizer(["a gripping film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = base(**batch).logits.clone()
    params = {"r": 4, "target_modules": "all_linear", "compression": compression}
    model = adapter_io.attach(base, "mora", params, MethodContext())
    assert sum(isinstance(m, MoRALayer) for m in model.modules()) == 2 * (6 if family == "bert" else 4)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_merge_puts_the_base_layers_back(tiny_models) -> None:
    base, _ = load_classifier(str(tiny_models["llama"]), 2, seed=0)
    model = adapter_io.attach(base, "mora", {"r": 2, "target_modules": "qv", "compression": "rotation"},
                              MethodContext())
    assert any("mora_M" in n for n, _ in model.named_parameters())
    merged = merge(model)
    assert not any(isinstance(m, MoRALayer) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
