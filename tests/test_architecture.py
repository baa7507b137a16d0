"""Architecture: layers only point down, one registry mechanism, a new backend is one file + one line.

* The import graph of ``bayesflip/`` (built with ``ast``: imports inside functions included,
  relative imports resolved, ``import a.b`` and ``from a import b`` where ``b`` is a submodule) has
  no cycle. Same rules as ``/work/shared/tools/import_cycles.py`` (an edge from a module to its own
  package's ``__init__`` is not counted).
* The backends never import the model registry, the planner, the job or the cluster layer; the
  model registry validates entries through the backend classes without importing torch.
* Families, reducers and backends are lazy entries of one :class:`bayesflip.registry.Registry`.
* ``docs/BACKENDS.md``'s example backend (``tests/example_backend.py``), registered in one line,
  runs shards through the real job path with the hf backend's values.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "bayesflip"

KNOWN_CYCLES: set[frozenset[str]] = set()   # none allowed: every cycle fails the test


# ---------------------------------------------------------------------- the import graph
def modules(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under the package directory ``root``."""
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _targets(mods: dict[str, Path], cur: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = cur.split(".")
            keep = len(base) - node.level + (1 if mods[cur].name == "__init__.py" else 0)
            prefix = ".".join(base[:keep] + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
    out = []
    for n in names:
        while n and n not in mods:            # `import a.b.attr` / `from a.b import attr` → a.b
            n = n.rpartition(".")[0]
        if n and n != cur and not (cur.startswith(n + ".") and mods[n].name == "__init__.py"):
            out.append(n)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → modules of the same package it imports anywhere (module level or inside functions)."""
    mods = modules(root)
    g: dict[str, set[str]] = defaultdict(set)
    for m, p in mods.items():
        g[m]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                g[m].update(_targets(mods, m, node))
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found, key=len, reverse=True)


def _describe(comp: list[str], g: dict[str, set[str]]) -> str:
    edges = [f"{a} -> {b}" for a in comp for b in sorted(g[a]) if b in comp]
    return f"{len(comp)} modules: " + "; ".join(edges)


def test_graph_builder_sees_function_level_and_submodule_imports(tmp_path):
    """The checker can fail: a cycle closed only by an import inside a function, and one through
    ``from pkg import submodule`` / ``import pkg.sub``, are both found; a package's own __init__ is not."""
    pkg = tmp_path / "pk"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A\n",
        "a.py": "from . import b\nA = 1\n",
        "b.py": "def f():\n    from .c import C\n    return C\n",
        "c.py": "import pk.a\nC = 2\n",
        "sub/__init__.py": "",
        "sub/x.py": "from ..sub import y\nfrom .. import d\n",
        "sub/y.py": "from pk.sub import x\n",
        "d.py": "from pk import sub\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    g = import_graph(pkg)
    assert g["pk.b"] == {"pk.c"} and g["pk.c"] == {"pk.a"} and g["pk.a"] == {"pk.b"}
    assert g["pk.sub.x"] == {"pk.sub.y", "pk.d"} and g["pk.d"] == {"pk.sub"}
    assert cycles(g) == [["pk.a", "pk.b", "pk.c"], ["pk.sub.x", "pk.sub.y"]]


def test_no_import_cycles():
    g = import_graph(PKG)
    found = cycles(g)
    unknown = [c for c in found if frozenset(c) not in KNOWN_CYCLES]
    assert not unknown, "import cycles (imports inside functions count):\n" + "\n".join(_describe(c, g) for c in unknown)
    assert not found


def test_layers_point_down():
    """The backends sit below the model registry and the job; the model layer below the backends
    (except the registry's check of an entry through its backend class); families, engine, store,
    models, backends and config never import the cluster layer (``hpc``); bayes.py imports nothing
    of bayesflip."""
    g = import_graph(PKG)

    def bad(src_prefix: str, forbidden: tuple[str, ...]) -> list[str]:
        return [f"{m} -> {t}" for m in sorted(g) if m == src_prefix or m.startswith(src_prefix + ".")
                for t in sorted(g[m]) if any(t == f or t.startswith(f + ".") for f in forbidden)]

    upper = ("bayesflip.hpc", "bayesflip.plan", "bayesflip.job", "bayesflip.config", "bayesflip.commands",
             "bayesflip.cli", "bayesflip.models.registry", "bayesflip.models.add")
    tools = ("bayesflip.backends.tp_check", "bayesflip.backends.precision")   # `python -m` checks: take model names
    assert [e for e in bad("bayesflip.backends", upper) if not e.startswith(tools)] == []
    assert [e for e in bad("bayesflip.models", ("bayesflip.backends",))
            if e != "bayesflip.models.registry -> bayesflip.backends"] == []
    for low in ("bayesflip.experiments", "bayesflip.engine", "bayesflip.store", "bayesflip.store_layout",
                "bayesflip.models", "bayesflip.backends", "bayesflip.config", "bayesflip.bayes"):
        # `bayesflip models add` is a command (it proposes a job template), not the model layer proper
        assert [e for e in bad(low, ("bayesflip.hpc",)) if not e.startswith("bayesflip.models.add ")] == [], low
    assert g["bayesflip.bayes"] == set()


def test_registry_load_validates_through_backends_without_torch():
    code = ("import sys\nfrom bayesflip.models.registry import load_registry\nr = load_registry()\n"
            "assert any(s.backend == 'deepspeed' for s in r.values())\n"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'bayesflip.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- one registry mechanism
def _decorated(path: Path, decorator: str) -> list[tuple[str, str]]:
    """(registered name, object name) for every ``@decorator`` / ``@decorator("name")`` in a module."""
    out = []
    for node in ast.parse(path.read_text()).body:
        for d in getattr(node, "decorator_list", []):
            if isinstance(d, ast.Name) and d.id == decorator:
                name = next(s.value.value for s in node.body if isinstance(s, ast.Assign)
                            and getattr(s.targets[0], "id", "") == "name" and isinstance(s.value, ast.Constant))
                out.append((name, node.name))
            elif isinstance(d, ast.Call) and getattr(d.func, "id", "") == decorator:
                out.append((d.args[0].value, node.name))
    return out


def test_families_reducers_backends_are_lazy_entries_of_one_registry():
    from bayesflip.backends import BACKENDS
    from bayesflip.experiments import FAMILIES
    from bayesflip.reduce.base import REDUCERS
    from bayesflip.registry import Registry

    assert all(isinstance(r, Registry) for r in (FAMILIES, REDUCERS, BACKENDS))
    fams = {n: f"bayesflip.experiments.{p.stem}:{o}" for p in (PKG / "experiments").glob("*.py")
            for n, o in _decorated(p, "register")}
    reds = {n: f"bayesflip.reduce.{p.stem}:{o}" for p in (PKG / "reduce").glob("*.py")
            for n, o in _decorated(p, "register_reducer")}
    assert len(fams) == 10 and len(reds) == 10
    for reg, decorated in ((FAMILIES, fams), (REDUCERS, reds)):   # every plug-in module is listed, none twice
        assert set(reg.names()) == set(decorated)
        for name, target in decorated.items():
            mod, attr = target.split(":")
            assert reg.get(name) is getattr(__import__(mod, fromlist=[attr]), attr), name
    with pytest.raises(Exception, match=r"config key 'family': unknown family 'zz' \(allowed: acronym, attention, "):
        FAMILIES.get("zz")


# ---------------------------------------------------------------------- a new backend: one file + one line
def test_docs_show_the_example_backend_verbatim():
    doc = (REPO / "docs" / "BACKENDS.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    code = (REPO / "tests" / "example_backend.py").read_text()
    assert code in blocks and 25 <= len(code.splitlines()) <= 40


@pytest.fixture
def example_backend():
    from bayesflip.backends import BACKENDS

    BACKENDS.register_lazy("example", "example_backend:ExampleBackend")   # the one registry line
    yield
    BACKENDS.unregister("example")


def test_example_backend_validates_its_placement_options(example_backend, tmp_path):
    from bayesflip.errors import ConfigError
    from bayesflip.models.registry import parse_model_file

    f = tmp_path / "x.yaml"
    entry = "models:\n  m:\n    id: a/b\n    kind: std\n    backend: example\n"
    assert parse_model_file(_write(f, entry))["m"].backend == "example"
    with pytest.raises(ConfigError, match=r"x\.yaml: config key 'models\.m\.backend': tp > 1 needs backend: deepspeed$"):
        parse_model_file(_write(f, entry + "    tp: 2\n"))
    with pytest.raises(ConfigError, match=r"'models\.m\.backend': device_map needs backend: hf \(example places"):
        parse_model_file(_write(f, entry + "    device_map: auto\n"))
    with pytest.raises(ConfigError, match=r"'models\.m\.fp32_head': backend example keeps the model's dtype"):
        parse_model_file(_write(f, entry + "    fp32_head: true\n"))


def _write(f: Path, text: str) -> Path:
    f.write_text(text)
    return f


def test_example_backend_runs_shards_with_the_hf_backends_values(example_backend, tmp_path, monkeypatch):
    """The real local job path (``run_local``: plan → TaskPlan → ShardRunner → store) through the example
    backend: the same shards, the same stored values as through the hf backend (same weights, same engine):
    equal, floats within 1e-5 (the two placements leave the weights at different addresses, and the CPU
    kernels may then round a last bit differently)."""
    from bayesflip.backends import validate_spec
    from bayesflip.config import load_sweep
    from bayesflip.job import run_local
    from bayesflip.models.registry import load_registry
    from bayesflip.store import ResultStore, store_path

    spec = load_registry()["tiny-random"].model_copy(update={"name": "tiny-random-example", "backend": "example"})
    validate_spec(spec)                                  # what parse_entry runs for a YAML entry
    monkeypatch.setitem(load_registry(), spec.name, spec)   # as if configs/models had `backend: example`
    runs = {}
    for model in ("tiny-random", spec.name):
        sweep = load_sweep("test_tp", model)
        sweep = dataclasses.replace(sweep, experiments=[e for e in sweep.experiments if e.family == "icl"])
        lines: list[str] = []
        runs[model] = run_local(sweep, results_dir=tmp_path, device="cpu", progress=False, out=lines.append)
        (task, r), = runs[model].tasks
        assert task.model.backend == ("example" if model == spec.name else "hf") and not r.failed
        assert sorted(r.done) == [("icl_coin", s) for s in range(4)] + [("icl_die", s) for s in range(2)], lines
    for exp in ("icl_coin", "icl_die"):
        a, b = (ResultStore(store_path("test_tp", exp, m, tmp_path)) for m in ("tiny-random", spec.name))
        assert (a.read_attrs()["model_spec"]["backend"], b.read_attrs()["model_spec"]["backend"]) == ("hf", "example")
        names = sorted(a.read_attrs()["arrays"])
        assert names and names == sorted(b.read_attrs()["arrays"])
        for name in names:
            x, y = a.read(name), b.read(name)
            assert x.shape == y.shape and np.isfinite(x).any(), name
            if x.dtype.kind == "f":    # float32 CPU kernels may round the last bit differently from run to
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=name)   # run (seen: 9.5e-7 once)
            else:
                np.testing.assert_array_equal(x, y, err_msg=name)


def test_backends_get_slurm_host_expansion_from_the_cluster_layer(monkeypatch):
    """A compressed multi-node list is expanded by the function the cluster layer passes
    (``SweepTask``: ``export_rendezvous(slurm.hostnames)``); without one it is a one-line error, not scontrol."""
    from bayesflip.backends.distributed import DeviceError, dist_env

    for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[3-4]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    asked: list[str] = []
    assert dist_env(lambda nodes: asked.append(nodes) or ["node3", "node4"]).master_addr == "node3"
    assert asked == ["node[3-4]"]
    with pytest.raises(DeviceError, match=r"multi-node SLURM job \(node\[3-4\]\) without MASTER_ADDR.*export_rendezvous"):
        dist_env()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert dist_env().master_addr == "10.0.0.1"
