"""tgedge: edge deployment and export for text-guided vision-language models (TG-LLaVA family).

Importing the package imports no torch: the runtime and preprocessing install on a Jetson on their own.
"""

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402

from tgedge.errors import TgedgeError, TgedgeInternalError  # noqa: E402

DEMO_NAME = "demo"


def demo_checkpoint() -> Path:
    """The embedded demo model (a small TG-LLaVA trained on the shapes task), shipped as package data."""
    path = Path(__file__).parent / "demo_model"
    if not (path / "config.json").exists():
        raise TgedgeError(f"{path}: the embedded demo model is missing from this install")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint path, where the word `demo` (unless a folder of that name exists) means the demo model."""
    if str(path) == DEMO_NAME and not Path(path).exists():
        return demo_checkpoint()
    return Path(path)


__all__ = ["__version__", "TgedgeError", "TgedgeInternalError", "demo_checkpoint", "resolve_checkpoint"]
