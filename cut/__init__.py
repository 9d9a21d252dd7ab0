"""Contrastive Unlikelihood Training (Xu et al., arXiv 2312.14591) for Hugging Face causal LMs.

The package is laid out by part: `data` (records, templates, pairs, files), `modeling` (loading,
decoding, merging, the embedded models), `training` (the loss, the options, the Trainer, the CUT /
DPO / KTO recipes), `llm` (the client and the completers), `judges`, `tasks`, `methods` (URIAL,
ReAlign), `loop` (online, compare, tune, iterate), `evaluation`, `analysis` and `recipes`.

Module paths of earlier releases (`cut.train`, `cut.online`, `cut.loss`, ...) stay importable and
runnable (`python -m cut.online`, `torchrun -m cut.train`): `MOVED` maps each to its module now, and
a finder on `sys.meta_path` hands out that module under the old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

__version__ = "0.1.0"

# old module path -> where it lives now
MOVED = {
    "cut.options": "cut.args",
    "cut.io": "cut.data.files",
    "cut.records": "cut.data.records",
    "cut.templates": "cut.data.templates",
    "cut.pairs": "cut.data.pairs",
    "cut.models": "cut.modeling.loading",
    "cut.generate": "cut.modeling.generate",
    "cut.merge": "cut.modeling.merge",
    "cut.tiny": "cut.modeling.tiny",
    "cut.smollm": "cut.modeling.smollm",
    "cut.gemma": "cut.modeling.gemma",
    "cut.card": "cut.modeling.card",
    "cut.loss": "cut.training.loss",
    "cut.config": "cut.training.config",
    "cut.trainer": "cut.training.trainer",
    "cut.train": "cut.training.train",
    "cut.baselines": "cut.training",
    "cut.baselines.dpo": "cut.training.dpo",
    "cut.baselines.kto": "cut.training.kto",
    "cut.judge": "cut.judges.judge",
    "cut.urial": "cut.methods.urial",
    "cut.realign": "cut.methods.realign",
    "cut.online": "cut.loop.online",
    "cut.compare": "cut.loop.compare",
    "cut.tune": "cut.loop.tune",
    "cut.recipes.iterate": "cut.loop.iterate",
    "cut.demo": "cut.recipes.demo",
    "cut.analysis.inspect": "cut.analysis.ratios",
}


class _MovedLoader(importlib.abc.Loader):
    """Imports give the module itself (one object under both names); `python -m old.name` runs its
    code, as runpy asks a loader for `get_code`."""

    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self.own_spec = module.__spec__  # the import system sets __spec__ to the old name's: put it back
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.own_spec  # already executed under its own name

    def get_code(self, fullname: str):
        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new)

    def is_package(self, fullname: str) -> bool:
        spec = importlib.util.find_spec(self.new)
        return spec.submodule_search_locations is not None


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        found = importlib.util.find_spec(new)
        spec = importlib.machinery.ModuleSpec(
            fullname,
            _MovedLoader(new),
            origin=found.origin,
            is_package=found.submodule_search_locations is not None,
        )
        spec.has_location = True
        return spec


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())  # first, so an old package path never loads a second copy
