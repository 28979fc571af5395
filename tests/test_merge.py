"""VaRM against its formula, inside mergekit, and `fusechat merge` on toy-world checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.merge_methods.base import TensorGroup
from safetensors.torch import load_file, save_file

from fusechat.cli import main
from fusechat.merge import varm


def _group(base, targets, name="model.layers.0.mlp.up_proj.weight") -> TensorGroup:
    return TensorGroup.from_tensors([base, *targets], ids=["base", *range(len(targets))],
                                    base_index=0, name=name)  # fmt: skip


def test_weights_equal_the_formula_and_sum_to_one():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    d = [0.1 * torch.randn(4, 6, generator=g), 0.3 * torch.randn(4, 6, generator=g)]
    targets = [base + x for x in d]
    v = torch.tensor([x.double().square().mean() for x in d])
    w = varm.varm_weights(targets, base)
    torch.testing.assert_close(w, v / v.sum())
    assert w.sum().item() == pytest.approx(1.0)
    merged = varm.varm_merge.merge_group(_group(base, targets))
    torch.testing.assert_close(merged, w[0].float() * targets[0] + w[1].float() * targets[1])
    # abs statistic and a temperature
    va = torch.tensor([x.double().abs().mean() for x in d])
    torch.testing.assert_close(varm.varm_weights(targets, base, "abs"), va / va.sum())
    wt = varm.varm_weights(targets, base, temperature=0.5)
    torch.testing.assert_close(wt, torch.softmax((v / v.sum()) / 0.5, 0))
    # elementwise: one ratio per entry
    we = varm.varm_weights(targets, base, elementwise=True)
    s0, s1 = d[0].double().square(), d[1].double().square()
    torch.testing.assert_close(we[0], s0 / (s0 + s1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(we.sum(0), torch.ones_like(s0))


def test_identical_inputs_and_equal_deltas():
    base = torch.randn(3, 5)
    same = varm.varm_merge.merge_group(_group(base, [base.clone(), base.clone()]))
    torch.testing.assert_close(same, base)  # every v is 0: equal weights, the input back
    d = torch.randn(3, 5)
    a, b = base + d, base - d  # same variation, opposite directions
    out = varm.varm_merge.merge_group(_group(base, [a, b]))
    torch.testing.assert_close(out, (a + b) / 2)


def test_kernel_at_every_granularity_against_the_formula():
    """The mergekit kernel itself (no files): element-wise ratios entry by entry, layer and
    model weights from group statistics, the per-tensor report, float64 inputs kept."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ts = [base + 0.2 * torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    name = "model.layers.2.mlp.up_proj.weight"
    stats = {("0", "model.layers.2"): 1.0, ("1", "model.layers.2"): 3.0,
             ("0", "model"): 2.0, ("1", "model"): 2.0}  # fmt: skip
    with varm.session(stats) as run:
        el = varm.varm_merge.merge_group(_group(base, ts, name), granularity="element")
        s = [(t - base).square() for t in ts]
        w0 = s[0] / (s[0] + s[1])
        torch.testing.assert_close(el, w0 * ts[0] + (1 - w0) * ts[1], rtol=1e-5, atol=1e-6)
        assert run.weights[name]["0"] == pytest.approx(float(w0.mean()), rel=1e-5)
        lay = varm.varm_merge.merge_group(_group(base, ts, name), granularity="layer")
        torch.testing.assert_close(lay, 0.25 * ts[0] + 0.75 * ts[1])
        assert lay.dtype == torch.float64
        assert run.weights[name] == pytest.approx({"0": 0.25, "1": 0.75})
        mod = varm.varm_merge.merge_group(_group(base, ts, name), granularity="model")
        torch.testing.assert_close(mod, 0.5 * ts[0] + 0.5 * ts[1])
        hot = varm.varm_merge.merge_group(
            _group(base, ts, name), granularity="layer", temperature=0.1
        )
        w = torch.softmax(torch.tensor([0.25, 0.75], dtype=torch.float64) / 0.1, 0)
        torch.testing.assert_close(hot, w[0] * ts[0] + w[1] * ts[1])
        with pytest.raises(RuntimeError, match="no statistics"):
            varm.varm_merge.merge_group(_group(base, ts, "lm_head.weight"), granularity="layer")
        with pytest.raises(RuntimeError, match="already running"):
            with varm.session():
                pass
    # outside a session (mergekit run directly): matrix weights still work, nothing is kept,
    # and layer granularity names what it lacks
    torch.testing.assert_close(
        varm.varm_merge.merge_group(_group(base, ts, name)), varm.weighted_sum(
            ts, varm.varm_weights(ts, base, "square", 0.0, False)))  # fmt: skip
    with pytest.raises(RuntimeError, match="no statistics"):
        varm.varm_merge.merge_group(_group(base, ts, name), granularity="layer")
    with varm.session() as fresh:
        assert fresh.weights == {} and fresh.group_stats == {}
    assert torch.equal(varm.varm_merge.merge_group(_group(base, [], name)), base)  # no targets


def test_group_keys():
    assert varm.group_key("model.layers.12.self_attn.q_proj.weight", "layer") == "model.layers.12"
    assert varm.group_key("model.embed_tokens.weight", "layer") == "model.embed_tokens.weight"
    assert varm.group_key("model.layers.1.mlp.up_proj.weight", "model") == "model"
    # the heat map's rows and columns come from the same parsing
    assert varm.layer_of("model.layers.12.self_attn.q_proj.weight") == (
        "model.layers.12",
        12,
        "self_attn.q_proj",
    )
    assert varm.layer_of("model.layers.0.self_attn.q_proj.bias")[2] == "self_attn.q_proj"
    assert varm.layer_of("model.norm.weight") is None


# --------------------------------------------------------------------------- toy-world merges


def _finetune_like(src: Path, out: Path, seed: int, scale: float) -> Path:
    """A copy of ``src`` whose tensors moved by ``scale`` of their spread, more in some
    tensors than in others (as fine-tuning does)."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("manifest.json"))
    g = torch.Generator().manual_seed(seed)
    sd = load_file(out / "model.safetensors")
    for i, (k, t) in enumerate(sorted(sd.items())):
        s = scale * (1 + (i * (seed + 3)) % 5) * (t.float().std() if t.numel() > 1 else 1.0)
        sd[k] = t + s * torch.randn(t.shape, generator=g)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def targets(toy_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("targets")
    pivot = toy_world / "openchat-mini"
    return pivot, [_finetune_like(pivot, d / f"t{i}", i, 0.004 * (i + 1)) for i in range(3)]


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _config(pivot, models, method="varm", **params) -> dict:
    cfg = {
        "merge_method": method,
        "base_model": str(pivot),
        "models": [{"model": str(m)} for m in models],
        "dtype": "float32",
    }
    if params:
        cfg["parameters"] = params
    return cfg


def test_varm_merge_loads_and_generates(targets, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pivot, ts = targets
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, _config(pivot, ts))), str(out)]) == 0
    report = json.loads((out / "manifest.json").read_text())
    assert (out / "varm_weights.png").stat().st_size > 0
    assert (out / "chat_template.jinja").exists()
    for name, w in report["weights"].items():
        assert sum(w.values()) == pytest.approx(1.0), name
    # check one tensor against the formula on the inputs
    name = "model.layers.1.mlp.down_proj.weight"
    base = load_file(pivot / "model.safetensors")[name]
    ins = [load_file(t / "model.safetensors")[name] for t in ts]
    w = varm.varm_weights(ins, base)
    merged = load_file(out / "model.safetensors")[name]
    torch.testing.assert_close(merged, sum(wi.float() * x for wi, x in zip(w, ins, strict=True)))
    assert [report["weights"][name][str(t)] for t in ts] == pytest.approx(w.tolist())
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )  # fmt: skip
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # rerun: already merged, nothing redone
    assert main(["merge", str(tmp_path / "merge.yaml"), str(out)]) == 0


def test_varm_model_granularity_equals_mergekit_linear(targets, tmp_path):
    """With one weight per model, VaRM is a linear merge with those weights."""
    from fusechat.merge.run import run

    pivot, ts = targets
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r = run(_write(tmp_path / "a", _config(pivot, ts, granularity="model")), tmp_path / "varm")
    w = r["mean_weights"]
    assert len(set(round(x, 9) for x in w.values())) == 3 and sum(w.values()) == pytest.approx(1)
    lin = _config(pivot, [], method="linear")
    lin["models"] = [{"model": str(t), "parameters": {"weight": w[str(t)]}} for t in ts]
    del lin["base_model"]
    run(_write(tmp_path / "b", lin), tmp_path / "linear")
    a = load_file(tmp_path / "varm" / "model.safetensors")
    b = load_file(tmp_path / "linear" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_baselines_run_through_mergekit(targets, tmp_path):
    from fusechat.merge.run import run

    pivot, ts = targets
    for method, params in [("ties", {"density": 0.5, "weight": 0.5}), ("sce", {})]:
        cfg = _config(pivot, ts, method=method)
        if params:
            for m in cfg["models"]:
                m["parameters"] = params
        (tmp_path / method).mkdir()
        r = run(_write(tmp_path / method, cfg), tmp_path / f"out-{method}")
        assert r["merge_method"] == method and "weights" not in r
        assert (tmp_path / f"out-{method}" / "model.safetensors").exists()


def test_lora_adapter_input(targets, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pivot, ts = targets
    model = AutoModelForCausalLM.from_pretrained(pivot)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # a trained adapter, not the zero init
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    cfg = _config(pivot, [ts[0], tmp_path / "adapter"])
    assert main(["merge", str(_write(tmp_path, cfg)), str(out)]) == 0
    report = json.loads((out / "manifest.json").read_text())
    assert any("+" in m for m in report["models"])
    AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    # only the adapter's q/v moved: its weight there is positive, elsewhere zero
    lora = next(m for m in report["mean_weights"] if "+" in m)
    assert report["weights"][name][lora] > 0
    assert report["weights"]["model.layers.0.mlp.up_proj.weight"][lora] == 0


def _one_line_error(capsys, cfg_path, out) -> str:
    capsys.readouterr()
    assert main(["merge", str(cfg_path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert not Path(out).exists(), "no output folder after a rejected merge"
    return err


def test_bad_inputs_give_one_line_and_no_output(targets, toy_world, tmp_path, capsys):
    pivot, ts = targets
    out = tmp_path / "out"
    cfg = _config(pivot, [ts[0], toy_world / "nh2-mixtral-mini"])
    err = _one_line_error(capsys, _write(tmp_path, cfg), out)
    assert "architecture MixtralForCausalLM differs" in err
    assert "unknown method 'fancy'" in _one_line_error(
        capsys, _write(tmp_path, _config(pivot, ts, method="fancy")), out
    )
    # a tensor missing from one input
    holey = tmp_path / "holey"
    shutil.copytree(ts[0], holey)
    sd = load_file(holey / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, holey / "model.safetensors", metadata={"format": "pt"})
    err = _one_line_error(capsys, _write(tmp_path, _config(pivot, [ts[0], holey])), out)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in err
    # a shape mismatch
    wide = tmp_path / "wide"
    shutil.copytree(ts[0], wide)
    sd = load_file(wide / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(10, 10)
    save_file(sd, wide / "model.safetensors", metadata={"format": "pt"})
    err = _one_line_error(capsys, _write(tmp_path, _config(pivot, [ts[0], wide])), out)
    assert "tensor model.layers.0.mlp.up_proj.weight has shape [10, 10]" in err
    err = _one_line_error(capsys, _write(tmp_path, _config(pivot, [tmp_path / "nowhere"])), out)
    assert "nowhere: no such model folder" in err  # a local path, never sent to the hub
    (tmp_path / "bad.yaml").write_text("merge_method: [varm\n")
    assert "YAML syntax error" in _one_line_error(capsys, tmp_path / "bad.yaml", out)


def test_unrelated_base_warns(targets, toy_world, tmp_path, caplog):
    """A base the targets were not fine-tuned from: merged, with a warning in the report."""
    from fusechat.merge.run import run

    pivot, ts = targets
    stranger = _finetune_like(pivot, tmp_path / "stranger", 9, 1.0)
    r = run(_write(tmp_path, _config(stranger, ts[:2])), tmp_path / "out")
    assert r["warnings"] and "does not look like the base" in r["warnings"][0]


def _independent_weights(pivot, ts, names) -> torch.Tensor:
    """VaRM weights of a group of tensors from the files: ``v_i = sum over the group of
    sum(d_i^2) / its number of entries`` (pooled, not a mean of per-tensor means), normalised."""
    base = load_file(pivot / "model.safetensors")
    v = []
    for t in ts:
        sd = load_file(t / "model.safetensors")
        sq = sum(float((sd[n].double() - base[n].double()).square().sum()) for n in names)
        v.append(sq / sum(base[n].numel() for n in names))
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.sum()


@pytest.mark.parametrize("granularity", ["layer", "model", "element"])
def test_varm_granularities_against_weights_from_the_files(targets, tmp_path, granularity):
    from fusechat.merge.run import run

    pivot, ts = targets
    run(_write(tmp_path, _config(pivot, ts, granularity=granularity)), tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(pivot / "model.safetensors")
    ins = [load_file(t / "model.safetensors") for t in ts]
    name = "model.layers.1.self_attn.q_proj.weight"
    if granularity == "element":
        d2 = torch.stack([(x[name].double() - base[name].double()).square() for x in ins])
        w = d2 / d2.sum(0, keepdim=True)  # entry by entry, the targets' (not the base's) values
        want = (w * torch.stack([x[name].double() for x in ins])).sum(0)
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6)
        return
    group = [n for n in base if granularity == "model" or n.startswith("model.layers.1.")]
    w = _independent_weights(pivot, ts, group)
    want = sum(wi * x[name].double() for wi, x in zip(w, ins, strict=True))
    torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6)
    # pooled and per-tensor-mean weights differ here, so the test tells them apart
    per_tensor = torch.stack([_independent_weights(pivot, ts, [n]) for n in group]).mean(0)
    assert not torch.allclose(w, per_tensor, atol=1e-4)


def test_changed_input_weights_merge_again(targets, tmp_path):
    """The merge's cache key holds its inputs' content: an unchanged input is reused, a target
    retrained at the same path is merged anew (not answered "already merged")."""
    from fusechat.merge.run import run

    pivot, ts = targets
    mine = [shutil.copytree(t, tmp_path / f"in{i}") for i, t in enumerate(ts[:2])]
    cfg = _write(tmp_path, _config(pivot, mine, method="linear"))
    raw = yaml.safe_load(cfg.read_text())
    raw["models"] = [{"model": str(m), "parameters": {"weight": 0.5}} for m in mine]
    del raw["base_model"]
    cfg.write_text(yaml.safe_dump(raw))
    first = run(cfg, tmp_path / "out")
    before = load_file(tmp_path / "out" / "model.safetensors")
    assert run(cfg, tmp_path / "out")["key"] == first["key"]  # unchanged inputs: reused
    shutil.copy(ts[2] / "model.safetensors", mine[1] / "model.safetensors")  # "retrained"
    second = run(cfg, tmp_path / "out")
    assert second["key"] != first["key"]
    after = load_file(tmp_path / "out" / "model.safetensors")
    want = {k: 0.5 * load_file(ts[0] / "model.safetensors")[k] + 0.5 * v
            for k, v in load_file(ts[2] / "model.safetensors").items()}  # fmt: skip
    name = next(k for k in after if not torch.equal(after[k], before[k]))
    torch.testing.assert_close(after[name], want[name])


def test_an_input_changed_in_place_with_its_mtime_kept_merges_again(targets, tmp_path):
    """The key holds the inputs' bytes, not their name, size and mtime: a tensor rewritten in
    place (same size) whose mtime is put back, as ``cp -p`` or ``rsync -a`` can leave it, is
    merged again, and the output follows the new weights."""
    import os

    from fusechat.merge.run import run

    pivot, ts = targets
    mine = [shutil.copytree(t, tmp_path / f"in{i}") for i, t in enumerate(ts[:2])]
    raw = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in mine]}  # fmt: skip
    cfg = _write(tmp_path, raw)
    first = run(cfg, tmp_path / "out", plot=False)
    weights = mine[0] / "model.safetensors"
    st = weights.stat()
    sd = load_file(weights)
    name = sorted(sd)[0]
    sd[name] = sd[name] * 0.5
    save_file(sd, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = run(cfg, tmp_path / "out", plot=False)
    assert second["key"] != first["key"]
    merged = load_file(tmp_path / "out" / "model.safetensors")[name]
    torch.testing.assert_close(
        merged, 0.5 * sd[name] + 0.5 * load_file(mine[1] / "model.safetensors")[name]
    )


def test_variation_values_and_weighted_sum_precision():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 3, generator=g)
    ts = [base + s * torch.randn(5, 3, generator=g) for s in (0.1, 0.2)]
    d = [t - base for t in ts]
    v = varm.variation(ts, base)  # defaults: square, one value per target
    assert v.shape == (2,) and v.dtype == torch.float64
    torch.testing.assert_close(v, torch.stack([x.double().square().mean() for x in d]))
    torch.testing.assert_close(varm.variation(ts, base, "abs"),
                               torch.stack([x.double().abs().mean() for x in d]))  # fmt: skip
    e = varm.variation(ts, base, "abs", elementwise=True)
    torch.testing.assert_close(e, torch.stack([x.abs() for x in d]).double())
    # bf16 inputs are summed in float32, then cast back once
    tb = [t.to(torch.bfloat16) for t in ts]
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    out = varm.weighted_sum(tb, w)
    assert out.dtype == torch.bfloat16
    want = (0.3 * tb[0].float() + 0.7 * tb[1].float()).to(torch.bfloat16)
    assert torch.equal(out, want)
    assert varm.group_key("transformer.h.5.attn.c_attn.weight", "layer") == "transformer.h.5"
    assert varm.group_key("blocks.2.ff.weight", "layer") == "blocks.2"
    assert varm.group_key("lm.3.weight", "layer") == "lm.3.weight"  # a digit after another name


def test_weighted_sum_rounds_once_in_its_accumulation_dtype():
    g = torch.Generator().manual_seed(3)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        ts = [torch.randn(64, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
        out = varm.weighted_sum(ts, w)
        want = torch.zeros(64, dtype=dtype).add_(ts[0], alpha=0.3).add_(ts[1], alpha=0.7)
        assert out.dtype == dtype and torch.equal(out, want)
        assert not torch.equal(varm.weighted_sum([ts[1], ts[0]], w), out)  # order matters


def test_the_report_gives_each_targets_delta_and_their_cosines(targets, tmp_path):
    """The merge report's weight-space figures, read tensor by tensor, equal the pure
    functions on whole state dicts (an independent path)."""
    from fusechat.merge.run import run
    from fusechat.weightspace import delta_cosine, relative_delta

    pivot, ts = targets
    r = run(_write(tmp_path, _config(pivot, ts[:2])), tmp_path / "out", plot=False)
    ws = r["weight_space"]
    base, a, b = (load_file(p / "model.safetensors") for p in (pivot, *ts[:2]))
    assert ws["relative_delta"][str(ts[0])] == pytest.approx(relative_delta(base, a))
    assert ws["relative_delta"][str(ts[1])] == pytest.approx(relative_delta(base, b))
    assert ws["delta_cosine"][f"{ts[0]} ~ {ts[1]}"] == pytest.approx(delta_cosine(base, a, b))
    assert 0 < ws["relative_delta"][str(ts[0])] < ws["relative_delta"][str(ts[1])]
    # the same sums a row at a time (how a large tensor is read on a GPU)
    from fusechat.merge.checks import load_config, parse_config
    from fusechat.merge.run import delta_figures, merge_options

    cfg = parse_config(load_config(tmp_path / "merge.yaml"), "merge.yaml")
    rowwise = delta_figures(cfg, merge_options(1 << 30, "cpu", str(tmp_path), None, 0), chunk=1)
    assert rowwise["relative_delta"] == pytest.approx(ws["relative_delta"], rel=1e-12)
    assert rowwise["delta_cosine"] == pytest.approx(ws["delta_cosine"], rel=1e-12)
