"""tgedge: edge deployment and export for text-guided vision-language models (TG-LLaVA family).

Importing the package imports no torch: the runtime and preprocessing install on a Jetson on their own.
"""

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402

from tgedge.errors import TgedgeError, TgedgeInternalError  # noqa: E402

DEMO_NAME = "demo"
# The words that name an embedded demo model, by fusion family, and the package folder each ships in.
DEMO_NAMES = {"demo": "tg", "demo-gated": "gated"}
DEMO_FOLDERS = {"tg": "demo_model", "gated": "demo_model_gated"}


def demo_checkpoint(fusion: str = "tg") -> Path:
    """An embedded demo model trained on the shapes task, shipped as package data: `tg` (TG-LLaVA, the word
    `demo`) or `gated` (gated cross-modal fusion, the word `demo-gated`)."""
    if fusion not in DEMO_FOLDERS:
        raise TgedgeError(f"no demo model of fusion family {fusion!r} (demo models: {', '.join(DEMO_FOLDERS)})")
    path = Path(__file__).parent / DEMO_FOLDERS[fusion]
    if not (path / "config.json").exists():
        raise TgedgeError(f"{path}: the embedded demo model is missing from this install")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint path, where the words `demo` and `demo-gated` (unless a folder of that name exists) mean the
    embedded demo models."""
    if str(path) in DEMO_NAMES and not Path(path).exists():
        return demo_checkpoint(DEMO_NAMES[str(path)])
    return Path(path)


__all__ = ["__version__", "TgedgeError", "TgedgeInternalError", "demo_checkpoint", "resolve_checkpoint"]
