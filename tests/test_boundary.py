"""Architecture rules that keep a transformers upgrade inside ``ep_kit/models/`` and the package acyclic.

Both are checked on the source text (AST), so a violation fails here before it fails at run time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "ep_kit"

#: transformers internals: module paths, private attributes, and the attribute names of the
#: Qwen2.5-Omni modules (decoder/encoder layers, towers) that only the wrapper may touch.
INTERNAL = re.compile(
    r"transformers\.models\b|transformers\.modeling|\b_attn_implementation\b|_gradient_checkpointing_func|\b_from_config\b"
    r"|\b(q_proj|k_proj|v_proj|o_proj|self_attn|self_attn_layer_norm|input_layernorm|post_attention_layernorm"
    r"|audio_tower|language_model|get_audio_features|get_video_features|get_image_features"
    r"|get_placeholder_mask|get_rope_index|decoder_layers)\b|\.scaling\b|\bthinker\.model\b"
)


def _code_outside_models() -> list[Path]:
    files = [p for p in KIT.rglob("*.py") if "models" not in p.relative_to(KIT).parts[:1]]
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    return files


def _code_text(path: Path) -> str:
    """The file without comments and docstrings (prose may name the internals it explains)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                body[0] = ast.Pass()
    return ast.unparse(tree)


def test_no_transformers_internals_outside_models():
    offenders = {}
    for path in _code_outside_models():
        hits = sorted(set(m.group(0) for m in INTERNAL.finditer(_code_text(path))))
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}, f"transformers internals named outside ep_kit/models/: {offenders}"


def test_the_rule_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""q_proj in a docstring is fine."""\nx = layer.self_attn.q_proj\n')
    assert sorted({m.group(0) for m in INTERNAL.finditer(_code_text(bad))}) == ["q_proj", "self_attn"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """ep_kit modules imported by ``path`` at run time (type-checking-only imports excluded)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in KIT.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = _imports(path, modules)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first, unless we are inside that package.
        for target in list(edges):
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and not name.startswith(parent + ".") and name != parent:
                    edges.add(parent)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle_in_the_kit():
    assert _cycles(_graph()) == []


def test_cycle_finder_on_a_hand_made_graph():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_reducers_only_see_the_host_interface(tiny_model, tiny_config, av_batch, av_specs):
    """Every reducer runs on a model that is nothing but the ReducerHost methods (no transformers attributes)."""
    from ep_kit.reducers.base import ReducerHost
    from ep_kit.reducers.cs2 import CS2
    from ep_kit.reducers.fastv import FastV
    from ep_kit.reducers.omnizip import OmniZip

    cfg = tiny_config(num_layers=3)
    for reducer in (CS2(num_layers=2), FastV(layer=1), OmniZip()):
        model = tiny_model(cfg, reducer=reducer, keep_ratio=0.3).eval()
        assert isinstance(model, ReducerHost)
        names = [n for n in dir(ReducerHost) if not n.startswith("_")]

        class Narrow:
            """Forwards only the host interface; any other attribute access fails."""

            def __init__(self, target, allowed: list[str]) -> None:
                self._target, self._allowed = target, allowed

            def __getattr__(self, name: str):
                if name not in self._allowed:
                    raise AttributeError(f"reducer reached past the host interface: {name}")
                return getattr(self._target, name)

        batch = av_batch(cfg, av_specs, with_labels=False)
        with torch.no_grad():
            expected = model.prefill(batch).kept
            full = model.embed(batch)
            ctx = model.context(full, batch)
            ctx.model = Narrow(model, names)
            seq = model.reduce_before_llm(full, ctx)
            seq, _ = model.run_llm(seq, ctx)
        assert torch.equal(seq.source_index, expected.source_index), type(reducer).__name__


@pytest.mark.parametrize("entry", ["forward", "generate", "answer"])
def test_every_entry_point_runs_the_one_prefill(entry, tiny_model, tiny_config, av_batch, av_specs, monkeypatch):
    from ep_kit.models.omni import OmniThinker
    from ep_kit.reducers.cs2 import CS2

    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=1), keep_ratio=0.3).eval()
    calls = []
    real = OmniThinker.prefill

    def spy(self, batch, *args, **kwargs):
        result = real(self, batch, *args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(OmniThinker, "prefill", spy)
    batch = av_batch(cfg, av_specs, with_labels=entry == "forward")
    with torch.no_grad():
        if entry == "forward":
            out = model(batch)
            assert torch.equal(out.kept.source_index, calls[0].kept.source_index)
        elif entry == "generate":
            model.generate(batch, max_new_tokens=2)
        else:
            from ep_kit.train.module import EPKitModule

            module = EPKitModule.__new__(EPKitModule)
            torch.nn.Module.__init__(module)
            module.model = model
            batch = {
                **batch,
                "choice_token_ids": torch.tensor([[5, 6], [7, 8]]),
                "answer_index": torch.tensor([0, 1]),
                **{key: ["a", "b"] for key in ("question_id", "category", "benchmark")},
            }
            res = module.answer(batch)
            assert res["stats"] is calls[0].stats
    assert len(calls) == 1
