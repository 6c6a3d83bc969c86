"""Issue 10 item 5 (evaluation side): an evaluation's cached result is keyed by every parameter
that can change it.

Every registered task derives its key from its frozen config (``eval.tasks.config_params``):
each field is in the key unless its metadata says ``key=False`` (how fast, never what). This
checks it for every built-in task, field by field: a field enters the hashed parameters exactly
when it is not marked ``key=False``, and changing it changes the key.
"""

from __future__ import annotations

import dataclasses

import pytest

from sclstore.eval import tasks
from sclstore.store import cache_key

REQUIRED = {"pseudotime_key": "t", "perturbation_key": "pert", "control": "ctrl", "label_key": "cell_type"}


def _other(value: object) -> object:
    """Another value of the same kind (enough to tell whether the key sees the field)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    return "other"


@pytest.mark.parametrize("name", ["trajectory", "perturbation", "celltype", "diagnostics"])
def test_every_config_field_enters_the_key_unless_marked(name: str) -> None:
    task = tasks.get_task(name)
    fields = dataclasses.fields(task.config_cls)
    base = {f.name: REQUIRED[f.name] for f in fields if f.name in REQUIRED}
    cfg = task.config_cls(**base)
    params = tasks.config_params(task, cfg)
    keyed = {f.name for f in fields if f.metadata.get("key", True)}
    assert keyed <= set(params) and not ({f.name for f in fields} - keyed) & set(params)
    assert {f.name for f in fields} - keyed >= {"n_jobs", "progress"}
    first = cache_key(params)
    for f in fields:
        changed = dict(params)
        if f.name in changed:  # what the key would be with another value of this field (no validation needed)
            changed[f.name] = _other(changed[f.name])
            assert cache_key(changed) != first, f.name
