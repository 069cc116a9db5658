"""fbnas: differentiable, hardware-aware NAS over quantized blocks, with integer-only deployment.

The public names load on first use (PEP 562), so `import fbnas` and the `fbnas` command start without torch.
`timm.create_model("fbnas_net", arch=...)` works whichever of fbnas and timm is imported first."""
from __future__ import annotations

import importlib
import importlib.util
import sys

__version__ = "0.1.0"

_LAZY = {"Arch": "arch", "load_arch": "arch", "FbnasError": "errors", "build_model": "model",
         "SearchSpace": "space", "load_space": "space"}
__all__ = ["Arch", "FbnasError", "SearchSpace", "__version__", "build_model", "load_arch", "load_space"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. fbnas.search
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _RegisterWithTimm:
    """A meta-path finder that lets the next `import timm` run as usual, then registers fbnas_net in timm's model
    registry (timm has no plugin entry points, and importing timm here would cost seconds on every start)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_timm = spec.loader.exec_module

            def exec_module(module):
                exec_timm(module)
                importlib.import_module(".timm_models", __name__)

            spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    from . import timm_models  # noqa: F401  (registers timm.create_model("fbnas_net", arch=...))
else:
    sys.meta_path.insert(0, _RegisterWithTimm())
