"""mimlab/ reaches Lightning only through its public API, so an upgrade cannot break it silently: no imports of
``_``-prefixed names from ``lightning``, no ``_``-prefixed attributes read off a Trainer, its strategy or its loops,
and no inherited ``self._...`` attributes in subclasses of Lightning classes."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mimlab"
LIGHTNING_OBJECTS = {"trainer", "strategy", "fit_loop", "epoch_loop", "accelerator", "precision_plugin"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _lightning_names(tree: ast.Module) -> set[str]:
    """Local names bound to the lightning package or to names imported from it."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name.split(".")[0] == "lightning"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning":
            names |= {a.asname or a.name for a in node.names}
    return names


def _inherited_private(cls: ast.ClassDef) -> list[ast.Attribute]:
    """``self._x`` in a class body where the class itself never assigns ``self._x``."""
    uses = [
        n
        for n in ast.walk(cls)
        if isinstance(n, ast.Attribute)
        and _is_private(n.attr)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
    ]
    own = {n.attr for n in uses if isinstance(n.ctx, ast.Store)}
    own |= {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return [n for n in uses if n.attr not in own]


def private_lightning_uses(source: str) -> list[str]:
    """``line: text`` of each private Lightning import or attribute access in ``source``."""
    tree = ast.parse(source)
    lightning = _lightning_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning":
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            if owner in LIGHTNING_OBJECTS:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ClassDef) and any(ast.unparse(b).split(".")[0] in lightning for b in node.bases):
            found += [f"{n.lineno}: {ast.unparse(n)}" for n in _inherited_private(node)]
    return sorted(found, key=lambda use: int(use.split(":")[0]))


def test_the_check_finds_private_uses():
    source = """
from lightning.fabric.utilities.seed import _collect_rng_states, seed_everything
from lightning.pytorch.strategies import DDPStrategy
trainer._logger_connector.should_update_logs
self.trainer.strategy._ddp_kwargs
trainer.fit_loop.epoch_loop._batches_that_stepped + trainer.global_step

class Strategy(DDPStrategy):
    def setup(self, trainer):
        self._mine = 1
        return self._ddp_kwargs, self._mine, self._helper(), self.__class__

    def _helper(self):
        pass
"""
    assert private_lightning_uses(source) == [
        "2: from lightning.fabric.utilities.seed import _collect_rng_states",
        "4: trainer._logger_connector",
        "5: self.trainer.strategy._ddp_kwargs",
        "6: trainer.fit_loop.epoch_loop._batches_that_stepped",
        "11: self._ddp_kwargs",
    ]


def test_mimlab_uses_no_private_lightning_api():
    found = {
        str(p.relative_to(PACKAGE.parent)): uses
        for p in sorted(PACKAGE.rglob("*.py"))
        if (uses := private_lightning_uses(p.read_text()))
    }
    assert not found, f"private Lightning API (replace it with a public one): {found}"
