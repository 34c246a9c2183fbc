"""What every checkpoint layout reads the same way: weights (safetensors, shards, weights-only `.bin`), image
processor settings, the chat template; and the renaming by a layout's prefix table.

Nothing in a checkpoint is executed. Shard names in an index file must stay inside the checkpoint directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


from tgedge.config import ModelConfig, read_config_json
from tgedge.errors import TgedgeError
from tgedge.fileio import inside, regular_file
from tgedge.preprocess import ImageSettings, Tokenizer
from tgedge.prompt import PromptTemplate

if TYPE_CHECKING:  # torch: the CLI and the numpy-only presets import the layouts without it
    from tgedge.weights import LazyWeights


@dataclass
class Parts:
    """What a layout reads from a checkpoint directory, in tgedge's terms."""
    config: ModelConfig
    weights: LazyWeights  # tgedge parameter names
    image: ImageSettings
    tokenizer: Tokenizer
    template: PromptTemplate
    guide_tokenizer: Path | None  # the text guide's tokenizer.json, where the layout has one


def rename(keys, prefixes) -> dict[str, str]:
    """checkpoint name -> tgedge name by a layout's (checkpoint prefix, tgedge prefix) table, first match wins."""
    out = {}
    for k in keys:
        for old, new in prefixes:
            if k.startswith(old):
                out[k] = new + k[len(old):]
                break
        else:
            out[k] = k  # left as is: reported as unexpected unless ignored
    return out


def read_weights(directory: Path) -> "LazyWeights":
    """All tensors of a checkpoint directory, read when asked (float32 where floating point): safetensors through
    their memory map, one tensor at a time; a pickled `.bin` (weights only) has to be loaded whole."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = shard_files(index)
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    from tgedge.weights import LazyWeights

    tensors: dict = {}
    if files:
        return LazyWeights.from_safetensors([inside(directory, f, f"{index} weight_map") for f in files])
    else:
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise TgedgeError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
        import torch  # only for .bin weights: presets and the CLI import this package without torch

        for f in bins:
            try:  # weights_only: a pickle may hold tensors but never code
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:
                raise TgedgeError(f"{f}: cannot load with torch.load(weights_only=True) ({e})") from None
    return LazyWeights.from_tensors(tensors)


def shard_files(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` names (checked: a weight_map of names to file names)."""
    weight_map = read_config_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise TgedgeError(f"{index}: weight_map must be an object of tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    for f in files:
        inside(index.parent, f, f"{index} weight_map")
    return files


def find_image_settings(*dirs: Path) -> ImageSettings:
    for d in dirs:
        if (d / "preprocessor_config.json").exists():
            path = d / "preprocessor_config.json"
            return ImageSettings.from_processor_config(read_config_json(path), path)
        if (d / "processor_config.json").exists():
            path = d / "processor_config.json"
            proc = read_config_json(path)
            if "image_processor" in proc:
                return ImageSettings.from_processor_config(proc["image_processor"], f"{path} image_processor")
    raise TgedgeError(f"{dirs[0]}: no preprocessor_config.json (CLIP image processor settings)")


def find_chat_template(d: Path) -> str | None:
    if (d / "chat_template.jinja").exists():
        regular_file(d / "chat_template.jinja", "template file")
        try:
            return (d / "chat_template.jinja").read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise TgedgeError(f"{d / 'chat_template.jinja'}: not UTF-8 text (at byte {e.start})") from None
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (d / name).exists():
            t = read_config_json(d / name).get("chat_template")
            if isinstance(t, str):
                return t
    return None
