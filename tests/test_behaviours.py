"""Behaviours the outside check's surviving bugs broke (issue 30), each pinned by behaviour on
small hand-made fixtures: per-turn MinCE and its row weights, branch keeping, the fuse stage's
key and --overwrite, the alignment's pair memo, weighted losses, what training hands the row
reader and the loss, tree attention run through a model, and the study's paired interval.

Stage folders here are written by hand (``begin_stage`` / ``save_shard`` / ``finish_stage``):
no toy world, no model but a tiny random Mistral."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fusechat.configs import FuseConfig, TrainConfig
from fusechat.errors import FusechatError
from fusechat.fuse import fuse_stage
from fusechat.io import fingerprint
from fusechat.losses import fusion_losses, learned_next
from fusechat.rows import ShardRows, collate_rows, with_branches
from fusechat.shards import (
    StageReader,
    begin_stage,
    finish_stage,
    pack_ids,
    save_shard,
    unpack_ids,
)

U16 = np.dtype(np.uint16)
PIVOT_TOP = {1: 0.7, 2: 0.3}  # the pivot's captured distribution at every position


# --------------------------------------------------------------------------- hand-made stages


def _stage(folder: Path, key: dict, shards: list[list[dict]], stats: dict | None = None) -> dict:
    """A finished stage folder holding ``shards``; its key as read back."""
    begin_stage(folder, key)
    sums = {i: save_shard(folder, i, rows, key["stage"]) for i, rows in enumerate(shards)}
    finish_stage(folder, key, len(shards), stats or {}, sums)
    return StageReader(folder, key["stage"]).key


def _cap_row(index: int, mask: list[int], gold: list[float], truncated: bool = False) -> dict:
    """A captured row: ids 3, 4, ..., the pivot's top-2 ``PIVOT_TOP`` everywhere, gold
    log-probabilities ``gold`` (position t scores token t + 1), two bytes a token."""
    n = len(mask)
    m = np.asarray(mask, bool)
    g = np.asarray(gold, np.float16)
    learned = learned_next(m)
    top = np.tile(list(PIVOT_TOP), (n, 1))
    lp = np.log(np.tile(list(PIVOT_TOP.values()), (n, 1)))
    return {"pos.input_ids": pack_ids(np.arange(n) + 3, U16), "pos.labels_mask": m,
            "pos.byte_end": (2 * np.arange(1, n + 1)).astype(np.int32),
            "pos.topk_ids": pack_ids(top, U16), "pos.topk_logprobs": lp.astype(np.float16),
            "pos.gold_logprob": g, "row.index": np.int64(index),
            "row.nll_sum": np.float64(-g[learned].astype(np.float64).sum()),
            "row.n_tokens": np.int64(learned.sum()), "row.n_chars": np.int64(2 * n),
            "row.text_hash": np.uint64(index), "row.truncated": np.bool_(truncated)}  # fmt: skip


def _al_row(index: int, n: int, ce: float, n_tokens: int, dist: dict, valid=None, branches=None):
    """An aligned row over a pivot row of ``n`` positions: ``dist`` at every valid position,
    sequence cross-entropy ``ce`` over ``n_tokens`` learned tokens."""
    row = {"pos.ids": pack_ids(np.tile(list(dist), (n, 1)), U16),
           "pos.probs": np.tile(list(dist.values()), (n, 1)).astype(np.float16),
           "pos.valid": np.ones(n, bool) if valid is None else np.asarray(valid, bool),
           "row.index": np.int64(index), "row.nll_sum": np.float64(ce * n_tokens),
           "row.n_tokens": np.int64(n_tokens), "row.n_chars": np.int64(2 * n)}  # fmt: skip
    if branches is not None:
        row["pos.branch_ids"] = pack_ids(branches, U16)
    return row


def _world(d: Path, pivot: list[list[dict]], sources: list[tuple[list, list]]):
    """A pivot capture and, per source, its capture and its alignment to the pivot (folders
    as the stages write them: keys chained by fingerprint)."""
    base = {"stage": "capture", "version": 1, "shard_rows": len(pivot[0]),
            "corpus_fingerprint": "corpus"}  # fmt: skip
    pkey = _stage(d / "cap-pivot", {**base, "model": "pivot", "tokenizer_fingerprint": "tp"}, pivot)
    aligned = []
    for s, (cap_shards, al_shards) in enumerate(sources):
        skey = _stage(d / f"cap-s{s}", {**base, "model": f"s{s}", "tokenizer_fingerprint": f"t{s}"},
                      cap_shards)  # fmt: skip
        key = {"stage": "align", "version": 1, "pivot_capture": fingerprint(pkey),
               "source_capture": fingerprint(skey)}  # fmt: skip
        _stage(d / f"al-s{s}", key, al_shards, {"source_capture": str(d / f"cap-s{s}")})
        aligned.append(d / f"al-s{s}")
    return d / "cap-pivot", aligned


def _rows(folder: Path) -> list[dict]:
    return [r for _, rows in StageReader(folder, "fuse").shards() for r in rows]


def _weights(folder: Path) -> list[list[float]]:
    """Each fused row's model weights (pivot first), to 4 places (stored as float32)."""
    return [np.round(r["row.weights"].astype(np.float64), 4).tolist() for r in _rows(folder)]


def _dense(ids: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    return {int(i): round(float(p), 3) for i, p in zip(ids, probs, strict=True) if i >= 0 and p > 0}


# Two assistant turns of different lengths: positions 1-3 predict turn 1 (3 tokens), 6-7
# turn 2 (2 tokens); 0, 4, 5 and 8 learn nothing.
TWO_TURNS = [0, 0, 1, 1, 1, 0, 0, 1, 1]
# the pivot reads turn 1 well (CE 0.5) and turn 2 badly (CE 3.0): sequence CE 7.5 / 5 = 1.5
PIVOT_GOLD = [-9, -0.5, -0.5, -0.5, -9, -9, -3, -3, -9]
# a source that reads both turns at CE 1.0 (sequence CE 1.0): it wins turn 2 only
MIXED_GOLD = [-9, -1, -1, -1, -9, -9, -1, -1, -9]
SOURCE_TOP = {30: 0.6, 31: 0.4}


@pytest.fixture
def mixed(tmp_path):
    """Two two-turn rows in two shards; one source that wins turn 2 (and the sequence)."""
    pivot = [[_cap_row(i, TWO_TURNS, PIVOT_GOLD)] for i in range(2)]
    cap = [[_cap_row(i, TWO_TURNS, MIXED_GOLD)] for i in range(2)]
    al = [[_al_row(i, 9, 1.0, 5, SOURCE_TOP)] for i in range(2)]
    return _world(tmp_path, pivot, [(cap, al)])


def test_a_turn_a_truncated_source_never_captured_counts_as_its_worst():
    """Per-turn MinCE: a turn missing from a truncated source's row is its worst (inf), so the
    pivot wins it, never the source that did not see it."""
    from fusechat.fuse import fuse, sequence_weights, turn_ces

    piv = _cap_row(0, TWO_TURNS, PIVOT_GOLD)
    # the source read turn 1 better than the pivot (0.25 < 0.5), then its row was cut off
    cut = _cap_row(0, [0, 0, 1, 1, 1], [-9, -0.25, -0.25, -0.25, -9], truncated=True)
    per = turn_ces(piv, [cut], "token", [1.5, 0.25])
    assert per[1, 6] == per[1, 7] == math.inf  # +inf: not -inf, not its best turn
    w = sequence_weights(per, "minCE")
    assert w[:, [1, 2, 3, 6, 7]].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 0, 0]]
    # the fused target of turn 2 is the pivot's own
    pivot = (np.tile(list(PIVOT_TOP), (9, 1)), np.tile(list(PIVOT_TOP.values()), (9, 1)))
    source = (np.tile(list(SOURCE_TOP), (9, 1)), np.tile(list(SOURCE_TOP.values()), (9, 1)))
    valid = [np.ones(9, bool), np.arange(9) < 4]
    ids, p = fuse([pivot, source], valid, per, "minCE")
    assert _dense(ids[2], p[2]) == SOURCE_TOP and _dense(ids[6], p[6]) == PIVOT_TOP


def test_a_truncated_source_wins_only_the_turns_it_captured_in_the_stage(tmp_path):
    """Per-turn MinCE through the fuse stage: a truncated source (one turn of two) wins its
    turn, the pivot the turn it never saw: weights (2/5, 3/5), the pivot's target there."""
    pivot = [[_cap_row(0, TWO_TURNS, PIVOT_GOLD)]]
    cap = [[_cap_row(0, [0, 0, 1, 1, 1], [-9, -0.25, -0.25, -0.25, -9], truncated=True)]]
    al = [[_al_row(0, 9, 0.25, 3, SOURCE_TOP, valid=np.arange(9) < 4)]]
    piv, srcs = _world(tmp_path, pivot, [(cap, al)])
    fuse_stage(piv, srcs, tmp_path / "turn", FuseConfig(unit="turn"))
    (row,) = _rows(tmp_path / "turn")
    # turn 1 (3 learned positions) goes to the source, turn 2 (2) to the pivot
    np.testing.assert_allclose(row["row.weights"], [2 / 5, 3 / 5], rtol=1e-6)
    ids, p = unpack_ids(row["pos.target_ids"]), row["pos.target_probs"]
    assert [_dense(ids[t], p[t]) for t in (1, 2, 3)] == [SOURCE_TOP] * 3
    assert [_dense(ids[t], p[t]) for t in (6, 7)] == [PIVOT_TOP] * 2


def test_per_turn_row_weights_are_the_mean_over_learned_positions(mixed, tmp_path):
    """Per-turn row weights: the pivot wins turn 1 (3 learned tokens), the source turn 2 (2):
    (3/5, 2/5), the mean over learned positions, not over all 9; per sequence (0, 1)."""
    piv, srcs = mixed
    fuse_stage(piv, srcs, tmp_path / "turn", FuseConfig(unit="turn"))
    fuse_stage(piv, srcs, tmp_path / "seq", FuseConfig(unit="sequence"))
    for row in _rows(tmp_path / "turn"):
        np.testing.assert_allclose(row["row.weights"], [3 / 5, 2 / 5], rtol=1e-6)
        ids, p = unpack_ids(row["pos.target_ids"]), row["pos.target_probs"]
        assert _dense(ids[1], p[1]) == PIVOT_TOP and _dense(ids[6], p[6]) == SOURCE_TOP
    assert _weights(tmp_path / "seq") == [[0, 1]] * 2
    stats = StageReader(tmp_path / "turn", "fuse").manifest["stats"]
    assert stats["mean_weights"] == [0.6, 0.4]


# --------------------------------------------------------------------------- branches

SINGLE = [0, 0, 1, 1, 1, 1]  # one turn: positions 1-4 learned
S1_TOP, S2_TOP = {40: 0.6, 30: 0.4}, {31: 0.2, 45: 0.8}


def _branch_ids(t: int, slot: int, toks: list[int]) -> np.ndarray:
    b = np.full((6, 2, 3), -1)
    b[t, slot, : len(toks)] = toks
    return b


def _branch_world(d: Path):
    """Three single-turn rows and two sources with branches: the pivot wins row 0, source 1
    row 1, source 2 row 2. Source 1 branches after position 1 ([40, 41, 42]), source 2 after
    position 2 ([45, 46]), in every row."""
    ces = [(0.5, 1.0, 2.0), (1.5, 0.5, 1.0), (1.5, 1.0, 0.5)]  # (pivot, source 1, source 2)
    pivot = [[_cap_row(i, SINGLE, [-9] + [-c[0]] * 4 + [-9]) for i, c in enumerate(ces)]]
    sources = []
    for s, (top, br) in enumerate([(S1_TOP, _branch_ids(1, 0, [40, 41, 42])),
                                   (S2_TOP, _branch_ids(2, 1, [45, 46]))]):  # fmt: skip
        cap = [[_cap_row(i, SINGLE, [-9] + [-c[1 + s]] * 4 + [-9]) for i, c in enumerate(ces)]]
        al = [[_al_row(i, 6, c[1 + s], 4, top, branches=br) for i, c in enumerate(ces)]]
        sources.append((cap, al))
    return _world(d, pivot, sources)


def test_only_the_chosen_sources_branches_are_kept(tmp_path):
    """Branch keeping: a row keeps the branches of the source that won it, and none (all -1)
    where the pivot won."""
    piv, srcs = _branch_world(tmp_path)
    fuse_stage(piv, srcs, tmp_path / "fused")
    rows = _rows(tmp_path / "fused")
    assert [r["row.weights"].tolist() for r in rows] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    got = [unpack_ids(r["pos.branch_ids"]) for r in rows]
    assert (got[0] == -1).all()  # the pivot won: no branches
    assert got[1].tolist() == _branch_ids(1, 0, [40, 41, 42]).tolist()
    assert got[2].tolist() == _branch_ids(2, 1, [45, 46]).tolist()


def test_training_rows_weigh_branches_by_one_minus_lambda(tmp_path, monkeypatch):
    """Branch weights: train(lambda 0.9) hands the row reader branch weight 0.1, and a branch's
    tokens then weigh 0.1 times its alternative's probability in the fused target."""
    import fusechat.train as train_mod

    piv, srcs = _branch_world(tmp_path)
    fuse_stage(piv, srcs, tmp_path / "fused")
    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kw):
        seen.update(args=args, kw=kw)
        raise Stop

    monkeypatch.setattr(train_mod, "ShardRows", spy)
    with pytest.raises(Stop):
        train_mod.train("no-model", tmp_path / "fused", tmp_path / "out", TrainConfig(lam=0.9))
    assert seen["kw"]["with_targets"] is True
    assert seen["kw"]["branch_weight"] == pytest.approx(0.1)
    data = ShardRows(*seen["args"], **seen["kw"])  # the reader as train() builds it
    assert "segment" not in data[0]  # the pivot won row 0: no tree
    for i, n_br, p_alt in ((1, 3, 0.6), (2, 2, 0.8)):
        r = data[i]
        want = [1.0] * 6 + [0.1 * p_alt] * n_br
        np.testing.assert_allclose(r["position_weight"], want, rtol=1e-3)


# --------------------------------------------------------------------------- stage folders


def _partial(folder: Path, piv: Path, srcs: list[Path], cfg: FuseConfig, monkeypatch) -> None:
    """A fuse run killed after its first shard (shard 1 fails)."""
    import fusechat.fuse as fuse_mod

    real = fuse_mod._fuse_shard

    def dies_at_1(state, i):
        if i == 1:
            raise KeyboardInterrupt
        return real(state, i)

    with monkeypatch.context() as m:
        m.setattr(fuse_mod, "_fuse_shard", dies_at_1)
        with pytest.raises(KeyboardInterrupt):
            fuse_stage(piv, srcs, folder, cfg)
    assert (folder / "shard-00000.safetensors").exists()
    assert not (folder / "shard-00001.safetensors").exists()


def test_the_fusion_unit_is_part_of_the_fuse_stages_key(mixed, tmp_path):
    """A folder fused per sequence is not reused for a per-turn run: refused without
    --overwrite (naming unit), recomputed per turn with it."""
    piv, srcs = mixed
    out = tmp_path / "fused"
    fuse_stage(piv, srcs, out, FuseConfig(unit="sequence"))
    with pytest.raises(FusechatError, match=r"other settings \(unit\)"):
        fuse_stage(piv, srcs, out, FuseConfig(unit="turn"))
    m = fuse_stage(piv, srcs, out, FuseConfig(unit="turn"), overwrite=True)
    assert m["key"]["unit"] == "turn"
    assert _weights(out) == [[0.6, 0.4]] * 2
    again = fuse_stage(piv, srcs, out, FuseConfig(unit="turn"))  # the same settings: reused
    assert again == m


def test_overwrite_clears_old_shards_and_recomputes_under_the_new_key(mixed, tmp_path, monkeypatch):
    """--overwrite into a stage folder with other settings (finished or cut off) deletes its
    shards and recomputes every one under the new key; without it the run is refused."""
    piv, srcs = mixed
    seq, turn = FuseConfig(unit="sequence"), FuseConfig(unit="turn")
    part = tmp_path / "partial"
    _partial(part, piv, srcs, seq, monkeypatch)
    with pytest.raises(FusechatError, match="other settings"):
        fuse_stage(piv, srcs, part, turn)
    assert (part / "shard-00000.safetensors").exists()  # refused: nothing touched
    fuse_stage(piv, srcs, part, turn, overwrite=True)
    # shard 0 (written per sequence, checksum intact) was not resumed under the new key
    assert _weights(part) == [[0.6, 0.4]] * 2
    # the same settings resume a cut-off run: shard 0 kept, shard 1 written
    same = tmp_path / "same"
    _partial(same, piv, srcs, seq, monkeypatch)
    before = (same / "shard-00000.safetensors").stat().st_mtime_ns
    fuse_stage(piv, srcs, same, seq)
    assert (same / "shard-00000.safetensors").stat().st_mtime_ns == before
    assert _weights(same) == [[0, 1]] * 2
    # a finished folder: refused without --overwrite, recomputed with it
    with pytest.raises(FusechatError, match="other settings"):
        fuse_stage(piv, srcs, same, turn)
    assert _weights(same) == [[0, 1]] * 2
    fuse_stage(piv, srcs, same, turn, overwrite=True)
    assert _weights(same) == [[0.6, 0.4]] * 2
    assert StageReader(same, "fuse").key["unit"] == "turn"


# --------------------------------------------------------------------------- the pair memo


def test_the_pair_memo_stores_what_it_computed():
    """The alignment's pair memo: aligning the same row again computes no pair's pi anew (the
    memo holds every pair the first alignment looked up)."""
    from fusechat.textalign import SourceVocab, align_text
    from fusechat.tokens import FirstToken

    pivot = ["The", " Gug", "i", " is", "o", " Bo"]
    source = ["The", " Gugi", " is", " Gugo", " Bob", " Gob"]
    v = SourceVocab.build(
        [t.encode() for t in source], FirstToken(None, [t.encode() for t in pivot])
    )

    class Counting:
        def __init__(self, first):
            self.first, self.calls = first, 0

        def __call__(self, w):
            self.calls += 1
            return self.first(w)

        def __getattr__(self, name):
            return getattr(self.first, name)

    v.first = Counting(v.first)
    p_ids, p_ends = np.array([0, 1, 2, 3]), np.array([3, 7, 8, 11])
    s_ids, s_ends = np.array([0, 1, 2]), np.array([3, 8, 11])
    ids = np.array([[1, 3, 4], [2, -1, -1], [-1, -1, -1]])
    lp = np.log(np.array([[0.6, 0.3, 0.1], [1.0, 1e-9, 1e-9], [1.0, 1.0, 1.0]])).astype(np.float16)
    gold = np.log(np.array([0.6, 1.0, 1.0]))
    args = (p_ids, p_ends, s_ids, s_ends, ids, lp, gold, np.arange(4), v, 4)
    first = align_text(*args)
    computed = v.first.calls
    assert computed > 0 and len(v.pairs.pid) > 0  # the walk inside " Gugi" looked pairs up
    second = align_text(*args)
    assert v.first.calls == computed  # every pair from the memo
    for k in ("ids", "probs", "valid"):
        assert np.array_equal(first[k], second[k])


# --------------------------------------------------------------------------- losses


def _loop_loss(logits, ids, mask, tids, tprobs, lam, n_items, weight, kind="ce") -> float:
    """The docstring's formula, position by position: at each t whose next token is learned,
    ``w_t (lam * -log q(x_t+1) + (1 - lam) * -sum_k p_k log q(id_k))`` (p renormalised over
    its valid entries; KL adds ``(1 - lam) * sum_k p_k log p_k``), summed, over ``n_items``."""
    total = 0.0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not mask[b, t + 1]:
                continue
            logq = torch.log_softmax(logits[b, t].double(), -1)
            clm = -float(logq[ids[b, t + 1]])
            pairs = [
                (int(i), float(p)) for i, p in zip(tids[b, t], tprobs[b, t], strict=True) if i >= 0
            ]
            z = sum(p for _, p in pairs)
            fus = 0.0
            for i, p in pairs:
                if p > 0:
                    fus += -(p / z) * float(logq[i])
                    if kind == "kl":
                        fus += (p / z) * math.log(p / z)
            total += float(weight[b, t]) * (lam * clm + (1 - lam) * fus)
    return total / n_items


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("with_targets", [True, False])
def test_position_weight_is_honoured_with_n_items(kind, with_targets):
    """position_weight on the path training takes (n_items given): the loss equals a plain
    loop over positions of the docstring's formula, weights varying per position."""
    g = torch.Generator().manual_seed(0)
    B, T, V, K = 2, 6, 11, 3
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    tids = torch.randint(0, V, (B, T, K), generator=g)
    tids[0, 2, 1] = -1  # padding
    tprobs = torch.rand(B, T, K, generator=g)
    weight = torch.tensor([[0.5, 2.0, 0.25, 1.0, 3.0, 1.0], [1.0, 0.1, 0.7, 1.5, 0.3, 1.0]])
    lam = 0.3 if with_targets else 1.0
    tgt = (tids, tprobs) if with_targets else (None, None)
    loss, _, _ = fusion_losses(logits, ids, mask, *tgt, lam=lam, kind=kind, n_items=17,
                               position_weight=weight)  # fmt: skip
    want = _loop_loss(logits, ids, mask, tids, tprobs, lam, 17, weight, kind)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert want != pytest.approx(_loop_loss(logits, ids, mask, tids, tprobs, lam, 17,
                                            torch.ones(B, T), kind), rel=1e-3)  # fmt: skip


def test_training_hands_the_loss_the_batchs_weights_and_item_count():
    """compute_loss hands the loss its batch's position weights, n_items and lambda: the
    trainer's loss on a weighted batch equals the plain loop's."""
    from fusechat.trainer import model_inputs, trainer_class

    model = _tiny_mistral()
    batch = collate_rows([with_branches(_row(6), _two_branches(), 64, scale=0.1), _row(5)])
    fake = SimpleNamespace(lam=0.9, temperature=1.0, fusion_loss="ce", _parts=defaultdict(list),
                           state=SimpleNamespace(global_step=0), args=SimpleNamespace(world_size=1))  # fmt: skip
    with torch.no_grad():
        loss = trainer_class().compute_loss(fake, model, batch, num_items_in_batch=13)
        logits = model(**model_inputs(model, batch)).logits
    w = batch["position_weight"]
    assert w[0].tolist() != [1.0] * w.shape[1]  # the branches weigh 0.1 * p
    want = _loop_loss(logits, batch["input_ids"], batch["labels_mask"], batch["target_ids"],
                      batch["target_probs"], 0.9, 13, w)  # fmt: skip
    assert float(loss) == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- tree attention


def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=None)  # fmt: skip
    return MistralForCausalLM(cfg).eval()


def _row(n: int) -> dict:
    """A plain row of ``n`` tokens whose fused target gives 20 probability 0.25 at 1 and 30
    probability 0.5 at 3."""
    ids, probs = np.full((n, 2), -1), np.zeros((n, 2), np.float32)
    ids[1], probs[1] = [12, 20], [0.75, 0.25]
    ids[3], probs[3] = [30, 13], [0.5, 0.5]
    return {"input_ids": np.arange(10, 10 + n), "labels_mask": np.arange(n) > 0,
            "target_ids": ids, "target_probs": probs}  # fmt: skip


def _two_branches() -> np.ndarray:
    b = np.full((6, 2, 3), -1)
    b[1, 1] = [20, 21, 22]  # after position 1
    b[3, 0, :2] = [30, 31]  # after position 3: at positions the first branch also takes
    return b


def test_a_tree_batch_gives_each_branch_the_logits_it_has_alone():
    """Tree attention: each branch's logits in a tree batch (a row and two branches, padded
    beside a shorter row) equal those of the branch written after its prefix and run alone."""
    from fusechat.trainer import model_inputs

    model = _tiny_mistral()
    tree = with_branches(_row(6), _two_branches(), 64)
    assert tree["segment"].tolist() == [-1] * 6 + [0, 0, 0, 1, 1]
    plain = _row(4)
    batch = collate_rows([tree, plain])
    with torch.no_grad():
        got = model(**model_inputs(model, batch)).logits

        def alone(ids) -> torch.Tensor:
            return model(input_ids=torch.as_tensor(ids)[None]).logits[0]

        row = tree["input_ids"][:6]
        torch.testing.assert_close(got[0, :6], alone(row), atol=1e-5, rtol=0)
        for seg, t in ((0, 1), (1, 3)):
            at = np.flatnonzero(tree["segment"] == seg)
            ref = alone(np.concatenate([row[: t + 1], tree["input_ids"][at]]))
            torch.testing.assert_close(got[0, at], ref[t + 1 :], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1, :4], alone(plain["input_ids"]), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the study


def _summary(clm: float, target: float) -> dict:
    roles = {"clm": "clm", "t": "target"}
    return {"scores": {"clm": {"nll/char": clm}, "t": {"nll/char": target}},
            "models": {n: {"role": r, "path": ""} for n, r in roles.items()}}  # fmt: skip


def test_the_studys_interval_comes_from_the_paired_differences():
    """The study's verdict: CLM and target deviate unequally over seeds; the interval is the
    t interval of the per-pair differences (sample deviation), neither model's deviation."""
    from fusechat.study.stats import analyse

    clm, tgt = [0.40, 0.30, 0.35], [0.30, 0.28, 0.26]  # deviations 0.05 and 0.02
    r = analyse({i: _summary(c, t) for i, (c, t) in enumerate(zip(clm, tgt, strict=True))})
    assert r["models"]["clm"]["nll/char"]["std"] == pytest.approx(0.05)
    assert r["models"]["t"]["nll/char"]["std"] == pytest.approx(0.02)
    d = [c - t for c, t in zip(clm, tgt, strict=True)]  # 0.10, 0.02, 0.09
    mean = sum(d) / 3
    s = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302652729911275 * s / math.sqrt(3)  # Student's t, 97.5%, 2 degrees of freedom
    gain = r["targets"]["t"]["vs_clm"]
    assert gain["mean"] == pytest.approx(mean)
    assert gain["ci"] == pytest.approx([mean - half, mean + half], abs=1e-9)
    # 0.07 +- 0.108: no verdict for the target (the smaller deviation, 0.02, would give one)
    assert gain["won"] == 3 and r["targets"]["t"]["beats_clm"] is False
