"""`bayesflip gpu-check`: refuses without CUDA (exit 2, one line) unless --device cpu; `--device cpu --tiny`
runs the GPU machine's script end to end on the CPU (job shapes per kind of work, bf16 and float32)."""

import json

import pytest

from bayesflip import gpu_check
from bayesflip.gpu_check import device_peak, main


def test_gpu_check_without_cuda_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "_tokenizer", lambda: pytest.fail("loaded something before refusing"))
    assert main(["--out", str(tmp_path / "gc.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bayesflip: error: gpu-check needs a CUDA device")
    assert "--device cpu" in err[0] and not (tmp_path / "gc.json").exists()
    assert main(["--device", "cuda:0", "--tiny"]) == 2


def test_peak_flops_from_the_device_name():
    assert device_peak("NVIDIA H100 80GB HBM3")[:2] == ("H100 SXM", 989.0)
    assert device_peak("NVIDIA H100 PCIe")[:2] == ("H100 PCIe", 756.0)
    assert device_peak("NVIDIA H100 NVL")[0] == "H100 NVL"
    assert device_peak("NVIDIA H200")[:2] == ("H200", 989.0)
    assert device_peak("NVIDIA GH200 480GB")[0] == "GH200"
    assert device_peak("NVIDIA A100-SXM4-80GB") == ("A100", 312.0, 19.5)
    assert device_peak("NVIDIA A100 80GB PCIe")[0] == "A100"
    assert device_peak("Some Future GPU") is None


@pytest.mark.integration
def test_gpu_check_tiny_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BAYESFLIP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gc.json"
    assert main(["--device", "cpu", "--tiny", "--out", str(out), "--template", "cpu-debug"]) == 0
    res = json.loads(out.read_text())
    assert res["contract_ok"] and len(res["contract"]) == 4
    assert {(c["model"], c["dtype"]) for c in res["contract"]} == {
        (m, d) for m in ("tiny-random", "random-small-llama") for d in ("float32", "bfloat16")}
    for c in res["contract"]:
        if c["dtype"] == "float32":
            assert c["max_abs_dlogprob_choices"] <= 1e-4 and c["greedy_identical_to_hf_generate"] == "2/2"
    for dtype in ("bfloat16", "float32"):
        thr = res["throughput"][dtype]
        assert thr["dtype"] == dtype and thr["scoring"]["batch_tokens"] == 2048
        assert thr["scoring"]["engine_tokens_per_s"] > 0 and thr["scoring"]["raw_tokens_per_s"] > 0
        c = thr["curve"]
        assert c["engine_tokens_per_s"] > 0 and c["syncs_and_copies_per_forward"] <= 3
        assert c["max_abs_diff_vs_bare"] <= (1e-4 if dtype == "float32" else 0.1)
        g = thr["generation"]["stops"]["sampled"]
        assert g["engine_tokens_per_s"] > 0 and g["tokens_identical_to_hf"].split("/")[0] == g["tokens_identical_to_hf"].split("/")[1]
    for m in ("greedy", "sampled"):
        g = res["throughput"]["bfloat16"]["generation"][m]
        assert g["engine_tokens_per_s"] > 0 and g["hf_tokens_per_s"] > 0 and g["host_syncs_per_step"] >= 0
    cal = res["calibration"]
    assert cal["scoring_tokens_per_s"] > 0 and cal["curve_tokens_per_s"] > 0 and cal["generation_tokens_per_s"] > 0
    doc = json.loads((tmp_path / "cache" / "throughput" / "cpu-debug.json").read_text())
    assert doc["float32"]["score_tokens_per_s"] > 0 and doc["dtype"] == "bfloat16" and doc["derived"] is False
    assert "gpu-check on cpu" in capsys.readouterr().out
