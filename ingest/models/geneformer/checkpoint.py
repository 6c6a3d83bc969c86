"""Locate and read Geneformer checkpoint folders (HF model files + the release's two pickles).

One folder holds the Hugging Face model files (``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``, as written by ``BertForMaskedLM.save_pretrained``) and the two
dictionaries of the matching Geneformer release, found by name: ``*token_dictionary*.pkl``
(``{Ensembl id: token id}`` plus special tokens) and ``*gene_median*.pkl`` (``{Ensembl id:
non-zero median expression}``). The version follows from the token dictionary: without
``<cls>`` it is V1 (``<pad>``/``<mask>`` only, no special tokens in the input), with
``<cls>`` and ``<eos>`` it is V2 (``<cls>`` + genes + ``<eos>``). Facts:
``research/models.md`` §4.

The pickles are read with a restricted unpickler that only rebuilds plain containers and numpy
scalars, so a checkpoint folder cannot run code when it is opened.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sclstore.store.errors import CheckpointError

from .._common import check_state_dict_strict
from ..safe_load import safe_torch_load

__all__ = [
    "IGNORED_PREFIXES",
    "WEIGHT_FILES",
    "GeneformerDicts",
    "GeneformerFiles",
    "check_state_dict",
    "foreign_family",
    "locate_checkpoint",
    "read_config",
    "read_dictionaries",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
"""Weight files of an HF folder, in order of preference."""
TOKEN_GLOB = "*token_dictionary*.pkl"
MEDIAN_GLOB = "*gene_median*.pkl"
MAPPING_GLOB = "*ensembl_mapping_dict*.pkl"
"""The release's Ensembl mapping (collapse) dictionary, e.g. ``ensembl_mapping_dict_gc104M.pkl``
(V2) or ``ensembl_mapping_dict_gc30M.pkl`` (V1); optional, applied as the official tokenizer does."""
IGNORED_PREFIXES: tuple[str, ...] = (
    "cls.",
    "pooler.",
    "classifier.",
    "embeddings.position_ids",
    "embeddings.token_type_ids",
)
"""Keys (after removing ``bert.``) outside the encoder that are skipped on load: the MLM head
(``cls.predictions.*``), the pooler and classifier heads of fine-tuned models, and the
``position_ids``/``token_type_ids`` buffers that older transformers versions saved."""

_SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")
Version = Literal["V1", "V2"]


@dataclass(frozen=True)
class GeneformerFiles:
    """The files of one Geneformer checkpoint folder."""

    folder: Path
    config: Path
    weights: Path
    token_dictionary: Path
    gene_median: Path
    ensembl_mapping: Path | None = None

    @property
    def fmt(self) -> str:
        """``"safetensors"`` or ``"bin"``."""
        return "safetensors" if self.weights.suffix == ".safetensors" else "bin"

    def all(self) -> tuple[Path, ...]:
        """Config, weight and dictionary files, in hashing order."""
        extra = (self.ensembl_mapping,) if self.ensembl_mapping is not None else ()
        return (self.config, self.weights, self.token_dictionary, self.gene_median, *extra)


def foreign_family(folder: Path) -> str | None:
    """Return the model family a folder looks like when it is not a Geneformer folder, else None."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if {"model_config.yml", "collator_config.yml"} <= names:
        return "tahoe-x1 (model_config.yml, collator_config.yml): use --model tahoe-x1"
    if "args.json" in names or "best_model.pt" in names:
        return "scGPT (args.json, best_model.pt): use --model scgpt"
    if "models.ckpt" in names or any(n.endswith(".ckpt") for n in names):
        return "scFoundation (models.ckpt): use --model scfoundation"
    return None


def _one(folder: Path, pattern: str, what: str) -> Path | None:
    hits = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(hits) > 1:
        msg = (
            f"checkpoint folder {str(folder)!r} has several {what} files ({', '.join(p.name for p in hits)}); "
            "keep only the one of the release that matches the model weights"
        )
        raise CheckpointError(msg)
    return hits[0] if hits else None


def locate_checkpoint(path: str | Path) -> GeneformerFiles:
    """Find the files of a Geneformer checkpoint folder.

    Parameters
    ----------
    path
        The folder, or its ``config.json`` / weight file.

    Returns
    -------
    GeneformerFiles

    Raises
    ------
    CheckpointError
        If the folder does not exist, looks like another family's checkpoint, lacks a file
        (the message names each missing one) or holds several candidate dictionaries.
    """
    folder = Path(path).expanduser()
    if folder.is_file() and (folder.name in WEIGHT_FILES or folder.name == "config.json"):
        folder = folder.parent
    if not folder.is_dir():
        msg = (
            f"checkpoint folder {str(folder)!r} does not exist; pass --checkpoint DIR holding config.json, "
            f"model.safetensors (or pytorch_model.bin), {TOKEN_GLOB} and {MEDIAN_GLOB}"
        )
        raise CheckpointError(msg)
    if not (folder / "config.json").is_file():
        other = foreign_family(folder)
        if other is not None:
            msg = f"checkpoint folder {str(folder)!r} is not a Geneformer checkpoint: it looks like {other}"
            raise CheckpointError(msg)
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    tokens = _one(folder, TOKEN_GLOB, "token dictionary")
    medians = _one(folder, MEDIAN_GLOB, "gene median")
    ens_map = _one(folder, MAPPING_GLOB, "Ensembl mapping dictionary")
    if ens_map is None:
        logger.warning(
            "no %s next to the checkpoint in %r: dataset ids are matched to the token dictionary as they are "
            "(the official tokenizer would apply the release's Ensembl mapping dictionary)", MAPPING_GLOB, str(folder),
        )
    missing = [
        name
        for name, found in (
            ("config.json", (folder / "config.json").is_file()),
            ("model.safetensors or pytorch_model.bin", weights is not None),
            (f"the token dictionary ({TOKEN_GLOB})", tokens is not None),
            (f"the gene median dictionary ({MEDIAN_GLOB})", medians is not None),
        )
        if not found
    ]
    if missing:
        msg = (
            f"Geneformer checkpoint folder {str(folder)!r} is missing {', '.join(missing)}; put the HF model files "
            "and the token dictionary and gene median .pkl files of the same release in one folder"
        )
        raise CheckpointError(msg)
    assert weights is not None and tokens is not None and medians is not None
    return GeneformerFiles(
        folder=folder, config=folder / "config.json", weights=weights, token_dictionary=tokens, gene_median=medians,
        ensembl_mapping=ens_map,
    )


def read_config(files: GeneformerFiles) -> dict[str, Any]:
    """Read ``config.json`` and check that it describes a BERT encoder.

    Raises
    ------
    CheckpointError
        If the file does not parse, or the model is not a (supported) BERT.
    """
    try:
        cfg = json.loads(files.config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read config.json in {str(files.folder)!r}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json in {str(files.folder)!r} is not a JSON object")
    model_type = cfg.get("model_type")
    if model_type != "bert":
        msg = (
            f"config.json in {str(files.folder)!r} has model_type {model_type!r}, but Geneformer is a BERT "
            "('bert'); pass the folder of a Geneformer release"
        )
        raise CheckpointError(msg)
    return cfg


class _SafeUnpickler(pickle.Unpickler):
    """Rebuild only builtin containers and numpy scalars (no code runs)."""

    _ALLOWED = {  # noqa: RUF012 (read-only allow-list)
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dictionary pickle")


def _load_pickle(path: Path) -> Any:
    try:
        return _SafeUnpickler(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        msg = f"cannot read {path.name} in {str(path.parent)!r} as a plain dictionary pickle: {exc}"
        raise CheckpointError(msg) from exc


@dataclass(frozen=True)
class GeneformerDicts:
    """The token and gene-median dictionaries of one release.

    Attributes
    ----------
    tokens
        ``{token: id}`` including the special tokens.
    medians
        ``{Ensembl id: median}`` as stored (python or numpy floats: upstream's
        ``norm_factor_vector`` takes numpy's dtype of them).
    version
        ``"V1"`` (no ``<cls>``) or ``"V2"`` (``<cls>`` and ``<eos>``).
    ensembl_mapping
        ``{Ensembl id: Ensembl id}`` of the release's mapping dictionary, or None.
    """

    tokens: dict[str, int]
    medians: dict[str, Any]
    version: Version
    ensembl_mapping: dict[str, str] | None = None

    @property
    def genes(self) -> dict[str, int]:
        """``{Ensembl id: token id}`` of the genes that have both a token and a median."""
        return {g: t for g, t in self.tokens.items() if g not in _SPECIALS and g in self.medians}


def read_dictionaries(files: GeneformerFiles) -> GeneformerDicts:
    """Read and validate the token and gene-median dictionaries; decide V1 vs V2.

    Raises
    ------
    CheckpointError
        If a pickle is not a dictionary of the expected kind, ids repeat, ``<pad>`` is missing,
        only one of ``<cls>``/``<eos>`` is present, a median is not a positive finite number, or
        no gene has both a token and a median.
    """
    raw_tokens = _load_pickle(files.token_dictionary)
    raw_medians = _load_pickle(files.gene_median)
    name_t, name_m = files.token_dictionary.name, files.gene_median.name
    if not isinstance(raw_tokens, Mapping) or not raw_tokens:
        raise CheckpointError(f"{name_t} is not a non-empty dictionary {{Ensembl id: token id}}")
    if not isinstance(raw_medians, Mapping) or not raw_medians:
        raise CheckpointError(f"{name_m} is not a non-empty dictionary {{Ensembl id: median}}")
    try:
        tokens = {str(k): int(v) for k, v in raw_tokens.items()}
        medians = {str(k): v for k, v in raw_medians.items()}
        for v in medians.values():
            float(v)
    except (TypeError, ValueError) as exc:
        msg = f"{name_t} / {name_m} must map gene ids to integer token ids / numeric medians: {exc}"
        raise CheckpointError(msg) from exc
    if len(set(tokens.values())) != len(tokens):
        raise CheckpointError(f"{name_t} maps several tokens to the same id; it is not a Geneformer token dictionary")
    if "<pad>" not in tokens:
        raise CheckpointError(f"{name_t} lacks the '<pad>' token; it is not a Geneformer token dictionary")
    has_cls, has_eos = "<cls>" in tokens, "<eos>" in tokens
    if has_cls != has_eos:
        msg = f"{name_t} has {'<cls>' if has_cls else '<eos>'} but not {'<eos>' if has_cls else '<cls>'}; V2 needs both"
        raise CheckpointError(msg)
    bad = next((g for g, m in medians.items() if not (math.isfinite(float(m)) and float(m) > 0)), None)
    if bad is not None:
        raise CheckpointError(f"{name_m}: the median of {bad!r} is {medians[bad]!r}; medians must be positive numbers")
    dicts = GeneformerDicts(tokens=tokens, medians=medians, version="V2" if has_cls else "V1",
                            ensembl_mapping=_read_mapping(files.ensembl_mapping))
    n_genes = len(dicts.genes)
    if n_genes == 0:
        msg = f"no gene of {name_t} has a median in {name_m}; the two dictionaries are not of the same release"
        raise CheckpointError(msg)
    n_tok = sum(1 for g in tokens if g not in _SPECIALS)
    if n_genes < n_tok:
        missing = n_tok - n_genes
        logger.warning("%d of %d genes of %s have no median in %s; they are ignored", missing, n_tok, name_t, name_m)
    return dicts


def _read_mapping(path: Path | None) -> dict[str, str] | None:
    """The Ensembl mapping dictionary (``{id: id}``; non-string values are never matched), or None."""
    if path is None:
        return None
    raw = _load_pickle(path)
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(f"{path.name} is not a non-empty dictionary {{Ensembl id: Ensembl id}}")
    return {str(k): v for k, v in raw.items() if isinstance(v, str)}


def _fix_key(key: str) -> str:
    # very old BERT checkpoints name LayerNorm parameters gamma/beta (transformers renames them too)
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def read_state_dict(files: GeneformerFiles) -> dict[str, torch.Tensor]:
    """Read the weights and strip the ``bert.`` prefix of ``BertForMaskedLM`` saves.

    ``BertModel`` saves carry no prefix. Head keys (``cls.*``, ``classifier.*``) keep their
    names and are dropped later by :func:`check_state_dict`.

    Raises
    ------
    CheckpointError
        If the file cannot be read.
    """
    path = files.weights
    try:
        if files.fmt == "safetensors":
            from safetensors.torch import load_file

            raw: Mapping[str, torch.Tensor] = load_file(str(path), device="cpu")
        else:
            raw = safe_torch_load(path)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {path.name} in {str(files.folder)!r}: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path.name} in {str(files.folder)!r} does not hold a state dict")
    prefixed = any(k.startswith("bert.") for k in raw)
    return {_fix_key(k[len("bert.") :] if prefixed and k.startswith("bert.") else k): v for k, v in raw.items()}


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], *, where: str
) -> dict[str, torch.Tensor]:
    """Return the BERT encoder weights of ``state`` (``bert.`` stripped), checked strictly.

    Other keys must start with one of :data:`IGNORED_PREFIXES`. See
    :func:`._common.check_state_dict_strict` (``CheckpointError`` naming the first bad key).
    """
    return check_state_dict_strict(
        state, expected, subject=f"checkpoint {where}", model="a Geneformer BERT", encoder="BERT encoder",
        ignored=IGNORED_PREFIXES, config_source="config.json",
    )
