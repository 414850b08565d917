"""surgeon: prune Hugging Face causal LMs with second-order information.

``surgeon.prune(model, config, calibration)`` prunes in place with the method the config names
(LLM Surgeon, FLAP, ADMM, SparseGPT, Wanda, magnitude) and returns a :class:`~surgeon.report.Report`.
"""

__version__ = "0.1.0"

from .api import prune  # noqa: E402
from .config import MethodConfig  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["MethodConfig", "Report", "__version__", "prune"]
