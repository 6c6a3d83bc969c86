"""``sclstore convert-checkpoint`` (registered on ``cli.app``)."""

from pathlib import Path
from typing import Annotated

import typer

from sclstore.cli import JsonOpt, VerboseOpt, app, emit_json, err, handled

__all__: list[str] = []


@app.command("convert-checkpoint")
@handled
def convert_checkpoint(
    src: Annotated[Path, typer.Argument(help="Checkpoint folder or weight file (best-model.pt, best_model.pt, models.ckpt).")],
    dst: Annotated[Path, typer.Argument(help="New folder for the converted checkpoint.")],
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="I trust SRC: unpickle it with the full unpickler (can run code).")
    ] = False,
    model: Annotated[str | None, typer.Option("--model", help="tahoe-x1, scgpt or scfoundation (default: guessed).")] = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Rewrite a trusted pickle checkpoint as tensors + plain config that sclstore loads without unpickling code."""
    from sclstore.ingest.convert import convert_checkpoint as convert

    info = convert(src, dst, trust_pickle=trust_pickle, family=model)
    if json_out:
        emit_json(info)
        return
    err.print(f"converted {info['family']} checkpoint: {info['tensors']} tensors -> {info['destination']} "
              f"({', '.join(info['files'])}); pass --checkpoint {info['destination']}", markup=False, highlight=False)
