"""Import timm beside a CPU torch build, for tests only.

timm imports torchvision at module load; PyPI's torchvision does not load beside torch's CPU build
here (see CPU_NOTES). timm's ViT does not *use* torchvision, so a stand-in that answers every
torchvision import with inert placeholders is enough to build timm models as a reference.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(name)


def _stub(name: str) -> type:
    return _StubMeta(name, (), {"__init__": lambda self, *args, **kwargs: None})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(name)


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def import_timm():
    """timm, or None when it is not installed (it is a dev-only reference)."""
    try:
        import torchvision  # noqa: F401  (a working torchvision needs no stand-in)
    except Exception:
        sys.modules.pop("torchvision", None)
        sys.meta_path.insert(0, _TorchvisionStandIn())
    try:
        import timm
    except ImportError:
        return None
    return timm
