import json
import subprocess
import sys

import pytest

from bayesflip.errors import ConfigError
from bayesflip.models.registry import get_model_spec, load_registry, models_of_type, parse_model_file


def test_registry_has_study_and_local_models():
    reg = load_registry()
    for name in ["smollm2-135m-instruct", "tiny-random", "gemma-2-2b", "gemma-2-2b-it", "llama-3.1-8b-instruct",
                 "phi-2", "phi-3.5-mini-instruct", "mistral-7b-v0.3", "olmoe-1b-7b-instruct", "llama-3.1-70b",
                 "pythia-70m", "pythia-12b"]:
        assert name in reg
    assert reg["llama-3.1-70b"].backend == "deepspeed" and reg["llama-3.1-70b"].tp == 4
    assert {m.kind for m in models_of_type("instruct")} == {"instruct"}
    assert all(m.model_set not in ("local", "extra") for m in models_of_type("std"))
    assert [m.name for m in models_of_type("tiny-random")] == ["tiny-random"]


def test_unknown_model_lists_known_names():
    with pytest.raises(ConfigError) as e:
        get_model_spec("gpt-5")
    assert "unknown model 'gpt-5'" in str(e.value) and "smollm2-135m-instruct" in str(e.value)
    with pytest.raises(ConfigError, match="MODEL_TYPE.*allowed: all, std, instruct"):
        models_of_type("huge")


def test_bad_registry_entry_names_key(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("models:\n  m:\n    id: a/b\n    kind: chat\n")
    with pytest.raises(ConfigError, match=r"models\.m\.kind.*'std' or 'instruct'"):
        parse_model_file(f)
    f.write_text("models:\n  m:\n    id: a/b\n    kind: std\n    colour: red\n")
    with pytest.raises(ConfigError, match=r"models\.m\.colour"):
        parse_model_file(f)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bayesflip.cli", *args], capture_output=True, text=True)


@pytest.mark.integration
def test_score_cli_json(smol):
    r = _cli("score", "--model", "smollm2-135m-instruct", "--prompt", "I tossed a coin and it landed on",
             "--choice", " heads", "--choice", " tails", "--json")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"model", "choices", "logprobs", "probs", "off_choice_mass"}
    assert out["choices"] == [" heads", " tails"]
    assert abs(sum(out["probs"]) - 1) < 1e-9 and out["probs"][0] > 0.9
    assert abs(out["off_choice_mass"] - 0.4348) < 2e-3


def test_score_cli_errors_without_traceback():
    r = _cli("score", "--model", "nope", "--prompt", "x", "--choice", " a")
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = _cli("score", "--model", "tiny-random", "--prompt", "x", "--choice", " a", "--choice", "")
    assert r.returncode == 2 and "empty choice" in r.stderr and "Traceback" not in r.stderr
