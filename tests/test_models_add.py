"""`bayesflip models add`, unprepared models failing offline with the `models prepare` hint, and
`prompts --where` checks. The Hub is a hand-built cache (tests/test_prepare.py); no network: the CLI
runs under a socket guard that records any connection attempt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bayesflip.errors import ConfigError
from bayesflip.models.add import ModelAddError, add_model, infer_kind

from conftest import private_configs
from test_prepare import SHA, _hub_cache

REPO = Path(__file__).resolve().parent.parent
SWEEPS = {
    "addx": """models: [tinyhub]
experiments:
  icl_coin: {seed: 3, shard_size: 2, params: {thetas: [0.5], n_flips: 4, samples: 4}}
""",
    "ghostx": """models: [ghost]
experiments:
  icl_coin: {seed: 3, shard_size: 2, params: {thetas: [0.5], n_flips: 4, samples: 2}}
""",
}
# every connection attempt (DNS included) is recorded in $NET_LOG and refused
GUARD = """
import os, socket, sys
def _refuse(*a, **k):
    with open(os.environ["NET_LOG"], "a") as f:
        f.write(repr(a[:2]) + "\\n")
    raise OSError("network disabled in this test")
socket.getaddrinfo = _refuse
socket.socket.connect = _refuse
socket.create_connection = _refuse
from bayesflip.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def world(tmp_path):
    """A private configs/ (with a `ghost` Hub model that is not in the cache) and a Hub cache holding
    testorg/tiny-llama, which the registry does not know yet. HF_HUB_OFFLINE is *not* set: the
    commands must go offline by themselves."""
    _hub_cache(tmp_path)
    cfg = private_configs(tmp_path, SWEEPS)
    (cfg / "models" / "ghosts.yaml").write_text(
        "models:\n  ghost: {id: testorg/ghost, kind: std, dtype: float32, template: cpu-debug}\n"
        "  ghost2: {id: testorg/ghost2, kind: instruct, dtype: float32, template: cpu-debug}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path), "BAYESFLIP_CONFIG_DIR": str(cfg),
           "NET_LOG": str(tmp_path / "net.log")}
    for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "BAYESFLIP_CACHE"):
        env.pop(k, None)      # the default bayesflip cache holds the converted proxy tokenizer

    def bf(*args):
        return subprocess.run([sys.executable, "-c", GUARD, *args], capture_output=True, text=True, env=env,
                              timeout=600)

    return tmp_path, cfg, bf


def _tiny_llama_params() -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bayesflip.models.prepare import gguf_cache_dir
    from bayesflip.models.registry import get_model_spec

    tok = AutoTokenizer.from_pretrained(gguf_cache_dir(get_model_spec("smollm2-135m-instruct")))
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    return sum(p.numel() for p in m.parameters())


@pytest.mark.integration
def test_add_from_hub_cache_then_plan_dry_run_and_debug(world):
    tmp, cfg, bf = world
    r = bf("models", "add", "testorg/tiny-llama", "--name", "tinyhub", "--template", "cpu-debug")
    assert r.returncode == 0, r.stderr
    assert "added tinyhub to" in r.stdout and "next: bayesflip plan" in r.stdout   # already in the cache
    doc = yaml.safe_load((cfg / "models" / "user.yaml").read_text())
    n = _tiny_llama_params()
    assert doc["models"]["tinyhub"] == {"id": "testorg/tiny-llama", "kind": "std", "dtype": "float32",
                                        "params_b": float(f"{n / 1e9:.3g}"), "template": "cpu-debug",
                                        "max_length": 256}
    # the snapshot's tokenizer has a chat template but the name does not say instruct: std, with a note
    assert "pass --kind instruct if it is a chat model" in r.stdout

    r = bf("plan", "--exp", "addx", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["models"][0]
    assert row["model"] == "tinyhub" and row["proxy_tokenizer"] is False and row["params_b"] == float(f"{n / 1e9:.3g}")
    assert row["cells"] == 4 and row["shards"] == 2

    res = tmp / "res"
    r = bf("debug", "--exp", "addx", "--results-dir", str(res))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tinyhub: 2 shards done" in r.stdout
    import zarr
    attrs = dict(zarr.open_group(res / "addx" / "icl_coin" / "tinyhub.zarr", mode="r").attrs)
    assert attrs["model_revision"] == SHA

    # duplicates: the same Hub id without --name, the same name
    r = bf("models", "add", "testorg/tiny-llama")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "already registered as tinyhub" in r.stderr
    r = bf("models", "add", "testorg/tiny-llama", "--name", "tinyhub")
    assert r.returncode == 2 and "'tinyhub' is already in the registry (user.yaml" in r.stderr
    assert not (tmp / "net.log").exists()


@pytest.mark.parametrize("cmd", [
    ["prompts", "--exp", "ghostx"],
    ["debug", "--exp", "ghostx"],
    ["submit", "--exp", "ghostx", "--executor", "local"],
    ["plan", "--exp", "ghostx"],
    ["score", "--model", "ghost", "--prompt", "I tossed a coin and it landed on", "--choice", " heads"],
])
def test_unprepared_model_fails_offline_with_the_prepare_hint(world, cmd):
    tmp, _, bf = world
    r = bf(*cmd, "--results-dir", str(tmp / "res")) if cmd[0] in ("debug", "submit", "plan") else bf(*cmd)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "not prepared" in r.stderr and "run `bayesflip models prepare ghost`" in r.stderr
    assert not (tmp / "net.log").exists()           # no connection attempted (no Hub retries)
    assert not (tmp / "res").exists()               # nothing written


def test_all_unprepared_models_named_in_one_line(world):
    tmp, _, bf = world
    r = bf("prompts", "--exp", "paper_icl_coin", "--model", "ghosts")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "models 'ghost', 'ghost2' are not prepared" in r.stderr
    assert "run `bayesflip models prepare ghost ghost2`" in r.stderr


@pytest.mark.integration
def test_dry_run_costs_an_unprepared_model_with_the_marked_proxy(world):
    tmp, _, bf = world
    r = bf("plan", "--exp", "ghostx", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "ghost*" in r.stdout and "proxy tokenizer smollm2-135m-instruct (model not prepared): ghost" in r.stdout
    assert not (tmp / "net.log").exists()


def test_add_uncached_offline_needs_kind_then_prompts_says_prepare(world):
    tmp, cfg, bf = world
    r = bf("models", "add", "Qwen/Qwen2.5-0.5B")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "not in the Hub cache" in r.stderr and "--kind base|instruct" in r.stderr and "--hub" in r.stderr
    assert not (cfg / "models" / "user.yaml").exists()
    r = bf("models", "add", "Qwen/Qwen2.5-0.5B", "--kind", "base", "--params-b", "0.494")
    assert r.returncode == 0, r.stderr
    assert "next: bayesflip models prepare qwen2.5-0.5b" in r.stdout
    entry = yaml.safe_load((cfg / "models" / "user.yaml").read_text())["models"]["qwen2.5-0.5b"]
    assert entry == {"id": "Qwen/Qwen2.5-0.5B", "kind": "std", "dtype": "bfloat16", "params_b": 0.494,
                     "template": "gpu-small"}
    r = bf("prompts", "--exp", "paper_icl_coin", "--model", "qwen2.5-0.5b")
    assert r.returncode == 2 and "run `bayesflip models prepare qwen2.5-0.5b`" in r.stderr
    assert not (tmp / "net.log").exists()


# ---------------------------------------------------------------------- add_model in-process
@pytest.fixture
def cfgdir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return private_configs(tmp_path, {})


def _model_dir(d: Path, chat_template: bool, **cfg) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, **cfg).save_pretrained(d)
    tc = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        tc["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


def test_add_local_directory_and_instruct_rules(cfgdir, tmp_path):
    d = _model_dir(tmp_path / "My-Chat-Model", chat_template=True)
    spec, path, facts = add_model(str(d), config_dir=cfgdir)
    # embeddings 100·16 + head 100·16 + 1 layer (4 attn proj 16·16/8·16 + mlp 3·16·32 + 2 norms) + final norm
    n = 100 * 16 * 2 + (16 * 16 + 2 * 16 * 8 + 16 * 16) + 3 * 16 * 32 + 16 * 3
    assert spec.name == "my-chat-model" and spec.source == "local" and spec.id == str(d.resolve())
    assert spec.kind == "instruct" and spec.max_length == 1024 and spec.params_b == float(f"{n / 1e9:.3g}")
    assert facts.params == n
    base = _model_dir(tmp_path / "plain-base", chat_template=False)
    with pytest.raises(ModelAddError, match="no chat template.*--kind base"):
        add_model(str(base), kind="instruct", config_dir=cfgdir)
    assert add_model(str(base), config_dir=cfgdir)[0].kind == "std"
    assert infer_kind("Qwen/Qwen2.5-0.5B", True)[0] == "std"          # base models ship a chat template too
    assert infer_kind("google/gemma-2-2b-it", True)[0] == "instruct"
    assert infer_kind("x/anything", None)[0] is None


def test_add_keeps_comments_validates_and_refuses_bad_names(cfgdir, tmp_path):
    d = _model_dir(tmp_path / "m1", chat_template=False)
    user = cfgdir / "models" / "lab.yaml"
    user.write_text("# our lab's models\nmodels:\n  lab-a: {id: lab/a, kind: std, params_b: 1.0}\n")
    add_model(str(d), name="lab-b", model_set="lab", tp=4, config_dir=cfgdir)
    text = user.read_text()
    assert text.startswith("# our lab's models\n") and "# bayesflip models add" in text
    from bayesflip.models.registry import forget_registry, load_registry
    forget_registry()
    reg = load_registry(cfgdir)
    assert reg["lab-b"].backend == "deepspeed" and reg["lab-b"].tp == 4 and reg["lab-b"].template == "gpu-large"
    assert reg["lab-a"].model_set == "lab"
    with pytest.raises(ConfigError, match="--template.*tp=2 needs 2"):
        add_model(str(d), name="lab-c", tp=2, template="gpu-small", config_dir=cfgdir)
    with pytest.raises(ConfigError, match="not a plain name"):
        add_model(str(d), name="../evil", config_dir=cfgdir)
    with pytest.raises(ModelAddError, match="names a model set"):
        add_model(str(d), name="paper", config_dir=cfgdir)
    with pytest.raises(ModelAddError, match="neither a local model directory nor a Hub id"):
        add_model("./no/such/dir", kind="base", config_dir=cfgdir)
    assert "lab-c" not in user.read_text()


def test_add_with_hub_reads_config_files_only_and_leaves_the_cache_alone(cfgdir, tmp_path):
    from huggingface_hub.errors import EntryNotFoundError

    src = _model_dir(tmp_path / "remote", chat_template=True, torch_dtype="bfloat16")
    asked = []

    def fake_download(repo_id, filename, revision, cache_dir):
        asked.append(filename)
        assert not filename.endswith((".safetensors", ".bin"))         # never weights
        if not (src / filename).exists():
            raise EntryNotFoundError(f"404: {filename}")
        return str(src / filename)

    with pytest.raises(ModelAddError, match="not in the Hub cache"):
        add_model("someorg/Tiny-Instruct", config_dir=cfgdir, download=fake_download)     # --hub not given
    assert asked == []
    spec, _, facts = add_model("someorg/Tiny-Instruct", hub=True, config_dir=cfgdir, download=fake_download)
    assert asked[0] == "config.json" and "tokenizer_config.json" in asked
    assert spec.kind == "instruct" and spec.dtype == "bfloat16" and spec.params_b is not None
    assert "the Hub" in facts.where
    assert not (tmp_path / "hub").exists()          # the Hub cache untouched: the model does not look prepared

    def offline(**kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    with pytest.raises(ModelAddError, match="cannot read config.json of someorg/other@main from the Hub"):
        add_model("someorg/other", hub=True, config_dir=cfgdir, download=offline)


def test_hub_unreachable_fails_at_once(cfgdir, monkeypatch):
    """No DNS (an offline node): `models add --hub` and `models prepare` stop before any Hub request."""
    import socket

    from bayesflip.models.prepare import ModelNotPreparedError, prepare_hub
    from bayesflip.models.registry import ModelSpec

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ModelAddError, match=r"cannot reach the Hub \(huggingface.co: .*Name or service not known\); "
                                            r"on this node add someorg/x from flags"):
        add_model("someorg/x", hub=True, config_dir=cfgdir)
    spec = ModelSpec(name="x", id="someorg/x", kind="std")
    with pytest.raises(ModelNotPreparedError, match="cannot reach the Hub.*run `bayesflip models prepare x`"):
        prepare_hub(spec)


# ---------------------------------------------------------------------- prompts --where
def test_where_unknown_key_bad_value_and_no_match(capsys, monkeypatch):
    from bayesflip.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["prompts", "--exp", "icl_coin", "--model", "tiny-random", "--limit", "2"]
    assert main([*base, "--where", "thetaa=0.3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'thetaa'; did you mean 'theta'?" in err
    assert "(allowed: n, sample, theta)" in err
    assert main([*base, "--where", "theta=abc"]) == 2
    assert "theta='abc' does not parse: theta is a number" in capsys.readouterr().err
    assert main([*base, "--where", "theta=0.33"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "no prompt of icl_coin matches --where theta=0.33 (theta takes 0.0, 0.1, 0.2" in out.err
    assert main([*base, "--where", "theta=0.7", "--where", "n=3", "--json"]) == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [(x["cell"]["theta"], x["cell"]["n"], x["cell"]["sample"]) for x in recs] == [(0.7, 3, 0), (0.7, 3, 1)]
    assert main([*base, "--where", "n=7"]) == 1          # n: the listed read points only
    assert "n takes 0, 1, 3, 5, 10, 20, 100" in capsys.readouterr().err


def test_template_path_is_not_a_template_name():
    from bayesflip.hpc.templates import load_template

    with pytest.raises(ConfigError, match="is a path: name a template, not a path.*allowed: cpu-debug"):
        load_template("../job_templates/cpu-debug")
    assert load_template("cpu-debug").name == "cpu-debug"


def test_sweep_models_matches_load_sweep():
    from bayesflip.config import load_sweep, sweep_models

    for name, mt in [("demo", None), ("paper_coinflips", None), ("paper_coinflips", "paper:std"),
                     ("icl_coin", "tiny-random"), ("paper_iicl", "local")]:
        assert sweep_models(name, mt) == load_sweep(name, mt).models
