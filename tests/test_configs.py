"""Stage configs: options derived from their fields, errors that name the option, jobs that
travel whole."""

from __future__ import annotations

import argparse

import pytest

from fusechat.configs import CaptureConfig, CaptureJob, DataSpec, LoraConfig, TrainConfig, TrainJob
from fusechat.errors import FusechatError
from fusechat.options import add_options, from_options, job_command, option_values, read_job


def _parse(cls, argv, **kw):
    p = argparse.ArgumentParser()
    add_options(p, cls, **kw)
    return p.parse_args(argv)


def test_every_field_is_an_option_with_the_fields_default_and_choices():
    p = argparse.ArgumentParser()
    add_options(p, TrainConfig)
    flags = {o for a in p._actions for o in a.option_strings}
    for name, f in TrainConfig.model_fields.items():
        if name == "lora":
            continue  # nested: added with its own prefix
        flag = "--" + (f.alias or name).replace("_", "-")
        assert flag in flags or "--no-" + flag[2:] in flags, name
    # nothing given: nothing set, and the config's own defaults apply
    assert option_values(_parse(TrainConfig, []), TrainConfig) == {}
    assert from_options(TrainConfig, {}) == TrainConfig()
    args = _parse(TrainConfig, ["--lambda", "0.5", "--no-gradient-checkpointing",
                                "--scheduler", "linear", "--extra", '{"optim": "sgd"}'])  # fmt: skip
    cfg = from_options(TrainConfig, option_values(args, TrainConfig))
    assert (cfg.lam, cfg.gradient_checkpointing, cfg.scheduler) == (0.5, False, "linear")
    assert cfg.extra == {"optim": "sgd"}
    with pytest.raises(SystemExit):  # a Literal's choices are argparse's
        _parse(TrainConfig, ["--scheduler", "cosine-ish"])


def test_errors_name_the_option_nested_and_aliased_ones_too():
    with pytest.raises(FusechatError, match=r"^--lambda: Input should be less than or equal"):
        from_options(TrainConfig, {"lam": 2})
    with pytest.raises(FusechatError, match=r"^--lora-r: Input should be greater than 0"):
        from_options(TrainConfig, {"lora": {"r": 0}})
    with pytest.raises(FusechatError, match=r"^--chat-template-of: Input should be a valid"):
        from_options(CaptureConfig, {"model": "m", "render_with": 3},
                     {"render_with": "chat_template_of"})  # fmt: skip
    # a rule over several fields says which
    with pytest.raises(FusechatError, match="tensor_parallel_size is a vllm setting"):
        from_options(CaptureConfig, {"model": "m", "tensor_parallel_size": 2})


def test_lora_alpha_defaults_to_twice_the_rank_and_modules_read_as_given():
    assert LoraConfig(r=8).scale == 16 and LoraConfig(r=8, alpha=4).scale == 4
    assert LoraConfig(target_modules=["all-linear"]).target_modules == "all-linear"
    assert LoraConfig(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")


def test_speed_settings_stay_out_of_the_key():
    a = CaptureConfig(model="m", batch_tokens=1024)
    assert a.key() == CaptureConfig(model="m").key() and "batch_tokens" not in a.key()
    assert a.key() != CaptureConfig(model="m", k=5).key()


def test_a_job_travels_whole_and_a_bad_file_is_one_line(tmp_path):
    job = TrainJob(config=TrainConfig(lam=0.3, lora=LoraConfig(r=4, dropout=0.2), seed=7),
                   model="M", data="D", out="O")  # fmt: skip
    cmd = job_command(["launcher", "--x"], "train", job, tmp_path / "job.json")
    assert cmd == ["launcher", "--x", "-m", "fusechat.cli", "train", "--config",
                   str(tmp_path / "job.json")]  # fmt: skip
    assert read_job(TrainJob, cmd[-1]) == job
    cap = CaptureJob(config=CaptureConfig(model="m"), data=DataSpec(path="d"), out="o")
    (tmp_path / "cap.json").write_text(cap.model_dump_json())
    with pytest.raises(FusechatError, match="not a train job"):
        read_job(TrainJob, str(tmp_path / "cap.json"))
    with pytest.raises(FusechatError, match="cannot read"):
        read_job(TrainJob, str(tmp_path / "missing.json"))
