"""The GPU tools also run on the CPU, so the suite keeps them working: the device check passes
for every quantization and the stage profile reports every stage. No timing is asserted."""

from __future__ import annotations

import json

import torch

from benchmarks import device_check, stages
from benchmarks.extraction import BenchConfig

CPU = torch.device("cpu")


def test_the_device_check_passes_for_every_quantization_on_the_cpu():
    result = device_check.run(CPU, ["llama"], ["FP16", "Q8", "Q4", "Q2"])

    assert result["ok"], [r.get("error") for r in result["results"]]
    classes = [set(r["layer_classes"]) for r in result["results"]]
    assert classes == [{"Linear"}, {"Linear8bitLt", "Linear"}, {"Linear4bit", "Linear"},
                       {"QLinear", "Linear"}]  # fmt: skip
    for row in result["results"]:
        assert row["problems"] == [] and row["self_check_passed"]
        assert max(row["resid_max_rel_error"].values()) == 0.0  # float32 storage: exact
    json.dumps(result, allow_nan=False)


def test_the_stage_profile_reports_every_stage_against_the_bare_forward():
    cfg = BenchConfig(layers=[1, 2], shape=[3, 64], n_sequences=4, context_size=32,
                      batch_size=2, repeats=1)  # fmt: skip
    result = stages.run_stages(cfg)

    expected = {"bare_forward", "hooks", "copy", "copy_stats", "ours_disk"}
    assert expected <= result["tok_s"].keys() == result["vs_bare"].keys()
    assert result["vs_bare"]["bare_forward"] == 1.0 and not result["notes"]
    assert all(v > 0 for v in result["tok_s"].values())
