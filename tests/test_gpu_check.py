"""`bayesflip gpu-check --device cpu --tiny`: the GPU machine's script runs end to end on the CPU."""

import json

from bayesflip.gpu_check import main


def test_gpu_check_tiny_on_cpu(tmp_path, capsys):
    out = tmp_path / "gc.json"
    assert main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["contract_ok"] and len(res["contract"]) == 4
    assert {(c["model"], c["dtype"]) for c in res["contract"]} == {
        (m, d) for m in ("tiny-random", "random-small-llama") for d in ("float32", "bfloat16")}
    for c in res["contract"]:
        if c["dtype"] == "float32":
            assert c["max_abs_dlogprob_choices"] <= 1e-4 and c["greedy_identical_to_hf_generate"] == "2/2"
    thr = res["throughput"]
    assert thr["scoring"]["engine_tokens_per_s"] > 0 and thr["scoring"]["raw_tokens_per_s"] > 0
    for m in ("greedy", "sampled"):
        g = thr["generation"][m]
        assert g["engine_tokens_per_s"] > 0 and g["hf_tokens_per_s"] > 0 and g["host_syncs_per_step"] >= 0
    cal = res["calibration"]
    assert cal["scoring_tokens_per_s"] > 0 and cal["generation_tokens_per_s"] > 0
    assert "gpu-check on cpu" in capsys.readouterr().out
