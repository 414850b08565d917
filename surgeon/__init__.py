"""surgeon: prune Hugging Face causal LMs with second-order information.

``surgeon.prune(model, config, calibration)`` prunes in place with the method the config names
(LLM Surgeon, FLAP, ADMM, SparseGPT, Wanda, magnitude) and returns a :class:`~surgeon.report.Report`.
"""

__version__ = "0.1.0"

from .api import prune  # noqa: E402
from .config import MethodConfig  # noqa: E402
from .io import load_pruned, save_pruned  # noqa: E402
from .methods.admm import AdmmConfig  # noqa: E402
from .methods.flap import FlapConfig  # noqa: E402
from .methods.magnitude import MagnitudeConfig  # noqa: E402
from .methods.sparsegpt import SparseGPTConfig  # noqa: E402
from .methods.surgeon import KOBDConfig, LOBDConfig, SurgeonConfig  # noqa: E402
from .methods.wanda import WandaConfig  # noqa: E402
from .report import Report  # noqa: E402

__all__ = [
    "AdmmConfig", "FlapConfig", "KOBDConfig", "LOBDConfig", "MagnitudeConfig", "MethodConfig", "Report",
    "SparseGPTConfig", "SurgeonConfig", "WandaConfig", "__version__", "load_pruned", "prune", "save_pruned",
]
