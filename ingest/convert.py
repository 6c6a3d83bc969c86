"""``sclstore convert-checkpoint``: rewrite a trusted pickle checkpoint as plain tensors + config.

sclstore never runs code from a checkpoint (:mod:`sclstore.ingest.models.safe_load`). A file
whose pickle needs arbitrary objects is refused; if the user trusts it, this module unpickles
it **once**, with Python's full unpickler, and writes a copy that holds only tensors and plain
data, in a layout sclstore reads with ``weights_only=True``:

* Tahoe-X1 Composer ``best-model.pt`` -> the Hugging Face layout: ``model.safetensors``
  (``["state"]["model"]``) + ``model_config.yml``, ``collator_config.yml``, ``vocab.json``;
* scGPT ``best_model.pt`` -> a flat state dict of tensors (``torch.save``) + ``args.json``,
  ``vocab.json``;
* scFoundation ``models.ckpt`` -> the same ``{sub_model: {"config", "state_dict"}}`` dict with
  configs reduced to JSON data (``argparse.Namespace`` -> dict, numpy scalars -> numbers),
  plus the folder's gene list.

The full unpickler runs only when the caller passes ``trust_pickle=True`` (``--trust-pickle``).
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sclstore.store.errors import CheckpointError, InvalidInputError

from .models.scfoundation import checkpoint as sfc
from .models.scgpt import checkpoint as sgc
from .models.tahoe import checkpoint as txc

__all__ = ["FAMILIES", "convert_checkpoint"]

logger = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("tahoe-x1", "scgpt", "scfoundation")

_REFUSE = (
    "convert-checkpoint unpickles {src} with Python's full unpickler, which runs any code the file holds: "
    "do this only for a file from a source you trust, and say so with --trust-pickle"
)


class _Placeholder:
    """Stand-in for classes of packages that are not installed (e.g. composer's Timestamp)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


class _TrustedUnpickler(pickle.Unpickler):
    """The full unpickler (the user vouched for the file); missing classes become placeholders."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            logger.debug("%s.%s is not importable; using a placeholder", module, name)
            return type(name, (_Placeholder,), {"__module__": module})


_trusted_pickle = types.ModuleType("sclstore_trusted_pickle")
_trusted_pickle.Unpickler = _TrustedUnpickler  # type: ignore[attr-defined]
_trusted_pickle.load = pickle.load  # type: ignore[attr-defined]
_trusted_pickle.__dict__["UnpicklingError"] = pickle.UnpicklingError


def _trusted_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_trusted_pickle)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot unpickle {path.name} in {str(path.parent)!r}: {type(exc).__name__}: {first}") from None


def _plain(obj: Any, where: str) -> Any:
    """JSON data of a config value (Namespace -> dict, numpy -> numbers); anything else is an error."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, where) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        return _plain(vars(obj), where)
    if isinstance(obj, (list, tuple)):
        return [_plain(v, where) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise CheckpointError(f"{where}: config value of type {type(obj).__name__} is not plain data; cannot convert it")


def _tensors(state: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where} is not a state dict of tensors; cannot convert it")
    return {str(k): v.detach().clone().contiguous() for k, v in state.items()}


def _family(src: Path, family: str | None) -> str:
    if family is not None:
        if family not in FAMILIES:
            raise InvalidInputError(f"--model {family!r} has no pickle checkpoints to convert; choose {', '.join(FAMILIES)}")
        return family
    folder = src if src.is_dir() else src.parent
    if src.is_file() and src.suffix == ".ckpt":
        return "scfoundation"
    guess = sgc.guess_family(folder)
    if guess not in FAMILIES:
        raise InvalidInputError(f"cannot tell which model family {str(src)!r} belongs to: pass --model {'|'.join(FAMILIES)}")
    return guess  # type: ignore[return-value]


def convert_checkpoint(src: str | Path, dst: str | Path, *, trust_pickle: bool, family: str | None = None) -> dict[str, Any]:
    """Rewrite a pickle checkpoint as tensors + plain config in a layout sclstore loads safely.

    Parameters
    ----------
    src
        The checkpoint folder (or its weight file).
    dst
        A new (or empty) folder for the converted checkpoint.
    trust_pickle
        Must be True: the source is unpickled with the full unpickler, which can run code.
    family
        ``tahoe-x1``, ``scgpt`` or ``scfoundation``; guessed from the file names when None.

    Returns
    -------
    dict
        ``family``, ``source``, ``destination``, ``tensors`` (number written) and ``files``.

    Raises
    ------
    InvalidInputError
        Without ``trust_pickle``, when ``dst`` is not empty, or the family cannot be told.
    CheckpointError
        If the source cannot be unpickled or holds no state dict.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not trust_pickle:
        raise InvalidInputError(_REFUSE.format(src=repr(str(src))))
    if not src.exists():
        raise InvalidInputError(f"checkpoint {str(src)!r} does not exist")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InvalidInputError(f"destination {str(dst)!r} exists and is not an empty folder: pass a new folder")
    fam = _family(src, family)
    tmp = dst.with_name(f".{dst.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n = {"tahoe-x1": _tahoe, "scgpt": _scgpt, "scfoundation": _scfoundation}[fam](src, tmp)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in dst.iterdir())
    logger.info("converted %s checkpoint %s -> %s (%d tensors)", fam, src, dst, n)
    return {"family": fam, "source": str(src), "destination": str(dst), "tensors": n, "files": files}


def _tahoe(src: Path, out: Path) -> int:
    from safetensors.torch import save_file

    files = txc.locate_checkpoint(src)
    if files.fmt == "hf":
        raise InvalidInputError(f"{str(files.folder)!r} is already in the safe HF layout (model.safetensors): nothing to convert")
    obj = _trusted_load(files.weights)
    try:
        state = obj["state"]["model"]
    except (KeyError, TypeError, IndexError):
        raise CheckpointError(f"{files.weights.name} has no ['state']['model'] entry: not a Composer checkpoint") from None
    tensors = _tensors(state, f"{files.weights.name} ['state']['model']")
    save_file(tensors, str(out / txc.WEIGHT_FILES["hf"]), metadata={"format": "pt", "converted_from": files.weights.name})
    for name in txc.CONFIG_FILES:
        shutil.copy2(files.folder / name, out / name)
    return len(tensors)


def _scgpt(src: Path, out: Path) -> int:
    files = sgc.locate_checkpoint(src)
    obj = _trusted_load(files.weights)
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next((obj[k] for k in ("model_state_dict", "state_dict", "model") if isinstance(obj.get(k), Mapping)), obj)
    tensors = _tensors(obj, files.weights.name)
    torch.save(tensors, out / files.weights.name)
    for path in (files.args, files.vocab):
        shutil.copy2(path, out / path.name)
    return len(tensors)


def _scfoundation(src: Path, out: Path) -> int:
    files = sfc.locate_checkpoint(src)
    obj = _trusted_load(files.weights)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{files.weights.name} holds a {type(obj).__name__}, not scFoundation's dict of sub-models")
    payload: dict[str, Any] = {}
    n = 0
    for name, sub in obj.items():
        if not (isinstance(sub, Mapping) and {"config", "state_dict"} <= set(sub)):
            logger.info("dropping top-level entry %r of %s (not a sub-model)", name, files.weights.name)
            continue
        where = f"{files.weights.name} [{name!r}]"
        tensors = _tensors(sub["state_dict"], f"{where}['state_dict']")
        payload[str(name)] = {"config": _plain(sub["config"], where), "state_dict": tensors}
        n += len(tensors)
    if not payload:
        raise CheckpointError(f"{files.weights.name} has no {{'config', 'state_dict'}} sub-models: not an scFoundation checkpoint")
    json.dumps({k: v["config"] for k, v in payload.items()})  # plain data, checked
    torch.save(payload, out / sfc.CKPT_NAME)
    if files.gene_list is not None:
        shutil.copy2(files.gene_list, out / files.gene_list.name)
    return n
