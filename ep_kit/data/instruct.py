"""ms-swift style audio-visual instruction data (jsonl) as a torch Dataset of model inputs.

One row per conversation, the layout ms-swift and most AV instruction sets use::

    {"messages": [{"role": "user", "content": "<video>What happens?"},
                  {"role": "assistant", "content": "A dog barks."}],
     "videos": ["clips/a.mp4"], "audios": []}

``<video>`` / ``<audio>`` tags mark where each medium goes, in list order. Relative paths resolve
against ``media_root`` (default: the annotation file's folder). Rows are validated when the
dataset is built, so a bad row fails at once with the file and line, not hours into training.
Labels cover the assistant turns only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ep_kit.data.processor import MEDIA_TAG, SampleEncoder, split_media_tags

ROLES = ("system", "user", "assistant")


def parse_instruct_row(row: Any, where: str, media_root: Path) -> dict[str, Any]:
    """Validate one row; return ``{"messages": parts-form messages, "videos": paths, "audios": paths}``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a json object, got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: missing or empty field 'messages'")
    if row.get("images"):
        raise ValueError(f"{where}: 'images' are not supported (video/audio only)")
    out_messages, counts = [], {"video": 0, "audio": 0, "image": 0}
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: messages[{j}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{j}] has role {m['role']!r}, expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: messages[{j}].content must be a string with <video>/<audio> tags")
        for tag in MEDIA_TAG.findall(m["content"]):
            counts[tag] += 1
        if m["role"] == "assistant":
            if MEDIA_TAG.search(m["content"]):
                raise ValueError(f"{where}: messages[{j}] (assistant) contains a media tag")
            out_messages.append({"role": "assistant", "content": m["content"]})
        else:
            out_messages.append({"role": m["role"], "content": split_media_tags(m["content"])})
    if not any(m["role"] == "assistant" for m in out_messages):
        raise ValueError(f"{where}: no assistant message to learn from")
    lists = {}
    for key, tag in (("videos", "video"), ("audios", "audio")):
        value = row.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: field {key!r} must be a list of paths")
        if len(value) != counts[tag]:
            raise ValueError(f"{where}: {counts[tag]} <{tag}> tag(s) but {len(value)} entries in {key!r}")
        lists[key] = [str(p if Path(p).is_absolute() else media_root / p) for p in value]
    if counts["image"]:
        raise ValueError(f"{where}: <image> tags are not supported (video/audio only)")
    return {"messages": out_messages, **lists}


def read_instruct_jsonl(path: str | Path, media_root: str | Path | None = None) -> list[dict[str, Any]]:
    """All rows of an instruction jsonl, validated (errors name the file and line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"instruction annotation file not found: {p}")
    root = Path(media_root) if media_root is not None else p.parent
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p} line {i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid json: {err}") from err
        rows.append(parse_instruct_row(row, where, root))
    if not rows:
        raise ValueError(f"{p}: no instruction rows")
    return rows


class InstructDataset(Dataset):
    """Instruction rows -> encoded samples (``input_ids``, ``labels`` on assistant turns, media)."""

    def __init__(
        self, annotation: str | Path, encoder: SampleEncoder, media_root: str | Path | None = None
    ) -> None:
        self.annotation = Path(annotation)
        self.rows = read_instruct_jsonl(annotation, media_root)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = self.rows[index]
        return self.encoder.encode(row["messages"], row["videos"], row["audios"], add_generation_prompt=False)
