"""Multiple-choice video benchmarks read from their public annotation files plus a local media root.

Why here and not through a harness: the kit evaluates token-reduction budgets by scoring the
next-token logits of the option letters, per sample, with per-category accuracy; it needs the
same questions, options and answers the community harnesses use, nothing else. Every reader
returns :class:`MCSample` rows; a row with a missing field raises ``ValueError`` naming the file and
row (or, with ``skip_bad=True``, is counted in a :class:`SkipReport` -- never dropped silently).
``skip_bad`` covers every per-row problem: missing or malformed fields, ``options`` that are not a
list of 2 to 10 strings, a jsonl line that is not json, a WorldSense video entry that is not an
object or has no ``task<N>``, and (with ``check_files``) a missing video. Whole-file problems (no
such file, not UTF-8, a json file that does not parse) always raise.

Question ids must be unique within one read: the accuracy metric keeps one record per
(benchmark, question id), so a repeated id would silently drop questions from the count. A repeat
raises ``ValueError`` naming both rows; with ``skip_bad=True`` it is renamed ``<id>#2``, ``<id>#3``,
... with a warning and listed in :attr:`SkipReport.renamed`.

Formats (public annotation files; media files live under ``media_root``):

* Video-MME: rows with ``videoID``, ``question_id``, ``question``, ``options`` (``"A. ..."``),
  ``answer`` (letter), ``duration``, ``domain``, ``task_type`` (json / jsonl, or parquet when
  pandas is installed); video ``<media_root>/<videoID>.mp4``. With or without audio is the
  evaluation's ``use_audio_in_video`` switch; both read the same file.
* MLVU (dev): one json per task (``1_plotQA.json``, ...), rows with ``video``, ``question``,
  ``candidates`` (option texts), ``answer`` (the correct text), ``question_type``; video
  ``<media_root>/<task folder>/<video>`` or ``<media_root>/<video>``.
* Daily-Omni: ``qa.json`` list with ``Question``, ``Choice`` (``"A. ..."``), ``Answer``,
  ``video_id``, ``Type``, ``video_category``, ``video_duration``; video
  ``<media_root>/<video_id>/<video_id>_video.mp4``.
* WorldSense: flat rows (harness form: ``index``, ``video_path``, ``question``, ``candidates``,
  ``answer``, ``task_type``, ``task_domain``, ``duration``) or the original per-video dict
  (``{video_id: {..., "task1": {question, candidates, answer, task_type, ...}}}``).
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)

HARNESS_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video{audio}. "
    "Respond with only the letter ({letters}) of the correct option."
)
HARNESS_SUFFIX = "Answer with the option's letter from the given choices directly."
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])[\.\):]\s*")


@dataclass
class MCSample:
    """One multiple-choice question about one video."""

    question_id: str
    video_path: str
    question: str
    options: list[str]
    answer_letter: str
    category: str
    benchmark: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer_letter)

    @property
    def letters(self) -> list[str]:
        return list(LETTERS[: len(self.options)])


@dataclass
class SkipReport:
    """Every sample left out of an evaluation (or training run), with where and why. Never silent.

    ``renamed`` lists samples that were kept under a new question id (a duplicated id with
    ``skip_bad=True``); they are not skips, so :attr:`count` leaves them out, but :meth:`summary`
    lists them.
    """

    skipped: list[tuple[str, str]] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))

    def rename(self, where: str, reason: str) -> None:
        self.renamed.append((where, reason))

    @property
    def count(self) -> int:
        return len(self.skipped)

    @property
    def empty(self) -> bool:
        """Nothing skipped and nothing renamed (a report worth printing is one that is not empty)."""
        return not self.skipped and not self.renamed

    @classmethod
    def merged(cls, reports: Iterable[SkipReport]) -> SkipReport:
        """One report holding every entry of ``reports``, in order (sources made of several data sets)."""
        out = cls()
        for report in reports:
            out.skipped += report.skipped
            out.renamed += report.renamed
        return out

    def summary(self) -> str:
        if self.empty:
            return "no samples skipped"
        lines = [f"{self.count} sample(s) skipped:"] + [f"  {w}: {r}" for w, r in self.skipped]
        if self.renamed:
            lines += [f"{len(self.renamed)} sample(s) kept under a new question id:"]
            lines += [f"  {w}: {r}" for w, r in self.renamed]
        return "\n".join(lines)


def format_mc_prompt(
    question: str,
    options: list[str],
    instruction: str | None = HARNESS_INSTRUCTION,
    suffix: str | None = HARNESS_SUFFIX,
    with_audio: bool = True,
) -> str:
    """Question, lettered options (``"A. text"``), in the community harnesses' prompt style."""
    letters = LETTERS[: len(options)]
    parts = []
    if instruction:
        audio = " and its audio" if with_audio else ""
        parts.append(instruction.format(audio=audio, letters=", ".join(letters)))
    parts.append(question.strip())
    parts += [f"{letter}. {strip_option_letter(text)}" for letter, text in zip(letters, options, strict=True)]
    if suffix:
        parts.append(suffix)
    return "\n".join(parts)


def strip_option_letter(option: str) -> str:
    """``"B. a cat"`` / ``"(B) a cat"`` -> ``"a cat"``."""
    return _OPTION_PREFIX.sub("", str(option), count=1).strip()


# ------------------------------------------------------------------ file reading
@dataclass
class _Malformed:
    """Stands in for an unreadable row (``skip_bad``), so it is counted where rows are built.

    Keeping its place keeps the row numbers (and ids derived from them) of the rows after it.
    """

    reason: str


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{p} line {line}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "re-encode the file as UTF-8"
        ) from err


def read_rows(path: str | Path, skip_bad: bool = False) -> list[Any]:
    """Rows of a json (list or dict), jsonl or parquet annotation file.

    A jsonl line that is not json raises ``ValueError`` naming the file and line; with
    ``skip_bad=True`` it is kept as a placeholder row that fails (and is counted) when the reader
    builds it.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file not found: {p}")
    if p.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as err:
            raise ValueError(
                f"{p}: reading parquet needs pandas + pyarrow; convert it to json/jsonl"
            ) from err
        return pd.read_parquet(p).to_dict(orient="records")
    text = _read_text(p)
    if p.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    if not skip_bad:
                        raise ValueError(f"{p} line {i}: invalid json: {err}") from err
                    rows.append(_Malformed(f"line {i}: invalid json: {err}"))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: invalid json: {err}") from err
    return data


def _need(row: Any, keys: Iterable[str], where: str) -> None:
    if isinstance(row, _Malformed):
        raise ValueError(f"{where}: {row.reason}")
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [
        k for k in keys if row.get(k) is None or (isinstance(row.get(k), str) and not row.get(k).strip())
    ]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def _letter(answer: Any, options: list[str], where: str) -> str:
    """The answer letter from a letter (``"B"``, ``"(B)"``) or from an option's text."""
    text = str(answer).strip()
    m = re.fullmatch(r"\(?([A-J])\)?\.?", text)
    if m and LETTERS.index(m.group(1)) < len(options):
        return m.group(1)
    stripped = [strip_option_letter(o) for o in options]
    for i, option in enumerate(stripped):
        if option == text or options[i] == text:
            return LETTERS[i]
    raise ValueError(f"{where}: answer {answer!r} is neither an option letter nor one of the options")


def _options(value: Any, where: str) -> list[str]:
    """A list of 2 to 10 option strings (a json or Python list literal, or a parquet array, is accepted).

    Why strict: a dict would silently become its keys, and a stray string its characters, each a
    wrong question the accuracy would still count.
    """
    if isinstance(value, str):  # some dumps store the list as its json text or Python repr
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as err:
                raise ValueError(f"{where}: options {value!r} are a string, not a list of options") from err
    if not isinstance(value, (list, tuple)) and hasattr(value, "tolist"):  # parquet list columns: numpy
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{where}: options must be a list of {MIN_OPTIONS} to {MAX_OPTIONS} strings, "
            f"got {type(value).__name__} {value!r}"
        )
    bad = [f"[{i}] {type(o).__name__}" for i, o in enumerate(value) if not isinstance(o, str)]
    if bad:
        raise ValueError(f"{where}: options must be strings; not a string: {', '.join(bad)}")
    if not MIN_OPTIONS <= len(value) <= MAX_OPTIONS:
        raise ValueError(
            f"{where}: options must be a list of {MIN_OPTIONS} to {MAX_OPTIONS} strings "
            f"(letters {LETTERS[0]}-{LETTERS[-1]}), got {len(value)}"
        )
    return list(value)


def _collect(
    rows: Iterable[tuple[str, Callable[[], MCSample]]], skip_bad: bool, report: SkipReport | None
) -> list[MCSample]:
    out, first = [], {}
    for where, make in rows:
        try:
            sample = make()
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
            if not skip_bad:
                raise
            if report is None:
                raise ValueError(f"skip_bad=True needs a SkipReport to count skips ({where}: {err})") from err
            report.add(where, str(err))
            continue
        qid = sample.question_id
        if qid in first:
            reason = f"duplicate question_id {qid!r} (first at {first[qid]})"
            if not skip_bad:
                raise ValueError(
                    f"{where}: {reason}; the accuracy counts each question id once, so fix the "
                    "annotation (or pass skip_bad=True to rename repeats)"
                )
            if report is None:
                raise ValueError(f"skip_bad=True needs a SkipReport to count skips ({where}: {reason})")
            k = 2
            while f"{qid}#{k}" in first:
                k += 1
            sample.question_id = f"{qid}#{k}"
            report.rename(where, f"{reason}: kept as {sample.question_id!r}")
            warnings.warn(f"{where}: {reason}: kept as {sample.question_id!r}", stacklevel=3)
        first[sample.question_id] = where
        out.append(sample)
    return out


def _check_media(sample: MCSample, check_files: bool) -> MCSample:
    if check_files and not Path(sample.video_path).is_file():
        raise FileNotFoundError(f"video file not found: {sample.video_path} (question {sample.question_id})")
    return sample


# ------------------------------------------------------------------ readers
def read_videomme(
    annotation: str | Path,
    media_root: str | Path,
    with_audio: bool = True,
    skip_bad: bool = False,
    report: SkipReport | None = None,
    check_files: bool = False,
) -> list[MCSample]:
    """Video-MME (``videomme`` with audio, ``videomme_noaudio`` without; same questions)."""
    rows = read_rows(annotation, skip_bad)
    if not isinstance(rows, list):
        raise ValueError(f"{annotation}: expected a json list (or jsonl / parquet rows) of questions")
    name = "videomme" if with_audio else "videomme_noaudio"

    def make(i: int, row: dict) -> Callable[[], MCSample]:
        where = f"{annotation} row {i}"

        def build() -> MCSample:
            _need(row, ["videoID", "question", "options", "answer"], where)
            options = _options(row["options"], where)
            return _check_media(
                MCSample(
                    question_id=str(row.get("question_id") or f"{row['videoID']}-{i}"),
                    video_path=str(Path(media_root) / f"{row['videoID']}.mp4"),
                    question=str(row["question"]),
                    options=[strip_option_letter(o) for o in options],
                    answer_letter=_letter(row["answer"], options, where),
                    category=str(row.get("task_type") or "unknown"),
                    benchmark=name,
                    extra={k: row.get(k) for k in ("duration", "domain", "sub_category") if k in row},
                ),
                check_files,
            )

        return build

    return _collect(((f"{annotation} row {i}", make(i, r)) for i, r in enumerate(rows)), skip_bad, report)


def read_mlvu(
    annotation_dir: str | Path,
    media_root: str | Path,
    skip_bad: bool = False,
    report: SkipReport | None = None,
    check_files: bool = False,
) -> list[MCSample]:
    """MLVU dev: every ``*.json`` task file in ``annotation_dir`` (or one file)."""
    root = Path(annotation_dir)
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]
    if not files:
        raise FileNotFoundError(f"no MLVU task json files in {root}")

    def video_path(task_file: Path, video: str) -> str:
        nested = Path(media_root) / task_file.stem / video
        return str(nested if nested.exists() else Path(media_root) / video)

    def make(task_file: Path, i: int, row: dict) -> Callable[[], MCSample]:
        where = f"{task_file} row {i}"

        def build() -> MCSample:
            _need(row, ["video", "question", "candidates", "answer"], where)
            options = _options(row["candidates"], where)
            return _check_media(
                MCSample(
                    question_id=f"{task_file.stem}-{i}",
                    video_path=video_path(task_file, str(row["video"])),
                    question=str(row["question"]),
                    options=[strip_option_letter(o) for o in options],
                    answer_letter=_letter(row["answer"], options, where),
                    category=str(row.get("question_type") or re.sub(r"^\d+_", "", task_file.stem)),
                    benchmark="mlvu",
                    extra={"duration": row.get("duration")},
                ),
                check_files,
            )

        return build

    items = []
    for f in files:
        rows = read_rows(f, skip_bad)
        if not isinstance(rows, list):
            raise ValueError(f"{f}: expected a json list of questions")
        items += [(f"{f} row {i}", make(f, i, r)) for i, r in enumerate(rows)]
    return _collect(items, skip_bad, report)


def daily_omni_sample(row: Any, index: int, media_root: str | Path, where: str | None = None) -> MCSample:
    """One Daily-Omni ``qa.json`` row (its ``index`` in the file) as the kit reads it.

    Shared by :func:`read_daily_omni` and the lmms-eval task (``ep_kit/lmms_eval/tasks/daily_omni``), so
    both give the same question id, options, answer letter and video path. A bad row raises
    ``ValueError`` naming ``where`` (default: the row index).
    """
    where = where or f"Daily-Omni row {index}"
    _need(row, ["Question", "Choice", "Answer", "video_id"], where)
    options = _options(row["Choice"], where)
    vid = str(row["video_id"])
    return MCSample(
        question_id=f"{vid}-{index}",
        video_path=str(Path(media_root) / vid / f"{vid}_video.mp4"),
        question=str(row["Question"]),
        options=[strip_option_letter(o) for o in options],
        answer_letter=_letter(row["Answer"], options, where),
        category=str(row.get("Type") or "unknown"),
        benchmark="daily_omni",
        extra={k: row.get(k) for k in ("video_category", "video_duration") if k in row},
    )


def read_daily_omni(
    annotation: str | Path,
    media_root: str | Path,
    skip_bad: bool = False,
    report: SkipReport | None = None,
    check_files: bool = False,
) -> list[MCSample]:
    """Daily-Omni ``qa.json``; videos at ``<media_root>/<video_id>/<video_id>_video.mp4``."""
    rows = read_rows(annotation, skip_bad)

    def make(i: int, row: dict) -> Callable[[], MCSample]:
        where = f"{annotation} row {i}"
        return lambda: _check_media(daily_omni_sample(row, i, media_root, where), check_files)

    if not isinstance(rows, list):
        raise ValueError(f"{annotation}: expected a json list of questions")
    return _collect(((f"{annotation} row {i}", make(i, r)) for i, r in enumerate(rows)), skip_bad, report)


def _worldsense_rows(data: Any, annotation: str | Path) -> Iterator[tuple[str, str, Any]]:
    """(where, question id, flat row) for either WorldSense layout.

    A malformed video entry yields one :class:`_Malformed` row, so it fails (or, with ``skip_bad``,
    is counted) where the rows are built instead of ending the whole read.
    """
    if isinstance(data, list):
        for i, row in enumerate(data):
            qid = str(row.get("index", i)) if isinstance(row, dict) else str(i)
            yield f"{annotation} row {i}", qid, row
    elif isinstance(data, dict):
        for video_id, entry in data.items():
            where = f"{annotation} video {video_id}"
            if not isinstance(entry, dict):
                yield where, str(video_id), _Malformed(f"expected an object, got {type(entry).__name__}")
                continue
            tasks = [k for k in entry if re.fullmatch(r"task\d+", k)]
            if not tasks:
                yield where, str(video_id), _Malformed("no task1..taskN questions")
                continue
            for key in sorted(tasks, key=lambda k: int(k[4:])):
                if not isinstance(entry[key], dict):
                    reason = f"expected an object, got {type(entry[key]).__name__}"
                    yield f"{where} {key}", f"{video_id}-{key}", _Malformed(reason)
                    continue
                row = dict(entry[key])
                row.setdefault("video_path", entry.get("video_path") or f"{video_id}.mp4")
                row.setdefault("duration", entry.get("duration"))
                row.setdefault("task_domain", entry.get("domain"))
                yield f"{annotation} video {video_id} {key}", f"{video_id}-{key}", row
    else:
        raise ValueError(f"{annotation}: expected a json list or object")


def read_worldsense(
    annotation: str | Path,
    media_root: str | Path,
    skip_bad: bool = False,
    report: SkipReport | None = None,
    check_files: bool = False,
) -> list[MCSample]:
    """WorldSense, harness (flat rows) or original (per-video ``task<N>``) layout."""
    data = read_rows(annotation, skip_bad)

    def make(where: str, qid: str, row: dict) -> Callable[[], MCSample]:
        def build() -> MCSample:
            _need(row, ["video_path", "question", "candidates", "answer"], where)
            options = _options(row["candidates"], where)
            return _check_media(
                MCSample(
                    question_id=qid,
                    video_path=str(Path(media_root) / str(row["video_path"])),
                    question=str(row["question"]),
                    options=[strip_option_letter(o) for o in options],
                    answer_letter=_letter(row["answer"], options, where),
                    category=str(row.get("task_type") or "unknown"),
                    benchmark="worldsense",
                    extra={k: row.get(k) for k in ("task_domain", "duration", "audio_class") if k in row},
                ),
                check_files,
            )

        return build

    return _collect(((w, make(w, q, r)) for w, q, r in _worldsense_rows(data, annotation)), skip_bad, report)


BenchmarkName = Literal["videomme", "videomme_noaudio", "mlvu", "daily_omni", "worldsense"]
#: The paper's main-table groups, the one definition the readers, the metrics and the tables share:
#: a group's accuracy is the mean of its benchmarks' accuracies ("AV avg" and "Video avg").
BENCHMARK_GROUPS: dict[str, tuple[str, ...]] = {
    "audio_visual": ("worldsense", "daily_omni", "videomme"),
    "video_only": ("videomme_noaudio", "mlvu"),
}
#: benchmarks whose evaluation feeds the video's audio track (the others are video-only).
AUDIO_BENCHMARKS = frozenset(BENCHMARK_GROUPS["audio_visual"])


def read_benchmark(
    name: BenchmarkName,
    annotation: str | Path,
    media_root: str | Path,
    skip_bad: bool = False,
    report: SkipReport | None = None,
    check_files: bool = False,
) -> list[MCSample]:
    """Dispatch by benchmark name (see the module docstring for each format)."""
    kw = {"skip_bad": skip_bad, "report": report, "check_files": check_files}
    if name == "videomme":
        return read_videomme(annotation, media_root, with_audio=True, **kw)
    if name == "videomme_noaudio":
        return read_videomme(annotation, media_root, with_audio=False, **kw)
    if name == "mlvu":
        return read_mlvu(annotation, media_root, **kw)
    if name == "daily_omni":
        return read_daily_omni(annotation, media_root, **kw)
    if name == "worldsense":
        return read_worldsense(annotation, media_root, **kw)
    raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BenchmarkName.__args__)}")
