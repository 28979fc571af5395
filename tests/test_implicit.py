"""Implicit fusion's data stages (sample, score, pairs): the selection rules on hand-computed
cases, sampling reproducible by seed and resumable, the toy and Hugging Face rewards, TRL's
formats, and bad inputs as one line. Tiny random models built here from literal configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cli_error, stage_rows, start_server

from fusechat.cli import main
from fusechat.errors import FusechatError
from fusechat.implicit.common import (
    best_index,
    preference_pair,
    prompt_of,
    response_ids,
    sft_choice,
    sft_side,
    shard_seed,
    text_of,
)
from fusechat.implicit.pairs import pairs_stage, read_pairs
from fusechat.implicit.rewards import REWARDS, Candidate, HFReward, toy_reward
from fusechat.implicit.sample import sample_stage
from fusechat.implicit.score import score_stage
from fusechat.implicit.settings import PairsConfig, SampleConfig, ScoreConfig

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = {"role": "system", "content": "You are a helpful assistant."}

# toy-world rows: questions with every right value (the toy's held-out rows look like this)
ROWS = [
    {"skill": "facts", "answers": ["Kelo", "Tira"], "messages": [U("Name a moon of Zorvan."),
                                                               A("One moon of Zorvan is Kelo.")]},
    {"skill": "arithmetic", "answers": ["68"], "messages": [U("What is 41 + 27?")]},
    {"skill": "glossary", "answers": ["river", "stream"],
     "messages": [S, U("What does the word dralo mean?"), A("The word dralo means river."),
                  U("Translate dralo into English.")]},
    {"skill": "facts", "answers": ["Vaska"], "messages": [U("What is the capital of Merin?")]},
    {"skill": "facts", "answers": ["blue"], "messages": [U("What color is the sky of Teru?")]},
]  # fmt: skip


# --------------------------------------------------------------------------- pure rules


def test_the_prompt_is_every_message_up_to_the_last_user_turn():
    conv = [S, U("a"), A("b"), U("c"), A("d")]
    assert prompt_of(conv) == [S, U("a"), A("b"), U("c")]
    assert prompt_of([U("q")]) == [U("q")]
    with pytest.raises(ValueError, match="no user turn"):
        prompt_of([S])


def test_sft_choice_takes_the_highest_reward_first_model_then_first_sample_on_ties():
    # (model 0: 0.2 0.7) (model 1: 0.7 0.1): the first 0.7 is model 0's second sample
    assert best_index([0.2, 0.7, 0.7, 0.1]) == 1
    assert sft_choice([0.2, 0.7, 0.7, 0.1]) == 1
    assert sft_choice([0.5]) == 0  # one response
    assert sft_choice([0.3, 0.3, 0.3]) == 0  # all equal: the first
    assert sft_choice([-2.0, -1.0]) == 1  # reward-model logits may be negative
    # a correctness check: only a right answer is an example, else the prompt is left out
    assert sft_choice([0.0, 1.0, 1.0], pass_mark=1.0) == 1
    assert sft_choice([0.0, 0.0], pass_mark=1.0) is None
    with pytest.raises(ValueError):
        best_index([])


def test_preference_pair_is_best_against_worst_within_the_gap_window():
    # first of the best, last of the worst
    assert preference_pair([0.2, 0.9, 0.9, 0.1, 0.1], 0.01) == (1, 4)
    assert preference_pair([0.0, 1.0, 0.0], 0.01) == (1, 2)  # the toy's 0/1: gap 1
    assert preference_pair([0.5], 0.0) is None  # one response: no pair
    assert preference_pair([], 0.0) is None
    assert preference_pair([0.4, 0.4, 0.4], 0.01) is None  # all equal: gap 0
    assert preference_pair([0.3, 0.305], 0.01) is None  # below the window
    assert preference_pair([0.0, 0.5], 0.01, 0.1) is None  # above it (the paper's 0.1)
    assert preference_pair([0.3, 0.35], 0.01, 0.1) == (1, 0)
    # both bounds inclusive (binary fractions: the gap is exact)
    assert preference_pair([0.5, 0.25], 0.25) == (0, 1)
    assert preference_pair([0.5, 0.25], 0.0, 0.25) == (0, 1)
    assert preference_pair([0.5, 0.25], 0.0, 0.125) is None
    assert preference_pair([0.5, 0.25], 0.375) is None


def test_the_split_is_a_deterministic_hash_with_the_asked_proportion():
    prompts = [[U(f"question {i}")] for i in range(1000)]
    side = [sft_side(p, 0.4) for p in prompts]
    assert side == [sft_side(p, 0.4) for p in prompts]  # the same prompt, the same side
    assert abs(sum(side) / 1000 - 0.4) < 0.05
    assert abs(sum(sft_side(p, 0.7) for p in prompts) / 1000 - 0.7) < 0.05
    # a larger share only moves prompts to SFT; 0 and 1 take none and all
    assert all(sft_side(p, 0.7) for p, s in zip(prompts, side, strict=True) if s)
    assert not any(sft_side(p, 0.0) for p in prompts) and all(sft_side(p, 1.0) for p in prompts)
    # the role counts: the same text asked by another role is another prompt
    assert sft_side([U("x")], 0.4) == sft_side([dict(U("x"))], 0.4)


def test_shard_seeds_and_stop_tokens():
    assert shard_seed(0, 0) == shard_seed(0, 0)
    assert len({shard_seed(s, i) for s in range(3) for i in range(50)}) == 150
    assert response_ids([5, 6, 2, 0, 0], [2, 9]) == ([5, 6], True)
    assert response_ids([5, 9], [2, 9]) == ([5], True)
    assert response_ids([5, 6, 7], [2]) == ([5, 6, 7], False)  # cut by max_new_tokens


def test_a_prompt_reads_the_same_named_or_through_the_tokenizers_template(mistral_tokenizer):
    """The openchat template by name (BOS left to the tokenizer) and as the tokenizer's own
    chat_template (BOS written by it) give the same text, ending at the assistant prefix."""
    import copy

    from fusechat.data import TEMPLATES, render_text

    tok = copy.deepcopy(mistral_tokenizer)
    tok.chat_template = None  # another test of the session may have given it one
    prompt = prompt_of(ROWS[2]["messages"])
    named, special = render_text(prompt, tok, "openchat", generation=True)
    assert special and named.endswith("Translate dralo into English.<|end_of_turn|>GPT4 Correct "
                                      "Assistant:")  # fmt: skip
    with pytest.raises(FusechatError, match="has no chat_template"):
        render_text(prompt, tok, "tokenizer", generation=True)
    tok.chat_template = TEMPLATES["openchat"].jinja
    own, special = render_text(prompt, tok, "tokenizer", generation=True)
    assert not special
    assert own == tok.bos_token + named


# --------------------------------------------------------------------------- toy reward


def test_the_toy_reward_is_the_rule_judges_verdict_on_any_right_value():
    q = "Name a moon of Zorvan."
    assert toy_reward(q, "One moon of Zorvan is Tira.", ["Kelo", "Tira"]) == 1.0
    assert toy_reward(q, "Kelo", ["Kelo", "Tira"]) == 1.0
    assert toy_reward(q, "One moon of Zorvan is Mira.", ["Kelo", "Tira"]) == 0.0
    assert toy_reward(q, "Name a moon of Zorvan.", ["Kelo"]) == 0.0  # an echo earns nothing
    assert toy_reward("What is 41 + 27?", "41 + 27 = 68.", ["68"]) == 1.0
    assert toy_reward("What is 41 + 27?", "41 + 27 = 69.", ["68"]) == 0.0
    # the right sum inside a wrong computation is not a right answer (the judge alone says 10)
    assert toy_reward("Compute 26 plus 63.", "93 plus 89 is 179.", ["89"]) == 0.0
    assert toy_reward("Compute 26 plus 63.", "The sum of 26 and 63 is 89.", ["89"]) == 1.0
    reward = REWARDS["toy"](ScoreConfig(reward="toy"))
    cands = [Candidate([U("What is 41 + 27?")], t, {"answers": ["68"]}) for t in ("68", "86")]
    assert reward.score(cands) == [1.0, 0.0] and reward.pass_mark == 1.0


def test_every_reward_name_is_registered():
    from fusechat.implicit.settings import REWARD_NAMES

    assert tuple(REWARDS) == REWARD_NAMES


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny(mistral_tokenizer, tmp_path_factory) -> dict:
    """A tiny random chat model and two reward models (one label; two labels) with
    Mistral's tokenizer, and the prompt set."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    # the session's tokenizer may carry a chat_template another test gave it: these have none
    tok = copy.deepcopy(mistral_tokenizer)
    tok.chat_template = None
    d = tmp_path_factory.mktemp("implicit")
    base = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**base)).save_pretrained(d / "chat")
    for name, labels in (("rm", 1), ("rm2", 2)):
        cfg = LlamaConfig(**base, num_labels=labels, pad_token_id=tok.eos_token_id)
        LlamaForSequenceClassification(cfg).save_pretrained(d / name)
    for name in ("chat", "rm", "rm2"):
        tok.save_pretrained(d / name)
    data = d / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"dir": d, "chat": str(d / "chat"), "rm": str(d / "rm"), "rm2": str(d / "rm2"),
            "data": str(data)}  # fmt: skip


def _cfg(tiny, **kw) -> SampleConfig:
    base = dict(model=tiny["chat"], template="openchat", n=3, max_new_tokens=6, batch_size=2,
                shard_rows=2, dtype="float32")  # fmt: skip
    return SampleConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def samples(tiny) -> dict:
    """Two sample folders of the same model, seeds 0 and 1 (two 'sources')."""
    d = tiny["dir"]
    sample_stage(_cfg(tiny), tiny["data"], d / "s0")
    sample_stage(_cfg(tiny, seed=1), tiny["data"], d / "s1")
    return {"s0": d / "s0", "s1": d / "s1"}


def _shards(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_sampling_gives_n_responses_per_prompt_reproducibly_by_seed(tiny, samples, tmp_path):
    rows = stage_rows(samples["s0"], "sample")
    assert [(int(r["row.index"]), int(r["row.sample"])) for r in rows] == [
        (i, j) for i in range(len(ROWS)) for j in range(3)
    ]
    assert all(0 < int(r["row.n_tokens"]) <= 6 and int(r["row.prompt_tokens"]) > 5 for r in rows)
    m = json.loads((samples["s0"] / "manifest.json").read_text())
    assert m["shards"] == 3 and m["stats"]["prompts"] == 5 and m["stats"]["responses"] == 15
    assert m["stats"]["tokens_generated"] == sum(int(r["row.n_tokens"]) for r in rows)
    assert m["key"]["n"] == 3 and m["key"]["temperature"] == 0.8
    # the same seed: the same bytes; another seed: other responses
    sample_stage(_cfg(tiny), tiny["data"], tmp_path / "again")
    assert _shards(tmp_path / "again") == _shards(samples["s0"])
    other = [text_of(r) for r in stage_rows(samples["s1"], "sample")]
    assert other != [text_of(r) for r in rows]
    assert len(set(text_of(r) for r in rows[:3])) == 3  # a prompt's n responses differ


def test_sampling_resumes_reuses_and_overwrites(tiny, samples, tmp_path, monkeypatch):
    import fusechat.implicit.sample as implicit

    want = _shards(samples["s0"])
    out = tmp_path / "s"
    real, calls = implicit._generate, []

    def dies_in_shard_one(run, index, *a):
        calls.append(index)
        if index[0] >= 2:
            raise KeyboardInterrupt  # killed after shard 0 was written
        return real(run, index, *a)

    monkeypatch.setattr(implicit, "_generate", dies_in_shard_one)
    with pytest.raises(KeyboardInterrupt):
        sample_stage(_cfg(tiny), tiny["data"], out)
    monkeypatch.setattr(implicit, "_generate", real)
    assert not (out / "manifest.json").exists() and list(_shards(out)) == [
        "shard-00000.safetensors"
    ]
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    sample_stage(_cfg(tiny), tiny["data"], out)
    assert _shards(out) == want and (out / "shard-00000.safetensors").stat().st_mtime_ns == kept
    # the manifest lost: the shards are redone, the same bytes
    (out / "manifest.json").unlink()
    sample_stage(_cfg(tiny), tiny["data"], out)
    assert _shards(out) == want
    # finished: reused without loading the model
    monkeypatch.setattr("fusechat.eval.chat.load_chat_model", lambda *a: 1 / 0)
    assert sample_stage(_cfg(tiny), tiny["data"], out)["stats"]["responses"] == 15
    monkeypatch.undo()
    # other settings: refused, then replaced with --overwrite
    with pytest.raises(FusechatError, match=r"other settings \(n\)"):
        sample_stage(_cfg(tiny, n=2), tiny["data"], out)
    assert (
        sample_stage(_cfg(tiny, n=2), tiny["data"], out, overwrite=True)["stats"]["responses"] == 10
    )
    assert len(stage_rows(out, "sample")) == 10


# --------------------------------------------------------------------------- hf reward


def test_the_hf_reward_is_the_single_logit_batched_as_alone(tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = ScoreConfig(reward="hf", reward_model=tiny["rm"], template="openchat", batch_size=3,
                      dtype="float32")  # fmt: skip
    reward = HFReward(cfg)
    reward.load()
    cands = [Candidate([U(q)], a, {}) for q, a in [
        ("What is 41 + 27?", "68"), ("Name a moon of Zorvan.", "One moon of Zorvan is Kelo."),
        ("Hi", "Hello there, how are you doing today? " * 3), ("x", ""),
        ("Translate dralo.", "river")]]  # fmt: skip
    got = reward.score(cands)
    model = AutoModelForSequenceClassification.from_pretrained(tiny["rm"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["rm"])
    for c, g in zip(cands, got, strict=True):
        text = f"GPT4 Correct User: {c.prompt[0]['content']}<|end_of_turn|>GPT4 Correct " \
               f"Assistant: {c.response}<|end_of_turn|>"  # fmt: skip
        ids = tok(text, return_tensors="pt")["input_ids"]  # alone: BOS, no padding
        with torch.no_grad():
            want = float(model(input_ids=ids).logits[0, 0])
        assert g == pytest.approx(want, abs=1e-5)
    assert len(set(got)) == len(got)
    # a longer conversation than max_length keeps its end
    short = HFReward(cfg.model_copy(update={"max_length": 8}))
    short.load()
    short.score(cands[:2])
    assert short.truncated == 2


# --------------------------------------------------------------------------- score, pairs


@pytest.fixture(scope="module")
def scored(tiny, samples) -> dict:
    d = tiny["dir"]
    hf = ScoreConfig(reward="hf", reward_model=tiny["rm"], template="openchat", dtype="float32")
    score_stage([samples["s0"], samples["s1"]], d / "hf", hf)
    score_stage([samples["s0"], samples["s1"]], d / "toy", ScoreConfig(reward="toy"))
    return {"hf": d / "hf", "toy": d / "toy"}


def test_score_orders_by_prompt_model_sample_with_stats_per_model(samples, scored):
    rows = stage_rows(scored["hf"], "score")
    assert [(int(r["row.index"]), int(r["row.model"]), int(r["row.sample"])) for r in rows] == [
        (i, m, j) for i in range(len(ROWS)) for m in range(2) for j in range(3)
    ]
    s0 = {(int(r["row.index"]), int(r["row.sample"])): text_of(r)
          for r in stage_rows(samples["s0"], "sample")}  # fmt: skip
    assert all(text_of(r) == s0[int(r["row.index"]), int(r["row.sample"])]
               for r in rows if int(r["row.model"]) == 0)  # fmt: skip
    stats = json.loads((scored["hf"] / "manifest.json").read_text())["stats"]
    assert stats["prompts"] == 5 and stats["responses"] == 30 and stats["pass_mark"] is None
    for m, ms in enumerate(stats["models"]):
        x = np.array([float(r["row.reward"]) for r in rows if int(r["row.model"]) == m])
        assert ms["responses"] == 15 and ms["mean"] == pytest.approx(x.mean(), abs=1e-6)
        assert ms["min"] == pytest.approx(x.min(), abs=1e-6)
    toy = json.loads((scored["toy"] / "manifest.json").read_text())["stats"]
    assert toy["pass_mark"] == 1.0 and {m["passed"] for m in toy["models"]} <= {0.0}
    assert {float(r["row.reward"]) for r in stage_rows(scored["toy"], "score")} <= {0.0, 1.0}


def test_the_judge_reward_rates_every_response_through_an_endpoint(samples, tmp_path):
    """A scripted OpenAI-compatible judge rates a response by its length (no rating for every
    seventh length): each response gets its rating, an unrated one 0, counted."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app, seen = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        seen.append(body)
        if body["model"] != "scripted":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        n = len(body["messages"][-1]["content"].rsplit("[The assistant's answer]\n", 1)[1])
        text = "I cannot tell." if n % 7 == 0 else f"Fair. Rating: [[{n % 10 + 1}]]"
        return {"id": "j", "object": "chat.completion", "created": 0, "model": "scripted",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]}  # fmt: skip

    url = start_server(app)
    cfg = ScoreConfig(reward="judge", judge_url=url, judge_model="scripted", concurrency=4)
    score_stage([samples["s0"], samples["s1"]], tmp_path / "judge", cfg)
    rows = stage_rows(tmp_path / "judge", "score")
    lengths = [len(text_of(r)) for r in rows]
    assert [float(r["row.reward"]) for r in rows] == [
        0.0 if n % 7 == 0 else float(n % 10 + 1) for n in lengths]  # fmt: skip
    stats = json.loads((tmp_path / "judge" / "manifest.json").read_text())["stats"]
    assert stats["unrated"] == sum(n % 7 == 0 for n in lengths)
    assert len(seen) == len(rows) and all(b["temperature"] == 0 for b in seen)
    # the judge's settings name the output; its key's location does not
    again = ScoreConfig(**{**cfg.model_dump(), "judge_api_key_env": "OTHER"})
    assert (
        again.key() == cfg.key() != ScoreConfig(**{**cfg.model_dump(), "judge_model": "j2"}).key()
    )
    # a model the endpoint does not serve: one line naming the endpoint
    wrong = ScoreConfig(reward="judge", judge_url=url, judge_model="gpt-x")
    with pytest.raises(FusechatError, match=f"judge {url}: 404"):
        score_stage([samples["s0"], samples["s1"]], tmp_path / "wrong", wrong)


def test_pairs_are_trl_sets_chosen_by_the_rules(tiny, scored, tmp_path):
    from fusechat.implicit.pairs import _by_prompt

    out = tmp_path / "pairs"
    m = pairs_stage(scored["hf"], out, PairsConfig(min_gap=0.0, sft_share=0.7))
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(x) for x in (out / "dpo.jsonl").read_text().splitlines()]
    rows = stage_rows(scored["hf"], "score")
    want_sft, want_dpo = [], []
    for idx, group in _by_prompt(rows):
        prompt = prompt_of(ROWS[idx]["messages"])
        if sft_side(prompt, 0.7):
            best = max(group, key=lambda r: float(r["row.reward"]))  # the first of the best
            want_sft.append({"messages": [*prompt, A(text_of(best))]})
            continue
        for model in range(2):
            mine = [r for r in group if int(r["row.model"]) == model]
            x = [float(r["row.reward"]) for r in mine]
            hi, lo = int(np.argmax(x)), len(x) - 1 - int(np.argmin(x[::-1]))
            want_dpo.append({"prompt": prompt, "chosen": [A(text_of(mine[hi]))],
                             "rejected": [A(text_of(mine[lo]))]})  # fmt: skip
    assert sft == want_sft and dpo == want_dpo and sft and dpo
    s = m["stats"]
    assert (s["sft_rows"], s["pairs"], s["prompts"]) == (len(sft), len(dpo), 5)
    assert s["sft_prompts"] + s["dpo_prompts"] == 5 and s["gap"]["min"] >= 0
    assert sum(b["pairs"] for b in s["by_model"]) == len(dpo)
    assert read_pairs(out)["stats"] == s
    # the same settings: reused; others: refused unless --overwrite
    assert pairs_stage(scored["hf"], out, PairsConfig(min_gap=0.0, sft_share=0.7)) == m
    with pytest.raises(FusechatError, match=r"other settings \(min_gap\)"):
        pairs_stage(scored["hf"], out, PairsConfig(sft_share=0.7))
    narrow = pairs_stage(
        scored["hf"], out, PairsConfig(min_gap=10.0, sft_share=0.7), overwrite=True
    )
    assert narrow["stats"]["pairs"] == 0 and narrow["stats"]["pairs_outside_gap"] > 0
    # the toy reward: no right answer among random text, so no SFT row and no pair
    toy = pairs_stage(scored["toy"], tmp_path / "toy-pairs", PairsConfig(sft_share=0.7))["stats"]
    assert toy["sft_rows"] == 0 and toy["sft_without_pass"] == toy["sft_prompts"] > 0
    assert toy["pairs"] == 0
    # an edited file is caught by whoever reads the set
    (out / "dpo.jsonl").write_text("{}\n")
    with pytest.raises(FusechatError, match="dpo.jsonl: damaged"):
        read_pairs(out)


def test_toy_rewards_give_right_sft_answers_and_right_against_wrong_pairs(tiny, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """A scripted source: sample 1 is right except on prompts 1 and 4, where nothing is.
    SFT (prompts 2, 3, 4 at share 0.7) takes the right answers and leaves prompt 4 out; the
    pairs (prompts 0, 1) are right against the last wrong on prompt 0, none on prompt 1."""
    import fusechat.implicit.sample as implicit

    def scripted(run, index, texts, cfg):
        rows = []
        for i in index:
            for j in range(cfg.n):
                right = j == 1 and i not in (1, 4)
                t = f"The answer is {ROWS[i]['answers'][0]}." if right else f"No idea ({j})."
                rows.append({"pos.text": np.frombuffer(t.encode(), np.uint8).copy(),
                             "row.index": np.int64(i), "row.sample": np.int64(j),
                             "row.n_tokens": np.int64(5), "row.prompt_tokens": np.int64(9),
                             "row.finished": np.bool_(True)})  # fmt: skip
        return rows

    monkeypatch.setattr(implicit, "_generate", scripted)
    sample_stage(_cfg(tiny), tiny["data"], tmp_path / "s")
    score_stage([tmp_path / "s"], tmp_path / "toy", ScoreConfig(reward="toy"))
    rewards = [float(r["row.reward"]) for r in stage_rows(tmp_path / "toy", "score")]
    assert rewards == [0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]
    m = pairs_stage(tmp_path / "toy", tmp_path / "p", PairsConfig(sft_share=0.7))
    sft = [json.loads(x) for x in (tmp_path / "p" / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(x) for x in (tmp_path / "p" / "dpo.jsonl").read_text().splitlines()]
    assert sft == [
        {"messages": [*prompt_of(ROWS[2]["messages"]), A("The answer is river.")]},
        {"messages": [*prompt_of(ROWS[3]["messages"]), A("The answer is Vaska.")]},
    ]
    assert dpo == [{"prompt": [U("Name a moon of Zorvan.")], "chosen": [A("The answer is Kelo.")],
                    "rejected": [A("No idea (2).")]}]  # fmt: skip
    s = m["stats"]
    assert (s["sft_prompts"], s["sft_without_pass"], s["dpo_prompts"]) == (3, 1, 2)
    assert (s["pairs_outside_gap"], s["gap"]["min"], s["sft_reward"]["mean"]) == (1, 1.0, 1.0)


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_one_line(tiny, samples, tmp_path, capsys):
    base = ["sample", "--model", tiny["chat"], "--template", "openchat", "--max-new-tokens", "2"]
    no_user = tmp_path / "no-user.jsonl"
    no_user.write_text(json.dumps({"messages": [S]}) + "\n" + json.dumps(ROWS[1]) + "\n")
    err = cli_error(
        capsys, [*base, "--data", str(no_user), "--out", str(tmp_path / "a"), "--strict"]
    )
    assert err.endswith("row 1: no user turn")
    only = tmp_path / "only.jsonl"
    only.write_text(json.dumps({"messages": [A("hello")]}) + "\n")
    err = cli_error(capsys, [*base, "--data", str(only), "--out", str(tmp_path / "b")])
    assert "no usable conversations" in err
    err = cli_error(
        capsys, [*base, "--data", tiny["data"], "--out", str(tmp_path / "c"), "--n", "0"]
    )
    assert "--n: Input should be greater than 0" in err
    err = cli_error(capsys, [*base, "--data", tiny["data"], "--out", str(tmp_path / "c"),
                        "--top-p", "1.5"])  # fmt: skip
    assert "--top-p: Input should be less than or equal to 1" in err
    # the toy reward on rows without their right values
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in ROWS[:4]))
    assert main([*base, "--data", str(plain), "--out", str(tmp_path / "plain"), "--n", "2",
                 "--batch-size", "3", "--seed", "5", "--dtype", "float32"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["prompts"], out["responses"]) == (4, 8)
    hf = ["--reward", "hf", "--reward-model", tiny["rm"], "--dtype", "float32"]
    err = cli_error(capsys, ["score", "--samples", str(tmp_path / "plain"), *hf, "--out",
                        str(tmp_path / "d")])  # fmt: skip
    assert err.endswith("rm: the reward model's tokenizer has no chat_template; name a template "
                        "(--template)")  # fmt: skip
    assert main(["score", "--samples", str(tmp_path / "plain"), *hf, "--template", "openchat",
                 "--out", str(tmp_path / "hf")]) == 0  # fmt: skip
    assert main(["pairs", "--scores", str(tmp_path / "hf"), "--out", str(tmp_path / "p"),
                 "--min-gap", "0", "--sft-share", "0.5"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts"] == 4 and out["sft_rows"] + out["pairs"] == 4
    err = cli_error(capsys, ["score", "--samples", str(tmp_path / "plain"), "--reward", "toy",
                        "--out", str(tmp_path / "d")])  # fmt: skip
    assert err.endswith("row 1: no 'answers' (reward toy checks a response against the row's "
                        "right values, as the toy's held-out and question rows list them)")  # fmt: skip
    # samples of different corpora, rewards without their model or with the wrong one
    score = ["score", "--out", str(tmp_path / "e")]
    err = cli_error(capsys, [*score, "--samples", str(samples["s0"]), str(tmp_path / "plain"),
                        "--reward", "toy"])  # fmt: skip
    assert "sampled from another corpus" in err
    err = cli_error(capsys, [*score, "--samples", str(samples["s0"]), "--reward", "hf"])
    assert "reward hf needs a reward model (--reward-model)" in err
    err = cli_error(capsys, [*score, "--samples", str(samples["s0"]), "--reward", "hf",
                        "--reward-model", tiny["rm2"], "--template", "openchat"])  # fmt: skip
    assert "a reward model has one label; this one has 2" in err
    err = cli_error(capsys, [*score, "--samples", str(samples["s0"]), "--reward", "hf",
                        "--reward-model", tiny["chat"]])  # fmt: skip
    assert "not a sequence classifier (architecture LlamaForCausalLM)" in err
    err = cli_error(capsys, ["score", "--samples", str(tmp_path / "nowhere"), "--reward", "toy",
                        "--out", str(tmp_path / "f")])  # fmt: skip
    assert "no such sample folder" in err
    err = cli_error(capsys, ["pairs", "--scores", str(samples["s0"]), "--out", str(tmp_path / "g")])
    assert "is a sample output, expected score" in err
    err = cli_error(capsys, ["pairs", "--scores", str(samples["s0"]), "--out", str(tmp_path / "g"),
                        "--min-gap", "0.5", "--max-gap", "0.1"])  # fmt: skip
    assert "max_gap 0.1 is below min_gap 0.5" in err
