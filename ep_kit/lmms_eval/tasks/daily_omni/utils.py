"""Helpers of the kit's Daily-Omni lmms-eval task (``_default_template_yaml``).

Why through the kit: the row is read by :func:`ep_kit.data.benchmarks.daily_omni_sample` (the reader
``ep-kit test`` uses: question id, options without their letters, answer letter, video path) and the
prompt is :func:`ep_kit.data.datamodule.harness_prompt`, so a model sees exactly the question
``ep-kit test`` asks. The response is scored the way lmms-eval's multiple-choice video tasks score
theirs: the option letter is extracted from free text (:func:`extract_letter`), then compared with
the answer. The ``ep_kit`` model's per-sample budget (realised keep ratio, audio share of the kept
tokens) is put into each sample's record, so ``--log_samples`` carries it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ep_kit.data.benchmarks import MCSample, daily_omni_sample
from ep_kit.data.datamodule import harness_prompt
from ep_kit.lmms_eval.harness import budget_for

#: how sure a letter found in a given form is the answer (the highest wins, then the last position).
_FORMS: tuple[tuple[str, int], ...] = (
    (r"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?({L})\b", 7),
    (r"\(({L})\)", 6),
    (r"\b({L})\.", 5),
    (r"\b({L}):", 4),
    (r"\b({L})\)", 3),
    (r"(?<![A-Za-z])({L})(?![A-Za-z])", 1),
)


def extract_letter(response: str, letters: list[str]) -> str:
    """The option letter a free-text ``response`` gives, or ``""``.

    As lmms-eval's multiple-choice tasks do: a letter standing alone at the start wins, then one at the
    end, then one after an answer phrase ("the answer is B"), then ``(B)``, ``B.``, ``B:``, ``B)``, and
    last any standalone letter; within a form the last occurrence counts.
    """
    text = response.strip().strip(".,;:!?'\"` ")
    if not text:
        return ""
    choice = "|".join(re.escape(x) for x in letters)
    if re.match(rf"^\(?({choice})(?![A-Za-z])", text):
        return re.match(rf"^\(?({choice})", text).group(1)  # type: ignore[union-attr]
    end = re.search(rf"(?<![A-Za-z])({choice})\)?$", text)
    if end:
        return end.group(1)
    best: tuple[int, int, str] | None = None
    for pattern, rank in _FORMS:
        for m in re.finditer(pattern.format(L=choice), text):
            letter = m.group(1)
            if letter in letters and (best is None or (rank, m.start()) > best[:2]):
                best = (rank, m.start(), letter)
    return best[2] if best else ""


def daily_omni_process_docs(dataset: Any) -> Any:
    """Each row keeps its index in ``qa.json`` (the kit's question id is ``<video_id>-<index>``)."""
    return dataset.map(lambda _, i: {"row_index": i}, with_indices=True)


def _sample(doc: dict[str, Any], kwargs: dict[str, Any] | None = None) -> MCSample:
    media_root = (kwargs or {}).get("media_root") or ""
    return daily_omni_sample(doc, int(doc["row_index"]), media_root, f"qa.json row {doc['row_index']}")


def daily_omni_doc_to_visual(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> list[str]:
    """The question's video, ``<media_root>/<video_id>/<video_id>_video.mp4``; a missing file names its path."""
    if not (lmms_eval_specific_kwargs or {}).get("media_root"):
        raise ValueError("daily_omni: media_root is not set (write the task with python -m ep_kit.lmms_eval.tasks)")
    path = _sample(doc, lmms_eval_specific_kwargs).video_path
    if not Path(path).is_file():
        raise FileNotFoundError(f"daily_omni: video file not found: {path} (row {doc['row_index']})")
    return [path]


def daily_omni_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The kit's prompt: instruction, question, lettered options, answer-with-the-letter line."""
    kwargs = lmms_eval_specific_kwargs or {}
    return harness_prompt(_sample(doc, kwargs), with_audio=bool(kwargs.get("with_audio", True)))


def daily_omni_doc_to_target(doc: dict[str, Any]) -> str:
    return _sample(doc).answer_letter


def daily_omni_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """Score one response; the record carries the question id, the parsed letter and the ep_kit budget."""
    sample = _sample(doc)
    response = results[0] if results else ""
    pred = extract_letter(response, sample.letters)
    record: dict[str, Any] = {
        "question_id": sample.question_id,
        "video_id": str(doc["video_id"]),
        "category": sample.category,
        "pred_answer": pred,
        "answer": sample.answer_letter,
        "score": 1.0 if pred == sample.answer_letter else 0.0,
    }
    spent = budget_for(doc)
    if spent is not None:
        record["ep_kit"] = spent
    counts = {k: spent[k] for k in ("kept_candidates", "n_candidates", "kept_audio", "kept_video")} if spent else {}
    return {"daily_omni_acc": record, "realised_keep_ratio": counts, "audio_share": counts}


def daily_omni_accuracy(records: list[dict[str, Any]]) -> float:
    """Fraction of questions answered right (``ep-kit test``'s ``test/acc/daily_omni``)."""
    return sum(r["score"] for r in records) / max(1, len(records))


def _ratio(records: list[dict[str, Any]], kept: tuple[str, ...], total: tuple[str, ...]) -> float:
    spent = [r for r in records if r]
    if not spent:
        return float("nan")  # a model other than ep_kit: no budget record
    num = sum(s[k] for s in spent for k in kept)
    den = sum(s[k] for s in spent for k in total)
    return num / max(1, den)


def realised_keep_ratio(records: list[dict[str, Any]]) -> float:
    """Kept / candidate A/V tokens over all questions (``ep-kit test``'s ``test/realised_keep_ratio``)."""
    return _ratio(records, ("kept_candidates",), ("n_candidates",))


def audio_share(records: list[dict[str, Any]]) -> float:
    """Audio share of the kept A/V tokens over all questions (``ep-kit test``'s ``test/audio_share``)."""
    return _ratio(records, ("kept_audio",), ("kept_audio", "kept_video"))
