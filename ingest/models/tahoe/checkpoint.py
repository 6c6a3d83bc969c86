"""Locate and read Tahoe-X1 checkpoint folders (HF layout or Composer ``best-model.pt``).

A folder holds ``model_config.yml``, ``collator_config.yml``, ``vocab.json`` and either
``model.safetensors`` (the Hugging Face release) or ``best-model.pt`` (a local Composer
checkpoint, ``torch.load(...)["state"]["model"]``, read without running code: see
:mod:`.safe_load`). Keys are prefixed ``model.`` in both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from sclstore.store.errors import CheckpointError

from .._common import check_state_dict_strict
from ..safe_load import safe_torch_load

__all__ = [
    "COMPOSER_MODULES",
    "CONFIG_FILES",
    "IGNORED_PREFIXES",
    "WEIGHT_FILES",
    "CheckpointFiles",
    "check_state_dict",
    "locate_checkpoint",
    "read_state_dict",
    "read_vocab",
    "read_yaml",
]

logger = logging.getLogger(__name__)

CONFIG_FILES: tuple[str, ...] = ("model_config.yml", "collator_config.yml", "vocab.json")
WEIGHT_FILES: dict[str, str] = {"hf": "model.safetensors", "composer": "best-model.pt"}
IGNORED_PREFIXES: tuple[str, ...] = ("expression_decoder.", "mvc_decoder.", "chem_encoder.")
"""Heads of ``TXModel`` that the encoder does not use; their weights are skipped on load."""

CheckpointFormat = Literal["hf", "composer"]


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint folder."""

    folder: Path
    model_config: Path
    collator_config: Path
    vocab: Path
    weights: Path
    fmt: CheckpointFormat

    def all(self) -> tuple[Path, ...]:
        """Config, vocabulary and weight files, in hashing order."""
        return (self.model_config, self.collator_config, self.vocab, self.weights)


def locate_checkpoint(path: str | Path) -> CheckpointFiles:
    """Find the files of a Tahoe-X1 checkpoint folder.

    Parameters
    ----------
    path
        The folder, or its weight file.

    Returns
    -------
    CheckpointFiles

    Raises
    ------
    CheckpointError
        If the folder or any required file is missing (the message names them).
    """
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name in WEIGHT_FILES.values():
        folder = folder.parent
    if not folder.is_dir():
        msg = (
            f"checkpoint folder {str(folder)!r} does not exist; pass --checkpoint DIR holding "
            f"{', '.join(CONFIG_FILES)} and model.safetensors"
        )
        raise CheckpointError(msg)
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    fmt: CheckpointFormat | None = None
    for candidate, name in WEIGHT_FILES.items():
        if (folder / name).is_file():
            fmt = candidate  # type: ignore[assignment]
            break
    if fmt is None:
        missing.append(" or ".join(WEIGHT_FILES.values()))
    if missing:
        msg = (
            f"checkpoint folder {str(folder)!r} is missing {', '.join(missing)}; a Tahoe-X1 checkpoint needs "
            f"{', '.join(CONFIG_FILES)} and model.safetensors (HF) or best-model.pt (Composer)"
        )
        raise CheckpointError(msg)
    assert fmt is not None
    return CheckpointFiles(
        folder=folder,
        model_config=folder / "model_config.yml",
        collator_config=folder / "collator_config.yml",
        vocab=folder / "vocab.json",
        weights=folder / WEIGHT_FILES[fmt],
        fmt=fmt,
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """Read an (OmegaConf-written) YAML mapping.

    Raises
    ------
    CheckpointError
        If the file does not parse to a mapping.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {path.name} in {str(path.parent)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} in {str(path.parent)!r} is not a YAML mapping")
    return data


def read_vocab(path: Path) -> dict[str, int]:
    """Read ``vocab.json`` (``{token: id}``).

    Raises
    ------
    CheckpointError
        If it is not a JSON object of integer ids or lacks ``<cls>``/``<pad>``.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read vocab.json in {str(path.parent)!r}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise CheckpointError(f"vocab.json in {str(path.parent)!r} must be a JSON object {{token: integer id}}")
    for token in ("<cls>", "<pad>"):
        if token not in data:
            raise CheckpointError(f"vocab.json in {str(path.parent)!r} lacks the special token {token!r}")
    return data


COMPOSER_MODULES: tuple[str, ...] = (
    "composer", "llmfoundry", "tahoe_x1", "mosaicfm", "omegaconf", "torchmetrics", "transformers",
    "streaming", "datetime", "pathlib", "numpy",
)
"""Packages whose classes a Composer training checkpoint pickles besides the weights (its
timestamp, run config, metrics, RNG state): read as inert placeholders, never imported."""


def _load_composer(path: Path) -> Mapping[str, torch.Tensor]:
    obj = safe_torch_load(path, inert_modules=COMPOSER_MODULES, mmap=True)
    try:
        state = obj["state"]["model"]
    except (KeyError, TypeError, IndexError):
        msg = f"{path.name} in {str(path.parent)!r} has no ['state']['model'] entry: not a Composer checkpoint"
        raise CheckpointError(msg) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name} in {str(path.parent)!r}: ['state']['model'] is not a state dict of tensors")
    return state


def read_state_dict(files: CheckpointFiles) -> dict[str, torch.Tensor]:
    """Read the weights and strip the ``model.`` prefix of ``ComposerTX``.

    Returns
    -------
    dict of str to torch.Tensor
        Keys as in ``TXModel.state_dict()``.

    Raises
    ------
    CheckpointError
        If the file cannot be read, or some keys carry the prefix and others do not.
    """
    if files.fmt == "hf":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Mapping[str, torch.Tensor] = load_file(str(files.weights), device="cpu")
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read model.safetensors in {str(files.folder)!r}: {exc}") from exc
    else:
        raw = _load_composer(files.weights)
    prefixed = [k.startswith("model.") for k in raw]
    if all(prefixed):
        return {k[len("model.") :]: v for k, v in raw.items()}
    if not any(prefixed):
        return dict(raw)
    odd = [k for k in raw if not k.startswith("model.")][:3]
    msg = f"{files.weights.name} in {str(files.folder)!r} mixes 'model.'-prefixed keys with others, e.g. {odd}"
    raise CheckpointError(msg)


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], *, where: str
) -> dict[str, torch.Tensor]:
    """Return the Tahoe-X1 encoder weights of ``state``, checked strictly (:func:`._common.check_state_dict_strict`).

    Keys outside the encoder must start with one of :data:`IGNORED_PREFIXES`; raises
    ``CheckpointError`` naming the first missing, misshapen or unexpected key(s).
    """
    return check_state_dict_strict(
        state, expected, subject=f"checkpoint {where}", model="Tahoe-X1", encoder="Tahoe-X1 encoder",
        ignored=IGNORED_PREFIXES, config_source="model_config.yml",
    )
