"""benchmarks.cpu_speed at smoke size: every row in its own process, the JSON the README's CPU
table is made from, ratios against the same preset's reference and diffusers rows (the figures
themselves need an idle machine: benchmarks/RESULTS.md)."""
import json

import pytest

from benchmarks import cpu_speed, report_parts

pytest.importorskip("diffusers")


def test_rows_against_reference_and_diffusers(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert cpu_speed.main(["--presets", "tiny", "--sample-presets", "tiny", "--image-size", "16", "--batch-size", "4",
                           "--steps", "1", "--warmup", "1", "--rounds", "2", "--sample-n", "2",
                           "--train-rows", "reference,diffusers", "--sample-rows", "fast_eager,library,diffusers"]) == 0
    r = json.loads((tmp_path / "cpu_speed.json").read_text())
    assert [(x["row"], x["preset"]) for x in r["train"]] == [("reference", "tiny"), ("diffusers", "tiny")]
    assert [x["row"] for x in r["sample"]] == ["fast_eager", "library", "diffusers"]
    ref, peer = r["train"]
    assert ref["vs_reference"] == 1.0 and peer["vs_diffusers"] == 1.0
    assert ref["vs_diffusers"] == pytest.approx(ref["img_per_s"]["median"] / peer["img_per_s"]["median"], abs=0.01)
    for x in r["train"] + r["sample"]:
        v = x["img_per_s"]
        assert v["rounds"] == 2 and 0 < v["min"] <= v["median"] <= v["max"] and x["peak_rss_mib"] > 100
    assert r["sample"][0]["vs_reference"] is None  # no reference row was asked for
    text = report_parts.cpu_speed(r)
    assert "| tiny | diffusers |" in text and "Sampling" in text
    assert f"on {r['env']['cpu']} (" in text  # the CPU's model, not just "cpu": the machines differ


def test_unknown_row_is_refused():
    with pytest.raises(SystemExit):
        cpu_speed.main(["--train-rows", "reference,turbo"])


def test_kernels_flag_reaches_the_fast_rows_only():
    """--kernels sets the fast rows' backends (compiled too: the fast row is the plan --compile
    gives); the reference and bf16 rows keep theirs (auto is the reference in fp32)."""
    gn = lambda row, k: cpu_speed.plan_of(row, k).backends["group_norm_act"]  # noqa: E731
    assert [gn(r, "torch") for r in ("reference", "bf16", "fast_eager", "fast")] == ["auto", "torch", "torch", "torch"]
    assert [gn(r, "aten") for r in ("fast_eager", "fast")] == ["aten", "aten"]
    assert cpu_speed.plan_of("fast", "auto").compile == "default"
    with pytest.raises(SystemExit):
        cpu_speed.main(["--kernels", "turbo"])


def test_layout_rows_force_one_layout_whatever_the_plan_picks():
    """fast_nchw and fast_cl are fast_eager in one layout, asked for by name only (they measure
    plan.channels_last_pays, not the default), and the env names the plan fast_eager resolved to."""
    for k in ("auto", "aten", "torch"):
        eager = cpu_speed.plan_of("fast_eager", k)
        nchw, cl = cpu_speed.plan_of("fast_nchw", k), cpu_speed.plan_of("fast_cl", k)
        assert (nchw.channels_last, cl.channels_last) == (False, True)
        assert nchw.backends == cl.backends == eager.backends and nchw.autocast_dtype == cl.autocast_dtype
    assert not set(cpu_speed.LAYOUT_ROWS) & set(cpu_speed.TRAIN_ROWS + cpu_speed.SAMPLE_ROWS)
    with pytest.raises(SystemExit):
        cpu_speed.main(["--train-rows", "fast_nhwc"])


def test_the_fp32_layout_row_is_the_reference_in_channels_last_with_the_extensions_group_norm():
    """fp32_cl: the fast path's layout and GroupNorm without its bf16; every other part is the
    reference's (fp32, the other ops' backends, no compile)."""
    ref, row = cpu_speed.plan_of("reference"), cpu_speed.plan_of("fp32_cl")
    assert (row.autocast_dtype, row.channels_last, row.compile) == (None, True, None)
    assert row.backends == {**ref.backends, "group_norm_act": "cpp"} and ref.backends["group_norm_act"] == "auto"
    assert (row.keep_heap, row.eval_elements) == (ref.keep_heap, ref.eval_elements)
