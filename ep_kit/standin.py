"""A stand-in for the real-scale inputs: a tiny Qwen2.5-Omni checkpoint and data in their real on-disk formats.

    python -m ep_kit.standin OUT [--seed 0] [--questions 6] [--size 3b]

Why: the real recipes take a local Qwen2.5-Omni directory, ms-swift instruction data and four
benchmarks in their official layouts, none of which can be downloaded here. The stand-in writes
all of them in the layouts the real files have, at a size a 2-core CPU runs in seconds, so every
real recipe, evaluation and table driver runs end to end in the tests exactly as it does on a GPU
node; only the paths differ.

* ``OUT/model/``: ``Qwen2_5OmniForConditionalGeneration`` (thinker + talker + token2wav) written by
  transformers' own ``save_pretrained``: ``config.json`` (``model_type: qwen2_5_omni``), sharded
  safetensors with the released key names (``thinker.model.layers...``) and their index, the
  processor files (tokenizer with the real special-token ids and a chat template, feature extractor,
  image and video processors). The thinker has the released depth (36 layers for 3B, 28 for 7B),
  head_dim 128 and vocabulary size, so every recipe's layer indices and Sync-RoPE sections bind;
  widths are tiny. The tokenizer is byte level (no merges): real text encodes to more tokens.
* ``OUT/model-thinker/``: the same thinker saved alone (``model_type: qwen2_5_omni_thinker``).
* ``OUT/data/``: ``av_instruct/{train,val}.jsonl`` (ms-swift rows, media under ``media/``),
  ``daily_omni/`` (``qa.json``, ``Videos/<id>/<id>_video.mp4``), ``worldsense/``
  (``worldsense_qa.json`` per-video ``task<N>`` layout, ``videos/``), ``videomme/``
  (``videomme.json`` rows with Video-MME's fields, ``data/<videoID>.mp4``) and ``mlvu/``
  (``json/<n>_<task>.json``, ``video/<n>_<task>/``). Clips are the synthetic benchmark's (real mp4,
  H.264 + AAC); every answer follows from the media.
* ``OUT/paths_train.yaml``, ``OUT/paths_eval.yaml``, ``OUT/cpu.yaml``: the overlays that point a real
  recipe at the stand-in and at this machine (a user writes the same two path files for real data).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ep_kit.data.benchmarks import LETTERS
from ep_kit.data.synthetic import SyntheticAVBenchmark
from ep_kit.models.tiny import QWEN_VOCAB_3B, QWEN_VOCAB_7B, tiny_thinker_config
from ep_kit.tokens import QWEN_OMNI_SPECIAL_TOKENS

#: question types whose answer needs only the frames (the video-only benchmarks use these).
VIDEO_ONLY_TYPES = ("picture_only", "temporal_order")
DEPTH = {"3b": 36, "7b": 28}
VOCAB = {"3b": QWEN_VOCAB_3B, "7b": QWEN_VOCAB_7B}
DONE = "standin.json"


@dataclass(frozen=True)
class Standin:
    """Where a written stand-in keeps each part."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def thinker(self) -> Path:
        return self.root / "model-thinker"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def paths_train(self) -> Path:
        return self.root / "paths_train.yaml"

    @property
    def paths_eval(self) -> Path:
        return self.root / "paths_eval.yaml"

    @property
    def cpu(self) -> Path:
        return self.root / "cpu.yaml"

    def is_complete(self) -> bool:
        return (self.root / DONE).is_file()


# ------------------------------------------------------------------------------ model
def _talker_config() -> dict[str, Any]:
    """A tiny talker with the released codec vocabulary (8448) and special codec ids."""
    return {
        "vocab_size": 8448,
        "embedding_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
    }


def _token2wav_config() -> dict[str, Any]:
    """A tiny DiT + BigVGAN pair (the released structure, widths of a few channels)."""
    dit = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "emb_dim": 16,
        "head_dim": 16,
        "num_embeds": 64,
        "mel_dim": 16,
        "enc_emb_dim": 16,
        "enc_dim": 16,
        "enc_channels": [16, 16, 16, 16, 48],
        "enc_attention_channels": 8,
        "enc_se_channels": 8,
        "look_ahead_layers": [0],
        "look_backward_layers": [0],
    }
    bigvgan = {
        "mel_dim": 16,
        "upsample_initial_channel": 32,
        "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1, 3, 5]],
        "upsample_rates": [2, 2],
        "upsample_kernel_sizes": [4, 4],
    }
    return {"dit_config": dit, "bigvgan_config": bigvgan}


def standin_thinker_config(size: Literal["3b", "7b"] = "3b"):
    """The stand-in thinker: released depth, head_dim 128, vocabulary and token ids; tiny widths."""
    config = tiny_thinker_config(
        vocab="qwen", hidden_size=64, num_layers=DEPTH[size], num_heads=2, num_kv_heads=1, head_dim=128,
        intermediate_size=128, mrope_section=[16, 24, 24], vision_depth=2, audio_layers=2,
    )
    config.text_config.vocab_size = VOCAB[size]
    return config


def write_processor(directory: Path) -> None:
    """The processor files of a released directory, with a byte-level tokenizer on the real special ids."""
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    from ep_kit.data.tokenizer import CHAT_TEMPLATE, build_byte_tokenizer

    tokenizer = build_byte_tokenizer(QWEN_OMNI_SPECIAL_TOKENS)
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        # The released feature extractor's window is 300 s; the kit narrows it at load time.
        feature_extractor=WhisperFeatureExtractor(feature_size=128, chunk_length=300, return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(directory))


def write_model(root: Path, size: Literal["3b", "7b"] = "3b", seed: int = 0) -> None:
    """``root/model`` (full Qwen2.5-Omni, sharded) and ``root/model-thinker`` (thinker only), bf16."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    thinker = standin_thinker_config(size)
    config = Qwen2_5OmniConfig(
        thinker_config=thinker.to_dict(), talker_config=_talker_config(), token2wav_config=_token2wav_config()
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the released config's tts ids lie outside the talker vocab too
    try:
        model = Qwen2_5OmniForConditionalGeneration(config).to(torch.bfloat16)
        model.save_pretrained(str(root / "model"), max_shard_size="16MB")
        model.thinker.save_pretrained(str(root / "model-thinker"))
    finally:
        hf_logging.set_verbosity(verbosity)
    for directory in (root / "model", root / "model-thinker"):
        write_processor(directory)


# ------------------------------------------------------------------------------- data
def _clips(work: Path, name: str, n: int, seed: int, seconds: int, resolution: int, types=None) -> list[dict]:
    """``n`` synthetic test rows (with their mp4 paths), optionally of the given question types only."""
    over = n if types is None else 3 * n
    bench = SyntheticAVBenchmark(
        work / name, num_train=0, num_val=0, num_test=over, seconds=seconds, resolution=resolution,
        shuffle_options=True, seed=seed,
    ).prepare()
    rows = [r for r in bench.rows("test") if types is None or r["question_type"] in types][:n]
    for r in rows:
        r["path"] = bench.directory / r["video"]
    return rows


def _lettered(options: list[str]) -> list[str]:
    return [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]


def _move(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), dst)
    return str(dst)


def write_instruct(root: Path, work: Path, n_train: int, n_val: int, seed: int, seconds: int, res: int) -> None:
    """ms-swift rows: ``<video>`` + a multiple-choice prompt, answered with the letter and the option."""
    from ep_kit.data.benchmarks import format_mc_prompt

    bench = SyntheticAVBenchmark(
        work / "instruct", num_train=n_train, num_val=n_val, num_test=0, seconds=seconds, resolution=res,
        shuffle_options=True, seed=seed,
    ).prepare()
    for split in ("train", "val"):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for r in bench.rows(split):
                rel = f"clips/{r['question_id']}.mp4"
                _move(bench.directory / r["video"], root / "media" / rel)
                answer = r["options"][LETTERS.index(r["answer"])]
                prompt = format_mc_prompt(r["question"], r["options"])
                row = {
                    "messages": [
                        {"role": "user", "content": f"<video>{prompt}"},
                        {"role": "assistant", "content": f"{r['answer']}. {answer}"},
                    ],
                    "videos": [rel],
                }
                fh.write(json.dumps(row) + "\n")


def write_daily_omni(root: Path, rows: list[dict]) -> None:
    out = []
    for i, r in enumerate(rows):
        vid = f"standin{i:04d}"
        _move(r["path"], root / "Videos" / vid / f"{vid}_video.mp4")
        out.append({
            "Question": r["question"], "Choice": _lettered(r["options"]), "Answer": r["answer"], "video_id": vid,
            "Type": r["question_type"], "video_category": "synthetic", "video_duration": f"{r['seconds']}s",
        })
    (root / "qa.json").write_text(json.dumps(out, indent=1))


def write_worldsense(root: Path, rows: list[dict]) -> None:
    """Original layout: one entry per video with ``task1..N`` questions (two questions per video here)."""
    out: dict[str, Any] = {}
    for i, r in enumerate(rows):
        vid = f"ws{i // 2:04d}"
        if vid not in out:
            _move(r["path"], root / "videos" / f"{vid}.mp4")
            out[vid] = {"video_path": f"{vid}.mp4", "duration": r["seconds"], "domain": "synthetic"}
            events = r["events"]
        else:  # the second question of a video must be about that video: reuse its events
            r = _requestion(r, events)
        out[vid][f"task{len([k for k in out[vid] if k.startswith('task')]) + 1}"] = {
            "question": r["question"], "candidates": _lettered(r["options"]), "answer": r["answer"],
            "task_type": r["question_type"], "audio_class": "tone",
        }
    (root / "worldsense_qa.json").write_text(json.dumps(out, indent=1))


def _requestion(row: dict, events: list[dict]) -> dict:
    """A question about another clip's ``events``: how many flashes appeared (answer computed from them)."""
    flashes = sum(1 for e in events if e["kind"] == "flash")
    options = ["0", "1", "2", "3"]
    return {**row, "question": "How many flashes appeared?", "options": options,
            "answer": LETTERS[min(flashes, 3)], "question_type": "counting"}


def write_videomme(root: Path, rows: list[dict]) -> None:
    """Video-MME's row fields (``videoID``, ``question_id``, ``task_type``, lettered ``options``)."""
    out = []
    for i, r in enumerate(rows):
        video_id = f"{i + 1:03d}"
        youtube = f"standinVid{i:03d}"
        _move(r["path"], root / "data" / f"{youtube}.mp4")
        out.append({
            "video_id": video_id, "duration": "short", "domain": "Synthetic", "sub_category": r["question_type"],
            "url": f"https://www.youtube.com/watch?v={youtube}", "videoID": youtube, "question_id": f"{video_id}-1",
            "task_type": r["question_type"], "question": r["question"], "options": _lettered(r["options"]),
            "answer": r["answer"],
        })
    (root / "videomme.json").write_text(json.dumps(out, indent=1))


def write_mlvu(root: Path, rows: list[dict]) -> None:
    """MLVU dev: one json per task (answers as option text), videos in a folder per task."""
    tasks: dict[str, list[dict]] = {}
    for i, r in enumerate(rows):
        task = {"picture_only": "1_plotQA", "temporal_order": "2_order"}[r["question_type"]]
        name = f"standin{i:04d}.mp4"
        _move(r["path"], root / "video" / task / name)
        tasks.setdefault(task, []).append({
            "video": name, "duration": r["seconds"], "question": r["question"], "candidates": r["options"],
            "answer": r["options"][LETTERS.index(r["answer"])], "question_type": task.split("_", 1)[1],
        })
    (root / "json").mkdir(parents=True, exist_ok=True)
    for task, items in tasks.items():
        (root / "json" / f"{task}.json").write_text(json.dumps(items, indent=1))


def write_data(root: Path, questions: int, seed: int, seconds: int = 4, resolution: int = 56) -> None:
    """Instruction data (``4 * questions`` train, ``questions`` val) and the five benchmark layouts."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        work = Path(tmp)
        (root / "av_instruct").mkdir(parents=True, exist_ok=True)
        write_instruct(root / "av_instruct", work, 4 * questions, questions, seed, seconds, resolution)
        write_daily_omni(root / "daily_omni", _clips(work, "do", questions, seed + 1, seconds, resolution))
        write_worldsense(root / "worldsense", _clips(work, "ws", questions, seed + 2, seconds, resolution))
        write_videomme(root / "videomme", _clips(work, "vm", questions, seed + 3, seconds, resolution))
        write_mlvu(root / "mlvu", _clips(work, "ml", questions, seed + 4, seconds, resolution, VIDEO_ONLY_TYPES))


# ---------------------------------------------------------------------------- overlays
def benchmark_entries(data: Path) -> list[dict[str, Any]]:
    """The evaluation suite's entries for data laid out as the official releases (``data`` = their parent)."""
    def entry(name: str, annotation: Path, media: Path) -> dict[str, Any]:
        return {"class_path": "ep_kit.data.BenchmarkSource",
                "init_args": {"name": name, "annotation": str(annotation), "media_root": str(media)}}

    return [
        entry("worldsense", data / "worldsense/worldsense_qa.json", data / "worldsense/videos"),
        entry("daily_omni", data / "daily_omni/qa.json", data / "daily_omni/Videos"),
        entry("videomme", data / "videomme/videomme.json", data / "videomme/data"),
        entry("videomme_noaudio", data / "videomme/videomme.json", data / "videomme/data"),
        entry("mlvu", data / "mlvu/json", data / "mlvu/video"),
    ]


def write_overlays(s: Standin) -> None:
    """Path overlays (what a user writes for real data) and the CPU overlay (hardware only)."""
    import yaml

    model = {"thinker": {"init_args": {"path": str(s.model)}}}
    train = {
        "model": model,
        "data": {"init_args": {"source": {"init_args": {
            "train": str(s.data / "av_instruct/train.jsonl"),
            "val": str(s.data / "av_instruct/val.jsonl"),
            "media_root": str(s.data / "av_instruct/media"),
        }}}},
    }
    evaluation = {"model": model, "data": {"init_args": {"source": {"init_args": {
        "benchmarks": benchmark_entries(s.data)}}}}}
    # Hardware only: one CPU process, fp32 (bf16 matmuls are slow on most CPUs), no loader workers.
    cpu = {
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"},
        "model": {"thinker": {"init_args": {"dtype": "float32"}}},
        "data": {"init_args": {"num_workers": 0}},
    }
    header = "# Written by `python -m ep_kit.standin`: {}\n"
    s.paths_train.write_text(header.format("point a real training recipe at the stand-in") + yaml.safe_dump(train))
    s.paths_eval.write_text(header.format("point an evaluation recipe at the stand-in") + yaml.safe_dump(evaluation))
    s.cpu.write_text(header.format("run a real recipe on one CPU process") + yaml.safe_dump(cpu))


def write_standin(
    out: str | Path, questions: int = 6, seed: int = 0, size: Literal["3b", "7b"] = "3b", force: bool = False
) -> Standin:
    """Write the whole stand-in into ``out`` (skipped when a finished one is already there)."""
    s = Standin(Path(out).resolve())
    if s.is_complete() and not force:
        return s
    if questions < 2:
        raise ValueError(f"questions must be >= 2 per benchmark, got {questions}")
    if s.root.exists() and any(s.root.iterdir()):
        if not force:
            raise FileExistsError(f"{s.root} exists and holds no finished stand-in; pass --force to overwrite it")
        shutil.rmtree(s.root)
    s.root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    write_model(s.root, size=size, seed=seed)
    write_data(s.data, questions, seed)
    write_overlays(s)
    info = {"size": size, "questions": questions, "seed": seed, "seconds": round(time.time() - start, 1)}
    (s.root / DONE).write_text(json.dumps(info, indent=2))
    return s


def main(argv: list[str] | None = None) -> Standin:
    parser = argparse.ArgumentParser(prog="python -m ep_kit.standin", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write (model/, model-thinker/, data/, overlays)")
    parser.add_argument("--questions", type=int, default=6, help="questions per benchmark (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(DEPTH), default="3b", help="depth and vocabulary of 3B or 7B")
    parser.add_argument("--force", action="store_true", help="overwrite an existing directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    s = write_standin(args.out, questions=args.questions, seed=args.seed, size=args.size, force=args.force)
    print(f"[ep-kit] stand-in written to {s.root}: model {s.model}, data {s.data}")
    print(f"[ep-kit] try: ep-kit fit --config recipes/cs2_ste_20.yaml --config {s.paths_train} --config {s.cpu} "
          "--trainer.max_steps=2")
    return s


if __name__ == "__main__":
    main()
