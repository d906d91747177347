"""Evaluation metrics as torchmetrics objects, so every number is synced across ranks by torchmetrics.

* :class:`MultipleChoiceAccuracy` -- accuracy overall, per benchmark and per (benchmark, category).
  Group names are only known at run time and differ between ranks, so per-sample records (group
  name and question id as fixed-width byte rows, correctness, number of options) are list states
  gathered with ``dist_reduce_fx="cat"``; :meth:`compute` groups them. Records are de-duplicated by
  (benchmark, question id): a ``DistributedSampler`` pads the last batch with repeated samples,
  which would otherwise be counted twice.
* :class:`BudgetShare` -- where the token budget went: realised keep ratio over the candidate
  pool, audio/video share of the kept A/V tokens and the keep ratio of each modality (sum states).
* :class:`QuestionOutcomes` -- one record per question (id, category, correct, predicted letter,
  kept tokens), for statistics over questions (bootstrap intervals, paired comparisons of rows);
  de-duplicated exactly as :class:`MultipleChoiceAccuracy`, so its mean is the logged accuracy.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from ep_kit.data.benchmarks import BENCHMARK_GROUPS

#: bytes per encoded name (longer names are cut and suffixed with a checksum, so they stay unique).
NAME_BYTES = 128
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def encode_names(names: Sequence[str], device: torch.device | None = None) -> Tensor:
    """``(N, NAME_BYTES)`` uint8 rows holding UTF-8 names, zero padded (syncable as a tensor state)."""
    out = torch.zeros(len(names), NAME_BYTES, dtype=torch.uint8)
    for i, name in enumerate(names):
        raw = str(name).encode("utf-8")
        if len(raw) > NAME_BYTES:
            raw = raw[: NAME_BYTES - 9] + b"~" + f"{zlib.crc32(raw):08x}".encode()
        out[i, : len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return out.to(device) if device is not None else out


def decode_name(row: Tensor) -> str:
    raw = bytes(row.tolist()).rstrip(b"\x00")
    return raw.decode("utf-8", errors="replace")


def option_letter(index: int) -> str:
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} has no letter (at most {len(LETTERS)} options)")
    return LETTERS[index]


def first_occurrences(keys: Tensor) -> list[int]:
    """Indices of the first row of each distinct key row of ``keys`` (``(N, NAME_BYTES)``), in order.

    A ``DistributedSampler`` pads the last batch with repeated samples; every per-question metric
    keeps only the first record of a question, so they all count the same questions.
    """
    seen: set[bytes] = set()
    rows: list[int] = []
    for i in range(keys.shape[0]):
        key = bytes(keys[i].tolist())
        if key not in seen:
            seen.add(key)
            rows.append(i)
    return rows


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A list state as one tensor (after a sync it is one already)."""
    if isinstance(state, Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0)


class MultipleChoiceAccuracy(Metric):
    """Multiple-choice accuracy overall, per benchmark and per category.

    ``update(predicted, target, benchmarks, categories, question_ids, num_options)``; :meth:`compute`
    returns ``{"acc": ..., "acc_macro": mean over benchmarks, "chance": mean 1/n_options,
    "count": ..., "acc/<benchmark>": ..., "acc/<benchmark>/<category>": ...,
    "acc_group/<group>": ...}``; groups are :data:`ep_kit.data.benchmarks.BENCHMARK_GROUPS` (the
    paper's audio-visual and video-only averages) with ``acc_group/<group>/benchmarks`` saying how
    many of the group's benchmarks were evaluated.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("qids", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("options", default=[], dist_reduce_fx="cat")

    def update(
        self,
        predicted: Tensor,
        target: Tensor,
        benchmarks: Sequence[str],
        categories: Sequence[str],
        question_ids: Sequence[str],
        num_options: Tensor,
    ) -> None:
        n = predicted.shape[0]
        for name, value in (
            ("target", target),
            ("benchmarks", benchmarks),
            ("categories", categories),
            ("question_ids", question_ids),
            ("num_options", num_options),
        ):
            if len(value) != n:
                raise ValueError(f"MultipleChoiceAccuracy.update: {name} has {len(value)} entries, predicted has {n}")
        if any("\t" in str(b) for b in benchmarks):
            raise ValueError("benchmark names must not contain a tab")
        groups = [f"{b}\t{c}" for b, c in zip(benchmarks, categories, strict=True)]
        self.groups.append(encode_names(groups, self.device))
        self.qids.append(encode_names([f"{b}\t{q}" for b, q in zip(benchmarks, question_ids, strict=True)], self.device))
        self.correct.append((predicted.long() == target.long()).to(self.device, torch.long))
        self.options.append(num_options.to(self.device, torch.long))

    def compute(self) -> dict[str, Tensor]:
        groups, qids = _cat(self.groups), _cat(self.qids)
        correct, options = _cat(self.correct), _cat(self.options)
        if correct.numel() == 0:
            return {}
        # De-duplicate by (benchmark, question id): keep the first record of each question.
        rows = first_occurrences(qids)
        idx = torch.tensor(rows, device=correct.device)
        groups, correct, options = groups[idx], correct[idx].float(), options[idx].float()
        out: dict[str, Tensor] = {
            "acc": correct.mean(),
            "chance": (1.0 / options.clamp(min=1)).mean(),
            "count": torch.tensor(float(len(rows)), device=correct.device),
        }
        per_bench: dict[str, list[int]] = {}
        per_cat: dict[str, list[int]] = {}
        for i in range(groups.shape[0]):
            bench, _, cat = decode_name(groups[i]).partition("\t")
            per_bench.setdefault(bench, []).append(i)
            per_cat.setdefault(f"{bench}/{cat}", []).append(i)
        bench_accs = []
        for bench, members in sorted(per_bench.items()):
            acc = correct[members].mean()
            out[f"acc/{bench}"] = acc
            bench_accs.append(acc)
        out["acc_macro"] = torch.stack(bench_accs).mean()
        for group, members in BENCHMARK_GROUPS.items():
            present = [out[f"acc/{b}"] for b in members if f"acc/{b}" in out]
            if present:  # the mean over the group's benchmarks that were evaluated
                out[f"acc_group/{group}"] = torch.stack(present).mean()
                out[f"acc_group/{group}/benchmarks"] = torch.tensor(float(len(present)), device=correct.device)
        for key, members in sorted(per_cat.items()):
            out[f"acc/{key}"] = correct[members].mean()
        return out


class BudgetShare(Metric):
    """Where the budget went, summed over samples (and ranks).

    ``update(stats)`` takes :class:`~ep_kit.models.omni.OmniOutput` ``stats`` (per-sample counts
    ``n_video``, ``n_audio``, ``kept_video``, ``kept_audio``, ``n_candidates``, ``kept_candidates``).
    :meth:`compute` returns ``realised_keep_ratio`` (kept / candidate tokens), ``audio_share`` and
    ``video_share`` (of the kept A/V tokens), ``audio_keep_ratio`` and ``video_keep_ratio``, and,
    when the stats carry ``layer_avg_kept`` (candidates per decoder layer, averaged over layers),
    ``layer_avg_keep_ratio``: the effective budget of methods that drop inside the LLM.
    """

    full_state_update = False
    KEYS = ("n_video", "n_audio", "kept_video", "kept_audio", "n_candidates", "kept_candidates")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for key in (*self.KEYS, "layer_avg_kept", "layer_avg_candidates"):
            self.add_state(key, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: Mapping[str, Tensor]) -> None:
        missing = [k for k in self.KEYS if k not in stats]
        if missing:
            raise ValueError(f"BudgetShare.update: stats lack {missing}")
        for key in self.KEYS:
            value = torch.as_tensor(stats[key]).to(self.device, torch.float64).sum()
            setattr(self, key, getattr(self, key) + value)
        if "layer_avg_kept" in stats:
            self.layer_avg_kept += torch.as_tensor(stats["layer_avg_kept"]).to(self.device, torch.float64).sum()
            self.layer_avg_candidates += torch.as_tensor(stats["n_candidates"]).to(self.device, torch.float64).sum()

    def compute(self) -> dict[str, Tensor]:
        def ratio(a: Tensor, b: Tensor) -> Tensor:
            return (a / b.clamp(min=1.0)).float()

        kept_av = self.kept_audio + self.kept_video
        out = {
            "realised_keep_ratio": ratio(self.kept_candidates, self.n_candidates),
            "audio_share": ratio(self.kept_audio, kept_av),
            "video_share": ratio(self.kept_video, kept_av),
            "audio_keep_ratio": ratio(self.kept_audio, self.n_audio),
            "video_keep_ratio": ratio(self.kept_video, self.n_video),
        }
        if self.layer_avg_candidates > 0:
            out["layer_avg_keep_ratio"] = ratio(self.layer_avg_kept, self.layer_avg_candidates)
        return out


@dataclass
class QuestionOutcome:
    """What one evaluated question came to: its answer and what the reducer kept for it."""

    benchmark: str
    question_id: str
    category: str
    correct: int  # 1 right, 0 wrong
    predicted: str  # the predicted option letter
    kept_video: int
    kept_audio: int
    n_video: int
    n_audio: int


class QuestionOutcomes(Metric):
    """Per-question records of an evaluation epoch (synced across ranks), never logged.

    Why: intervals and paired comparisons of table rows need each question's outcome, not only the
    accuracy. ``update`` takes what :meth:`ep_kit.train.module.EPKitModule.answer` returns;
    :meth:`outcomes` returns one :class:`QuestionOutcome` per distinct (benchmark, question id), the
    first record of each (as :class:`MultipleChoiceAccuracy` counts them), in evaluation order.
    """

    full_state_update = False
    COUNTS = ("kept_video", "kept_audio", "n_video", "n_audio")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("qids", "categories", "correct", "predicted", *self.COUNTS):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        predicted: Tensor,
        target: Tensor,
        benchmarks: Sequence[str],
        categories: Sequence[str],
        question_ids: Sequence[str],
        stats: Mapping[str, Tensor],
    ) -> None:
        if any("\t" in str(b) for b in benchmarks):
            raise ValueError("benchmark names must not contain a tab")
        self.qids.append(encode_names([f"{b}\t{q}" for b, q in zip(benchmarks, question_ids, strict=True)], self.device))
        self.categories.append(encode_names(list(categories), self.device))
        self.correct.append((predicted.long() == target.long()).to(self.device, torch.long))
        self.predicted.append(predicted.to(self.device, torch.long))
        for key in self.COUNTS:
            getattr(self, key).append(torch.as_tensor(stats[key]).to(self.device, torch.long).reshape(-1))

    def compute(self) -> Tensor:
        """The number of distinct questions (the records themselves: :meth:`outcomes`)."""
        return torch.tensor(float(len(first_occurrences(_cat(self.qids)))) if self.qids else 0.0)

    def outcomes(self) -> list[QuestionOutcome]:
        """Every distinct question's record, gathered from all ranks."""
        with self.sync_context():
            qids = _cat(self.qids)
            if qids.numel() == 0:
                return []
            cats, correct, predicted = _cat(self.categories), _cat(self.correct), _cat(self.predicted)
            counts = {k: _cat(getattr(self, k)) for k in self.COUNTS}
            records = []
            for i in first_occurrences(qids):
                bench, _, qid = decode_name(qids[i]).partition("\t")
                records.append(
                    QuestionOutcome(
                        benchmark=bench,
                        question_id=qid,
                        category=decode_name(cats[i]),
                        correct=int(correct[i]),
                        predicted=option_letter(int(predicted[i])),
                        **{k: int(counts[k][i]) for k in self.COUNTS},
                    )
                )
            return records
