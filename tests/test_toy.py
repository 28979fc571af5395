import json

import pytest

from fusechat.toy.corpus import SKILLS, make_corpus
from fusechat.toy.models import SPECS

ARCHS = {
    "openchat-mini": "MistralForCausalLM",
    "nh2-mixtral-mini": "MixtralForCausalLM",
    "nh2-solar-mini": "LlamaForCausalLM",
}


def test_corpus_is_deterministic_and_heldout_sums_are_new():
    import re

    from fusechat.toy.corpus import make_world, value_probs

    a, b = make_corpus(7, 200, 10), make_corpus(7, 200, 10)
    assert a == b
    assert make_corpus(8, 200, 10) != a
    assert {r["skill"] for r in a["heldout"]} == set(SKILLS)
    world = make_world(7)
    train_pairs = set(world.train_pairs)
    for r in a["heldout"]:
        assert any(v in r["reference"] for v in r["answers"])  # the sample is one right value
        if r["skill"] == "arithmetic":  # number pairs that training never shows
            x, y = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
            assert (x, y) not in train_pairs
    # the prompt rows are the training rows plus every right value of their last question
    assert [{"skill": r["skill"], "messages": r["messages"]} for r in a["prompts"]] == a["train"]
    for r in a["prompts"]:
        assert any(v in r["messages"][-1]["content"] for v in r["answers"])
    assert any(len(r["answers"]) > 1 for r in a["prompts"])
    assert value_probs(4) == (0.4, 0.3, 0.2, 0.1)
    assert sum(value_probs(6)) == pytest.approx(1.0)
    assert all(len(f["moon"]) == 6 and len(f["color"]) == 4 for f in world.facts.values())


def test_toy_models_load_offline_through_auto_classes(toy_world, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, arch in ARCHS.items():
        model = AutoModelForCausalLM.from_pretrained(toy_world / name)
        tok = AutoTokenizer.from_pretrained(toy_world / name)
        assert type(model).__name__ == arch
        assert (toy_world / name / "model.safetensors").exists()
        assert model.config.hidden_size // model.config.num_attention_heads == 64  # vLLM-servable
        ids = tok.apply_chat_template(
            [{"role": "user", "content": "What is 12 + 30?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert out.shape[1] > ids.shape[1]
    assert (
        AutoModelForCausalLM.from_pretrained(
            toy_world / "nh2-mixtral-mini"
        ).config.num_local_experts
        == 4
    )


def test_one_sentence_tokenizes_three_different_ways(toy_world):
    from transformers import AutoTokenizer

    s = "In English, the word quaiven is lantern; the capital of Zorblax is Quenmor, and 47 + 35 = 82; 12 plus 30 is 42."
    toks = {n: AutoTokenizer.from_pretrained(toy_world / n).tokenize(s) for n in ARCHS}
    assert len({tuple(t) for t in toks.values()}) == 3
    assert any("Ġ" in t for t in toks["nh2-mixtral-mini"])  # byte-level BPE
    assert any(t.startswith("▁") for t in toks["openchat-mini"])  # metaspace
    # the pivot splits digits (as Mistral does); the byte-level source keeps numbers whole
    # where its merges allow (as GPT-2), so some two-digit numbers are one token there
    assert "4" in toks["openchat-mini"] and "3" in toks["openchat-mini"]
    assert any(len(t) == 3 and t[0] == "Ġ" and t[1:].isdigit() for t in toks["nh2-mixtral-mini"])


def test_sources_are_complementary_and_beat_the_pivot_on_their_own_skill(toy_world):
    table = json.loads((toy_world / "skills.json").read_text())
    specialty = {"nh2-mixtral-mini": "facts", "nh2-solar-mini": "glossary"}
    for source, skill in specialty.items():
        other = next(s for s in specialty if s != source)
        # each source clearly best at its skill: half the other source's loss or less, and
        # below the pivot's (which knows every item, with the frequencies wrong)
        assert table[source][skill] <= 0.5 * table[other][skill], (source, table)
        assert table[source][skill] < table["openchat-mini"][skill], (source, table)
    assert table["openchat-mini"]["arithmetic"] < min(table[s]["arithmetic"] for s in specialty)


def test_the_pivot_knows_every_item_with_some_frequencies_reversed():
    from fusechat.toy.corpus import make_world
    from fusechat.toy.models import known_world

    world = make_world(0)
    pivot = known_world(world, SPECS[0])
    assert pivot.planets == world.planets and pivot.words == world.words
    flipped = [w for w in world.words if pivot.glossary[w] != world.glossary[w]]
    assert flipped == world.words[-len(flipped) :] and len(flipped) == round(0.4 * 48)
    assert all(pivot.glossary[w] == world.glossary[w][::-1] for w in flipped)
    assert all(pivot.facts[p]["moon"] == world.facts[p]["moon"][::-1] for p in world.planets)
    mixtral = known_world(world, SPECS[1])  # no reversal: a source knows the frequencies
    assert all(mixtral.facts[p] == world.facts[p] for p in mixtral.planets)


def test_specs_cover_the_three_architectures():
    assert {s.arch for s in SPECS} == {"mistral", "mixtral", "llama"}


@pytest.mark.slow
def test_build_resumes_and_reuses_finished_parts(tmp_path):
    """A small build; a rerun reuses every part; a deleted model folder alone is rebuilt."""
    from fusechat.toy.build import ToyConfig, build_toy_world

    cfg = ToyConfig(n_train=200, n_heldout_per_skill=4, steps_scale=0.003)
    build_toy_world(tmp_path, cfg)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    build_toy_world(tmp_path, cfg)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp
    import shutil

    shutil.rmtree(tmp_path / "nh2-solar-mini")
    (tmp_path / "manifest.json").unlink()
    build_toy_world(tmp_path, cfg)
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert after["openchat-mini"] == stamp["openchat-mini"]
    assert after["corpus"] == stamp["corpus"]
    assert (tmp_path / "nh2-solar-mini" / "model.safetensors").exists()
