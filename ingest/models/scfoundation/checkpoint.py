"""Locate and read scFoundation checkpoints (the official ``models.ckpt``).

The released file (``model/models/models.ckpt``, downloaded per ``model/models/download.txt``
of ``biomap-research/scFoundation``) is a ``torch.save`` dict with three sub-models, ``cell``
(cell embeddings), ``rde`` (read-depth enhancement) and ``gene`` (gene embeddings), each
``{"config": ..., "state_dict": {"model.<key>": tensor}}``. The official loader
(``model/load.py``: ``load_model_frommmf`` + ``convertconfig``) picks one sub-model, flattens
``config["model_config"][config["model"]]`` and ``config["dataset_config"]["rnaseq"]`` into one
dict and strips ``model.`` from the keys; so does this module.

The gene list is the packaged official one unless the checkpoint folder holds its own
``OS_scRNA_gene_index*.tsv`` (the official file name), which then takes precedence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sclstore.store.errors import CheckpointError, InvalidInputError

from .._common import check_state_dict_strict
from ..safe_load import safe_torch_load

__all__ = [
    "CKPT_NAME",
    "GENE_INDEX_GLOB",
    "IGNORED_PREFIXES",
    "CheckpointFiles",
    "check_state_dict",
    "family_hint",
    "flatten_config",
    "locate_checkpoint",
    "open_checkpoint",
    "read_state_dict",
    "select_sub_model",
    "sub_model_names",
]

logger = logging.getLogger(__name__)

CKPT_NAME = "models.ckpt"
GENE_INDEX_GLOB = "OS_scRNA_gene_index*.tsv"
IGNORED_PREFIXES: tuple[str, ...] = ("decoder.", "decoder_embed.", "norm.", "to_final.")
"""Parts of ``MaeAutobin`` the encoder does not use (performer decoder and the value head)."""

_OTHER_SUFFIXES = frozenset({".safetensors", ".json", ".yml", ".yaml", ".pkl"})
_OTHER_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tahoe-x1", ("model_config.yml", "collator_config.yml")),
    ("scgpt", ("args.json",)),
    ("scgpt", ("best_model.pt",)),
    ("geneformer", ("config.json",)),
)


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one scFoundation checkpoint."""

    folder: Path
    weights: Path
    gene_list: Path | None
    """The folder's own gene list, or None for the packaged official list."""


def family_hint(folder: Path) -> str | None:
    """Name the model family a folder looks like (by its file names), or None."""
    if not folder.is_dir():
        return None
    names = {p.name for p in folder.iterdir()}
    for family, needed in _OTHER_FAMILIES:
        if all(n in names for n in needed):
            if family == "geneformer" and not (names & {"model.safetensors", "pytorch_model.bin"}):
                continue
            return family
    return None


def _not_scfoundation(path: Path, what: str) -> CheckpointError:
    folder = path if path.is_dir() else path.parent
    family = family_hint(folder)
    hint = f"; the folder looks like a {family} checkpoint: use --model {family}" if family else ""
    fix = hint or f"; pass scFoundation's {CKPT_NAME} (its model/models/ folder)"
    msg = f"{what}: not an scFoundation checkpoint (expected {CKPT_NAME} with 'cell'/'rde'/'gene' sub-models){fix}"
    return CheckpointError(msg)


def locate_checkpoint(path: str | Path) -> CheckpointFiles:
    """Find ``models.ckpt`` and an optional gene list for ``path`` (the folder or the file).

    Raises
    ------
    CheckpointError
        If the path does not exist, holds no ``models.ckpt`` (naming the family it looks like,
        if any), or holds several gene lists.
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix in _OTHER_SUFFIXES or p.name in {"best_model.pt", "pytorch_model.bin"}:
            raise _not_scfoundation(p, f"checkpoint file {str(p)!r}")
        folder, weights = p.parent, p
    elif p.is_dir():
        folder, weights = p, p / CKPT_NAME
        if not weights.is_file():
            nested = p / "models" / CKPT_NAME
            if nested.is_file():
                weights = nested
            elif family_hint(p) is not None:
                raise _not_scfoundation(p, f"checkpoint folder {str(p)!r}")
            else:
                msg = (
                    f"checkpoint folder {str(p)!r} is missing {CKPT_NAME}; pass the folder holding the official "
                    f"{CKPT_NAME} (scFoundation's model/models/) or the file itself"
                )
                raise CheckpointError(msg)
    else:
        msg = f"checkpoint {str(p)!r} does not exist; pass the folder holding {CKPT_NAME} or the file itself"
        raise CheckpointError(msg)
    lists = sorted({*folder.glob(GENE_INDEX_GLOB), *weights.parent.glob(GENE_INDEX_GLOB)})
    if len(lists) > 1:
        names = ", ".join(x.name for x in lists)
        raise CheckpointError(f"checkpoint folder {str(folder)!r} holds several gene lists ({names}); keep one")
    return CheckpointFiles(folder=folder, weights=weights, gene_list=lists[0] if lists else None)


def open_checkpoint(path: Path) -> Mapping[str, Any]:
    """``torch.load`` the checkpoint memory-mapped: configs are read, tensor data stay on disk.

    Read with ``weights_only=True`` (:mod:`.safe_load`): a file whose pickle needs objects other
    than tensors, plain containers, numpy data and ``argparse.Namespace`` is refused (never
    executed); legacy (non-zip) files are read without memory-mapping.

    Raises
    ------
    CheckpointError
        If the file cannot be read, needs arbitrary objects, or is not a dict.
    """
    where = f"{path.name} in {str(path.parent)!r}"
    obj = safe_torch_load(path, mmap=True)
    if not isinstance(obj, Mapping):
        raise _not_scfoundation(path, f"{where} holds a {type(obj).__name__}")
    return obj


def sub_model_names(ckpt: Mapping[str, Any]) -> list[str]:
    """Sorted names of the entries that look like sub-models (``{"config", "state_dict", ...}``)."""
    return sorted(str(k) for k, v in ckpt.items() if isinstance(v, Mapping) and {"config", "state_dict"} <= set(v))


def select_sub_model(ckpt: Mapping[str, Any], sub_model: str, *, path: Path) -> Mapping[str, Any]:
    """Return ``ckpt[sub_model]`` after checking its structure.

    Raises
    ------
    CheckpointError
        If the file is not a dict of ``{"config", "state_dict"}`` sub-models.
    InvalidInputError
        If ``sub_model`` is not one of them (the message lists those available).
    """
    subs = sub_model_names(ckpt)
    if not subs:
        keys = sorted(map(str, ckpt))[:8]
        raise _not_scfoundation(path, f"{path.name} has top-level keys {keys}")
    if sub_model not in ckpt or sub_model not in subs:
        msg = f"sub-model {sub_model!r} is not in {path.name}; available: {', '.join(subs)} (cell = cell embeddings)"
        raise InvalidInputError(msg)
    return ckpt[sub_model]


def flatten_config(sub: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Flatten a sub-model config as the official ``convertconfig``.

    ``{**config["model_config"][config["model"]], **config["dataset_config"]["rnaseq"],
    "model_type": config["model"], "pos_embed": False}``.

    Raises
    ------
    CheckpointError
        If the nested keys are missing.
    """
    cfg = sub["config"]
    try:
        model_type = cfg["model"]
        model_cfg = cfg["model_config"][model_type]
        data_cfg = cfg.get("dataset_config", {}).get("rnaseq", {}) or {}
    except (KeyError, TypeError, AttributeError) as exc:
        msg = f"{where}: config lacks {exc} (expected config['model'], config['model_config'][model])"
        raise CheckpointError(msg) from None
    flat: dict[str, Any] = {**dict(model_cfg), **dict(data_cfg)}
    flat["model_type"] = "performer_gau" if model_type == "performergau_resolution" else model_type
    flat["pos_embed"] = False
    return flat


def read_state_dict(sub: Mapping[str, Any], *, where: str) -> dict[str, torch.Tensor]:
    """Strip ``model.`` from the sub-model's keys (official ``convertconfig``).

    Raises
    ------
    CheckpointError
        If a key lacks the prefix or a value is not a tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sub["state_dict"].items():
        key = str(key)
        if not key.startswith("model."):
            msg = f"{where}: state_dict key {key!r} lacks the 'model.' prefix of scFoundation checkpoints"
            raise CheckpointError(msg)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("model.") :]] = value
    return out


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], *, where: str
) -> dict[str, torch.Tensor]:
    """Check a sub-model's weights against the encoder strictly; return the encoder's weights.

    The decoder and value head (:data:`IGNORED_PREFIXES`) are skipped; anything else missing,
    misshapen or unexpected is a ``CheckpointError`` (:func:`._common.check_state_dict_strict`).
    """
    return check_state_dict_strict(
        state, expected, subject=where, model="scFoundation", encoder="scFoundation encoder",
        ignored=IGNORED_PREFIXES, config_source="the checkpoint config", skipped="parts",
    )
