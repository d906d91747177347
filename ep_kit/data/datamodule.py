"""The LightningDataModule: a data source (synthetic / instruction jsonl / benchmark) -> batches.

Why sources are components: each is a typed class a YAML config picks by ``class_path``
(``SyntheticSource``, ``InstructSource``, ``BenchmarkSource``), so a new data set is a new class,
not a new flag. The module owns what is shared: the processor (tiny tokenizer or a local model
directory), frame sampling knobs, audio-in-video, the processed-sample cache and collation.

Batches (see :func:`ep_kit.data.collate.collate_av`):

* training: prompt + answer, ``labels`` on the answer (-100 elsewhere) and ``answer_mask``;
* evaluation (multiple choice): the prompt ends at the assistant turn; ``choice_token_ids``
  ``(B, n_options)`` (+ ``choice_mask``), ``answer_index`` ``(B,)``, and ``question_id`` /
  ``category`` / ``benchmark`` lists. The model scores the next-token logits of the letters.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ep_kit.data.benchmarks import (
    AUDIO_BENCHMARKS,
    BenchmarkName,
    MCSample,
    SkipReport,
    format_mc_prompt,
    read_benchmark,
)
from ep_kit.data.collate import collate_av
from ep_kit.data.instruct import InstructDataset
from ep_kit.data.media import FPS_MAX_FRAMES, MEDIA_ERRORS, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS
from ep_kit.data.processor import AVInputBuilder, SampleEncoder, build_processor
from ep_kit.data.resumable import ResumableDataLoader
from ep_kit.data.synthetic import SyntheticAVBenchmark

Split = Literal["train", "val", "test"]
log = logging.getLogger(__name__)


def harness_prompt(sample: MCSample, with_audio: bool) -> str:
    """The community harnesses' multiple-choice prompt."""
    return format_mc_prompt(sample.question, sample.options, with_audio=with_audio)


def short_prompt(sample: MCSample) -> str:
    """Question and lettered options only (the synthetic benchmark: short for tiny models)."""
    return format_mc_prompt(sample.question, sample.options, instruction=None, suffix=None)


class MCDataset(Dataset):
    """Multiple-choice samples -> encoded prompts (``mode="eval"``) or prompt+answer (``"train"``)."""

    def __init__(
        self,
        samples: list[MCSample],
        encoder: SampleEncoder,
        prompt: Callable[[MCSample], str],
        mode: Literal["train", "eval"] = "eval",
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.samples = samples
        self.encoder = encoder
        self.prompt = prompt
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def messages(self, sample: MCSample) -> list[dict[str, Any]]:
        user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": self.prompt(sample)}]}
        if self.mode == "train":
            return [user, {"role": "assistant", "content": sample.answer_letter}]
        return [user]

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        out: dict[str, Any] = dict(
            self.encoder.encode(self.messages(s), [s.video_path], add_generation_prompt=self.mode == "eval")
        )
        out["choice_token_ids"] = torch.tensor(self.encoder.builder.letter_ids(s.letters), dtype=torch.long)
        out["answer_index"] = s.answer_index
        out["question_id"], out["category"], out["benchmark"] = s.question_id, s.category, s.benchmark
        out["question"], out["options"] = s.question, list(s.options)
        return out

    def drop_unreadable(self, report: SkipReport) -> MCDataset:
        """Encode every sample once (filling the cache); count and drop those whose media fail.

        "Fail" is any of :data:`~ep_kit.data.media.MEDIA_ERRORS` (PyAV errors that are not
        ``ValueError``, or an unreadable file, included), as for instruction data with ``skip_bad``.
        """
        kept = []
        for i, s in enumerate(self.samples):
            try:
                self[i]
            except MEDIA_ERRORS as err:
                report.add(f"{s.benchmark} {s.question_id} ({s.video_path})", str(err))
                continue
            kept.append(s)
        self.samples = kept
        return self


class DataSource:
    """Where samples come from. Subclasses build the dataset of each split (None: no such split)."""

    def pixel_bounds(self) -> tuple[int, int]:
        """Per-frame pixel bounds that suit this source when the data module leaves them unset."""
        return VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS

    def audio_window(self) -> int:
        """Whisper window in seconds when the data module leaves it unset (checkpoint: 30 s is enough)."""
        return 30

    def prepare(self) -> None:
        """Write or check files (runs once, on one process)."""

    def dataset(self, split: Split, encoder: SampleEncoder, use_audio_in_video: bool) -> Dataset | None:
        raise NotImplementedError

    def datasets(
        self, split: Split, encoder_for: Callable[[bool], SampleEncoder], use_audio_in_video: bool
    ) -> list[tuple[Dataset, bool]]:
        """Every dataset of ``split``, each with the audio-in-video setting its batches use.

        One by default, fed with audio when the data module feeds audio and :attr:`with_audio`
        allows it; an evaluation suite gives one per benchmark, so the video-only benchmarks are fed
        without their audio track while the audio-visual ones keep it.
        """
        audio = use_audio_in_video and self.with_audio
        ds = self.dataset(split, encoder_for(audio), audio)
        return [] if ds is None else [(ds, audio)]

    @property
    def with_audio(self) -> bool:
        """Whether this source's videos are fed with their audio track (when the data module feeds audio)."""
        return True


class SyntheticSource(DataSource):
    """The kit's synthetic audio-visual benchmark (see :class:`SyntheticAVBenchmark`)."""

    def __init__(
        self,
        root: str = "data/synthetic",
        num_train: int = 500,
        num_val: int = 60,
        num_test: int = 100,
        seconds: int = 4,
        events: int = 2,
        resolution: int = 56,
        shuffle_options: bool = False,
        seed: int = 0,
        question_types: list[str] | None = None,
        dense_seconds: int = 12,
        long_seconds: list[int] | None = None,
    ) -> None:
        self.resolution = resolution
        self.bench = SyntheticAVBenchmark(
            root,
            num_train,
            num_val,
            num_test,
            seconds,
            events,
            resolution,
            shuffle_options=shuffle_options,
            seed=seed,
            question_types=question_types,
            dense_seconds=dense_seconds,
            long_seconds=long_seconds,
        )

    def pixel_bounds(self) -> tuple[int, int]:
        side = max(28, (self.resolution // 28) * 28)
        return 28 * 28, side * side

    def audio_window(self) -> int:
        # Features of the real frames do not depend on the window; a short one is cheaper.
        return int(self.bench.max_seconds) + 1

    def prepare(self) -> None:
        self.bench.prepare()

    def dataset(self, split: Split, encoder: SampleEncoder, use_audio_in_video: bool) -> Dataset | None:
        self.bench.prepare()
        samples = self.bench.samples(split)
        if not samples:
            return None
        return MCDataset(samples, encoder, short_prompt, mode="train" if split == "train" else "eval")


class InstructSource(DataSource):
    """ms-swift style jsonl instruction data (training; ``val`` is scored by loss, None = no validation).

    It has no test split: evaluate a trained row with an evaluation recipe's benchmark suite
    (``recipes/eval_benchmarks.yaml``).

    Args:
        train / val: the jsonl files (``val=None``: no validation).
        media_root: folder relative media paths resolve against (default: each jsonl's folder).
        skip_bad: count bad rows in :attr:`report` and go on instead of raising: rows with invalid
            json, a schema error or missing media are left out when the dataset is built, and a
            sample whose media fail to decode mid-run is dropped from its batch (see
            :class:`~ep_kit.data.instruct.InstructDataset`). Off by default: a bad row then fails
            naming the file and line. Why opt-in: a silently smaller training set changes results.
    """

    def __init__(
        self, train: str, val: str | None = None, media_root: str | None = None, skip_bad: bool = False
    ) -> None:
        self.paths = {"train": train, "val": val, "test": None}
        self.media_root = media_root
        self.skip_bad = skip_bad
        self._datasets: dict[str, InstructDataset] = {}

    @property
    def report(self) -> SkipReport:
        """Rows skipped so far over every split built (a fresh merge, in split order)."""
        return SkipReport.merged(ds.report for ds in self._datasets.values())

    def skip_summary(self) -> str:
        """End-of-run text of :attr:`report`: per split, rows kept and skipped, then every skip with its reason.

        Meant for the end of a run (decode-time skips accumulate while it goes on); see
        :class:`~ep_kit.data.instruct.InstructDataset` for what ``num_workers > 0`` leaves out.
        """
        parts = [
            f"{split}: {ds.annotation}: {ds.report.count} row(s) skipped "
            f"({len(ds.rows)} passed the build-time checks)"
            for split, ds in self._datasets.items()
        ]
        return "\n".join([*parts, self.report.summary()])

    def dataset(self, split: Split, encoder: SampleEncoder, use_audio_in_video: bool) -> Dataset | None:
        path = self.paths[split]
        if path is None:
            return None
        ds = InstructDataset(path, encoder, self.media_root, skip_bad=self.skip_bad)
        self._datasets[split] = ds
        return ds


class BenchmarkSource(DataSource):
    """A multiple-choice benchmark (``val`` and ``test`` are the benchmark; no training split).

    ``skip_bad=True`` counts and drops unreadable rows and media in :attr:`report` (logged by the
    data module) instead of raising.
    """

    def __init__(
        self,
        name: BenchmarkName,
        annotation: str,
        media_root: str,
        skip_bad: bool = False,
        limit: int | None = None,
    ) -> None:
        self.name = name
        self.annotation = annotation
        self.media_root = media_root
        self.skip_bad = skip_bad
        self.limit = limit
        self.report = SkipReport()

    @property
    def with_audio(self) -> bool:
        """Only the audio-visual benchmarks are evaluated with the video's audio track."""
        return self.name in AUDIO_BENCHMARKS

    def dataset(self, split: Split, encoder: SampleEncoder, use_audio_in_video: bool) -> Dataset | None:
        if split == "train":
            return None
        self.report = SkipReport()
        samples = read_benchmark(
            self.name,
            self.annotation,
            self.media_root,
            skip_bad=self.skip_bad,
            report=self.report,
            check_files=self.skip_bad,
        )
        if self.limit is not None:
            samples = samples[: self.limit]
        with_audio = use_audio_in_video and self.name in AUDIO_BENCHMARKS
        prompt = functools.partial(harness_prompt, with_audio=with_audio)
        ds = MCDataset(samples, encoder, prompt, mode="eval")
        if self.skip_bad:
            ds.drop_unreadable(self.report)
        return ds


class BenchmarkSuite(DataSource):
    """Several benchmarks evaluated in one run (``val`` and ``test``), one loader per benchmark.

    Each benchmark keeps its own audio setting (:data:`ep_kit.data.benchmarks.AUDIO_BENCHMARKS`:
    Video-MME without audio and MLVU are fed frames only), and the metrics report accuracy per
    benchmark, per category and per main-table group (``acc_group/audio_visual``,
    ``acc_group/video_only``).

    Args:
        benchmarks: the benchmarks (each a :class:`BenchmarkSource`); names must be unique.
    """

    def __init__(self, benchmarks: list[BenchmarkSource]) -> None:
        if not benchmarks:
            raise ValueError("BenchmarkSuite.benchmarks is empty: list at least one BenchmarkSource")
        names = [b.name for b in benchmarks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"BenchmarkSuite.benchmarks names {repeated} more than once")
        self.benchmarks = list(benchmarks)

    @property
    def report(self) -> SkipReport:
        return SkipReport.merged(b.report for b in self.benchmarks)

    def dataset(self, split: Split, encoder: SampleEncoder, use_audio_in_video: bool) -> Dataset | None:
        raise TypeError("BenchmarkSuite has one dataset per benchmark: use datasets()")

    def datasets(
        self, split: Split, encoder_for: Callable[[bool], SampleEncoder], use_audio_in_video: bool
    ) -> list[tuple[Dataset, bool]]:
        return [pair for b in self.benchmarks for pair in b.datasets(split, encoder_for, use_audio_in_video)]


class AVDataModule(L.LightningDataModule):
    """Audio-visual batches for training and multiple-choice evaluation.

    Args:
        source: where samples come from (``SyntheticSource``, ``InstructSource``, ``BenchmarkSource``).
        processor: ``"tiny"`` (offline byte-level tokenizer) or a local Qwen2.5-Omni model directory.
        batch_size / eval_batch_size: per-step batch sizes (eval defaults to ``batch_size``).
        num_workers: DataLoader workers.
        fps / max_frames: frame sampling (Qwen2.5-Omni: 2 fps, <= 768 frames).
        min_pixels / max_pixels: per-frame pixel bounds (``None``: the source's choice).
        use_audio_in_video: feed each video's audio track interleaved with its frames.
        audio_chunk_seconds: Whisper window of the feature extractor (longer audio is kept whole;
            ``None``: the source's choice, 30 s for real data).
        system_prompt: replaces the chat template's default system turn when set.
        cache_dir: processed-sample cache (``None``: no cache; the budget knobs below are part of its key).
        max_tokens: per-sample token budget (``len(input_ids)``; ``None``: no length control). A sample
            over it is re-decoded with fewer frames first (spread over the whole clip; down to 2 per
            video, or with audio down to half of the room the text leaves), then ``audio_policy`` applies; the prompt text is never truncated (a prompt that
            cannot fit raises ``ValueError`` naming the file). See :class:`SampleEncoder`.
        audio_policy: ``"truncate"`` keeps the first seconds of the audio track that fit (25 tokens per
            second) and warns naming the file; ``"error"`` raises ``ValueError`` naming the file instead.
        max_position_embeddings: the model's context (``max_position_embeddings`` of the model
            directory's config, given as a plain int: the data package reads no model code). A longer
            sample raises ``ValueError`` naming the file when ``max_tokens`` is set, else warns.
        shuffle_seed: seed of the training shuffle (``None``: the run's seed, ``torch.initial_seed()``,
            which ``seed_everything`` sets). The training loader is a
            :class:`~ep_kit.data.resumable.ResumableDataLoader` sharded across the data-parallel
            ranks (DDP, DeepSpeed, FSDP alike), so a run killed mid-epoch and resumed from its last
            checkpoint trains exactly the remaining samples of the epoch, each once; a resume whose
            dataset size, batch size or world size changed mid-epoch is refused with what changed.
    """

    def __init__(
        self,
        source: DataSource,
        processor: str = "tiny",
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        fps: float = 2.0,
        max_frames: int = FPS_MAX_FRAMES,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        use_audio_in_video: bool = True,
        audio_chunk_seconds: int | None = None,
        system_prompt: str | None = None,
        cache_dir: str | None = None,
        shuffle_seed: int | None = None,
        max_tokens: int | None = None,
        audio_policy: Literal["truncate", "error"] = "truncate",
        max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.processor_source = processor
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.fps = fps
        self.max_frames = max_frames
        lo, hi = source.pixel_bounds()
        self.min_pixels = min_pixels if min_pixels is not None else lo
        self.max_pixels = max_pixels if max_pixels is not None else hi
        self.use_audio_in_video = use_audio_in_video
        self.audio_chunk_seconds = (
            audio_chunk_seconds if audio_chunk_seconds is not None else source.audio_window()
        )
        self.system_prompt = system_prompt
        self.cache_dir = cache_dir
        self.shuffle_seed = shuffle_seed
        self.max_tokens = max_tokens
        self.audio_policy = audio_policy
        self.max_position_embeddings = max_position_embeddings
        self._processor = None
        self._encoders: dict[bool, SampleEncoder] = {}
        self.datasets: dict[str, list[tuple[Dataset, bool]]] = {}

    def encoder_for(self, use_audio_in_video: bool) -> SampleEncoder:
        """The sample encoder that feeds each video's audio track (or not); one processor serves both."""
        if use_audio_in_video not in self._encoders:
            if self._processor is None:
                self._processor = build_processor(
                    self.processor_source, self.audio_chunk_seconds, self.min_pixels, self.max_pixels
                )
            builder = AVInputBuilder(self._processor, use_audio_in_video, self.system_prompt)
            self._encoders[use_audio_in_video] = SampleEncoder(
                builder,
                self.fps,
                self.min_pixels,
                self.max_pixels,
                self.max_frames,
                self.cache_dir,
                max_tokens=self.max_tokens,
                audio_policy=self.audio_policy,
                max_position_embeddings=self.max_position_embeddings,
            )
        return self._encoders[use_audio_in_video]

    @property
    def encoder(self) -> SampleEncoder:
        """The encoder of the data module's own audio setting (``use_audio_in_video``)."""
        return self.encoder_for(self.use_audio_in_video)

    @property
    def tokenizer(self):
        return self.encoder.builder.tokenizer

    @property
    def skip_report(self) -> SkipReport | None:
        return getattr(self.source, "report", None)

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        splits: tuple[Split, ...] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }.get(stage or "", ("train", "val", "test"))
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self.source.datasets(split, self.encoder_for, self.use_audio_in_video)
        self._log_skips(at_end=False)

    def teardown(self, stage: str) -> None:
        """At the end of every run: the skip report again, with what was skipped while it ran."""
        self._log_skips(at_end=True)

    def _log_skips(self, at_end: bool) -> None:
        """Never skip silently: log the source's skip report when it holds anything."""
        report = self.skip_report
        if report is None or report.empty:
            return
        summary = getattr(self.source, "skip_summary", None) if at_end else None
        log.warning("%s", summary() if summary is not None else report.summary())

    def _collate(self, use_audio_in_video: bool) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return functools.partial(
            collate_av,
            pad_token_id=int(self.tokenizer.pad_token_id),
            use_audio_in_video=use_audio_in_video,
        )

    def _loaders(self, split: Split, shuffle: bool, batch_size: int) -> list[DataLoader]:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        loaders = []
        for ds, audio in self.datasets.get(split) or []:
            kwargs = {
                "batch_size": batch_size,
                "num_workers": self.num_workers,
                "collate_fn": self._collate(audio),
                "persistent_workers": self.num_workers > 0,
            }
            if shuffle:
                # Training: one resumable loader on any number of ranks. It shards the epoch itself and
                # its sampler is a DistributedSampler, so Lightning (DDP, DeepSpeed, FSDP) keeps it instead
                # of injecting its own, which would restart an interrupted epoch from the wrong batches.
                seed = self.shuffle_seed if self.shuffle_seed is not None else torch.initial_seed() % 2**31
                shard = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
                loaders.append(
                    ResumableDataLoader(
                        ds,
                        shuffle=True,
                        seed=seed,
                        num_replicas=int(shard.get("num_replicas") or 1),
                        rank=int(shard.get("rank") or 0),
                        **kwargs,
                    )
                )
            else:
                loaders.append(DataLoader(ds, shuffle=False, **kwargs))
        return loaders

    def train_dataloader(self) -> DataLoader:
        loaders = self._loaders("train", True, self.batch_size)
        if len(loaders) != 1:
            raise ValueError(
                f"data.source ({type(self.source).__name__}) has {'no' if not loaders else len(loaders)} training "
                "set(s); training needs exactly one (InstructSource or SyntheticSource)"
            )
        return loaders[0]

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loader(s); an empty list (no validation) when the source has no ``val`` split."""
        loaders = self._loaders("val", False, self.eval_batch_size)
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = self._loaders("test", False, self.eval_batch_size)
        if not loaders:
            raise ValueError(
                f"data.source ({type(self.source).__name__}) has no 'test' split: evaluate with a benchmark suite, "
                "e.g. `ep-kit test --config RECIPE --config recipes/eval_benchmarks.yaml` (see README, Real scale)"
            )
        return loaders[0] if len(loaders) == 1 else loaders


__all__ = [
    "AVDataModule",
    "BenchmarkSource",
    "BenchmarkSuite",
    "DataSource",
    "InstructSource",
    "MCDataset",
    "SyntheticSource",
    "harness_prompt",
    "short_prompt",
]
