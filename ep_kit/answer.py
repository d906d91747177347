"""``ep-kit answer``: ask the kit about one clip and see which tokens it kept.

::

    ep-kit answer --video CLIP.mp4 --question "Which colour flashes first?" --options red green blue yellow \\
        --config recipes/toy/cs2_ste_20.yaml [--weights last.ckpt] [--keep_ratio 0.1] [--output_dir DIR]

The recipe is parsed by the kit's own parser (:func:`ep_kit.cli.answer` calls :func:`ep_kit.cli.parse`), so the clip is encoded by
the recipe's data module (its processor, frame rate and pixel bounds, no sample cache) and answered
by the recipe's model through the one prefill every run uses. With ``--options`` the answer is the
option whose letter scores highest (as ``ep-kit test``); without, the model generates a short
answer. Prints the answer and the kept tokens per modality; writes ``kept.json`` (every kept
audio/video token: modality, input index, frame and grid cell or time) and ``kept.png`` (see
:mod:`ep_kit.kept`) into ``--output_dir`` (default ``runs/answer/<clip name>``). Any other
``--key=value`` is passed to the recipe parser as an override (e.g. ``--model.thinker.init_args.init_from=null``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ep_kit.data.benchmarks import LETTERS, MCSample
from ep_kit.data.collate import collate_av
from ep_kit.data.datamodule import AVDataModule, MCDataset, SyntheticSource, harness_prompt, short_prompt
from ep_kit.data.media import load_video
from ep_kit.kept import kept_figure, kept_positions
from ep_kit.sequence import Modality


def arguments() -> argparse.ArgumentParser:
    """The ``ep-kit answer`` arguments (unknown ``--key=value`` ones are recipe overrides: ``parse_known_args``)."""
    p = argparse.ArgumentParser(prog="ep-kit answer", description="Answer one question about one clip and "
                                "draw which tokens were kept. Other --key=value arguments override the recipe.")
    p.add_argument("--video", required=True, help="the clip (a video file with its audio track)")
    p.add_argument("--question", required=True)
    p.add_argument("--options", nargs="+", default=None, help="answer options (lettered A, B, ... in order)")
    p.add_argument("--config", action="append", required=True, help="recipe file(s), as for ep-kit fit")
    p.add_argument("--weights", default=None, help="trained weights: a .ckpt of ep-kit fit (model.init_from)")
    p.add_argument("--keep_ratio", type=float, default=None, help="budget (default: the recipe's)")
    p.add_argument("--output_dir", default=None, help="where kept.json and kept.png go (default runs/answer/<clip>)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="answer length without --options")
    return p


def recipe_args(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """The kit-parser arguments of an ``answer`` call: its recipes, no sample cache, weights, budget, overrides.

    Checks the clip first, so a wrong path fails before the model is built.
    """
    if not Path(args.video).is_file():
        raise FileNotFoundError(f"--video: {args.video} does not exist")
    out = [a for c in args.config for a in ("--config", str(c))]
    out += ["--data.init_args.cache_dir=null", *overrides]
    if args.weights is not None:
        out.append(f"--model.init_from={args.weights}")
    if args.keep_ratio is not None:
        out.append(f"--model.keep_ratio={args.keep_ratio}")
    return out


def encode(data: AVDataModule, video: str, question: str, options: Sequence[str] | None) -> dict[str, Any]:
    """One-sample batch of ``video`` + ``question`` (+ lettered ``options``), as the recipe's data module encodes."""
    encoder = data.encoder
    if options:
        if len(options) > len(LETTERS):
            raise ValueError(f"--options: at most {len(LETTERS)} options, got {len(options)}")
        sample = MCSample("clip", str(video), question, list(options), LETTERS[0], "clip", "answer")
        audio = data.use_audio_in_video
        prompt = short_prompt if isinstance(data.source, SyntheticSource) else (lambda s: harness_prompt(s, audio))
        item = MCDataset([sample], encoder, prompt, mode="eval")[0]
        item["answer_index"] = -1  # no known answer
    else:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        item = dict(encoder.encode(messages, [str(video)], add_generation_prompt=True))
    return collate_av([item], pad_token_id=int(data.tokenizer.pad_token_id),
                      use_audio_in_video=data.use_audio_in_video)


def answer_clip(
    module: Any,
    data: AVDataModule,
    video: str,
    question: str,
    options: Sequence[str] | None,
    output_dir: str | Path | None = None,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Answer with the recipe's ``module`` (an ``EPKitModule``) and ``data`` module, print the kept
    counts, write ``kept.json`` and ``kept.png``; returns the JSON record."""
    module.eval()
    batch = encode(data, video, question, options)
    model = module.model
    with torch.no_grad():
        if options:
            res = module.answer(batch)
            pick = int(res["predicted"][0])
            text = f"{LETTERS[pick]}. {options[pick]}"
            p = res["prefill"]
        else:
            ids = model.generate(batch, max_new_tokens=max_new_tokens)[0]
            text = data.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
            p = model.prefill(batch)
    grid = [int(x) for x in batch["video_grid_thw"][0]] if "video_grid_thw" in batch else None
    per_grid = float(batch["video_second_per_grid"][0]) if grid is not None else 0.0
    merge = int(model.config.vision_config.spatial_merge_size)
    rate = model.positions_per_second
    tokens = kept_positions(p.full.modality[0], p.kept.source_index[0], grid, per_grid, merge, rate)
    counts = {}
    for name, m in (("video", Modality.VIDEO), ("audio", Modality.AUDIO)):
        counts[name] = {"kept": sum(t["modality"] == name for t in tokens), "total": int(p.full.count(m)[0])}
    record = {
        "video": str(video),
        "question": question,
        "options": list(options) if options else None,
        "answer": text,
        "keep_ratio": module.keep_ratio,
        "counts": counts,
        "video_grid_thw": grid,
        "spatial_merge_size": merge,
        "second_per_grid": per_grid,
        "audio_tokens_per_second": rate,
        "tokens": tokens,
    }
    out = Path(output_dir) if output_dir is not None else Path("runs") / "answer" / Path(video).stem
    out.mkdir(parents=True, exist_ok=True)
    (out / "kept.json").write_text(json.dumps(record, indent=1))
    if grid is not None:
        clip = load_video(video, fps=data.encoder.fps, min_pixels=data.encoder.min_pixels,
                          max_pixels=data.encoder.max_pixels, max_frames=data.encoder.max_frames)
        fig = kept_figure(clip.numpy(), tokens, (grid[0], grid[1], grid[2]), counts["audio"]["total"], rate, merge,
                          title=f"{Path(video).name}: {question} -> {text}")
        fig.savefig(out / "kept.png", dpi=100)
    print(f"answer: {text}")
    print("kept: " + ", ".join(f"{k} {v['kept']}/{v['total']}" for k, v in counts.items())
          + f" (keep ratio {module.keep_ratio:g})")
    print(f"wrote {out / 'kept.json'}" + (f" and {out / 'kept.png'}" if grid is not None else ""))
    return record
