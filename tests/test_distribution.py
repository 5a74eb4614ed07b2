"""Adapters under Keras's own keras.distribution (DataParallel,
ModelParallel with KerasHub's Gemma LayoutMap), on JAX with 8 simulated
CPU devices, in a child process (tests/distribution_check.py): keras's
distribution API runs on JAX, so scripts/test.sh runs this file in the jax
process only (the child is JAX whatever the parent's backend)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("distribution") / "report.json"
    env = dict(os.environ, KERAS_BACKEND="jax")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "distribution_check.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


def test_every_family_trains_under_model_parallel_as_on_one_device(report):
    """One method per family, and LoRA over NF4 and under DataParallel: the
    loss and every trainable variable after two steps match one device."""
    assert report["devices"] == 8
    cases = report["cases"]
    assert len(cases) >= 10
    for name, case in cases.items():
        assert case["same_keys"], name
        for a, b in zip(case["loss_single"], case["loss_sharded"]):
            assert abs(a - b) <= 1e-5 * abs(a), (name, case)
        assert case["max_array_diff"] <= 1e-5 * max(1.0, case["max_abs"]), (name, case)


def test_adapter_variables_are_replicated_and_kernels_keep_their_sharding(report):
    case = report["cases"]["lora/float/model_parallel"]["layouts"]
    query = "gemma_backbone[0]/decoder_block_0/attention/query"
    assert case[f"{query}/lora_a"] == "P(None, None)"
    assert case[f"{query}/lora_b"] == "P(None, None)"
    # the frozen kernel inside the adapter keeps the LayoutMap's sharding
    assert case[f"{query}/kernel"] == "P('model', 'batch', None)"
    for name, spec in case.items():
        if not name.endswith("/kernel"):
            assert "model" not in spec and "batch" not in spec, (name, spec)


def test_a_model_saved_under_model_parallel_reloads_on_one_device(report):
    reload = report["reload"]
    assert reload["adapters"] == 14
    assert reload["devices"] == ["cpu:0"]
    assert reload["max_output_diff"] <= 1e-5


def test_ours_trains_where_keras_lora_breaks_keras_19496(report):
    """The layout map of the 2024 distributed-tuning guides matches Keras's
    `lora_kernel_a/b` by their paths and gives them the kernel's 3-D layout
    (keras #19496); our adapter variables are not kernels."""
    guide = report["guide_map"]
    assert guide["keras"].startswith("ValueError"), guide
    assert guide["ours"] == "ok", guide


def test_an_nf4_base_is_replicated_under_model_parallel(report):
    """Documented in docs/distribution.md: no LayoutMap rule names the NF4
    codes, so the quantized base is replicated (and trains as on one
    device, checked above)."""
    layouts = report["cases"]["lora/nf4/model_parallel"]["layouts"]
    query = "gemma_backbone[0]/decoder_block_0/attention/query"
    assert layouts[f"{query}/codes"] == "P(None,)"
    assert layouts[f"{query}/lora_a"] == "P(None, None)"


def test_the_docs_code_block_runs_under_model_parallel(report):
    """docs/distribution.md's example, as written (tests/test_docs.py runs
    the other pages' blocks; this one needs the 8 devices)."""
    assert report["docs_block"]["blocks"] == 1
    assert report["docs_block"]["saved"]
    assert report["docs_block"]["adapters"] == 14


def test_sharded_expert_stacks_stay_sharded_and_train_as_on_one_device(report):
    """A Mixtral whose layout map shards the expert stacks over the expert
    axis: once adapted, each stack keeps that sharding (the adapter holds
    the same variable), and LoRA on the experts trains as on one device."""
    moe = report["moe"]
    assert len(moe["after"]) == 3
    for path, spec in moe["after"].items():
        assert spec == "P('model', None, None)" == moe["before"][path], (path, spec)
    assert moe["same_keys"]
    for a, b in zip(moe["loss_single"], moe["loss_sharded"]):
        assert abs(a - b) <= 1e-5 * abs(a), moe
    assert moe["max_array_diff"] <= 1e-5 * max(1.0, moe["max_abs"]), moe
