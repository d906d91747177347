"""Everything between media files on disk and Qwen2.5-Omni model inputs.

* :mod:`~ep_kit.data.media` -- PyAV decoding with Qwen2.5-Omni's frame/audio rules.
* :mod:`~ep_kit.data.tokenizer` / :mod:`~ep_kit.data.processor` -- offline processor, conversation
  -> inputs with labels, cached per-sample encoding.
* :mod:`~ep_kit.data.instruct` -- ms-swift style instruction jsonl.
* :mod:`~ep_kit.data.benchmarks` -- WorldSense, Daily-Omni, Video-MME, MLVU readers.
* :mod:`~ep_kit.data.synthetic` -- the seeded synthetic audio-visual benchmark.
* :mod:`~ep_kit.data.collate` / :mod:`~ep_kit.data.datamodule` -- batches and the LightningDataModule.
* :mod:`~ep_kit.data.one_clip` -- ``build_batch``: one clip and a question -> a model batch.
"""

from ep_kit.data.benchmarks import MCSample, SkipReport, format_mc_prompt, read_benchmark
from ep_kit.data.collate import collate_av
from ep_kit.data.datamodule import (
    AVDataModule,
    BenchmarkSource,
    BenchmarkSuite,
    DataSource,
    InstructSource,
    MCDataset,
    SyntheticSource,
)
from ep_kit.data.instruct import InstructDataset, read_instruct_jsonl
from ep_kit.data.media import VideoClip, load_audio, load_video
from ep_kit.data.one_clip import build_batch
from ep_kit.data.processor import AVInputBuilder, SampleEncoder, build_processor
from ep_kit.data.synthetic import SyntheticAVBenchmark
from ep_kit.data.tokenizer import build_tiny_tokenizer

__all__ = [
    "AVDataModule",
    "AVInputBuilder",
    "BenchmarkSource",
    "BenchmarkSuite",
    "DataSource",
    "InstructDataset",
    "InstructSource",
    "MCDataset",
    "MCSample",
    "SampleEncoder",
    "SkipReport",
    "SyntheticAVBenchmark",
    "SyntheticSource",
    "VideoClip",
    "build_batch",
    "build_processor",
    "build_tiny_tokenizer",
    "collate_av",
    "format_mc_prompt",
    "load_audio",
    "load_video",
    "read_benchmark",
    "read_instruct_jsonl",
]
