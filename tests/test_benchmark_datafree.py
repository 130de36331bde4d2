"""benchmarks/datafree.py runs in fast mode and writes the documented JSON.

Reference: the benchmark's own docstring (JSON layout: header from benchmarks/common.py,
settings, fp32, accuracy[source][config][observer] (min-max weight scales),
accuracy_mse_weights (same layout, MSE weight scales), calibration_scores, bn_loss,
cle_bias_correction[config][row], distillation_W4A4, distillation_ablation_W4A4[weights],
decomposition_W4A4[observer], method_seconds, targets). In fast mode (one seed, 64 images,
20-step loops) only the robust properties are checked: every cell is a valid accuracy, W8A8
stays near fp32 for every source, synthetic data matches the BN statistics better than
noise, CLE undoes the unbalancing at W8A8, the decomposition's rows are the cells they name,
the input range is the preprocessing's, and the targets are recomputed from the numbers.
"""

from __future__ import annotations

import pytest

SOURCES = ("real", "noise", "noise_clamped", "bn_synthetic", "generator")


@pytest.fixture(scope="module")
def result(fast_benchmark):
    result, stdout = fast_benchmark("datafree")
    assert "target" in stdout and "CLE + bias correction" in stdout
    return result


def test_header_and_layout(result):
    assert result["benchmark"] == "datafree" and result["fast"] is True and result["seeds"] == [0]
    for key in ("platform", "cpu_count", "torch_threads"):
        assert key in result["machine"]
    for key in ("python", "torch", "qlib"):
        assert key in result["versions"]
    assert result["settings"]["model"] == "cnn16" and len(result["settings"]["input_range"]) == 2
    assert set(result["accuracy"]) == set(result["accuracy_mse_weights"]) == set(SOURCES)
    assert len(result["targets"]) == 7 and all(isinstance(t["met"], bool) for t in result["targets"])
    assert set(result["distillation_ablation_W4A4"]) == {"minmax", "mse"}


def test_input_range_comes_from_the_preprocessing_and_is_the_images_range(result, digits16):
    """Data-free: the range is the normalization's image of [0, 1] (no image read); it is also
    the range the standardized training digits actually take."""
    from qlib.datafree import DIGITS_NORMALIZATION, standardized_range
    lo, hi = result["settings"]["input_range"]
    assert (lo, hi) == standardized_range(*DIGITS_NORMALIZATION[16])
    assert result["settings"]["input_normalization"] == list(DIGITS_NORMALIZATION[16])
    x = digits16.train.tensors[0]
    assert lo == pytest.approx(x.min().item(), abs=1e-5) and hi == pytest.approx(x.max().item(), abs=1e-5)


def test_cells_are_accuracies_and_8_bits_is_free(result):
    fp32 = result["fp32"]["mean"]
    assert 95 <= fp32 <= 100
    for source in SOURCES:
        for config in ("W8A8", "W6A6", "W4A4"):
            s = result["accuracy"][source][config]["percentile"]
            assert 0 <= s["min"] <= s["mean"] <= s["max"] <= 100 and s["n"] == 1
        assert result["accuracy"][source]["W8A8"]["percentile"]["mean"] >= fp32 - 1.0
        assert result["accuracy_mse_weights"][source]["W8A8"]["percentile"]["mean"] >= fp32 - 1.0


def test_synthetic_data_matches_bn_statistics_better_than_noise(result):
    b = result["bn_loss"]
    assert b["bn_synthetic_end"]["mean"] < b["bn_synthetic_start"]["mean"]
    assert b["bn_synthetic_end"]["mean"] < b["noise"]["mean"]
    scores = result["calibration_scores"]
    assert scores["bn_synthetic"]["bn_distance"] < scores["noise"]["bn_distance"]
    assert scores["real"]["mmd_inputs"] < scores["noise"]["mmd_inputs"]


def test_cle_undoes_unbalancing_at_8_bits(result):
    w8 = result["cle_bias_correction"]["W8A8"]
    assert w8["unbalanced per-tensor"]["mean"] < 50
    assert w8["+ CLE"]["mean"] >= w8["original per-channel"]["mean"] - 1.0
    d = result["distillation_W4A4"]["accuracy"]
    assert set(d) == {"ptq", "distilled_bn_synthetic", "distilled_generator"}


def test_decomposition_rows_are_the_cells_they_name(result):
    rows = result["decomposition_W4A4"]["percentile"]
    assert [r["row"] for r in rows][:3] == ["fp32", "min-max weights + real", "MSE weights + real"]
    tables = {"min-max": result["accuracy"], "MSE": result["accuracy_mse_weights"]}
    ablation = result["distillation_ablation_W4A4"]
    for r in rows:
        if r["weights"] == "fp32":
            cell = result["fp32"]
        elif r["distillation"] == "-":
            cell = tables[r["weights"]][r["calibration"]]["W4A4"]["percentile"]
        else:
            cell = ablation["mse"]["accuracy"][f"distilled_{r['distillation']}"]
        assert (r["mean"], r["min"], r["max"]) == (cell["mean"], cell["min"], cell["max"]), r["row"]
    # the original distillation rows are the min-max-weight rows of the ablation
    for k, v in result["distillation_W4A4"]["accuracy"].items():
        assert v == ablation["minmax"]["accuracy"][k]
    assert set(ablation["mse"]["accuracy"]) == {"ptq", "biases_only", "weights_only", "distilled_bn_synthetic",
                                                "distilled_generator"}


def test_new_targets_are_recomputed_from_the_numbers(result):
    by = lambda start: next(x for x in result["targets"] if x["name"].startswith(start))  # noqa: E731
    acc, mse = result["accuracy"], result["accuracy_mse_weights"]
    gain = by("MSE weights: real-data")
    assert gain["value"] == pytest.approx(mse["real"]["W4A4"]["percentile"]["mean"]
                                          - acc["real"]["W4A4"]["percentile"]["mean"])
    assert gain["met"] == (gain["value"] >= gain["threshold"])
    gap = by("MSE weights: BN-synthetic within")
    assert gap["value"] == pytest.approx(mse["real"]["W4A4"]["percentile"]["mean"]
                                         - mse["bn_synthetic"]["W4A4"]["percentile"]["mean"])
    ab = result["distillation_ablation_W4A4"]
    kd = by("MSE weights: distillation")
    gains = {w: ab[w]["accuracy"]["distilled_bn_synthetic"]["mean"] - ab[w]["accuracy"]["ptq"]["mean"]
             for w in ab}
    assert kd["value"] == pytest.approx(gains["minmax"] - gains["mse"], abs=1e-6)
    assert kd["met"] == (kd["value"] > 0)
