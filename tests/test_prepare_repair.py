"""``models prepare`` verifies a snapshot and repairs it; a damaged cache is one line, never a
SafetensorError traceback; a killed conversion's ``.tmp-*`` dir is removed by the next run (issue 19).

Offline: a hand-built Hub cache laid out like huggingface_hub's (``snapshots/<sha>/<file>`` links
into ``blobs/<sha256>``), a fake ``download`` that puts the good blob back, and a fake GGUF conversion.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bayesflip.backends import load_backend
from bayesflip.models import prepare
from bayesflip.models.integrity import clean_stale_tmp, safetensors_problem, snapshot_problems, tmp_name
from bayesflip.models.prepare import (ModelNotPreparedError, is_prepared, prepare_hub, prepared_revision,
                                      require_prepared)
from test_prepare import SHA, _spec, hub_env

REPO = Path(__file__).resolve().parent.parent


def _as_blob(snap: Path, name: str = "model.safetensors") -> tuple[Path, bytes]:
    """Move ``snap/name`` into ``blobs/<sha256>`` and link it, as the Hub cache does; return (blob, bytes)."""
    data = (snap / name).read_bytes()
    blob = snap.parent.parent / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(exist_ok=True)
    (snap / name).rename(blob)
    (snap / name).symlink_to(os.path.relpath(blob, snap))
    return blob, data


@pytest.fixture
def hub(tmp_path, monkeypatch):
    snap = hub_env(tmp_path, monkeypatch)
    blob, data = _as_blob(snap)
    return snap, blob, data


def _restore(blob: Path, data: bytes, calls: list):
    def download(repo_id, revision, cache_dir, ignore_patterns):
        calls.append(repo_id)
        snap = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / SHA
        blob.write_bytes(data)
        if not (snap / "model.safetensors").exists():
            (snap / "model.safetensors").symlink_to(os.path.relpath(blob, snap))
        return str(snap)
    return download


def test_truncated_weights_are_one_line_then_prepare_repairs(hub):
    snap, blob, data = hub
    spec = _spec()
    assert is_prepared(spec) and snapshot_problems(snap, hashes=True) == []
    blob.write_bytes(data[: len(data) // 2])                     # a truncated download / copy
    assert snapshot_problems(snap) == [f"model.safetensors: truncated ({len(data) // 2} of {len(data)} bytes)"]
    assert not is_prepared(spec) and prepared_revision(spec) is None
    with pytest.raises(ModelNotPreparedError) as e:
        require_prepared(spec)
    msg = str(e.value)
    assert "\n" not in msg and "is damaged (model.safetensors: truncated" in msg
    assert "run `bayesflip models prepare hubtiny` to repair it" in msg
    with pytest.raises(ModelNotPreparedError, match="is damaged"):     # the load: the same line, no SafetensorError
        load_backend(spec, device="cpu")

    calls: list = []
    rec = prepare_hub(spec, download=_restore(blob, data, calls))
    assert calls == ["testorg/tiny-llama"] and rec["sha"] == SHA
    assert blob.read_bytes() == data and is_prepared(spec)
    assert load_backend(spec, device="cpu").revision == SHA


def test_a_flipped_byte_is_found_by_its_hash_and_fetched_again(hub):
    snap, blob, data = hub
    spec = _spec()
    bad = bytearray(data)
    bad[-1] ^= 0xFF                                               # same size: only the hash tells
    blob.write_bytes(bytes(bad))
    assert snapshot_problems(snap) == []
    assert snapshot_problems(snap, hashes=True) == [f"model.safetensors: content does not match its hash "
                                                    f"{blob.name[:12]}…"]
    calls: list = []
    prepare_hub(spec, download=_restore(blob, data, calls))
    assert calls and blob.read_bytes() == data


def test_repair_that_cannot_fetch_is_one_line_not_ready(hub):
    snap, blob, data = hub
    spec = _spec()
    blob.write_bytes(data[:100])

    def offline(repo_id, revision, cache_dir, ignore_patterns):   # the cache's snapshot, nothing fetched
        return str(snap)

    with pytest.raises(ModelNotPreparedError, match="the damaged model.safetensors of snapshot .* could not be "
                                                    "fetched again"):
        prepare_hub(spec, download=offline)
    assert not is_prepared(spec)                                  # no weights: not prepared, a plan says so


def test_models_prepare_cli_on_a_truncated_cache_is_not_ready(hub, tmp_path):
    snap, blob, data = hub
    blob.write_bytes(data[:1000])
    cfg = tmp_path / "configs" / "models"
    cfg.mkdir(parents=True)
    (cfg / "hubset.yaml").write_text("models:\n  hubtiny: {id: testorg/tiny-llama, kind: std, dtype: float32, "
                                     "template: cpu-debug}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "BAYESFLIP_CONFIG_DIR": str(tmp_path / "configs")}
    r = subprocess.run([sys.executable, "-m", "bayesflip.cli", "models", "prepare", "hubtiny"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("bayesflip:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "cannot fetch testorg/tiny-llama@main for model 'hubtiny'" in lines[0]   # offline: the repair needs the Hub
    assert "->" not in r.stdout                                   # never reported as prepared
    r = subprocess.run([sys.executable, "-m", "bayesflip.cli", "score", "--model", "hubtiny", "--prompt", "x",
                        "--choice", " a", "--choice", " b"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.safetensors: missing" in r.stderr and "run `bayesflip models prepare hubtiny` to repair it" in r.stderr


def test_safetensors_header_sizes(tmp_path):
    from safetensors.torch import save_file
    import torch

    p = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(10), "b": torch.ones(3, 4)}, str(p))
    assert safetensors_problem(p) is None
    full = p.read_bytes()
    p.write_bytes(full + b"x")
    assert "too long" in safetensors_problem(p)
    p.write_bytes(full[:5])
    assert safetensors_problem(p) == "w.safetensors: truncated (5 bytes, no header)"


def test_gguf_copy_truncated_is_converted_again_and_stale_tmp_removed(tmp_path, monkeypatch):
    from bayesflip.models.registry import get_model_spec

    spec = get_model_spec("smollm2-135m-instruct")
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path)
    converted = []

    def fake_convert(spec, pkg_dir, target):
        converted.append(target)
        shutil.copytree(good, target)

    good = tmp_path / "good"
    good.mkdir()
    from safetensors.torch import save_file
    import torch
    save_file({"w": torch.zeros(4)}, str(good / "model.safetensors"))
    (good / "config.json").write_text("{}")
    (good / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(prepare, "_convert_gguf", fake_convert)

    target = prepare.gguf_cache_dir(spec)
    assert converted == [target] and snapshot_problems(target) == []
    assert prepare.gguf_cache_dir(spec) == target and len(converted) == 1          # whole: reused

    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[:-3])                        # truncated copy
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = target.parent / (tmp_name(target).replace(f"-{os.getpid()}-", f"-{int(done.stdout)}-") + "abc123")
    live = target.parent / (tmp_name(target).replace(f"-{os.getpid()}-", f"-{os.getppid()}-") + "def456")
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    assert prepare.gguf_cache_dir(spec) == target and len(converted) == 2          # converted again
    assert (target / "model.safetensors").read_bytes() == data
    assert not dead.exists() and live.exists()        # a killed run's scratch dir goes; a live one's stays
    assert clean_stale_tmp(target) == []
