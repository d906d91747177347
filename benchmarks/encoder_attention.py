"""The vision tower's attention calls: stock per-window ``sdpa`` against one SDPA call per window length.

Why: under ``sdpa`` transformers' Qwen2.5-Omni vision encoder calls the attention function once per
window per layer (6840 calls for a 30 s clip at 2 fps and 224 x 420 frames), and the encoders are
about 43% of the end-to-end prefill FLOPs, which no token reducer touches. This script measures
what those calls cost and what :mod:`ep_kit.models.vision_attention` (the same encoder, its window
attention routed through transformers' packed "flash" call into one SDPA per window length) saves.

What it does, on the released vision architecture (3B and 7B share it: depth 32, hidden 1280,
16 heads, window 112, patch 14, merge 2, full attention in blocks 7/15/23/31), random weights:

* counts ``aten::scaled_dot_product_attention`` calls of one forward per variant (torch profiler)
  and checks them against the analytic count (:func:`ep_kit.models.vision_attention.attention_calls`),
  which it also evaluates for a ``--seconds`` clip at the processor's frame size;
* checks the grouped output equals the stock one (max abs difference);
* times the tower, variants interleaved (stock, grouped, stock, ...), median and range over
  ``--repeats``, with the attention modules' own time (forward hooks) split out;
* puts the vision tower into the prefill: its share of the end-to-end FLOPs (:mod:`ep_kit.flops`)
  at ``--seconds`` and at the measured clip.

Default clip: ``--frames 2`` of 224 x 420 (one temporal grid, the processor's size for 16:9 video
at 105k pixels). Every per-frame quantity (windows, calls, FLOPs) is linear in the number of
temporal grids, so the per-forward ratios of one grid are those of a 30 s clip.

Run (CPU):  python benchmarks/encoder_attention.py
Run (GPU):  python benchmarks/encoder_attention.py --device cuda --dtype bf16 --frames 60 --repeats 10
Results: ``runs/encoder_attention/encoder_attention_<device>.{json,md}`` (``--out`` to choose;
``benchmarks/results`` holds the recorded ones).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

from ep_kit import flops
from ep_kit.models import vision_attention as va
from ep_kit.models.tiny import qwen_omni_3b_config, qwen_omni_7b_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "encoder_attention"
VARIANTS = ("stock", "grouped")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("3b", "7b"), default="3b", help="released config (same vision tower)")
    p.add_argument("--frames", type=int, default=2, help="frames of the measured clip (2 per temporal grid)")
    p.add_argument("--height", type=int, default=224, help="frame height (multiple of 28)")
    p.add_argument("--width", type=int, default=420, help="frame width (multiple of 28)")
    p.add_argument("--seconds", type=float, default=30.0, help="clip length of the analytic counts and FLOP share")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--depth", type=int, default=None,
                   help="keep only the first N vision blocks (quick checks; default: the released 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed tower forwards per variant (interleaved)")
    p.add_argument("--core-repeats", type=int, default=20, help="timed attention-core passes per variant (interleaved)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.height % 28 or args.width % 28 or args.frames < 1 or args.repeats < 1:
        p.error("height/width must be multiples of 28, frames and repeats positive")
    return args


class ModuleTimer:
    """Wall time spent inside a set of modules (forward pre-hook / hook pairs), synchronising CUDA."""

    def __init__(self, modules: Sequence[torch.nn.Module], cuda: bool) -> None:
        self.cuda, self.total, self._start = cuda, 0.0, 0.0
        self.handles = [h for m in modules for h in (m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post))]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, *_: Any) -> None:
        self._start = self._now()

    def _post(self, *_: Any) -> None:
        self.total += self._now() - self._start

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def sdpa_calls(encoder: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``aten::scaled_dot_product_attention`` calls of one forward (torch profiler), and its output."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        out = va.encode_video(encoder, pixels, grid)
    return sum(1 for e in prof.events() if e.name == "aten::scaled_dot_product_attention"), out


def timed(encoder: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor, cuda: bool) -> tuple[float, float]:
    """(tower ms, attention-module ms) of one forward."""
    timer = ModuleTimer(va.attention_modules(encoder), cuda)
    try:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            va.encode_video(encoder, pixels, grid)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3, timer.total * 1e3
    finally:
        timer.remove()


def core_pass(core: torch.nn.Module, inputs: dict[str, Any], cuda: bool) -> float:
    """ms of one forward's worth of attention without the projections: every block's attention (window
    bounds, or per-grid bounds in the full-attention blocks) through transformers' own attention forward.
    Fresh bound tensors per pass, as the encoder builds them per forward."""
    cu_windows, cu_full = (t.clone() for t in va.window_bounds(inputs["vision"], inputs["grid"]))
    full = set(inputs["vision"].fullatt_block_indexes)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        lengths = {id(cu): int((cu[1:] - cu[:-1]).max()) for cu in (cu_windows, cu_full)}
        for layer in range(inputs["vision"].depth):
            cu = cu_full if layer in full else cu_windows
            core(inputs["hidden"], cu_seqlens=cu, max_seqlen=lengths[id(cu)], position_embeddings=inputs["rotary"])
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def add_paired(res: dict[str, Any]) -> dict[str, Any]:
    """Median and range of the per-repeat differences stock - grouped (ms; the variants ran back to back
    within a repeat, so a load change between repeats cancels) for the tower and the attention core."""
    for key in ("tower_ms_runs", "attention_core_ms_runs"):
        runs = res[key]
        res[key.replace("_runs", "_paired_saving")] = summary([a - b for a, b in zip(runs["stock"], runs["grouped"], strict=True)])
    return res


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha} with uncommitted changes" if dirty else sha


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    config = (qwen_omni_3b_config if args.model == "3b" else qwen_omni_7b_config)()
    vision = config.vision_config
    if args.depth is not None:  # a shallower tower of the same blocks, for quick runs (tests)
        vision.depth = args.depth
        vision.fullatt_block_indexes = [i for i in vision.fullatt_block_indexes if i < args.depth]
    grid_t, grid_h, grid_w = va.grid_of(args.frames, args.height, args.width, vision)
    grid = torch.tensor([[grid_t, grid_h, grid_w]], device=device)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(grid_t * grid_h * grid_w, patch_dim, generator=gen).to(device, dtype)
    torch.manual_seed(0)
    encoder = va.random_vision_encoder(vision, dtype=dtype).to(device)
    print(f"vision tower {sum(p.numel() for p in encoder.parameters()) / 1e6:.0f} M params, grid {grid.tolist()[0]}, "
          f"{args.dtype} on {args.device}", flush=True)

    calls, outputs = {}, {}
    for variant in VARIANTS:  # the profiled forward is also the warm-up
        va.set_grouped_vision_attention(encoder, variant == "grouped")
        calls[variant], outputs[variant] = sdpa_calls(encoder, pixels, grid)
        print(f"{variant}: {calls[variant]} SDPA calls", flush=True)
    diff = float((outputs["grouped"].float() - outputs["stock"].float()).abs().max())
    scale = float(outputs["stock"].float().abs().max())

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    attn: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for variant in VARIANTS:
            va.set_grouped_vision_attention(encoder, variant == "grouped")
            ms, attn_ms = timed(encoder, pixels, grid, cuda)
            times[variant].append(ms)
            attn[variant].append(attn_ms)
            print(f"repeat {r + 1}/{args.repeats} {variant}: tower {ms:.1f} ms, attention modules {attn_ms:.1f} ms", flush=True)

    core = va.bare_attention(encoder)
    n, dim = pixels.shape[0], vision.hidden_size
    head_dim = dim // vision.num_heads
    inputs = {
        "vision": vision, "grid": grid, "hidden": torch.randn(n, dim, generator=gen).to(device, dtype),
        "rotary": tuple(torch.randn(n, head_dim, generator=gen).to(device, dtype) for _ in range(2)),
    }
    core_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.core_repeats + 1):  # the first pass of each variant is a warm-up
        for variant in VARIANTS:
            va.set_grouped_vision_attention(encoder, variant == "grouped")
            ms = core_pass(core, inputs, cuda)
            if r:
                core_ms[variant].append(ms)
    print("attention core ms: " + ", ".join(f"{v} {statistics.median(core_ms[v]):.1f}" for v in VARIANTS), flush=True)

    measured_grid = [(grid_t, grid_h, grid_w)]
    counts_clip = flops.token_counts(args.seconds, fps=args.fps, height=args.height, width=args.width)
    counts_measured = flops.token_counts(max(args.frames / args.fps, 0.5), fps=args.fps, height=args.height, width=args.width)
    share = {}
    for name, counts in (("clip", counts_clip), ("measured", counts_measured)):
        f = flops.prefill_flops(config, counts)
        share[name] = {
            "seconds": counts["seconds"], "grid_thw": list(counts["grid_thw"]), "tokens": counts["total"],
            "vision_flops": f["vision"], "audio_flops": f["audio"], "end_to_end_flops": f["end_to_end"],
            "vision_share": f["vision"] / f["end_to_end"], "encoders_share": f["encoders"] / f["end_to_end"],
        }
    stock, grouped = statistics.median(times["stock"]), statistics.median(times["grouped"])
    return add_paired({
        "meta": {
            "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/encoder_attention.py", *args.argv]),
            "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if cuda else
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "model": args.model, "depth": vision.depth, "dtype": args.dtype, "frames": args.frames, "height": args.height, "width": args.width,
            "grid_thw": list(measured_grid[0]), "repeats": args.repeats, "order": "interleaved stock, grouped per repeat",
        },
        "calls": {
            "measured": calls,
            "analytic_measured_clip": {v: va.attention_calls(vision, measured_grid, v == "grouped") for v in VARIANTS},
            "analytic_clip": {v: va.attention_calls(vision, [counts_clip["grid_thw"]], v == "grouped") for v in VARIANTS},
            "clip_seconds": args.seconds, "clip_grid_thw": list(counts_clip["grid_thw"]),
        },
        "output_max_abs_diff": diff, "output_max_abs": scale,
        "tower_ms": {v: summary(times[v]) for v in VARIANTS},
        "attention_ms": {v: summary(attn[v]) for v in VARIANTS},
        "attention_core_ms": {v: summary(core_ms[v]) for v in VARIANTS},
        "tower_ms_runs": times, "attention_ms_runs": attn, "attention_core_ms_runs": core_ms,
        "core_saving_ms": statistics.median(core_ms["stock"]) - statistics.median(core_ms["grouped"]),
        "speedup_tower": stock / grouped,
        "flop_share": share,
        "tower_flops_per_s": share["measured"]["vision_flops"] / (stock / 1e3),
    })


def to_markdown(res: dict[str, Any]) -> str:
    m, c, s = res["meta"], res["calls"], res["flop_share"]

    def paired(key: str) -> str:
        t = res[key]
        return f"{t['median']:.1f} ({t['min']:.1f} to {t['max']:.1f})"

    def row(name: str, key: str) -> str:
        t = res[key]
        return (f"| {name} | " + " | ".join(
            f"{t[v]['median']:.1f} ({t[v]['min']:.1f}-{t[v]['max']:.1f})" for v in VARIANTS) + " |")

    lines = [
        "# Vision tower attention calls: stock sdpa vs grouped by window length",
        "",
        f"Command: `{m['command']}`  ",
        f"Commit: {m['commit']}; {m['date']}; {m['device']}; torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']}  ",
        f"Qwen2.5-Omni-{m['model'].upper()} vision tower (random weights), {m['dtype']}, clip {m['frames']} frames of "
        f"{m['height']}x{m['width']} = grid {m['grid_thw']}; {m['repeats']} forwards per variant, {m['order']}.",
        "",
        "## Attention calls per forward",
        "",
        "| | stock sdpa | grouped |",
        "|---|---|---|",
        f"| measured clip, profiler (`aten::scaled_dot_product_attention`) | {c['measured']['stock']} | {c['measured']['grouped']} |",
        f"| measured clip, analytic | {c['analytic_measured_clip']['stock']} | {c['analytic_measured_clip']['grouped']} |",
        f"| {c['clip_seconds']:g} s clip (grid {c['clip_grid_thw']}), analytic | {c['analytic_clip']['stock']} | "
        f"{c['analytic_clip']['grouped']} |",
        "",
        f"Output: max |grouped - stock| = {res['output_max_abs_diff']:.3g} (max |stock| = {res['output_max_abs']:.3g}).",
        "",
        "## Time per forward, ms: median (min-max)",
        "",
        "| | stock sdpa | grouped |",
        "|---|---|---|",
        row("vision tower", "tower_ms"),
        row("of which attention modules (q/k/v/proj + attention, hooks)", "attention_ms"),
        row(f"attention core: all {m.get('depth', 32)} blocks' attention without q/k/v/proj (separate passes)", "attention_core_ms"),
        "",
        f"Tower time ratio stock / grouped (medians): {res['speedup_tower']:.3f}; attained {res['tower_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(stock, FLOP model). Attention-core saving (median difference): {res['core_saving_ms']:.1f} ms per forward "
        f"= {res['core_saving_ms'] / res['tower_ms']['stock']['median']:.2%} of the stock tower.",
        "",
        "Paired saving (stock - grouped within a repeat), ms, median (min to max): tower "
        + paired("tower_ms_paired_saving") + "; attention core " + paired("attention_core_ms_paired_saving") + ".",
        "",
        "## Vision tower in the prefill (FLOP model, ep_kit.flops, full model, audio of the video)",
        "",
        "| clip | grid | LLM tokens | vision TFLOP | end-to-end TFLOP | vision share | encoders share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("measured", "clip"):
        x = s[name]
        lines.append(f"| {x['seconds']:g} s | {x['grid_thw']} | {x['tokens']} | {x['vision_flops'] / 1e12:.2f} | "
                     f"{x['end_to_end_flops'] / 1e12:.2f} | {x['vision_share']:.1%} | {x['encoders_share']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"encoder_attention_{torch.device(args.device).type}{'_' + args.tag if args.tag else ''}"
    paths = {"json": args.out / f"{stem}.json", "md": args.out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(res, indent=2) + "\n")
    paths["md"].write_text(to_markdown(res))
    print(to_markdown(res))
    print(f"wrote {paths['json']} and {paths['md']}")
    return paths


if __name__ == "__main__":
    main()
