import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test-unit` runs a worker per core (pytest-xdist): one intra-op thread each, or the workers'
    # torch thread pools fight over the same cores (2 cores: 108 s with 2 threads per worker, 78 s with 1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def smol():
    from bayesflip.models.loader import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def tiny():
    from bayesflip.models.loader import load_model

    return load_model("tiny-random", device="cpu")


def plain_choice_logprob(lm, text: str, choice: str, chat_messages=None) -> float:
    """Reference: one plain transformers forward of the joined string, no engine code."""
    import torch

    tok = lm.tokenizer
    if chat_messages is not None:
        text = tok.apply_chat_template([{"role": r, "content": c} for r, c in chat_messages],
                                       tokenize=False, add_generation_prompt=True) + text
    ids = tok(text + choice).input_ids
    n = len(tok(choice, add_special_tokens=False).input_ids)
    model = getattr(lm.model, "module", lm.model)
    with torch.no_grad():
        lsm = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return float(sum(lsm[len(ids) - n - 1 + j, ids[len(ids) - n + j]] for j in range(n)))


def synthetic_store(root, sweep, exp, family, params: dict, shard_size: int, seed: int, model: str = "synthetic-model"):
    """A store of the real ``family`` (its cells, arrays and coords) with synthetic provenance and, as
    ``plan`` writes it, the family's ``evidence`` attribute.

    Returns (store, family, params, cells); the caller writes arrays shard by shard."""
    from bayesflip.config import config_hash
    from bayesflip.experiments import get_family
    from bayesflip.store import ResultStore, store_path

    fam = get_family(family)
    p = fam.Params(**params)
    cells = fam.cells(p)
    raw = {"family": family, "seed": seed, "shard_size": shard_size, "params": p.model_dump(mode="json")}
    attrs = {"experiment": exp, "family": family, "config": raw, "config_hash": config_hash(raw), "seed": seed,
             "shard_size": shard_size, "model": model, "model_id": "synthetic", "model_revision": "r1",
             "git_commit": "test", "created": "now", "versions": {"python": "3"}}
    if (ev := fam.evidence(p)) is not None:
        attrs["evidence"] = ev
    st = ResultStore.create(store_path(sweep, exp, model, root), fam.arrays(p), cells, shard_size, fam.coords(p), attrs)
    return st, fam, p, cells


def private_configs(tmp, sweeps: dict):
    """A private copy of ``configs/`` under ``tmp`` with extra sweeps (name -> YAML text or bytes);
    tests point ``BAYESFLIP_CONFIG_DIR`` at it."""
    import shutil
    from pathlib import Path

    cfg = Path(tmp) / "configs"
    if not cfg.exists():
        shutil.copytree(Path(__file__).resolve().parent.parent / "configs", cfg)
    for name, text in sweeps.items():
        p = cfg / "sweeps" / f"{name}.yaml"
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return cfg


def sweep_arrays(root, sweep: str, experiments, model: str) -> dict:
    """experiment → {array name → stored values} of one model's stores of a sweep."""
    from bayesflip.store import ResultStore, store_path

    out = {}
    for exp in experiments:
        st = ResultStore(store_path(sweep, exp, model, root))
        out[exp] = {k: st.read(k) for k in st.attrs["arrays"]}
    return out


def sweep_records(root, sweep: str, experiments, model: str) -> dict:
    """(experiment, shard) → completion record of one model's stores of a sweep."""
    from bayesflip.store import ResultStore, store_path

    return {(exp, s): r for exp in experiments
            for s, r in ResultStore(store_path(sweep, exp, model, root)).records().items()}
