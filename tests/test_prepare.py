"""Pinned, pre-fetched Hub models, offline: a hand-built Hub cache, loaded with HF_HUB_OFFLINE=1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bayesflip.backends import load_backend
from bayesflip.engine import ChoiceRequest
from bayesflip.models.prepare import (ModelNotPreparedError, is_prepared, prepare_hub, prepared_revision,
                                      record_path, require_prepared)
from bayesflip.models.registry import ModelSpec

REPO = Path(__file__).resolve().parent.parent
SHA = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo_id: str = "testorg/tiny-llama", sha: str = SHA, refs_exist_ok: bool = False) -> Path:
    """models--org--name/{refs/main, snapshots/<sha>/...} with a tiny random Llama + tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bayesflip.models.prepare import gguf_cache_dir
    from bayesflip.models.registry import get_model_spec

    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    tok = AutoTokenizer.from_pretrained(gguf_cache_dir(get_model_spec("smollm2-135m-instruct")))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True, exist_ok=refs_exist_ok)
    (repo / "refs" / "main").write_text(sha)
    return snap


def _spec(name="hubtiny", repo_id="testorg/tiny-llama", revision="main"):
    return ModelSpec(name=name, id=repo_id, source="hub", revision=revision, kind="std", dtype="float32",
                     template="cpu-debug")


def hub_env(tmp_path, monkeypatch) -> Path:
    """A hand-built Hub cache under ``tmp_path``, made this process's (offline) cache; its snapshot dir."""
    snap = _hub_cache(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BAYESFLIP_CACHE", str(tmp_path / "bf"))
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return hub_env(tmp_path, monkeypatch)


def test_offline_load_from_hand_built_cache_pins_the_sha(hub):
    spec = _spec()
    assert is_prepared(spec) and prepared_revision(spec) == SHA
    be = load_backend(spec, device="cpu")
    assert be.revision == SHA and be.model.config.num_hidden_layers == 1
    assert be.score_choices([ChoiceRequest([1, 2, 3], [[5], [6]])])[0].shape == (2,)
    # a registry revision that is itself the sha resolves without refs/
    assert prepared_revision(_spec(revision=SHA)) == SHA


def test_unprepared_hub_model_is_a_clear_error(hub):
    spec = _spec(name="ghost", repo_id="testorg/ghost")
    assert not is_prepared(spec)
    with pytest.raises(ModelNotPreparedError) as e:
        require_prepared(spec)
    msg = str(e.value)
    assert "\n" not in msg and "run `bayesflip models prepare ghost`" in msg and "testorg/ghost@main" in msg
    with pytest.raises(ModelNotPreparedError, match="bayesflip models prepare ghost"):
        load_backend(spec, device="cpu")


def test_prepare_records_the_resolved_sha(hub):
    spec = _spec()
    calls = []

    def fake_download(repo_id, revision, cache_dir, ignore_patterns):
        calls.append((repo_id, revision, cache_dir))
        return str(hub)

    rec = prepare_hub(spec, download=fake_download)
    assert rec["sha"] == SHA and calls[0][:2] == ("testorg/tiny-llama", "main")
    assert json.loads(record_path(spec).read_text())["sha"] == SHA
    # the record pins the sha even if refs/main moves on later
    (hub.parent.parent / "refs" / "main").write_text("f" * 40)
    assert prepared_revision(spec) == SHA

    def failing(**kw):
        raise OSError("401 Client Error: gated repo")

    with pytest.raises(ModelNotPreparedError, match="cannot fetch testorg/tiny-llama@main.*HF_TOKEN"):
        prepare_hub(spec, download=failing)


def test_models_prepare_cli_offline(tmp_path):
    snap = _hub_cache(tmp_path)
    cfg = tmp_path / "configs" / "models"
    cfg.mkdir(parents=True)
    (cfg / "hubset.yaml").write_text(
        "models:\n  hubtiny: {id: testorg/tiny-llama, kind: std, dtype: float32, template: cpu-debug}\n"
        "  ghost: {id: testorg/ghost, kind: std, dtype: float32, template: cpu-debug}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "BAYESFLIP_CONFIG_DIR": str(tmp_path / "configs"), "BAYESFLIP_CACHE": str(tmp_path / "bf")}
    env.pop("HF_HUB_CACHE", None)

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "bayesflip.cli", *a], capture_output=True, text=True, env=env)

    r = cli("models", "prepare", "hubtiny")
    assert r.returncode == 0, r.stderr
    assert f"hubtiny: testorg/tiny-llama@main -> {SHA}" in r.stdout and str(snap) in r.stdout
    assert json.loads((tmp_path / "bf" / "prepared" / "hubtiny.json").read_text())["sha"] == SHA
    r = cli("models", "list")
    assert "hubtiny" in r.stdout and SHA[:10] in r.stdout
    r = cli("models", "prepare", "ghost")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot fetch testorg/ghost@main" in r.stderr
    r = cli("models", "prepare")
    assert r.returncode == 2 and "name a model" in r.stderr


# ---------------------------------------------------------------------- the sha in manifest, store and records
HUB_SWEEP = """models: [hubtiny]
experiments:
  icl_coin: {seed: 3, shard_size: 2, params: {thetas: [0.5], n_flips: 4, samples: 4}}
"""
GHOST_SWEEP = """models: [ghost]
experiments:
  icl_coin: {seed: 3, shard_size: 2, params: {thetas: [0.5], n_flips: 4, samples: 2}}
"""
SHA_B = "fedcba9876543210fedcba9876543210fedcba98"


def _hub_env(tmp_path: Path) -> dict:
    from conftest import private_configs

    cfg = private_configs(tmp_path, {"hubx": HUB_SWEEP, "ghostx": GHOST_SWEEP})
    (cfg / "models" / "hubset.yaml").write_text(
        "models:\n  hubtiny: {id: testorg/tiny-llama, kind: std, dtype: float32, template: cpu-debug}\n"
        "  ghost: {id: testorg/ghost, kind: std, dtype: float32, template: cpu-debug}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "BAYESFLIP_CONFIG_DIR": str(cfg), "BAYESFLIP_CACHE": str(tmp_path / "bf")}
    env.pop("HF_HUB_CACHE", None)
    return env


def _bf(env, *a, timeout=600):
    return subprocess.run([sys.executable, "-m", "bayesflip.cli", *a], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.integration
def test_submitted_hub_model_pins_its_sha_in_manifest_store_and_records(tmp_path):
    """submit (local executor, HF_HUB_OFFLINE=1) on a hand-built Hub cache: the sha lands in the manifest,
    the store's identity and every done record; after the cache moves to another sha, the job refuses."""
    import zarr

    _hub_cache(tmp_path)
    env = _hub_env(tmp_path)
    res = tmp_path / "res"
    r = _bf(env, "submit", "--exp", "hubx", "--executor", "local", "--wait", "--results-dir", str(res))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    man = json.loads((res / "hubx" / "manifest.json").read_text())
    assert man["submissions"][-1]["pinned_revisions"] == {"hubtiny": SHA}
    store = res / "hubx" / "icl_coin" / "hubtiny.zarr"
    attrs = dict(zarr.open_group(store, mode="r").attrs)
    assert attrs["identity"]["model_revision"] == SHA and attrs["model_revision"] == SHA
    assert attrs["model_revision_requested"] == "main"
    recs = [json.loads(p.read_text()) for p in sorted((store.parent / "hubtiny.records").glob("shard-*.json"))]
    assert len(recs) == 2 and all(x["status"] == "done" and x["model_revision"] == SHA for x in recs)

    # re-prepared to a newer commit: refs/main -> sha B; plan and the job both refuse, naming the field
    _hub_cache(tmp_path, sha=SHA_B, refs_exist_ok=True)
    r = _bf(env, "submit", "--exp", "hubx", "--executor", "local", "--dry-run", "--results-dir", str(res))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"model_revision: store='{SHA}' now='{SHA_B}'" in r.stderr and "--overwrite" in r.stderr
    job = ("from bayesflip.job import run_task; from bayesflip.plan import TaskPlan; "
           f"run_task(TaskPlan.resolve('hubx', 'hubtiny', [('icl_coin', 0)], {str(res)!r}), device='cpu', progress=False)")
    r = subprocess.run([sys.executable, "-c", job], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0 and "StoreIdentityError" in r.stderr
    assert f"model_revision: store='{SHA}' now='{SHA_B}'" in r.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_submit_refuses_an_unprepared_hub_model_before_anything_is_submitted(tmp_path):
    env = _hub_env(tmp_path)
    res = tmp_path / "res"
    r = _bf(env, "submit", "--exp", "ghostx", "--executor", "local", "--results-dir", str(res))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "run `bayesflip models prepare ghost`" in r.stderr
    assert not res.exists()                      # no store, no manifest, no job folder


def test_sweep_task_runs_offline(monkeypatch):
    """Every cluster task starts with HF_HUB_OFFLINE=1 (env and the already imported huggingface_hub)."""
    import huggingface_hub.constants as hc

    from bayesflip.hpc.launch import SweepTask
    from bayesflip.plan import TaskPlan

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    out = SweepTask()(TaskPlan.resolve("demo", "tiny-random", [], "/nonexistent-results"))   # no work: nothing loaded
    assert out["done"] == [] and os.environ["HF_HUB_OFFLINE"] == "1" and hc.is_offline_mode()
