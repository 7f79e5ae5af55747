"""The package's shape: a torch-free config, no import cycles, no function-local imports dodging one, the library
never reaching into configs/ or scripts/, and the method plug-in contract (a toy method added in one line)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

import mllm_mer.model as mer_model
from mllm_mer.backbone import load_backbone
from mllm_mer.config import load_config
from mllm_mer.data.dataset import decode_options, load_media
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.loading import build_collator
from mllm_mer.export import methods_on
from mllm_mer.methods import ForwardState, Method
from mllm_mer.model import build_mer_model
from mllm_mer.trainable import apply_trainable
from mllm_mer.training.run_dir import save_final

PACKAGE = Path(mer_model.__file__).resolve().parent
REPO = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The mllm_mer modules an import statement loads (its module, each parent package, imported submodules)."""
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    if isinstance(node, ast.ImportFrom) and node.module:
        names += [f"{node.module}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known}
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """({module: mllm_mer modules it imports at module level}, ["module:line" of imports inside functions])."""
    modules = package_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local: list[str] = []
    for name, tree in modules.items():
        parts = name.split(".")
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # initialised before `name` runs
        for node in tree.body:  # module level, TYPE_CHECKING blocks excluded (annotations only)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _targets(node, known) - ancestors
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _targets(node, known | {"mllm_mer"}):
                        local.append(f"{name}:{node.lineno}")
    return graph, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_config_import_pulls_in_no_torch():
    code = "import sys, mllm_mer.config; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_cycle_and_no_function_local_import():
    graph, local = import_graph()
    assert len(graph) > 40 and graph["mllm_mer.model"], "the walker found the package"
    assert cycles(graph) == []
    assert local == [], f"function-local imports of mllm_mer modules: {local}"


def test_the_walker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from mllm_mer.fusion.dcr.config import PATHS")
    known = {"mllm_mer", "mllm_mer.fusion", "mllm_mer.fusion.dcr", "mllm_mer.fusion.dcr.config"}
    assert _targets(tree.body[0], known) == known


def test_library_never_reads_configs_or_runs_scripts():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ("configs", "scripts"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_only_build_mer_model_lists_the_methods():
    """Every method object is named once outside its own module: in `mllm_mer.model.METHODS`."""
    names = {"LORA", "MOSE", "AR", "DCR", "DNR"}
    users = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "method.py":
            continue
        used = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)} & names
        if used:
            users[module_name(path)] = used
    assert users == {"mllm_mer.model": names}


# ------------------------------------------------------------------------------------------ a toy method
class ToyMethod(Method):
    """A fifth method: a head on the last prompt state as an extra path, and an L2 penalty on its logits."""

    name = "toy"

    def enabled(self, cfg) -> bool:
        return True

    def loss_weights(self, cfg) -> dict[str, float]:
        return {"toy_l2": 0.25}

    def add_heads(self, mer: nn.Module, cfg) -> None:
        mer.fusion_toy = nn.Linear(mer.hidden_size, mer.num_classes)

    def contribute(self, mer: nn.Module, state: ForwardState) -> None:
        logits = mer.fusion_toy(state.pooled[:, -1].float())  # (B, C) from the last prompt state
        state.path_logits["toy"] = logits
        state.aux_losses["toy_l2"] = logits.pow(2).mean()

    def export_note(self, cfg) -> str:
        return "the toy head"


def train_batch(backbone, cfg, syn_dir: Path, n: int = 4) -> dict:
    """The first `n` training clips of the tiny set, collated as the run's training batches are."""
    samples = read_jsonl(syn_dir / "train.jsonl", cfg.data.labels)[:n]
    _, dataset, _ = load_media(samples, decode_options(cfg, backbone.processor), cfg.data.cache_dir)
    return build_collator(cfg, backbone, train=True)([dataset[i] for i in range(n)])


def test_a_toy_method_plugs_in_with_one_line(monkeypatch, tiny_dir, backbone, syn_dir, tmp_path):
    monkeypatch.setattr(mer_model, "METHODS", (*mer_model.METHODS, ToyMethod()))  # the one line in model.py
    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={syn_dir / 'train.jsonl'}",
                             f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}"])
    model = build_mer_model(load_backbone(tiny_dir), cfg)
    counts = apply_trainable(model, cfg)
    assert model.fusion_toy.weight.requires_grad and counts["heads"][0] > model.fusion_toy.weight.numel()
    batch = train_batch(backbone, cfg, syn_dir)
    out = model(batch)
    assert set(out.cls_logits) == {"fused", "toy"} and "toy_l2" in out.aux_losses
    expected = out.lm_loss + out.cls_loss + 0.25 * out.aux_losses["toy_l2"]
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.fusion_toy.weight.grad is not None
    (tmp_path / "run").mkdir()
    save_final(Accelerator(cpu=True), model, cfg)
    reloaded = build_mer_model(load_backbone(tiny_dir), cfg, run_dir=tmp_path / "run")
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).cls_logits["toy"], model(batch).cls_logits["toy"])
    assert methods_on(cfg)["toy"] is True


@pytest.mark.parametrize("legacy", ["lora.enabled=true", "mose.enabled=true"])
def test_replaced_adapter_flags_are_refused_with_the_replacement(legacy):
    from mllm_mer.config import ConfigError

    with pytest.raises(ConfigError, match="replaced by adapter"):
        load_config(None, ["data.train=x.jsonl", legacy])


def test_a_saved_0_1_run_config_is_migrated(tmp_path):
    import yaml

    from mllm_mer.config import load_run_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"lora": {"enabled": True, "r": 4},
                                                          "mose": {"enabled": True}, "data": {"train": "x"}}))
    (tmp_path / "run_info.json").write_text("{}")
    cfg = load_run_config(tmp_path, ["dcr.arbiter.alpha=1"])
    assert cfg.adapter == "mose" and cfg.lora.r == 4 and cfg.dcr.arbiter.alpha == 1.0
    assert cfg.dcr.arbiter.ridge == 1.0  # deep merge: the other arbiter keys keep their values
