"""lmms-eval integration: the ``ep_kit`` model plugin and the Daily-Omni task.

``pip install "ep-kit[lmms-eval]"`` registers the model through the entry-point group lmms-eval 0.7
reads (``lmms_eval.models``, declared in ``pyproject.toml``); its payload is :func:`manifest`, which
names :class:`ep_kit.lmms_eval.model.EPKit`. Nothing here imports ``lmms_eval`` until lmms-eval
itself asks for the manifest, so the kit works without the extra.

The Daily-Omni task ships in :data:`TASKS_DIR` (``python -m ep_kit.lmms_eval.tasks --help``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the shipped lmms-eval task definitions (``--include_path`` takes a folder written from them).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_NAME = "ep_kit"
MODEL_CLASS = "ep_kit.lmms_eval.model.EPKit"


def manifest() -> Any:
    """The ``ModelManifest`` lmms-eval's registry loads from the ``lmms_eval.models`` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)
