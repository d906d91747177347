"""ms-swift style audio-visual instruction data (jsonl) as a torch Dataset of model inputs.

One row per conversation, the layout ms-swift and most AV instruction sets use::

    {"messages": [{"role": "user", "content": "<video>What happens?"},
                  {"role": "assistant", "content": "A dog barks."}],
     "videos": ["clips/a.mp4"], "audios": []}

``<video>`` / ``<audio>`` tags mark where each medium goes, in list order. Relative paths resolve
against ``media_root`` (default: the annotation file's folder). Rows are validated when the
dataset is built, so a bad row fails at once with the file and line, not hours into training:
first every row's json and schema, then that every media file exists. Labels cover the assistant
turns only.

A media file that exists but does not decode (a corrupt mp4) only shows when its sample is
encoded; that error names the annotation file and line too. With ``skip_bad=True`` every bad row
(invalid json, schema, missing media, and later a decode error) is counted in a
:class:`~ep_kit.data.benchmarks.SkipReport` instead of raising; a sample that fails to decode
mid-run becomes ``None``, which :func:`~ep_kit.data.collate.collate_av` drops from its batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ep_kit.data.benchmarks import SkipReport
from ep_kit.data.media import MEDIA_ERRORS
from ep_kit.data.processor import MEDIA_TAG, SampleEncoder, split_media_tags

ROLES = ("system", "user", "assistant")
log = logging.getLogger(__name__)


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


def check_instruct_media(row: dict[str, Any], where: str, media_root: Path) -> None:
    """Every video and audio file of a parsed row exists (``FileNotFoundError`` naming ``where`` otherwise)."""
    for key, what in (("videos", "video"), ("audios", "audio")):
        for path in row[key]:
            if not Path(path).is_file():
                hint = "" if media_root.is_dir() else f" (media_root {media_root} does not exist)"
                raise FileNotFoundError(f"{where}: {what} file not found: {path}{hint}")


def _lines(p: Path) -> list[tuple[int, str | None, str]]:
    """``(line number, text or None, why not)`` per non-empty line; ``None`` for a line that is not UTF-8.

    Split on line feeds only: ``str.splitlines`` would also split inside a json string holding a
    U+2028 or a form feed.
    """
    out = []
    for i, raw in enumerate(p.read_bytes().split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if i == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            why = f"not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line)"
            out.append((i, None, f"{why}; re-encode the file as UTF-8"))
            continue
        if text.strip():
            out.append((i, text, ""))
    return out


def read_instruct_jsonl(
    path: str | Path,
    media_root: str | Path | None = None,
    skip_bad: bool = False,
    report: SkipReport | None = None,
) -> list[dict[str, Any]]:
    """All rows of an instruction jsonl, validated (errors name the file and line).

    Two passes: every line's encoding, json and schema first, then that every media file exists,
    so a broken annotation shows before any file system lookups. Each row keeps its ``line``
    number for later errors. With ``skip_bad=True`` a bad line is added to ``report`` (required)
    and left out instead of raising; a file left with no rows still raises.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"instruction annotation file not found: {p}")
    if skip_bad and report is None:
        raise ValueError(f"skip_bad=True needs a SkipReport to count skips ({p})")
    root = Path(media_root) if media_root is not None else p.parent
    skipped_before = report.count if report is not None else 0

    def bad(where: str, err: Exception) -> None:
        if not skip_bad:
            raise err
        report.add(where, str(err).removeprefix(f"{where}: "))

    parsed = []
    for i, line, why in _lines(p):
        where = f"{p} line {i}"
        try:
            if line is None:
                raise ValueError(f"{where}: {why}")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid json: {err}") from err
            parsed.append((where, {**parse_instruct_row(row, where, root), "line": i}))
        except ValueError as err:
            bad(where, err)
    rows = []
    for where, row in parsed:
        try:
            check_instruct_media(row, where, root)
        except FileNotFoundError as err:
            bad(where, err)
            continue
        rows.append(row)
    if not rows:
        skipped = report.skipped[skipped_before:] if report is not None else []
        detail = f" ({len(skipped)} bad line(s); first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"{p}: no instruction rows{detail}")
    return rows


class InstructDataset(Dataset):
    """Instruction rows -> encoded samples (``input_ids``, ``labels`` on assistant turns, media).

    Args:
        annotation: the jsonl file.
        encoder: decodes media and builds the model inputs.
        media_root: folder relative media paths resolve against (default: the annotation's folder).
        skip_bad: count bad rows in :attr:`report` instead of raising: at build time (invalid json,
            schema, missing media) the row is left out; a sample that fails to decode when it is
            fetched returns ``None`` (dropped by :func:`~ep_kit.data.collate.collate_av`), is
            counted once and is not decoded again. Without it a decode error re-raises naming the
            annotation file and line (``FileNotFoundError`` for a file gone since, else ``ValueError``).
        report: where skips are counted (default: a new one, :attr:`report`).

    With ``num_workers > 0`` a decode-time skip happens in a worker process: it is logged there as a
    warning when it happens, but only skips of the main process reach this :attr:`report`.
    """

    def __init__(
        self,
        annotation: str | Path,
        encoder: SampleEncoder,
        media_root: str | Path | None = None,
        skip_bad: bool = False,
        report: SkipReport | None = None,
    ) -> None:
        self.annotation = Path(annotation)
        self.skip_bad = skip_bad
        self.report = report if report is not None else SkipReport()
        self.rows = read_instruct_jsonl(annotation, media_root, skip_bad=skip_bad, report=self.report)
        self.encoder = encoder
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor] | None:
        row = self.rows[index]
        if index in self._failed:
            return None
        try:
            return self.encoder.encode(
                row["messages"], row["videos"], row["audios"], add_generation_prompt=False
            )
        except MEDIA_ERRORS as err:  # also a sample over the token budget (ValueError)
            where = f"{self.annotation} line {row['line']}"
            if not self.skip_bad:
                kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
                raise kind(f"{where}: cannot encode the sample: {err}") from err
            self._failed.add(index)
            self.report.add(where, f"cannot encode the sample: {err}")
            log.warning("skipped %s (skip_bad): cannot encode the sample: %s", where, err)
            return None
