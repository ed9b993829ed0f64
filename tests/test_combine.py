"""lora_edu.combine against PEFT's add_weighted_adapter, DARE statistically, and bad input."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from lora_edu.adapters import save_adapter, save_peft_adapter
from lora_edu.combine import (COMBINATION_TYPES, SVD_TYPES, adapter_from_model,
                              combine_adapters, combine_named_adapters, dare_linear, dare_ties,
                              install_adapter, read_adapter, sign_conflicts)
from lora_edu.lora import LoraConfig, inject_lora, lora_layers

peft = pytest.importorskip("peft")
from peft.utils import merge_utils  # noqa: E402

NAMES = ("t1", "t2", "t3")
WEIGHTS = {"t1": 1.0, "t2": -0.7, "t3": 0.5}
DETERMINISTIC = ("linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune",
                 "magnitude_prune_svd")


class Block(nn.Module):
    """Non-square layers, so that d ≠ k shows up if A and B were mixed up."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 12), nn.Linear(16, 16), nn.Linear(16, 20)


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def peft_model(ranks: tuple[int, ...], alphas: tuple[float, ...] = (8, 4, 2)):
    """A PEFT model with adapters t1, t2, t3 (random non-zero A and B) on q and v."""
    torch.manual_seed(1)
    model = None
    for name, r, alpha in zip(NAMES, ranks, alphas):
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"],
                              init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(base_model(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model


def peft_layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.base_model.model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and len(m.lora_A)}


def ours_from_peft(model) -> dict[str, dict]:
    """The PEFT model's adapters as {adapter: {module: (A, B, s)}}."""
    layers = peft_layers(model)
    return {a: {n: (m.lora_A[a].weight.detach().clone(), m.lora_B[a].weight.detach().clone(),
                    m.scaling[a]) for n, m in layers.items()} for a in NAMES}


@pytest.fixture(scope="module")
def equal_ranks():
    model = peft_model((4, 4, 4))
    return model, ours_from_peft(model)


@pytest.fixture(scope="module")
def mixed_ranks():
    model = peft_model((2, 3, 4))
    return model, ours_from_peft(model)


def peft_combined(model, name: str, combination_type: str, weights=WEIGHTS, **kw):
    model.add_weighted_adapter(list(weights), list(weights.values()), name,
                               combination_type=combination_type, **kw)
    return {n: (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach(), m.scaling[name])
            for n, m in peft_layers(model).items() if name in m.lora_A}


def assert_same(ours: dict, theirs: dict, products_only: bool) -> None:
    assert set(ours) == set(theirs)
    for layer, (A, B, s) in ours.items():
        tA, tB, ts = theirs[layer]
        assert s == ts == 1.0
        if products_only:
            torch.testing.assert_close(B @ A, tB @ tA, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(A, tA, rtol=0, atol=1e-6)
            torch.testing.assert_close(B, tB, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- against PEFT

@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_model_level_equals_peft(equal_ranks, combination_type: str) -> None:
    model, adapters = equal_ranks
    theirs = peft_combined(model, f"eq_{combination_type}", combination_type, density=0.5)
    ours = combine_named_adapters(adapters, WEIGHTS, combination_type, density=0.5)
    assert_same(ours, theirs, products_only=combination_type in SVD_TYPES)


@pytest.mark.parametrize("combination_type", ["ties", "magnitude_prune", "ties_svd"])
def test_other_density_equals_peft(equal_ranks, combination_type: str) -> None:
    model, adapters = equal_ranks
    theirs = peft_combined(model, f"d3_{combination_type}", combination_type, density=0.3)
    ours = combine_named_adapters(adapters, WEIGHTS, combination_type, density=0.3)
    assert_same(ours, theirs, products_only=combination_type in SVD_TYPES)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties_svd", "magnitude_prune_svd"])
def test_mixed_ranks_and_svd_rank_equal_peft(mixed_ranks, combination_type: str) -> None:
    model, adapters = mixed_ranks
    kw = {} if combination_type == "cat" else {"svd_rank": 6}
    theirs = peft_combined(model, f"mix_{combination_type}", combination_type, density=0.6,
                           **kw)
    ours = combine_named_adapters(adapters, WEIGHTS, combination_type, density=0.6,
                                  rank=kw.get("svd_rank"))
    assert_same(ours, theirs, products_only=combination_type in SVD_TYPES)
    A, B, _ = next(iter(ours.values()))
    assert A.shape[0] == (2 + 3 + 4 if combination_type == "cat" else 6) == B.shape[1]


def test_one_layer_api_equals_peft(equal_ranks) -> None:
    """combine_adapters on one layer's factors gives PEFT's lora_A / lora_B for that layer."""
    model, adapters = equal_ranks
    theirs = peft_combined(model, "one_layer_ties", "ties", density=0.4)
    layer = "0.v"
    factors = [adapters[a][layer][:2] for a in WEIGHTS]
    scalings = [adapters[a][layer][2] for a in WEIGHTS]
    A, B = combine_adapters(factors, list(WEIGHTS.values()), scalings, "ties", density=0.4)
    torch.testing.assert_close(A, theirs[layer][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(B, theirs[layer][1], rtol=0, atol=1e-6)


def test_single_adapter_is_linear_as_in_peft(equal_ranks) -> None:
    model, adapters = equal_ranks
    theirs = peft_combined(model, "single_svd", "svd", weights={"t2": 0.8})
    ours = combine_named_adapters(adapters, {"t2": 0.8}, "svd")
    assert_same(ours, theirs, products_only=False)


@pytest.mark.parametrize("rule", ["dare_linear", "dare_ties"])
def test_dare_rules_equal_peft_with_the_same_draws(rule: str) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(6, 10, generator=gen) for _ in range(3)]
    weights = [1.0, -0.5, 0.3]
    torch.manual_seed(11)
    theirs = getattr(merge_utils, rule)(tensors, torch.tensor(weights), 0.4)
    ours = {"dare_linear": dare_linear, "dare_ties": dare_ties}[rule](
        tensors, weights, 0.4, torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- rsLoRA inputs

def rslora_model(ranks: tuple[int, ...], use_rslora: tuple[bool, ...] = (True, True, True),
                 alphas: tuple[float, ...] = (8, 4, 2)):
    """Like :func:`peft_model`, with ``use_rslora`` per adapter (scaling α/√r where True)."""
    torch.manual_seed(1)
    model = None
    for name, r, alpha, rs in zip(NAMES, ranks, alphas, use_rslora):
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"],
                              init_lora_weights=False, use_rslora=rs)
        if model is None:
            model = peft.get_peft_model(base_model(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model


def with_upstream_rslora_fix(monkeypatch) -> None:
    """Apply the one-line fix of https://github.com/huggingface/peft/pull/3449 to the installed
    PEFT: the combined adapter's config gets ``use_rslora=False`` instead of inheriting it
    from the first adapter (``add_weighted_adapter`` makes that config with
    ``dataclasses.replace``, its only use in the module)."""
    import dataclasses

    import peft.tuners.lora.model as lora_model

    assert lora_model.replace is dataclasses.replace
    monkeypatch.setattr(lora_model, "replace",
                        lambda config, **kw: dataclasses.replace(config, **{**kw,
                                                                         "use_rslora": False}))


def peft_deltas(model, name: str) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW (scaling included) of adapter ``name``, per layer."""
    return {n: m.get_delta_weight(name).detach() for n, m in peft_layers(model).items()
            if name in m.lora_A}


RSLORA_CASES = [((4, 4, 4), (True, True, True), t) for t in DETERMINISTIC] + [
    ((2, 3, 4), flags, t) for flags in ((True, True, True), (False, True, False),
                                        (True, False, True))
    for t in ("cat", "svd", "ties_svd", "magnitude_prune_svd")]


@pytest.mark.parametrize("ranks, use_rslora, combination_type", RSLORA_CASES)
def test_rslora_combined_delta_equals_peft(monkeypatch, ranks, use_rslora,
                                           combination_type: str) -> None:
    """rsLoRA adapters (and mixes with plain ones, of mixed ranks): the combined ΔW equals
    PEFT's, with PEFT's combined scaling fixed to 1 as upstream's fix does."""
    with_upstream_rslora_fix(monkeypatch)
    model = rslora_model(ranks, use_rslora)
    adapters = ours_from_peft(model)
    first = peft_layers(model)["0.q"]
    for a, r, rs, alpha in zip(NAMES, ranks, use_rslora, (8, 4, 2)):  # inputs are rsLoRA
        assert first.scaling[a] == pytest.approx(alpha / (r ** 0.5 if rs else r))
    name = f"rs_{combination_type}"
    theirs = peft_combined(model, name, combination_type, density=0.5)
    ours = combine_named_adapters(adapters, WEIGHTS, combination_type, density=0.5)
    assert_same(ours, theirs, products_only=combination_type in SVD_TYPES)
    deltas = peft_deltas(model, name)
    for layer, (A, B, s) in ours.items():
        torch.testing.assert_close(s * B @ A, deltas[layer], rtol=0, atol=1e-6)
        assert A.shape[0] == {"cat": sum(ranks)}.get(combination_type, max(ranks))
        if combination_type == "cat":  # exact task arithmetic of PEFT's own input ΔW's
            target = sum(w * peft_layers(model)[layer].get_delta_weight(a)
                         for a, w in WEIGHTS.items())
            torch.testing.assert_close(s * B @ A, target, rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [(True, True, True), (False, True, False)])
def test_installed_peft_inherits_use_rslora_from_the_first_adapter(use_rslora) -> None:
    """Where we part from the installed PEFT: its combined adapter copies ``use_rslora`` from
    the first adapter with ``lora_alpha = r = r'``, so its scaling is ``√r'`` (not 1) when that
    adapter is rsLoRA; its factors are ours all the same. If PEFT fixes it, the scaling is 1
    and the ΔW's agree (the assertions hold either way)."""
    model = rslora_model((2, 3, 4), use_rslora)
    adapters = ours_from_peft(model)
    theirs = peft_combined(model, "rs_inherit_cat", "cat")
    ours = combine_named_adapters(adapters, WEIGHTS, "cat")
    assert_same(ours, {n: (A, B, 1.0) for n, (A, B, _) in theirs.items()}, products_only=False)
    config = model.peft_config["rs_inherit_cat"]
    assert config.r == config.lora_alpha == 2 + 3 + 4
    expected = config.r ** 0.5 if config.use_rslora else 1.0
    assert config.use_rslora in (use_rslora[0], False)
    deltas = peft_deltas(model, "rs_inherit_cat")
    for layer, (A, B, s) in ours.items():
        assert theirs[layer][2] == pytest.approx(expected)
        torch.testing.assert_close(expected * s * B @ A, deltas[layer], rtol=0, atol=1e-6)


def test_rslora_adapters_read_from_peft_directories(tmp_path, monkeypatch) -> None:
    """read_adapter computes s = α/√r from a PEFT config with use_rslora: the combination of
    saved rsLoRA adapters (mixed ranks) equals PEFT's (with upstream's fix)."""
    with_upstream_rslora_fix(monkeypatch)
    model = rslora_model((2, 3, 4), (True, False, True))
    model.save_pretrained(tmp_path)
    dirs = {a: tmp_path / a for a in NAMES}
    from_dirs = {a: read_adapter(d) for a, d in dirs.items()}
    for a, r, rs, alpha in zip(NAMES, (2, 3, 4), (True, False, True), (8, 4, 2)):
        assert from_dirs[a]["1.v"][2] == pytest.approx(alpha / (r ** 0.5 if rs else r))
    peft_combined(model, "rs_dirs", "cat")
    deltas = peft_deltas(model, "rs_dirs")
    ours = combine_named_adapters(dirs, WEIGHTS, "cat")
    assert set(ours) == set(deltas)
    for layer, (A, B, s) in ours.items():
        torch.testing.assert_close(s * B @ A, deltas[layer], rtol=0, atol=1e-6)


def test_rslora_lora_edu_model_combines_and_installs() -> None:
    """A lora_edu model with LoraConfig(use_rslora=True): adapter_from_model takes s = α/√r,
    and the installed 'cat' combination computes W0 + Σ w_i s_i B_i A_i."""
    models = random_lora_models([(seed, LoraConfig(r=r, lora_alpha=8, target_modules=["q", "v"],
                                                   use_rslora=True))
                                 for seed, r in ((1, 2), (2, 3))])
    adapters = [adapter_from_model(m) for m in models]
    assert adapters[0]["0.q"][2] == pytest.approx(8 / 2 ** 0.5)
    weights = {"a": 0.6, "b": -1.2}
    combined = combine_named_adapters(dict(zip(weights, models)), weights, "cat")
    model = install_adapter(base_model(), combined)
    reference = base_model()
    with torch.no_grad():
        for name in combined:
            reference.get_submodule(name).weight += sum(
                w * ad[name][2] * ad[name][1] @ ad[name][0]
                for w, ad in zip(weights.values(), adapters))
        x = torch.randn(3, 16)
        torch.testing.assert_close(model[0].v(x), reference[0].v(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "dare_ties",
                                              "magnitude_prune"])
def test_rslora_unequal_ranks_refused_like_peft(combination_type: str) -> None:
    """PEFT refuses rsLoRA adapters of different ranks for the entry-wise types (their
    factors cannot be added); so do we, before anything is computed."""
    model = rslora_model((2, 3, 4))
    adapters = ours_from_peft(model)
    with pytest.raises(ValueError, match="same r value"):
        model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "rs_bad",
                                   combination_type=combination_type, density=0.5)
    with pytest.raises(ValueError, match=r"same rank, got ranks \[2, 3, 4\]"):
        combine_named_adapters(adapters, WEIGHTS, combination_type, density=0.5)


# --------------------------------------------------------------------------- DARE statistics

def _layer_factors(adapters: dict, layer: str = "1.q"):
    factors = [adapters[a][layer][:2] for a in WEIGHTS]
    scalings = [adapters[a][layer][2] for a in WEIGHTS]
    return factors, scalings


def _within_5_sigma(samples: torch.Tensor, expected: torch.Tensor) -> None:
    """The mean of ``samples`` (n, ...) lies within 5 standard errors of ``expected``."""
    n = samples.shape[0]
    sem = samples.std(0) / n ** 0.5
    assert ((samples.mean(0) - expected).abs() <= 5 * sem + 1e-6).all()


def test_dare_linear_preserves_the_expectation(equal_ranks) -> None:
    """E[A] and E[B] are linear's A and B; the masks of A and B are independent, so
    E[B A] = E[B] E[A] is linear's B A too."""
    _, adapters = equal_ranks
    factors, scalings = _layer_factors(adapters)
    w = list(WEIGHTS.values())
    A_lin, B_lin = combine_adapters(factors, w, scalings, "linear")
    draws = [combine_adapters(factors, w, scalings, "dare_linear", density=0.5,
                              generator=torch.Generator().manual_seed(s)) for s in range(400)]
    _within_5_sigma(torch.stack([A for A, _ in draws]), A_lin)
    _within_5_sigma(torch.stack([B for _, B in draws]), B_lin)
    _within_5_sigma(torch.stack([B @ A for A, B in draws]), B_lin @ A_lin)
    assert not torch.allclose(draws[0][0], A_lin)  # it did drop something


def test_dare_linear_svd_at_full_rank_is_unbiased_task_arithmetic(equal_ranks) -> None:
    _, adapters = equal_ranks
    factors, scalings = _layer_factors(adapters)
    w = list(WEIGHTS.values())
    target = sum(wi * s * B @ A for wi, s, (A, B) in zip(w, scalings, factors))
    full = min(target.shape)
    draws = [combine_adapters(factors, w, scalings, "dare_linear_svd", density=0.3, rank=full,
                              generator=torch.Generator().manual_seed(s)) for s in range(400)]
    _within_5_sigma(torch.stack([B @ A for A, B in draws]), target)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd",
                                              "dare_ties_svd"])
def test_dare_is_reproducible_with_a_seed(equal_ranks, combination_type: str) -> None:
    _, adapters = equal_ranks

    def run(seed: int) -> dict:
        return combine_named_adapters(adapters, WEIGHTS, combination_type, density=0.5,
                                      generator=torch.Generator().manual_seed(seed))

    first, again, other = run(5), run(5), run(6)
    for layer in first:
        assert torch.equal(first[layer][0], again[layer][0])
        assert torch.equal(first[layer][1], again[layer][1])
    assert any(not torch.equal(first[n][1] @ first[n][0], other[n][1] @ other[n][0])
               for n in first)


def test_dare_with_peft_statistically(equal_ranks) -> None:
    """PEFT's dare_linear and ours estimate the same expectation (PEFT's draws cannot be
    aligned with ours at the model level: creating the new adapter consumes random numbers)."""
    model, adapters = equal_ranks
    theirs = []
    for s in range(40):
        theirs.append(peft_combined(model, f"dare_{s}", "dare_linear", density=0.5)["0.q"])
        model.delete_adapter(f"dare_{s}")
    linear = combine_named_adapters(adapters, WEIGHTS, "linear")["0.q"]
    _within_5_sigma(torch.stack([A for A, _, _ in theirs]), linear[0])


# --------------------------------------------------------------------------- what the types are

def test_cat_and_full_rank_svd_are_exact_task_arithmetic(mixed_ranks) -> None:
    _, adapters = mixed_ranks
    for layer in adapters["t1"]:
        target = sum(w * adapters[a][layer][2] * adapters[a][layer][1] @ adapters[a][layer][0]
                     for a, w in WEIGHTS.items())
        A, B, _ = combine_named_adapters(adapters, WEIGHTS, "cat")[layer]
        torch.testing.assert_close(B @ A, target, rtol=0, atol=1e-6)
        factors = [adapters[a][layer][:2] for a in WEIGHTS]
        scalings = [adapters[a][layer][2] for a in WEIGHTS]
        A, B = combine_adapters(factors, list(WEIGHTS.values()), scalings, "svd",
                                rank=min(target.shape))
        torch.testing.assert_close(B @ A, target, rtol=0, atol=1e-5)


def test_linear_has_cross_terms(equal_ranks) -> None:
    _, adapters = equal_ranks
    factors, scalings = _layer_factors(adapters)
    w = list(WEIGHTS.values())
    A, B = combine_adapters(factors, w, scalings, "linear")
    c = [(1 if wi * s >= 0 else -1) * abs(wi * s) ** 0.5 for wi, s in zip(w, scalings)]
    c_b = [abs(wi * s) ** 0.5 for wi, s in zip(w, scalings)]
    all_terms = sum(c_b[i] * c[j] * factors[i][1] @ factors[j][0]
                    for i in range(3) for j in range(3))
    diagonal = sum(wi * s * B_i @ A_i for wi, s, (A_i, B_i) in zip(w, scalings, factors))
    torch.testing.assert_close(B @ A, all_terms, rtol=0, atol=1e-5)
    assert (B @ A - diagonal).norm() > 0.1 * diagonal.norm()


def test_sign_conflicts_counts_opposite_non_zero_signs() -> None:
    a = torch.tensor([1.0, -1.0, 0.0, 2.0])
    b = torch.tensor([1.0, 1.0, -3.0, -1.0])
    assert sign_conflicts([a, b]) == 0.5


# --------------------------------------------------------------------------- whole adapters

def random_lora_models(specs):
    """One lora_edu model per ``(seed, LoraConfig)`` on the same base, with A and B drawn
    from N(0, 1) by that seed (so that every adapter's ΔW is non-zero)."""
    models = []
    for seed, config in specs:
        m = inject_lora(base_model(), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora_layers(m):
                layer.lora_A.normal_(generator=g)
                layer.lora_B.normal_(generator=g)
        models.append(m)
    return models


def lora_pair():
    """Two lora_edu models with different random adapters on q and v of the same base."""
    return random_lora_models([(seed, LoraConfig(r=4, lora_alpha=alpha,
                                                 target_modules=["q", "v"]))
                               for seed, alpha in ((1, 8), (2, 4))])


def test_models_directories_and_dicts_combine_alike(tmp_path) -> None:
    m1, m2 = lora_pair()
    save_adapter(m1, tmp_path / "one")
    save_peft_adapter(m2, tmp_path / "two")
    from_models = combine_named_adapters({"one": m1, "two": m2}, {"one": 1.0, "two": 0.5}, "svd")
    from_dirs = combine_named_adapters({"one": tmp_path / "one", "two": str(tmp_path / "two")},
                                       {"one": 1.0, "two": 0.5}, "svd")
    assert read_adapter(tmp_path / "two")["0.q"][2] == next(lay for _, lay in
                                                            lora_layers(m2)).scaling
    for layer in from_models:
        torch.testing.assert_close(from_models[layer][1] @ from_models[layer][0],
                                   from_dirs[layer][1] @ from_dirs[layer][0])


def test_install_adapter_computes_base_plus_delta() -> None:
    m1, m2 = lora_pair()
    combined = combine_named_adapters({"a": m1, "b": m2}, {"a": 1.0, "b": 1.0}, "cat")
    model = install_adapter(base_model(), combined)
    x = torch.randn(3, 16)
    reference = base_model()
    with torch.no_grad():
        for name, (A, B, s) in combined.items():
            reference.get_submodule(name).weight += s * B @ A
        q = model[1].q(x)
    torch.testing.assert_close(q, reference[1].q(x), rtol=1e-5, atol=1e-5)
    assert {n for n, _ in lora_layers(model)} == set(combined)


# --------------------------------------------------------------------------- bad input

def _pair(r: int = 2, d: int = 5, k: int = 4):
    return torch.randn(r, k), torch.randn(d, r)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"combination_type": "average"}, ValueError, "unknown combination_type"),
    ({"density": 0.0}, ValueError, "(0, 1]"),
    ({"density": 1.5}, ValueError, "(0, 1]"),
    ({"density": -0.2}, ValueError, "(0, 1]"),
    ({"density": None}, ValueError, "needs a density"),
    ({"density": "half"}, TypeError, "density"),
    ({"weights": [1.0]}, ValueError, "one weight per adapter"),
    ({"weights": [1.0, float("nan")]}, ValueError, "finite"),
    ({"scalings": [1.0, 2.0, 3.0]}, ValueError, "one scaling per adapter"),
    ({"rank": 2, "combination_type": "ties"}, ValueError, "leave rank=None"),
    ({"rank": 9, "combination_type": "svd"}, ValueError, "min(d, k)"),
    ({"rank": 1.5, "combination_type": "svd"}, TypeError, "rank"),
    ({"generator": 3, "combination_type": "dare_ties"}, TypeError, "generator"),
])
def test_bad_arguments(kwargs: dict, error: type, words: str) -> None:
    args = {"factors": [_pair(), _pair()], "weights": [1.0, 1.0], **kwargs}
    with pytest.raises(error, match=re.escape(words)):
        combine_adapters(**args)


@pytest.mark.parametrize("factors, words", [
    ([], "non-empty list"),
    ([_pair(), (torch.randn(2, 3), torch.randn(5, 2))], "same layer"),
    ([_pair(), (torch.randn(2, 4), torch.randn(6, 2))], "same layer"),
    ([_pair(), (torch.randn(2, 4), torch.randn(5, 3))], "same r"),
    ([_pair(), (torch.randn(5, 2), torch.randn(2, 4))], "in that order"),
    ([_pair(), (torch.ones(2, 4, dtype=torch.long), torch.randn(5, 2))], "floating point"),
    ([_pair(), torch.randn(2, 4)], "pair"),
])
def test_bad_factors(factors: list, words: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(words)):
        combine_adapters(factors, [1.0] * len(factors), combination_type="cat")


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "dare_ties",
                                              "magnitude_prune"])
def test_unequal_ranks_refused_where_entries_are_merged(combination_type: str) -> None:
    with pytest.raises(ValueError, match="same rank"):
        combine_adapters([_pair(2), _pair(3)], [1.0, 1.0], combination_type=combination_type)
    for ok in ("cat", "svd", "ties_svd", "dare_ties_svd"):  # these accept them
        combine_adapters([_pair(2), _pair(3)], [1.0, 1.0], combination_type=ok)


def test_model_level_bad_input_changes_nothing(equal_ranks) -> None:
    _, adapters = equal_ranks
    before = copy.deepcopy(adapters)
    with pytest.raises(ValueError, match="not in adapters"):
        combine_named_adapters(adapters, {"t1": 1.0, "nope": 1.0})
    partial = {"t1": adapters["t1"], "t2": dict(list(adapters["t2"].items())[:-1])}
    with pytest.raises(ValueError, match="different modules"):
        combine_named_adapters(partial, {"t1": 1.0, "t2": 1.0})
    with pytest.raises(ValueError, match="layer '0.q'.*min"):
        combine_named_adapters(adapters, WEIGHTS, "svd", rank=13)
    with pytest.raises(TypeError, match="weights must be"):
        combine_named_adapters(adapters, [1.0, 1.0])
    for a in adapters:
        for layer in adapters[a]:
            assert torch.equal(adapters[a][layer][0], before[a][layer][0])
            assert torch.equal(adapters[a][layer][1], before[a][layer][1])


def test_install_adapter_refuses_and_leaves_the_model_alone() -> None:
    m1, _ = lora_pair()
    adapter = adapter_from_model(m1)
    with pytest.raises(ValueError, match="already has LoRA"):
        install_adapter(m1, adapter)
    model = base_model()
    bad = dict(adapter)
    bad["0.q"] = (torch.randn(4, 15), torch.randn(12, 4), 2.0)
    with pytest.raises(ValueError, match="'0.q'"):
        install_adapter(model, bad)
    assert not list(lora_layers(model))
    with pytest.raises(ValueError, match="no LoRA layers"):
        adapter_from_model(base_model())


def test_every_combination_type_runs_on_the_equal_rank_adapters(equal_ranks) -> None:
    _, adapters = equal_ranks
    for combination_type in COMBINATION_TYPES:
        out = combine_named_adapters(adapters, WEIGHTS, combination_type,
                                     generator=torch.Generator().manual_seed(0))
        assert all(torch.isfinite(B @ A).all() for A, B, _ in out.values())


# --------------------------------------------------------------------------- the chapter's tasks

def test_letter_tasks_answers_seeds_and_exclusion() -> None:
    from lora_edu.letter_tasks import make_examples

    rev = make_examples("reverse", 50, seed=3)
    assert rev == make_examples("reverse", 50, seed=3) != make_examples("reverse", 50, seed=4)
    for prompt, answer in rev:
        letters = prompt.split(":")[1].rstrip("=").split()
        assert answer.split() == letters[::-1]
    for prompt, answer in make_examples("shift", 50, seed=3):
        letters = prompt.split(":")[1].rstrip("=").split()
        assert [ord(a) - ord(c) for a, c in zip(answer.split(), letters)] == [1] * 5
    held_out = make_examples("shift", 20, seed=1000)
    train = make_examples("shift", 2000, seed=0, exclude=held_out)
    assert not {p for p, _ in held_out} & {p for p, _ in train}
    with pytest.raises(ValueError, match="unknown task"):
        make_examples("sort", 3, seed=0)


# --------------------------------------------------------------------------- scoring a merge

def test_merged_applies_lambda_s_BA_and_restores_exactly() -> None:
    from lora_edu.combine import merged

    model = base_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    A, B = torch.randn(4, 16), torch.randn(12, 4)
    with merged(model, {"0.q": (A, B, 2.0)}, scale=0.5) as m:
        assert m is model
        assert torch.allclose(model[0].q.weight, before["0.q.weight"] + 0.5 * 2.0 * B @ A,
                              atol=1e-6)
        assert torch.equal(model[0].v.weight, before["0.v.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError), merged(model, {"0.q": (A, B, 1.0)}):
        raise RuntimeError("a failing evaluation")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for bad, err in (({"0.q": (torch.randn(4, 15), B, 1.0)}, ValueError),
                     ({"0.x": (A, B, 1.0)}, ValueError), ({"0": (A, B, 1.0)}, TypeError)):
        with pytest.raises(err), merged(model, {"0.v": (torch.randn(4, 16),
                                                        torch.randn(20, 4), 1.0), **bad}):
            pass
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_answer_items_agree_with_teacher_forced_scores() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_edu.combine import answer_items
    from lora_edu.letter_tasks import TaskBatch, teacher_forced_scores

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()
    batch = TaskBatch(torch.randint(0, 8, (70, 9)), answer_start=4)
    items = answer_items(model, batch, chunk=16)
    scores = teacher_forced_scores(model, batch)
    assert items["hits"].shape == items["loss"].shape == (70,)
    assert int(items["hits"].max()) <= 5
    assert abs(float(items["hits"].sum()) / (70 * 5) - scores["accuracy"]) < 1e-9
    assert abs(float(items["loss"].mean()) - scores["loss"]) < 1e-5
    with pytest.raises(TypeError, match="TaskBatch"):
        answer_items(model, batch.input_ids)
