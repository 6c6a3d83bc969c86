"""Read ``torch.save`` checkpoints without running code from them.

Every torch checkpoint a family reads (Tahoe-X1 ``best-model.pt``, scGPT ``best_model.pt``,
scFoundation ``models.ckpt``, Geneformer ``pytorch_model.bin``) goes through
:func:`safe_torch_load`, which always uses ``torch.load(weights_only=True)``: the pickle may
only build tensors, plain containers and numbers. On top of torch's own allow-list it accepts

* numpy arrays, dtypes and scalars (:data:`NUMPY_DATA`, data only) and ``argparse.Namespace``;
* *inert placeholders* for classes of the modules a family names (e.g. Composer's
  ``composer.core.time.Timestamp`` in a Tahoe-X1 training checkpoint): nothing is imported,
  the placeholder only stores the pickled arguments, and sclstore never reads it.

Any other global (``os.system``, ``builtins.eval``, a class of an unknown package) is refused
with a one-line :class:`~sclstore.store.errors.CheckpointError` that names the file and the fix,
``sclstore convert-checkpoint SRC DST --trust-pickle`` (:mod:`sclstore.ingest.convert`).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sclstore.store.errors import CheckpointError

__all__ = ["NUMPY_DATA", "Inert", "convert_hint", "safe_torch_load", "unsafe_globals_message"]

logger = logging.getLogger(__name__)

def _numpy_data() -> dict[str, Any]:
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    ma = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"] = ma._reconstruct
        out[f"{mod}.scalar"] = ma.scalar
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            out[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    out["argparse.Namespace"] = argparse.Namespace
    return out


NUMPY_DATA: dict[str, Any] = _numpy_data()
"""Real objects allowed by name: numpy array/scalar reconstruction (data only) and ``argparse.Namespace``."""

_UNSUPPORTED_RE = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


class Inert:
    """Placeholder for a class sclstore does not import: it only keeps what the pickle gave it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<inert {type(self).__module__}.{type(self).__qualname__}>"


def convert_hint(path: Path) -> str:
    """The fix for a checkpoint that needs arbitrary objects."""
    return (
        f"if you trust this file, convert it once with `sclstore convert-checkpoint {str(path)!r} DST --trust-pickle` "
        "and pass --checkpoint DST"
    )


def unsafe_globals_message(path: Path, names: Iterable[str]) -> str:
    """One line: the file, the objects its pickle needs, why that is refused, and the fix."""
    names = sorted(names)
    shown = ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")
    return (
        f"refusing to load {path.name} in {str(path.parent)!r}: its pickle needs {shown}, and unpickling "
        f"arbitrary objects can run code (sclstore reads only tensors and plain data); {convert_hint(path)}"
    )


def _placeholder(name: str) -> type[Inert]:
    module, _, qual = name.rpartition(".")
    return type(qual or name, (Inert,), {"__module__": module or "?"})


def _resolve(names: Iterable[str], inert_modules: tuple[str, ...], path: Path) -> list[tuple[Any, str]]:
    allowed: list[tuple[Any, str]] = []
    refused: list[str] = []
    for name in names:
        if name in NUMPY_DATA:
            allowed.append((NUMPY_DATA[name], name))
        elif name.split(".", 1)[0] in inert_modules:
            allowed.append((_placeholder(name), name))
        else:
            refused.append(name)
    if refused:
        raise CheckpointError(unsafe_globals_message(path, refused))
    return allowed


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def safe_torch_load(path: Path, *, inert_modules: tuple[str, ...] = (), mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with the extra allow-list described in the module.

    Parameters
    ----------
    path
        The checkpoint file.
    inert_modules
        Top-level module names (``"composer"``) whose classes become inert placeholders.
    mmap
        Memory-map tensor data (zip-format files only; ignored for legacy files).

    Returns
    -------
    Any
        The unpickled object.

    Raises
    ------
    CheckpointError
        If the pickle needs any other global (naming the file and ``convert-checkpoint``), or the
        file cannot be read as a torch checkpoint.
    """
    where = f"{path.name} in {str(path.parent)!r}"
    is_zip = _is_zip(path)
    extra: list[tuple[Any, str]] = [(obj, name) for name, obj in NUMPY_DATA.items()]  # BUILD needs the dtype classes too
    if is_zip:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:
            raise CheckpointError(f"cannot read {where} as a torch checkpoint: {_first_line(exc)}") from None
        extra += _resolve([n for n in names if n not in NUMPY_DATA], inert_modules, path)
        _check_crc(path, where)
    for _ in range(64):  # legacy files: learn the globals one refusal at a time
        try:
            with torch.serialization.safe_globals(list(extra)):  # type: ignore[arg-type]
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
        except pickle.UnpicklingError as exc:
            found = _UNSUPPORTED_RE.search(str(exc))
            if found is None:  # not a refused global: the bytes are not a (complete) checkpoint
                raise CheckpointError(f"cannot read {where} as a torch checkpoint: {_first_line(exc)}") from None
            name = found.group(1) or found.group(2)
            if any(name == known for _, known in extra):
                raise CheckpointError(unsafe_globals_message(path, [name])) from None
            extra += _resolve([name], inert_modules, path)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read {where} as a torch checkpoint: {_first_line(exc)}") from None
    raise CheckpointError(unsafe_globals_message(path, [name for _, name in extra]))


def _check_crc(path: Path, where: str) -> None:
    """Compare every member of the zip container with its CRC-32 (torch itself does not)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read {where} as a torch checkpoint: {_first_line(exc)}") from None
    if bad is not None:
        msg = f"{where} is damaged: {bad!r} fails its CRC-32 check; copy or download the checkpoint again"
        raise CheckpointError(msg)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0] if text else ""
    return f"{type(exc).__name__}: {first}; the file is damaged or incomplete: copy or download it again"
