"""The method examples in examples/, each run with --small (in the torch
shard: the library code they drive is tested on every backend)."""

import json
import os
import runpy

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")


def run_example(name, tmp_path, capsys):
    module = runpy.run_path(os.path.join(EXAMPLES, f"{name}.py"))
    assert module["main"](["--small", "--out", str(tmp_path)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.one_backend
def test_pissa_exported_as_plain_lora(tmp_path, capsys):
    result = run_example("pissa_to_lora", tmp_path, capsys)
    assert result["methods_in_lora_file"] == ["lora"] and result["ranks"] == [8]  # rank 2r
    assert result["max_output_diff"] <= 1e-4


@pytest.mark.one_backend
def test_dylora_at_every_rank(tmp_path, capsys):
    result = run_example("dylora_ranks", tmp_path, capsys)
    assert sorted(result["loss_by_rank"], key=int) == [str(r) for r in range(1, 9)]
    assert result["merged_at_rank_4_diff"] <= 1e-4


@pytest.mark.one_backend
def test_adalora_rank_report(tmp_path, capsys):
    result = run_example("adalora_report", tmp_path, capsys)
    assert result["mean_kept_rank"] == pytest.approx(2.0)  # target_rank, on average
    assert len(set(result["kept_rank"].values())) > 1  # moved between layers
    assert os.path.getsize(result["plot"]) > 0


@pytest.mark.one_backend
def test_svf_experts_composed_and_searched(tmp_path, capsys):
    result = run_example("svf_experts", tmp_path, capsys)
    alone = result["accuracy_by_weights"]
    assert alone["[1.0, 0.0]"]["plus3"] > alone["[0.0, 1.0]"]["plus3"]  # each expert on its task
    assert len(result["cem_weights"]) == 2


@pytest.mark.one_backend
def test_peft_adapter_into_keras_and_back(tmp_path, capsys):
    pytest.importorskip("peft")
    result = run_example("peft_roundtrip", tmp_path, capsys)
    assert result["layers"] == 6
    assert result["import_rel_diff"] <= 1e-4 and result["export_rel_diff"] <= 1e-4
