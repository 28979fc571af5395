"""The weight-space figures on hand-made state dicts, and on toy models against an oracle."""

from __future__ import annotations

import math

import pytest
import torch

from fusechat.weightspace import barrier, delta_cosine, lerp, line_losses, relative_delta


def _state(*tensors) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.tensor(t, dtype=torch.float32) for i, t in enumerate(tensors)}


BASE = _state([[3.0, 0.0]], [4.0])  # |base| = 5


def test_relative_delta_is_over_every_tensor_together():
    model = _state([[3.0, 1.0]], [4.0 + 1.0])  # delta (0, 1, 1): norm sqrt 2
    assert relative_delta(BASE, model) == pytest.approx(math.sqrt(2) / 5)
    assert relative_delta(BASE, BASE) == 0.0


def test_delta_cosine_of_deltas_not_of_weights():
    a = _state([[4.0, 0.0]], [4.0])  # delta (1, 0, 0)
    b = _state([[4.0, 1.0]], [4.0])  # delta (1, 1, 0)
    c = _state([[2.0, 0.0]], [4.0])  # delta (-1, 0, 0)
    assert delta_cosine(BASE, a, b) == pytest.approx(1 / math.sqrt(2))
    assert delta_cosine(BASE, a, c) == pytest.approx(-1.0)
    assert math.isnan(delta_cosine(BASE, a, BASE))  # no delta, no direction
    # the weights themselves are nearly parallel: the cosine must not be theirs
    flat = lambda s: torch.cat([v.flatten() for v in s.values()])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(a), flat(c), 0) > 0.9


def test_lerp_and_the_line():
    a, b = _state([[0.0, 2.0]], [1.0]), _state([[4.0, 2.0]], [3.0])
    mid = lerp(a, b, 0.25)
    assert mid["t0"].tolist() == [[1.0, 2.0]] and mid["t1"].tolist() == pytest.approx([1.5])
    ints = {"n": torch.tensor([7])}
    assert lerp(ints, {"n": torch.tensor([9])}, 0.5)["n"].tolist() == [7]  # not interpolated
    losses = line_losses(lambda s: float(s["t0"][0, 0]), a, b, (0.0, 0.5, 1.0))
    assert losses == [0.0, 2.0, 4.0]


def test_barrier_is_the_rise_above_the_chord():
    assert barrier((0, 0.5, 1), [1.0, 1.5, 2.0]) == 0.0  # on the chord
    assert barrier((0, 0.5, 1), [1.0, 2.0, 2.0]) == pytest.approx(0.5)
    assert barrier((0, 0.25, 0.5, 0.75, 1), [1, 1.1, 1.4, 1.2, 1]) == pytest.approx(0.4)
    assert barrier((0, 0.5, 1), [2.0, 1.0, 2.0]) == 0.0  # below: a basin, no barrier


def test_weight_figures_on_toy_models(toy_world, tmp_path):
    """Ends of each line are the models' own held-out losses (nll_per_char of the loaded model,
    an independent path); the pivot's relative delta to a copy of itself is 0; a model whose
    weights are the pivot's plus d has relative delta |d| / |pivot|."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fusechat.conversations import load_conversations
    from fusechat.data import load_model, load_tokenizer
    from fusechat.heldout import nll_per_char
    from fusechat.weightspace import weight_figures

    pivot = toy_world / "openchat-mini"
    moved = shutil.copytree(pivot, tmp_path / "moved")
    sd = load_file(moved / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    d = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    save_file({k: v + d[k] for k, v in sd.items()}, moved / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    convs, _ = load_conversations(toy_world / "corpus" / "heldout.jsonl")
    rows = [{"messages": c} for c in convs[:6]]
    figs = weight_figures(str(pivot), {"same": str(pivot), "moved": str(moved)}, rows,
                          alphas=(0.0, 0.5, 1.0))  # fmt: skip
    assert figs["relative_delta"]["same"] == 0.0
    full = load_model(str(pivot)).state_dict()
    # the state dict may hold a tied head under a second name: count each tensor once
    norm = math.sqrt(sum(float(v.double().square().sum()) for k, v in sd.items()))
    dn = math.sqrt(sum(float(v.double().square().sum()) for v in d.values()))
    if len(full) == len(sd):
        assert figs["relative_delta"]["moved"] == pytest.approx(dn / norm, rel=1e-4)
    tok = load_tokenizer(str(moved))
    own = nll_per_char(load_model(str(moved)), tok, rows, "tokenizer")
    assert figs["lines"]["pivot->moved"][-1] == pytest.approx(own, rel=1e-5)
    assert figs["lines"]["same->moved"][0] == figs["lines"]["pivot->moved"][0]
    assert len(figs["lines"]["same->moved"]) == 3 and set(figs["barrier"]) == set(figs["lines"])
