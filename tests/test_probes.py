from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from autopeft.data import TextSplit, TokenizedSplit, tokenize
from autopeft.errors import ConfigError
from autopeft.evaluate import Evaluator
from autopeft.models import load_classifier
from autopeft.probes import (
    FactualRecall,
    GeneralizationGap,
    LinearProbe,
    OutOfDistribution,
    PerplexityIncrease,
    ProbeContext,
    ProbeSet,
    RepresentationDrift,
    build_probes,
    capital_country_pairs,
    default_probes,
    linear_cka,
    probe_problems,
    wikipedia_articles,
    wikipedia_paragraphs,
)
from autopeft.train import TrainSettings, causal_lm_loss, fit


def test_linear_cka_is_one_for_rotations_and_scalings_and_low_for_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(64, 16, generator=gen)) < 0.5


def test_probe_texts_are_real_wikipedia_prose() -> None:
    paragraphs = wikipedia_paragraphs()
    assert len(paragraphs) > 1000
    assert paragraphs[0].startswith("Anarchism is a political philosophy")
    assert not any("[[" in p or "{{" in p for p in paragraphs[:200])


def test_drift_is_zero_for_the_base_and_grows_with_damage(tiny_bert: Path) -> None:
    model, tokenizer = load_classifier(str(tiny_bert), 2, seed=0)
    probe = RepresentationDrift(tokenizer, n_texts=32, seed=0)
    probe.fit_base(model)
    assert probe.forgetting(copy.deepcopy(model)) == pytest.approx(0.0, abs=1e-9)
    small, large = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for scale, net in ((0.01, small), (1.0, large)):
            gen = torch.Generator().manual_seed(1)
            for p in net.bert.encoder.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
    assert 0.0 < probe.forgetting(small) < probe.forgetting(large)


def test_drift_of_a_left_padded_decoder_does_not_depend_on_how_its_texts_are_batched(
        tiny_models: dict[str, Path]) -> None:
    """GPT-2's positions are absolute: scored without the split's position ids, a left-padded text's features
    moved with its batch's padding, so an unchanged model under a memory budget (the base scored in the
    smallest micro-batch's batches, a trial in its own) drifted 0.14."""
    from autopeft.data import eval_positions_limited

    model, tokenizer = load_classifier(str(tiny_models["gpt2"]), 2, seed=0)
    probe = RepresentationDrift(tokenizer, n_texts=32, seed=0)
    with eval_positions_limited(4 * 128):
        probe.fit_base(model)
    with eval_positions_limited(16 * 128):
        assert probe.forgetting(copy.deepcopy(model)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_linear_probe_forgetting_is_zero_for_the_base_and_grows_when_information_is_lost() -> None:
    # The packaged MiniLM: a tiny random model's pooled features hardly tell the articles apart (0.11 of 16).
    model, tokenizer = load_classifier("packaged:all-MiniLM-L6-v2", 2, seed=0)
    probe = LinearProbe(tokenizer, seed=0)
    probe.fit_base(model)
    assert probe.base is not None and 0.5 < probe.base < 1.0  # well above chance (1/16), not at the ceiling
    same = probe.score(copy.deepcopy(model))
    assert same == {"linear_probe_accuracy": probe.base, "linear_probe_forgetting": 0.0}
    blurred, erased = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():  # tokens blurred together, then all made alike: topic information is lost
        for keep, net in ((0.1, blurred), (0.0, erased)):
            embeddings = net.bert.embeddings.word_embeddings.weight
            embeddings.copy_(keep * embeddings + (1 - keep) * embeddings.mean(0))
    lost = probe.score(blurred)
    assert 0.0 < lost["linear_probe_forgetting"] < probe.score(erased)["linear_probe_forgetting"]
    # Accuracy over all held-out paragraphs: it moves in whole paragraphs, never by how folds split them.
    for accuracy in (probe.base, lost["linear_probe_accuracy"]):
        assert accuracy * len(probe.texts) == pytest.approx(round(accuracy * len(probe.texts)), abs=1e-9)
    assert LinearProbe(tokenizer, seed=3).texts == LinearProbe(tokenizer, seed=3).texts != probe.texts


def test_wikipedia_articles_group_the_same_paragraphs() -> None:
    articles = wikipedia_articles()
    assert [p for article in articles for p in article] == wikipedia_paragraphs()
    assert articles[0][0].startswith("Anarchism is a political philosophy")
    assert sum(len(a) >= 8 for a in articles) >= 16


def test_probe_texts_are_fixed_for_a_seed(tiny_bert: Path) -> None:
    _, tokenizer = load_classifier(str(tiny_bert), 2, seed=0)
    assert RepresentationDrift(tokenizer, n_texts=8, seed=3).texts == RepresentationDrift(tokenizer, n_texts=8, seed=3).texts


def _causal(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _perturbed(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """A copy with noise on every weight but the (tied) embeddings."""
    damaged = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in damaged.named_parameters():
            if "emb" not in name and "wte" not in name and "wpe" not in name:
                param.add_(scale * torch.randn(param.shape, generator=gen))
    return damaged


def test_capital_pairs_come_from_the_capital_section() -> None:
    pairs = capital_country_pairs()
    assert len(pairs) == 23 and pairs[0] == ("Athens", "Greece") and ("Tokyo", "Japan") in pairs
    assert len({capital for capital, _ in pairs}) == 23


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_perplexity_increase_is_zero_for_the_base_and_grows_with_damage(tiny_causal_models: dict[str, Path],
                                                                        family: str) -> None:
    model, tokenizer = _causal(tiny_causal_models[family])
    probe = PerplexityIncrease(tokenizer, n_texts=6, max_length=48)
    probe.fit_base(model)
    assert probe.score(copy.deepcopy(model))["perplexity_increase"] == 0.0
    small, large = probe.score(_perturbed(model, 0.02)), probe.score(_perturbed(model, 0.3))
    assert 0.0 < small["perplexity_increase"] < large["perplexity_increase"]
    assert small["perplexity"] > probe.base



def test_perplexity_does_not_depend_on_how_rows_are_batched_and_nan_outputs_are_not_zero_forgetting(
        tiny_causal_models: dict[str, Path]) -> None:
    """A left-padded row's first token was scored from a pad position, so a smaller evaluation batch (a memory
    budget's) changed the base model's perplexity. A model with non-finite outputs scored forgetting 0."""
    import math

    model, tokenizer = _causal(tiny_causal_models["llama"])
    batched, alone = (PerplexityIncrease(tokenizer, n_texts=6, max_length=48, batch_size=size) for size in (8, 1))
    assert batched.perplexity(model) == pytest.approx(alone.perplexity(model), rel=1e-5)
    batched.fit_base(model)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in broken.parameters() if p.dim() == 2).fill_(float("nan"))
    assert math.isnan(batched.score(broken)["perplexity_increase"])

def test_perplexity_of_a_decoder_classifier_uses_the_tied_lm_head(tiny_causal_models: dict[str, Path]) -> None:
    model, tokenizer = _causal(tiny_causal_models["llama"])
    classifier, class_tokenizer = load_classifier(str(tiny_causal_models["llama"]), 2, seed=0)
    as_lm, as_classifier = (PerplexityIncrease(t, n_texts=4, max_length=32) for t in (tokenizer, class_tokenizer))
    as_lm.fit_base(model)
    as_classifier.fit_base(classifier)
    assert as_classifier.base == pytest.approx(as_lm.base, rel=1e-5)  # same blocks, same head: same perplexity


def test_next_token_probes_refuse_an_encoder(tiny_bert: Path) -> None:
    model, tokenizer = load_classifier(str(tiny_bert), 2, seed=0)
    with pytest.raises(ConfigError, match="perplexity scores next tokens, which an encoder"):
        PerplexityIncrease(tokenizer, n_texts=2).fit_base(model)


def _teach_facts(model: torch.nn.Module, probe: FactualRecall, pad_id: int) -> None:
    """Train the tiny model until it knows the probe's facts, so forgetting them can be measured."""
    for module in model.modules():  # memorising six facts in a few steps: no dropout noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    answers = [probe.choices[int(g)] for g in probe.gold]
    data = TokenizedSplit([p + a for p, a in zip(probe.prompts, answers, strict=True)],
                          [[-100] * len(p) + a for p, a in zip(probe.prompts, answers, strict=True)], pad_left=True)
    fit(model, data, TrainSettings(learning_rate=2e-2, max_steps=25, micro_batch_size=len(answers),
                                     scheduler="constant"),
        pad_id=pad_id, loss_fn=causal_lm_loss)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_factual_recall_retention_is_one_for_the_base_and_drops_with_damage(tiny_causal_models: dict[str, Path],
                                                                            family: str) -> None:
    model, tokenizer = _causal(tiny_causal_models[family])
    probe = FactualRecall(tokenizer, pairs=capital_country_pairs()[:6])
    _teach_facts(model, probe, tokenizer.pad_token_id)
    probe.fit_base(model)
    assert probe.base == 1.0
    same = probe.score(copy.deepcopy(model))
    assert same["recall_forgetting"] == 0.0 and same["recall_retention"] == 1.0
    damaged = probe.score(_perturbed(model, 0.5))
    assert damaged["recall_forgetting"] > 0.0 and damaged["recall_accuracy"] < 1.0


def test_factual_recall_of_a_model_with_non_finite_outputs_is_not_a_score(tiny_causal_models: dict[str, Path]) -> None:
    """argmax over NaN scores picks the first candidate: such a model read a recall, and a finite forgetting."""
    import math

    model, tokenizer = _causal(tiny_causal_models["llama"])
    probe = FactualRecall(tokenizer, pairs=capital_country_pairs()[:6])
    probe.fit_base(model)
    broken = copy.deepcopy(model)
    broken.model.norm.register_forward_hook(lambda module, args, output: output * float("nan"))
    assert math.isnan(probe.score(broken)["recall_forgetting"])


@pytest.mark.parametrize("pairs", [capital_country_pairs()[:6], [("Kingstown", "Saint Vincent and the Grenadines")]],
                         ids=["one-token answers", "a many-token answer"])
def test_the_longest_input_counts_the_longest_row_factual_recall_feeds_the_model(
        tiny_causal_models: dict[str, Path], pairs: list[tuple[str, str]]) -> None:
    """The position-table check (prompt tuning's virtual tokens on top of the longest input) read 0 tokens for
    this probe, whose prompts are token lists rather than a split."""
    model, tokenizer = _causal(tiny_causal_models["gpt2"])
    probe = FactualRecall(tokenizer, pairs=pairs)
    widths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    probe.fit_base(model)
    assert widths and ProbeSet([probe]).longest_input() == max(widths)
    assert ProbeSet([probe]).longest_input(own_length_only=True) == max(widths)  # --max-length cannot cut it


def test_generalization_gap_and_ood_accuracy(tiny_bert: Path) -> None:
    model, tokenizer = load_classifier(str(tiny_bert), 2, seed=0)
    train = tokenize(TextSplit([f"train text {i}" for i in range(12)], [i % 2 for i in range(12)]), tokenizer, 16)
    val = tokenize(TextSplit([f"held out {i}" for i in range(8)], [1] * 8), tokenizer, 16)
    evaluate = Evaluator(tokenizer.pad_token_id)
    gap = GeneralizationGap(evaluate, train, val, max_rows=10)
    scores = gap.score(model)
    assert scores["generalization_gap"] == pytest.approx(scores["train_accuracy"] - evaluate(model, val))
    assert gap.score(model, measured={"val_accuracy": 0.25})["generalization_gap"] == pytest.approx(
        scores["train_accuracy"] - 0.25)  # the trial's own validation accuracy is reused
    ood = OutOfDistribution(evaluate, val)
    ood.fit_base(model)
    assert ood.score(copy.deepcopy(model)) == {"ood_accuracy": evaluate(model, val), "ood_accuracy_change": 0.0}


@pytest.mark.parametrize(("names", "decoder", "has_ood", "message"), [
    (["representation_drift", "nope"], False, False, "unknown probe 'nope'"),
    (["perplexity"], False, False, "perplexity needs a decoder"),
    (["representation_drift", "ood_accuracy"], True, False, "ood_accuracy needs an evaluation set; pass --ood-task"),
    (["generalization_gap"], True, False, "choose at least one forgetting probe"),
    (["perplexity", "perplexity"], True, False, "names a probe twice"),
])
def test_bad_probe_sets_are_named(names: list[str], decoder: bool, has_ood: bool, message: str) -> None:
    assert any(message in p for p in probe_problems(names, decoder=decoder, has_ood=has_ood))


def test_the_forgetting_probe_list_names_every_forgetting_probe_and_only_for_known_names() -> None:
    (only,) = probe_problems(["generalization_gap"], decoder=False, has_ood=False)
    assert "(linear_probe, representation_drift, perplexity, factual_recall)" in only
    assert probe_problems(["nope"], decoder=False, has_ood=False) == [
        ("--probes: unknown probe 'nope'; known: linear_probe, representation_drift, perplexity, factual_recall, "
        "generalization_gap, ood_accuracy")]


def test_default_probe_sets_are_valid() -> None:
    for decoder in (False, True):
        for has_ood in (False, True):
            names = default_probes(decoder=decoder, has_ood=has_ood)
            assert probe_problems(names, decoder=decoder, has_ood=has_ood) == []
    assert default_probes(decoder=True, has_ood=False)[0] == "perplexity"


def test_probe_set_scores_forgetting_and_caches_the_base(tiny_causal_models: dict[str, Path], tmp_path: Path) -> None:
    model, tokenizer = _causal(tiny_causal_models["llama"])

    def small() -> ProbeSet:
        return ProbeSet([PerplexityIncrease(tokenizer, n_texts=4, max_length=32),
                         RepresentationDrift(tokenizer, n_texts=8, max_length=32)])

    cache = tmp_path / "probe-base.pt"
    probes = small()
    base = probes.fit_base(model, cache_file=cache, cache_key="tiny-llama|seed0")
    assert not cache.exists()  # written only when asked (once the study exists)
    probes.save_base(cache, "tiny-llama|seed0")
    assert base["forgetting"] == 0.0 and base["representation_drift"] == 0.0
    damaged = _perturbed(model, 0.05)
    scores = probes.score(damaged)
    assert scores["forgetting"] == scores["perplexity_increase"] > 0.0 and scores["representation_drift"] > 0.0
    again = small()
    assert again.fit_base(None, cache_file=cache, cache_key="tiny-llama|seed0") == base  # type: ignore[arg-type]
    assert again.score(damaged) == scores  # loaded, not recomputed (the base model given was None)
    with pytest.raises(AttributeError):  # another key: recomputed, which needs the model
        small().fit_base(None, cache_file=cache, cache_key="other")  # type: ignore[arg-type]
    # The cache of the other key replaces the stale one, which had every later process fit the base again.
    other = small()
    other.fit_base(model, cache_file=cache, cache_key="other")
    other.save_base(cache, "other")
    assert small().fit_base(None, cache_file=cache, cache_key="other") == base  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == [cache]  # no partial file left beside it
    # Other probe texts (another release of the package that ships them) under the same key: recomputed.
    with pytest.raises(AttributeError):
        ProbeSet([PerplexityIncrease(tokenizer, n_texts=4, max_length=32, seed=1),
                  RepresentationDrift(tokenizer, n_texts=8, max_length=32)]).fit_base(
            None, cache_file=cache, cache_key="other")  # type: ignore[arg-type]


@pytest.mark.parametrize("content", [b"", b"garbage\n"])
def test_an_unreadable_base_cache_is_computed_again_and_replaced(tiny_causal_models: dict[str, Path], tmp_path: Path,
                                                                 content: bytes) -> None:
    """An empty or damaged probe-base.pt ended every later search of its study ('Aborted.', or a traceback)."""
    from autopeft.probes import ProbeCacheWarning

    model, tokenizer = _causal(tiny_causal_models["llama"])
    cache = tmp_path / "probe-base.pt"
    cache.write_bytes(content)
    probes = ProbeSet([PerplexityIncrease(tokenizer, n_texts=4, max_length=32)])
    with pytest.warns(ProbeCacheWarning, match=r"probe-base\.pt: unreadable \(.*\); the base model's probe scores are "
                                               r"computed again"):
        base = probes.fit_base(model, cache_file=cache, cache_key="k")
    assert base["forgetting"] == 0.0
    probes.save_base(cache, "k")
    again = ProbeSet([PerplexityIncrease(tokenizer, n_texts=4, max_length=32)])
    assert again.fit_base(None, cache_file=cache, cache_key="k") == base  # type: ignore[arg-type]


def test_build_probes_makes_the_named_probes_in_order(tiny_bert: Path) -> None:
    _, tokenizer = load_classifier(str(tiny_bert), 2, seed=0)
    split = tokenize(TextSplit(["a", "b"], [0, 1]), tokenizer, 8)
    context = ProbeContext(tokenizer, seed=0, evaluate=Evaluator(tokenizer.pad_token_id), train=split, validation=split,
                           ood=split)
    probes = build_probes(["generalization_gap", "representation_drift", "ood_accuracy"], context)
    assert probes.names == ["generalization_gap", "representation_drift", "ood_accuracy"]
    assert probes.primary.name == "representation_drift"


def test_before_the_model_loads_every_check_but_the_decoders_runs() -> None:
    assert probe_problems(["perplexity", "linear_probe"], decoder=None, has_ood=False) == []
    assert probe_problems(["perplexity", "perplexity"], decoder=None, has_ood=False) != []


@pytest.mark.parametrize(("settings", "message"), [
    ({"probes": ("perplexity",), "ood_task": "ood.csv"},
     "--probes: perplexity leaves out ood_accuracy, the probe that scores --ood-task"),
    ({"max_steps": 10, "max_total_steps": 5}, "--max-total-steps: 5 is below --max-steps (10): no trial would fit in it"),
])
def test_a_new_search_is_refused_settings_a_recorded_study_may_still_hold(settings: dict, message: str) -> None:
    from autopeft.config import SearchConfig
    from autopeft.search import new_search_problems

    config = SearchConfig(**settings)  # as read back from an older study or recipe: accepted
    assert any(message in problem for problem in new_search_problems(config))
