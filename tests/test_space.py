from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autopeft import methods
from autopeft.config import PACKAGE_DIR
from autopeft.errors import ConfigError
from autopeft.space import load_space

SPACE_FILES = sorted((PACKAGE_DIR / "search_spaces").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.name)
def test_every_shipped_space_loads_and_samples(path: Path) -> None:
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        params = space.suggest(study.ask())
        assert params.method in methods.names()
        assert set(params.method_params) == set(methods.get(params.method).params)


def test_shipped_spaces_exist() -> None:
    assert any(p.name == "default.yaml" for p in SPACE_FILES)


def test_shipped_spaces_can_draw_lora_without_dropout() -> None:
    """Dropout costs a copy of each adapted layer's input (tests/test_memory.py): a space that never draws
    0 has no LoRA configuration to admit under a budget at a dropout-free recipe's peak."""
    for path in SPACE_FILES:
        dropout = load_space(path).method_dims.get("lora", {}).get("dropout")
        if dropout is not None:  # a range has neither choices nor a value: it never draws exactly 0
            assert 0.0 in (dropout.choices or (dropout.value,)), path.name


BAD_SPACES = [
    ("method: [lora\n", "not valid YAML at line"),
    ("method: lora\nepochs: 3\n", "epochs: unknown key"),
    ("method: [lora, magic]\n", "'magic' must be one of"),
    ("method: lora\nmethods:\n  lora:\n    rank: 8\n", "methods.lora.rank: unknown parameter"),
    ("method: ia3\nmethods:\n  ia3:\n    learning_rte: 0.01\n",
     "methods.ia3.learning_rte: unknown parameter; allowed: target_modules; or a training parameter for this method"),
    ("method: lora\ntraining:\n  learning_rate: {low: 1.0e-2, high: 1.0e-4, log: true}\n", "low 0.01 is greater than high 0.0001"),
    ("method: lora\nmethods:\n  lora:\n    dropout: {low: 0.0, high: 0.1, log: true}\n", "must be > 0 on a log scale"),
    ("method: lora\ntraining:\n  learning_rate: {low: 0.0, high: 1.0e-4}\n", "learning_rate.low: 0.0 must be >= 1e-08"),
    ("method: lora\ntraining:\n  optimizer: [adamw, lion]\n", "'lion' must be one of adamw, adafactor"),
    ("method: lora\nmethods:\n  lora:\n    target_modules: [qv, everything]\n", "'everything' must be one of"),
    ("method: lora\nmethods:\n  lora:\n    r: {low: 8, high: 4}\n", "low 8 is greater than high 4"),
    ("method: lora\nmethods:\n  lora:\n    r: [4, 8.5]\n", "8.5 must be an integer"),
    ("training: {}\n", "method: missing"),
    ("- lora\n", "must be a YAML mapping"),
    ("method: lora\ntraining:\n  learning_rate: {low: 1.0e-4, high: 1.0e-2, log: \"false\"}\n",
     "learning_rate.log: 'false' must be true or false (unquoted)"),
    ("method: lora\nmethods:\n  lora:\n    r: {low: 4, high: 16, step: 2.5}\n",
     "methods.lora.r.step: 2.5 must be a whole number for an integer parameter"),
    ("method: lora\nmethods:\n  lora:\n    alpha: {low: 8, high: 30, step: 4}\n",
     "methods.lora.alpha.high: 30 is not on the grid low + k x step (8 + k x 4); use a high of 28"),
    ("method: lora\ntraining:\n  micro_batch_size: 32\nmethods:\n  lora:\n    effective_batch_size: 40\n",
     "methods.lora.effective_batch_size: 40 is not divisible by every micro_batch_size in [32]"),
    ("method: lora\nmethods:\n  lora:\n    r: [4, 8]\n    alpha: 16\n    r: 16\n",
     "not valid YAML at line 6, column 5: 'r' is given twice in one mapping (lines 4 and 6); keep one"),
    ("method: [lora, adalora]\nmethods:\n  adalora:\n    init_r: [4, 8]\n",
     "methods.adalora: target_r (at least 8) must be below init_r (at most 8)"),
    ("method: adalora\nmethods:\n  adalora:\n    warmup_fraction: 0.5\n    final_fraction: {low: 0.5, high: 0.8}\n",
     "methods.adalora: warmup_fraction + final_fraction must stay below 1"),
    ("method: lora\ntraining:\n  learning_rate: .nan\n", "learning_rate: nan must be a finite number"),  # loaded, then
    ("method: lora\nmethods:\n  lora:\n    alpha: [.inf, 16]\n", "alpha: inf must be a finite number"),  # 5 fails
    ("method: lora\nmethods:\n  lora:\n    r: [4, 4.0]\n", "r: [4, 4.0] lists a choice more than once"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_bad_space_names_file_key_and_what_is_allowed(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert message in str(info.value)
    assert all(str(path) in problem for problem in info.value.problems)


def test_a_merge_key_may_be_overridden_as_yaml_intends(tmp_path: Path) -> None:
    text = ("method: lora\ntraining: &shared\n  learning_rate: 1.0e-3\n  optimizer: adamw\n"
            "methods:\n  lora:\n    <<: *shared\n    learning_rate: 5.0e-4\n")
    space = load_space(write(tmp_path, text))
    assert space.training_overrides["lora"]["learning_rate"].value == 5.0e-4  # the method's own rate beats the merged one


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "method: [lora, magic]\nbatch: 3\ntraining:\n  learning_rate: {low: 1, high: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert len(info.value.problems) == 3


def test_conditional_parameters_are_sampled_only_for_their_method(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, (
        "method: [lora, ia3]\n"
        "training:\n  learning_rate: {low: 1e-4, high: 1e-2, log: true}\n"  # YAML reads 1e-4 as a string
        "methods:\n  lora:\n    r: [4, 8]\n    alpha: {low: 4, high: 32}\n"
        "  ia3:\n    target_modules: [kv, kv_ffn]\n    learning_rate: {low: 1.0e-2, high: 5.0e-2, log: true}\n")))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        params = space.suggest(trial)
        seen.add(params.method)
        other = "ia3" if params.method == "lora" else "lora"
        assert not any(name.startswith(f"{other}.") for name in trial.params)
        assert trial.params[f"{params.method}.learning_rate" if params.method == "ia3" else "learning_rate"] \
            == params.training["learning_rate"]
        if params.method == "ia3":
            assert 1e-2 <= params.training["learning_rate"] <= 5e-2
        else:
            assert params.method_params["r"] == trial.params["lora.r"]
        study.tell(trial, 0.0)
    assert seen == {"lora", "ia3"}


def test_a_fixed_effective_batch_searches_only_its_split(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "method: lora\ntraining:\n  effective_batch_size: 32\n"
                                       "  micro_batch_size: [8, 16, 32]\n"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    splits = set()
    for _ in range(12):
        t = space.suggest(study.ask()).training
        assert t["micro_batch_size"] * t["grad_accum_steps"] == 32
        splits.add(t["grad_accum_steps"])
    assert splits == {1, 2, 4}


@pytest.mark.parametrize(("text", "message"), [
    ("  effective_batch_size: 30\n  micro_batch_size: [8, 16]\n", "30 is not divisible by every micro_batch_size"),
    ("  effective_batch_size: 32\n  grad_accum_steps: [1, 2]\n", "leave it out when effective_batch_size is set"),
    ("  effective_batch_size: [16, 32]\n", "must be one fixed number"),
])
def test_bad_effective_batch(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_space(write(tmp_path, "method: lora\ntraining:\n" + text))


def test_fixed_values_are_recorded_without_sampling(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "method: lora\nmethods:\n  lora:\n    r: 16\n"))
    trial = optuna.create_study().ask()
    params = space.suggest(trial)
    assert params.method_params["r"] == 16 and params.flat()["lora.r"] == 16
    assert "lora.r" not in trial.params


def test_a_spaces_fixed_values_are_what_estimate_uses_and_searched_ones_take_their_defaults(tmp_path: Path) -> None:
    """`autopeft estimate --space` estimated every method at the library's defaults: micro-batch 16, fp32, r 8,
    whatever the space fixed."""
    space = load_space(write(tmp_path, "method: [lora, ia3]\ntraining:\n  micro_batch_size: 64\n  precision: bf16\n"
                                       "  optimizer: [adamw, adafactor]\nmethods:\n  lora:\n    r: 256\n"
                                       "    alpha: [16, 32]\n  ia3:\n    effective_batch_size: 128\n"))
    lora = space.fixed_params("lora")
    assert lora.method_params["r"] == 256 and lora.method_params["alpha"] == 16.0  # alpha is searched: its default
    assert (lora.training["micro_batch_size"], lora.training["precision"], lora.training["optimizer"]) == (64, "bf16", "adamw")
    assert space.fixed_params("ia3").training["grad_accum_steps"] == 2  # 128 split into micro-batches of 64


def test_a_method_rule_only_some_draws_break_is_left_to_fail_those_trials(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "method: adalora\nmethods:\n  adalora:\n    init_r: [4, 12]\n    target_r: 8\n"))
    assert space.method_dims["adalora"]["init_r"].choices == (4, 12)


def test_a_stepped_float_range_walks_its_own_values_on_a_grid(tmp_path: Path) -> None:
    """`step: 1` on a range from 0.5 read as an int: the grid was 0, 1, 2, 3 (0 turns clipping off, outside the
    range); float arithmetic put 0.9000000000000001 on the grid, above high, and `autopeft train` refused the recipe
    exported from it."""
    path = write(tmp_path, "method: lora\ntraining:\n  max_grad_norm: {low: 0.5, high: 3.5, step: 1}\n"
                           "  warmup_ratio: {low: 0.3, high: 0.9, step: 0.1}\nmethods:\n  lora:\n    r: 2\n")
    grid = load_space(path).grid()
    assert grid["max_grad_norm"] == [0.5, 1.5, 2.5, 3.5]
    assert grid["warmup_ratio"] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def test_a_grid_too_large_to_list_is_refused_by_its_size(tmp_path: Path) -> None:
    """About 90 million points: Optuna's grid sampler listed them after the study was created (a MemoryError)."""
    wide = write(tmp_path, "method: lora\ntraining:\n  weight_decay: {low: 0.0, high: 1.0, step: 1.0e-4}\n"
                           "  warmup_ratio: {low: 0.0, high: 0.9, step: 1.0e-4}\nmethods:\n  lora:\n    r: 2\n")
    with pytest.raises(ConfigError, match=r"--sampler grid: .*: the grid, the product of every method's settings, has 90,019,001 points "
                                          r"\(the most values: weight_decay 10001, warmup_ratio 9001\), more than 2,000,000"):
        load_space(wide).grid()
    one = write(tmp_path, "method: lora\ntraining:\n  weight_decay: {low: 0.0, high: 1.0, step: 1.0e-7}\n"
                          "methods:\n  lora:\n    r: 2\n")
    with pytest.raises(ConfigError, match=r"weight_decay has 10,000,001 values on its grid, more than the 2,000,000"):
        load_space(one).grid()
