"""tgedge: edge deployment and export for text-guided vision-language models (TG-LLaVA family).

Importing the package imports no torch: the runtime and preprocessing install on a Jetson on their own.
"""

__version__ = "0.1.0"

from tgedge.errors import TgedgeError, TgedgeInternalError  # noqa: E402

__all__ = ["__version__", "TgedgeError", "TgedgeInternalError"]
