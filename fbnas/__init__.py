"""fbnas: differentiable, hardware-aware NAS over quantized blocks, with integer-only deployment."""
__version__ = "0.1.0"

from .arch import Arch, load_arch  # noqa: E402
from .errors import FbnasError  # noqa: E402
from .model import build_model  # noqa: E402
from .space import SearchSpace, load_space  # noqa: E402
from . import timm_models  # noqa: E402,F401  (registers timm.create_model("fbnas_net", arch=...))

__all__ = ["Arch", "FbnasError", "SearchSpace", "__version__", "build_model", "load_arch", "load_space"]
