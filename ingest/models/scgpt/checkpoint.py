"""Locate and read scGPT checkpoint folders (``args.json``, ``vocab.json``, ``best_model.pt``).

The released scGPT models (whole-human and the organ models) are folders holding

* ``args.json``: the training arguments (``embsize``, ``nheads``, ``d_hid``, ``nlayers``,
  ``pad_token``, ``pad_value``, ...);
* ``vocab.json``: ``{gene symbol: id}`` with consecutive ids; the official loader
  (``scgpt.tasks.embed_data``) appends ``<pad>``, ``<cls>``, ``<eoc>`` when absent;
* ``best_model.pt``: a flat ``state_dict`` of ``scgpt.model.TransformerModel``. Models trained with
  flash-attention name the fused attention projection ``self_attn.Wqkv.*`` (flash-attn 1.x) or
  ``self_attn._impl.Wqkv.*`` / ``self_attn._impl.out_proj.*`` (the compatibility wrapper of the
  repository head); these are renamed to the ``torch.nn.MultiheadAttention`` names
  (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``) exactly as upstream ``load_pretrained``
  does: the layouts are identical (``[q; k; v]``, heads as ``(h d)``).

Unlike upstream (``load_pretrained(strict=False)`` silently drops every key whose name or shape
does not match), loading here is strict on the encoder and skips only an explicit allow-list of
heads (:data:`IGNORED_PATTERNS`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sclstore.store.errors import CheckpointError

from .._common import check_state_dict_strict
from ..safe_load import safe_torch_load

__all__ = [
    "IGNORED_PATTERNS",
    "RENAME_RULES",
    "REQUIRED_FILES",
    "SPECIAL_TOKENS",
    "ScGPTFiles",
    "check_state_dict",
    "guess_family",
    "locate_checkpoint",
    "read_args",
    "read_state_dict",
    "read_vocab",
    "rename_flash_keys",
]

logger = logging.getLogger(__name__)

REQUIRED_FILES: tuple[str, ...] = ("args.json", "vocab.json", "best_model.pt")
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>", "<eoc>")
"""Appended to the vocabulary, in this order, when absent (``embed_data``)."""

RENAME_RULES: tuple[tuple[str, str], ...] = (
    (r"self_attn\._impl\.Wqkv\.", "self_attn.in_proj_"),
    (r"self_attn\.Wqkv\.", "self_attn.in_proj_"),
    (r"self_attn\._impl\.out_proj\.", "self_attn.out_proj."),
)
"""Flash-attention parameter names -> ``nn.MultiheadAttention`` names (upstream ``load_pretrained``)."""

IGNORED_PATTERNS: tuple[str, ...] = (
    r"decoder\.",  # ExprDecoder (masked-value prediction)
    r"mvc_decoder\.",  # MVCDecoder (value prediction from the cell embedding)
    r"cls_decoder\.",  # ClsDecoder / SimDecoder (fine-tuned cell-type classifier)
    r"flag_encoder\.",  # generative-training flag embedding, unused by _encode
    r"batch_encoder\.",  # BatchLabelEncoder (use_batch_labels; off in embed_data)
    r"dsbn\.",  # DomainSpecificBatchNorm1d (off in embed_data)
    r"bn\.",  # BatchNorm1d of older releases, never applied in _encode
    r"grad_reverse_discriminator\.",  # AdversarialDiscriminator (do_dab)
    r"transformer_encoder\.layers\.\d+\.self_attn\.cross_attn\.",  # FlashscGPTMHA generative cross-attention
)
"""Checkpoint keys that are not part of the embedding path; skipped on load (anchored at the start)."""

_IGNORED_RE = re.compile("|".join(f"(?:{p})" for p in IGNORED_PATTERNS))

# file name sets that identify the other families' checkpoint folders
_FAMILY_MARKERS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("scgpt", (("args.json", "best_model.pt"),)),
    ("tahoe-x1", (("model_config.yml", "collator_config.yml"),)),
    ("scfoundation", (("models.ckpt",), ("OS_scRNA_gene_index.19264.tsv",))),
    ("geneformer", (("config.json", "model.safetensors"), ("config.json", "pytorch_model.bin"))),
)


@dataclass(frozen=True)
class ScGPTFiles:
    """The files of one scGPT checkpoint folder."""

    folder: Path
    args: Path
    vocab: Path
    weights: Path

    def all(self) -> tuple[Path, ...]:
        """Config, vocabulary and weight files, in hashing order."""
        return (self.args, self.vocab, self.weights)


def guess_family(folder: Path) -> str | None:
    """Return the model family a checkpoint folder looks like, from its file names (or None)."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return None
    for family, alternatives in _FAMILY_MARKERS:
        if any(all(n in names for n in files) for files in alternatives):
            return family
    if any(n.endswith(".ckpt") for n in names):
        return "scfoundation"
    if any("token_dictionary" in n and n.endswith(".pkl") for n in names):
        return "geneformer"
    return None


def locate_checkpoint(path: str | Path) -> ScGPTFiles:
    """Find the files of an scGPT checkpoint folder.

    Parameters
    ----------
    path
        The folder, or its ``best_model.pt``.

    Returns
    -------
    ScGPTFiles

    Raises
    ------
    CheckpointError
        If the folder or a required file is missing; when the folder looks like another
        family's checkpoint, the message says which ``--model`` to use.
    """
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name == "best_model.pt":
        folder = folder.parent
    if folder.is_file():
        other = "scfoundation" if folder.suffix == ".ckpt" else guess_family(folder.parent)
        hint = f"; it looks like a {other} checkpoint: use --model {other}" if other not in (None, "scgpt") else ""
        msg = (
            f"checkpoint {str(folder)!r} is a file; pass --checkpoint DIR, the scGPT folder holding "
            f"{', '.join(REQUIRED_FILES)}{hint}"
        )
        raise CheckpointError(msg)
    if not folder.is_dir():
        msg = (
            f"checkpoint folder {str(folder)!r} does not exist; pass --checkpoint DIR holding "
            f"{', '.join(REQUIRED_FILES)} (an scGPT model folder such as scGPT_human)"
        )
        raise CheckpointError(msg)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        other = guess_family(folder)
        if other is not None and other != "scgpt":
            msg = (
                f"checkpoint folder {str(folder)!r} looks like a {other} checkpoint, not scGPT "
                f"(it lacks {', '.join(missing)}): use --model {other}, or pass an scGPT folder"
            )
        else:
            msg = (
                f"checkpoint folder {str(folder)!r} is missing {', '.join(missing)}; an scGPT checkpoint "
                f"needs {', '.join(REQUIRED_FILES)}"
            )
        raise CheckpointError(msg)
    return ScGPTFiles(
        folder=folder, args=folder / "args.json", vocab=folder / "vocab.json", weights=folder / "best_model.pt"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path.name} in {str(path.parent)!r}: {exc}") from exc


def read_args(path: Path) -> dict[str, Any]:
    """Read ``args.json`` (a JSON object).

    Raises
    ------
    CheckpointError
        If the file does not parse to a JSON object.
    """
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"args.json in {str(path.parent)!r} is not a JSON object")
    return data


def read_vocab(path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """Read ``vocab.json`` and append the missing special tokens as the official loader does.

    The ids must be consecutive from 0 (upstream ``GeneVocab.from_dict`` requires it); each absent
    token of :data:`SPECIAL_TOKENS` gets the next id, in order.

    Returns
    -------
    tuple of (dict of str to int, tuple of str)
        The vocabulary and the special tokens that were appended.

    Raises
    ------
    CheckpointError
        If it is not a JSON object of integer ids, or the ids are not ``0..n-1``.
    """
    data = _read_json(path)
    where = f"vocab.json in {str(path.parent)!r}"
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise CheckpointError(f"{where} must be a JSON object {{gene symbol: integer id}}")
    if sorted(data.values()) != list(range(len(data))):
        n = len(data)
        msg = f"{where} must map its {n} tokens to the consecutive ids 0..{n - 1} (as scGPT's GeneVocab requires)"
        raise CheckpointError(msg)
    vocab = dict(data)
    added = tuple(tok for tok in SPECIAL_TOKENS if tok not in vocab)
    for tok in added:
        vocab[tok] = len(vocab)
    if added:
        logger.debug("appended special tokens %s to %s", added, where)
    return vocab, added


def read_state_dict(files: ScGPTFiles) -> dict[str, torch.Tensor]:
    """Read ``best_model.pt`` (a flat state dict) on the CPU, without running code (:mod:`.safe_load`).

    Raises
    ------
    CheckpointError
        If the file cannot be read or is not a mapping of names to tensors.
    """
    obj = safe_torch_load(files.weights)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        msg = (
            f"best_model.pt in {str(files.folder)!r} is not a flat state dict (torch.save(model.state_dict())) "
            "as released scGPT models are"
        )
        raise CheckpointError(msg)
    return {str(k): v for k, v in obj.items()}


def rename_flash_keys(state: Mapping[str, torch.Tensor], *, where: str) -> dict[str, torch.Tensor]:
    """Rename flash-attention attention keys to the ``nn.MultiheadAttention`` names.

    Raises
    ------
    CheckpointError
        If two keys map to the same name (e.g. both ``Wqkv`` and ``in_proj`` weights).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in RENAME_RULES:
            new = re.sub(pattern, repl, new)
        if new in out:
            raise CheckpointError(f"checkpoint {where} holds {new!r} twice (flash-attention and torch names)")
        out[new] = value
    return out


def _flash_hint(key: str) -> str:
    if key.endswith("self_attn.in_proj_weight") or key.endswith("self_attn.in_proj_bias"):
        flash = key.replace("self_attn.in_proj_", "self_attn.Wqkv.")
        return f" (named {flash!r} in flash-attention checkpoints)"
    return ""


def _shape_source(key: str) -> str:
    return "vocab.json (with the appended specials)" if key == "encoder.embedding.weight" else "args.json"


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], *, where: str
) -> dict[str, torch.Tensor]:
    """Check a renamed checkpoint (:func:`rename_flash_keys`) strictly; return the encoder weights.

    Keys outside the encoder must match one of :data:`IGNORED_PATTERNS`; a missing attention
    weight names its flash-attention spelling. See :func:`._common.check_state_dict_strict`.
    """
    heads = "decoder, mvc_decoder, cls_decoder, flag_encoder, batch_encoder, dsbn, bn, grad_reverse_discriminator"
    return check_state_dict_strict(
        state, expected, subject=f"checkpoint {where}", model="an scGPT TransformerModel",
        encoder="scGPT encoder (encoder, value_encoder, transformer_encoder)", ignored=_IGNORED_RE,
        ignored_heads=heads, config_source=_shape_source, mismatch="the files do not belong together",
        key_hint=_flash_hint,
    )
