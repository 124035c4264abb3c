"""benchmarks.eval_chunk: each forward row times its own chunk size and compares its output with
the whole batch's, the rule's chunk is the plan's, and the sampler rows are the capped and uncapped
FastSampler (the same images) and diffusers' pipeline."""
import json

import pytest

from benchmarks import eval_chunk
from ddpm_fast.plan import ExecutionPlan


def test_forward_and_sampler_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    calls = []
    real = eval_chunk.forward_part
    monkeypatch.setattr(eval_chunk, "forward_part", lambda *a: calls.append(a) or real(*a))
    elements = 32 * 32 * 32 * 2  # tiny's top level, 32 wide at 32 px: 2 images a call
    assert eval_chunk.main(["--presets", "tiny=5", "--chunks", "8,4,2", "--rounds", "3", "--elements", str(elements),
                            "--sample-preset", "tiny=3"]) == 0
    result = json.loads((tmp_path / "eval_chunk.json").read_text())
    assert result["env"]["elements"] == elements and calls == [("tiny", 5, [8, 4, 2], 3, elements)]
    (forward,) = result["forward"]
    assert (forward["preset"], forward["n"], forward["width"]) == ("tiny", 5, 32)
    assert forward["rule_chunk"] == 2 == ExecutionPlan(eval_elements=elements).images_per_call(32, 32)
    assert [r["chunk"] for r in forward["rows"]] == [5, 4, 2]  # 8 > n is the batch itself, listed once
    for r in forward["rows"]:
        t = r["ms_per_image"]
        assert t["rounds"] == 3 and 0 < t["min"] <= t["median"] <= t["max"]
        assert r["max_abs_diff"] < 1e-4
    assert forward["rows"][0]["max_abs_diff"] == 0  # the whole batch against itself
    sampler = result["sampler"]
    assert (sampler["n"], sampler["evaluations"], sampler["per_call"]) == (3, 20, 2)
    assert sampler["max_abs_diff"] < 1e-3  # the same noise, the model's rounding apart
    rows = {r["row"]: r for r in sampler["rows"]}
    assert list(rows) == ["capped", "whole", "diffusers"]
    for r in rows.values():
        assert r["img_per_s"]["median"] == pytest.approx(3 / r["s"]["median"], rel=2e-3)  # an odd count: the same round
    assert rows["whole"]["vs_whole"] == 1.0 and rows["diffusers"]["vs_diffusers"] == 1.0
    assert rows["capped"]["vs_whole"] == round(rows["capped"]["img_per_s"]["median"] /
                                               rows["whole"]["img_per_s"]["median"], 2)


def test_no_sampler_rows_and_a_bad_preset(capsys):
    assert eval_chunk.parse(["--sampler-rows", ""]).sampler_rows == []
    with pytest.raises(SystemExit):
        eval_chunk.parse(["--presets", "tiny=x"])
    assert "--presets" in capsys.readouterr().err
