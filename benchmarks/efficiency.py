"""Prefill latency and peak memory of Qwen2.5-Omni with token reduction, against the FLOP model and the paper.

Why this script exists: the paper's headline (Qwen2.5-Omni-3B, 517.1 ms -> 174.8 ms and 32.0 GB ->
12.3 GB at a 5% budget, sieve included) is only worth repeating if both sides are measured in one
run on one device and set against what the arithmetic allows. The thinker architecture is built
from its config with random weights (latency and memory do not depend on the weights), fed
synthetic clips with the token counts of real ones (2 fps, about 105k pixels per frame, audio of
the video interleaved in 2-second chunks), and timed stage by stage through the model's one
prefill path (:meth:`OmniThinker.prefill` with a clock, then :meth:`OmniThinker.head`):

* ``encoders``: embedding (vision + audio encoders through transformers, scatter, positions of the
  full sequence);
* ``sieve``: the pre-LLM reduction (CS2's N bidirectional layers, scorer, Top-K; Random,
  IntraModal and OmniZip select here too; zero for methods that reduce inside the LLM);
* ``llm``: the decoder with in-LLM drops, + final norm and lm_head on the last token by default;
* ``llm_stage`` = sieve + llm (everything after the embedding), ``end_to_end`` = all three.

Methods are the recipes users run (``--methods``: recipe files, one row each, labelled by the file
stem): :func:`ep_kit.recipes.method_from_recipe` parses each with the kit's CLI parser (a
``baselines/`` overlay on its evaluation base, a budget overlay on ``cs2_ste_20.yaml``) and the
row runs that recipe's reducer, budget and rotary layout on the benchmark's thinker (``--model``).
The default is every row of the main table: ``full``, EchoingPixels ``cs2_ste_{20,10,5}`` and every
``baselines/<method>_<pct>.yaml`` found, so a new baseline's recipes are measured with no edit here.
The FLOP-ideal speed-ups come from :mod:`ep_kit.flops` with each reducer's own token schedule.

On CUDA: bf16, CUDA events after warm-up, median of ``--repeats`` runs, peak memory from
``torch.cuda.max_memory_allocated`` and PASS/FAIL lines for the efficiency targets. On CPU:
float32, ``time.perf_counter``, no peak memory. ``--smoke`` runs a tiny thinker on CPU with the
toy recipes (``recipes/toy/``; a subset by default: full, the three EchoingPixels budgets and every
baseline at 20%). Results: ``runs/efficiency/efficiency_<device>[_tag].{json,md,png}`` (``--out``
to choose; ``benchmarks/results`` holds the recorded ones).

Run on a GPU:   python benchmarks/efficiency.py --model 3b     (30/60/120 s, every main-table row, 3 warm-up + 10 runs)
One method:     python benchmarks/efficiency.py --methods recipes/baselines/full.yaml recipes/baselines/fastv_20.yaml
CPU smoke:      python benchmarks/efficiency.py --smoke

Notes. Results are written after every measured row (``meta.complete`` false until the end), so a
run cut short by a time limit still leaves its numbers. With ``--attn sdpa`` transformers runs the
vision encoder's window attention as one SDPA call per window from Python (thousands per forward
for long clips); ``--attn flash_attention_2`` (needs ``flash_attn``) uses its varlen kernel instead.
Rows whose recipes share a reducer configuration (CS2 at three budgets) share one reducer, so the
sieve copy is built once.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from ep_kit import flops
from ep_kit.models import OmniThinker
from ep_kit.models.omni import random_thinker
from ep_kit.models.tiny import (
    SampleSpec,
    make_av_batch,
    qwen_omni_3b_config,
    qwen_omni_7b_config,
    tiny_thinker_config,
)
from ep_kit.recipes import RecipeMethod, baseline_keys, method_configs, method_from_recipe
from ep_kit.sequence import Modality

ROOT = Path(__file__).resolve().parents[1]
#: Default output directory (``benchmarks/results`` holds the recorded runs; pass ``--out`` to write there).
DEFAULT_OUT = ROOT / "runs" / "efficiency"
#: The paper's Qwen2.5-Omni-3B efficiency table (Daily-Omni, forward incl. sieve), by recipe stem: (ms, GB).
PAPER = {"full": (517.1, 32.0), "cs2_ste_20": (231.7, 14.2), "cs2_ste_10": (194.0, 13.1), "cs2_ste_5": (174.8, 12.3)}
#: Budgets of the main table, in row order.
BUDGETS = (20, 10, 5)
GIB = 2**30
STAGES = ("encoders", "sieve", "llm", "llm_stage", "end_to_end")


# ------------------------------------------------------------------------------------- settings
@dataclass
class Scale:
    """Model and clip geometry of one benchmark scale."""

    config: Any
    height: int | None  # None = smart_resize of a 16:9 1080p source to --max-pixels
    width: int | None
    prompt_tokens: int


def make_scale(args: argparse.Namespace) -> Scale:
    """The config and clip geometry for ``--model`` (``tiny`` = the CPU smoke configuration)."""
    if args.model == "tiny":
        cfg = tiny_thinker_config(
            hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2, vision_depth=2, vision_hidden_size=32,
            audio_layers=2, audio_d_model=32, attn_implementation=args.attn,
        )
        return Scale(cfg, 56, 84, 16)
    factory = {"3b": qwen_omni_3b_config, "7b": qwen_omni_7b_config}[args.model]
    return Scale(factory(attn_implementation=args.attn), args.height, args.width, args.prompt_tokens)


# --------------------------------------------------------------------------------------- methods
def default_recipes(toy: bool, baseline_budgets: Sequence[int] = BUDGETS) -> list[Path]:
    """The main table's rows as recipe files: full, EchoingPixels at each budget, every baseline found.

    Baselines are discovered from ``recipes/[toy/]baselines/<method>_<pct>.yaml`` (methods in file
    name order, at ``baseline_budgets``), so adding a baseline's recipes adds its rows.
    """
    folder = ROOT / "recipes" / ("toy" if toy else "")
    rows = folder / "baselines"
    out = [rows / "full.yaml", *(folder / f"cs2_ste_{pct}.yaml" for pct in BUDGETS)]
    return out + [
        rows / f"{m}_{pct}.yaml" for m in baseline_keys(rows) for pct in baseline_budgets if (rows / f"{m}_{pct}.yaml").is_file()
    ]


def resolve_recipe(entry: str | Path) -> Path:
    """A ``--methods`` entry as a file: as given, else relative to the repository root."""
    path = Path(entry)
    if not path.is_file() and not path.is_absolute() and (ROOT / path).is_file():
        return ROOT / path
    return path


def load_methods(entries: Sequence[str | Path], eval_base: str | Path | None = None) -> list[RecipeMethod]:
    """One :class:`RecipeMethod` per recipe (a ``baselines/`` row on ``eval_base`` or its default base).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file for a missing recipe, one that does
    not parse, or one that sets no ``model.reducer``; two entries with one file stem are refused
    (the stem labels the row).
    """
    methods = [method_from_recipe(method_configs(resolve_recipe(e), eval_base)) for e in entries]
    stems = [m.name for m in methods]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ValueError(f"--methods: rows are labelled by file stem and {twice} appear more than once")
    return methods


def reducer_label(method: RecipeMethod) -> str:
    """``FastV(layer=2)``-style description of a row's reducer ("" for the full model)."""
    r = method.reducer
    return "" if r is None else f"{type(r).__name__}({r.extra_repr()})"


# ------------------------------------------------------------------------------------------ model
def build_thinker(config: Any, device: torch.device, dtype: torch.dtype) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """The real transformers thinker with random weights, created directly on ``device`` in ``dtype``."""
    return random_thinker(config, dtype=dtype, device=device).eval()


def clip_batch(config: Any, counts: dict[str, Any], fps: float, prompt_tokens: int, batch_size: int,
               device: torch.device) -> dict[str, Any]:
    """A processor-shaped batch with exactly the token counts of ``counts`` (no answer: a prefill)."""
    head = prompt_tokens * 3 // 8  # system prompt + user prefix before the media; question after it
    spec = SampleSpec(prompt_len=head, answer_len=0, suffix_len=prompt_tokens - head, frames=counts["frames"],
                      height=counts["height"], width=counts["width"], fps=fps, audio_seconds=counts["seconds"])
    batch = make_av_batch(config, [spec] * batch_size, with_labels=False)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Clock:
    """Stage marks: CUDA events on a GPU (no host sync inside a run), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, marks: list[Any]) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks[:-1], marks[1:], strict=True)]
        return [(b - a) * 1e3 for a, b in zip(marks[:-1], marks[1:], strict=True)]


def timed_prefill(model: OmniThinker, batch: dict[str, Any], clock: Clock, logits: str) -> tuple[list[float], Any]:
    """One reduced prefill through :meth:`OmniThinker.prefill`, timed per stage: ``([encoders, sieve, llm] ms, Prefill)``.

    ``llm`` is the decoder plus :meth:`OmniThinker.head` (final norm + lm_head on the last token
    for ``logits="last"``, every token for ``"all"``); the prefill's budget statistics are never
    computed here (they are lazy), so no stage pays for them.
    """
    p = model.prefill(batch, clock=clock.mark)
    hidden = p.kept.hidden
    if logits == "last":
        rows = torch.arange(p.kept.batch_size, device=hidden.device)
        hidden = hidden[rows, p.kept.lengths - 1]
    head = [clock.mark()]
    model.head(hidden)
    head.append(clock.mark())
    encoders, sieve, llm = clock.elapsed_ms(p.marks)
    return [encoders, sieve, llm + clock.elapsed_ms(head)[0]], p


def realised_tokens(model: OmniThinker, ctx: Any, kept: Any) -> list[float]:
    """LLM tokens per decoder layer actually processed (mean over the batch): text + kept candidates."""
    per_layer = ctx.stats.get("llm_candidates_per_layer") or []
    non_candidates = (kept.attention_mask & ~model.candidate_mask(kept)).sum(-1).float()
    return [float((non_candidates + c.float()).mean()) for c in per_layer]


def param_bytes(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())


def tensor_bytes(batch: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def measure(model: OmniThinker, batch: dict[str, Any], device: torch.device, warmup: int, repeats: int,
            logits: str) -> dict[str, Any]:
    """Warm-up, then ``repeats`` timed prefills: per-stage medians, peak memory above the resident set."""
    clock = Clock(device)
    with torch.inference_mode():
        for _ in range(warmup):
            timed_prefill(model, batch, clock, logits)
        if device.type == "cuda":
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        samples: list[list[float]] = []
        for _ in range(repeats):
            p = None  # free the previous run's outputs before the next one is measured
            ms, p = timed_prefill(model, batch, clock, logits)
            samples.append(ms)
        tokens = realised_tokens(model, p.context, p.kept)
        n_av = p.full.count(Modality.VIDEO, Modality.AUDIO).float().mean().item()
        kept_av = p.kept.count(Modality.VIDEO, Modality.AUDIO).float().mean().item()
        transient = torch.cuda.max_memory_allocated() - resident if device.type == "cuda" else None
    per_stage = {
        "encoders": [s[0] for s in samples],
        "sieve": [s[1] for s in samples],
        "llm": [s[2] for s in samples],
    }
    per_stage["llm_stage"] = [a + b for a, b in zip(per_stage["sieve"], per_stage["llm"], strict=True)]
    per_stage["end_to_end"] = [sum(s) for s in samples]
    return {
        "ms": {k: statistics.median(v) for k, v in per_stage.items()},
        "ms_samples": per_stage,
        "tokens_per_layer": tokens,
        "n_av": n_av,
        "kept_av_last_layer": kept_av,
        "transient_bytes": transient,
        "reducer_stats": {k: v for k, v in p.context.stats.items() if isinstance(v, (int, float))},
    }


# ------------------------------------------------------------------------------------------- run
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run(
    args: argparse.Namespace,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Build the model once, measure every (clip length, recipe), return the result record.

    ``args.recipes`` holds the methods (:func:`load_methods`); ``on_row`` receives the partial record
    after every measured row (``meta.complete`` False).
    """
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    scale = make_scale(args)
    config = scale.config
    num_layers = config.text_config.num_hidden_layers
    methods: list[RecipeMethod] = args.recipes
    log(f"# device: {device_name(device)} | torch {torch.__version__} | transformers {transformers.__version__}")
    log(f"# model {args.model}: {num_layers} layers, hidden {config.text_config.hidden_size}, dtype {args.dtype}, "
        f"attn {args.attn}, logits {args.logits}")

    t0 = time.perf_counter()
    thinker = build_thinker(config, device, dtype)
    log(f"# built thinker in {time.perf_counter() - t0:.1f} s ({param_bytes(thinker) / GIB:.2f} GiB of weights)")
    thinker_bytes = param_bytes(thinker)

    # One wrapper per recipe, all sharing the thinker's weights; recipes with the same reducer
    # configuration (CS2 at three budgets) share one reducer, so the sieve copy is built once.
    wrappers: dict[str, OmniThinker] = {}
    shared: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for m in methods:
        key = json.dumps(m.reducer_config, sort_keys=True, default=str)
        reducer = shared.setdefault(key, m.reducer)
        try:
            with torch.device(device):
                wrappers[m.name] = OmniThinker(
                    thinker, rope=m.rope, reducer=reducer, keep_ratio=m.keep_ratio,
                    candidate_modalities=m.candidate_modalities,
                ).to(device).eval()
        except (ValueError, TypeError, RuntimeError) as err:  # e.g. stage layers beyond this decoder's depth
            why = f"{type(err).__name__}: {err}"
            log(f"SKIP {m.name}: {why}")
            skipped.append({"method": m.name, "reason": why})

    rows: list[dict[str, Any]] = []
    clips: dict[str, Any] = {}
    meta = {
        "device": device_name(device), "device_slug": device_slug(device), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *args.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "dtype": args.dtype, "attn": args.attn, "logits": args.logits,
        "batch_size": args.batch_size, "warmup": args.warmup, "repeats": args.repeats, "fps": args.fps,
        "max_pixels": args.max_pixels, "num_layers": num_layers, "smoke": args.smoke,
        "recipes": {m.name: [_relative(c) for c in m.configs] for m in methods},
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "peak_memory": "weights of the method + inputs + max_memory_allocated above the resident set"
        if device.type == "cuda" else "n/a on CPU",
    }

    def record(rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        add_relative(rows)
        checks = target_checks(rows, num_layers) if device.type == "cuda" and complete else []
        for c in checks:
            log(f"{c['status']}: {c['check']} -- {c['detail']}")
        return {
            "meta": {**meta, "complete": complete},
            "clips": clips,
            "rows": rows,
            "skipped": skipped,
            "checks": checks,
            "paper": {k: {"ms": v[0], "gb": v[1]} for k, v in PAPER.items()},
        }
    for seconds in args.seconds:
        counts = flops.token_counts(seconds, fps=args.fps, max_pixels=args.max_pixels, prompt_tokens=scale.prompt_tokens,
                                    height=scale.height, width=scale.width)
        clips[str(seconds)] = counts
        batch = clip_batch(config, counts, args.fps, scale.prompt_tokens, args.batch_size, device)
        batch_bytes = tensor_bytes(batch)
        log(f"\n## {seconds:g} s clip: {counts['video']} video + {counts['audio']} audio + {counts['text']} text "
            f"= {counts['total']} tokens ({counts['frames']} frames of {counts['height']}x{counts['width']})")
        for m in methods:
            if m.name not in wrappers:
                continue
            model = wrappers[m.name]
            reducer, ratio, label = model.reducer, m.keep_ratio, m.name
            res = measure(model, batch, device, args.warmup, args.repeats, args.logits)
            measured = [round(t) for t in res["tokens_per_layer"]]
            schedule = flops.schedule_of(config, counts, reducer, ratio)
            realised = flops.ideal_speedup(config, counts, reducer, ratio, args.logits, tokens=measured)
            try:
                analytic = flops.ideal_speedup(config, counts, reducer, ratio, args.logits)
                analytic_tokens = flops.tokens_per_layer(config, counts, reducer, ratio)
            except ValueError as err:  # e.g. a PyramidDrop budget its stages cannot reach at this depth
                analytic, analytic_tokens = {"error": str(err)}, None
            fl = flops.prefill_flops(config, counts, reducer, ratio, args.logits, tokens=measured)
            est = flops.prefill_bytes(config, counts, reducer, ratio, torch.finfo(dtype).bits // 8, args.logits,
                                      tokens=measured)
            own_weights = thinker_bytes + param_bytes(reducer)
            peak = None if res["transient_bytes"] is None else own_weights + batch_bytes + res["transient_bytes"]
            row = {
                "method": label, "kind": "full" if reducer is None else type(reducer).__name__, "label": label,
                "recipe": [_relative(c) for c in m.configs], "keep_ratio": ratio, "seconds": seconds,
                "tokens": counts["total"], "n_av": res["n_av"], "kept_av": res["kept_av_last_layer"],
                "tokens_per_layer": res["tokens_per_layer"], "tokens_per_layer_analytic": analytic_tokens,
                "sieve_layers": schedule.sieve_layers,
                "reducer": reducer_label(m),
                "rope": "model default (TMRoPE)" if m.rope is None else repr(m.rope),
                "reducer_stats": res["reducer_stats"],
                "effective_keep_ratio": realised["effective_keep_ratio"],
                "ms": res["ms"], "ms_samples": res["ms_samples"],
                "peak_gib": None if peak is None else peak / GIB,
                "weights_gib": own_weights / GIB,
                "flops_tera": {k: v / 1e12 for k, v in fl.items() if isinstance(v, int)},
                "ideal_speedup": {"llm": realised["llm"], "end_to_end": realised["end_to_end"]},
                "ideal_speedup_analytic": analytic,
                "estimated_gib": {k: v / GIB for k, v in est.items()},
                "paper_ms": PAPER.get(label, (None, None))[0],
                "paper_gb": PAPER.get(label, (None, None))[1],
            }
            rows.append(row)
            if on_row is not None:  # partial results survive a run cut short (device time limits)
                on_row(record(rows, complete=False))
            mem = "n/a" if peak is None else f"{peak / GIB:.2f} GiB"
            log(f"{label:>16}: end-to-end {res['ms']['end_to_end']:9.1f} ms | LLM stage {res['ms']['llm_stage']:9.1f} ms "
                f"(sieve {res['ms']['sieve']:.1f}) | peak {mem} | FLOP-ideal x{realised['llm']:.2f} LLM, "
                f"x{realised['end_to_end']:.2f} e2e")
        del batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return record(rows, complete=True)


def add_relative(rows: list[dict[str, Any]]) -> None:
    """Speed-up and memory reduction of every row against the full model on the same clip."""
    full = {r["seconds"]: r for r in rows if r["kind"] == "full"}
    paper_full = PAPER["full"]
    for r in rows:
        base = full.get(r["seconds"])
        r["speedup"] = None if base is None else {s: base["ms"][s] / r["ms"][s] if r["ms"][s] else None
                                                  for s in ("end_to_end", "llm_stage", "llm")}
        both = base is not None and base["peak_gib"] is not None and r["peak_gib"] is not None
        r["memory_reduction"] = base["peak_gib"] / r["peak_gib"] if both else None
        r["paper_speedup"] = paper_full[0] / r["paper_ms"] if r["paper_ms"] else None
        r["paper_memory_reduction"] = paper_full[1] / r["paper_gb"] if r["paper_gb"] else None


def target_checks(rows: list[dict[str, Any]], num_layers: int) -> list[dict[str, str]]:
    """The efficiency targets (sieve overhead, speed-up vs FLOPs, linear memory, 120 s in 80 GB) as PASS/FAIL lines.

    The sieve target applies to every row with a sieve (``row["sieve_layers"]`` of the reducer's token
    schedule: CS2's N). Meaningful on a GPU only.
    """
    out: list[dict[str, str]] = []

    def add(ok: bool | None, check: str, detail: str) -> None:
        out.append({"status": "N/A" if ok is None else ("PASS" if ok else "FAIL"), "check": check, "detail": detail})

    full = {r["seconds"]: r for r in rows if r["kind"] == "full"}
    for r in rows:
        base = full.get(r["seconds"])
        if r["kind"] == "full" or base is None:
            continue
        where = f"{r['method']} @ {r['seconds']:g} s"
        if r.get("sieve_layers"):
            limit = r["sieve_layers"] / num_layers * base["ms"]["llm_stage"] * 1.10
            add(r["ms"]["sieve"] <= limit, "sieve overhead <= N/L of the full LLM stage + 10%",
                f"{where}: sieve {r['ms']['sieve']:.1f} ms, limit {limit:.1f} ms")
        for stage, key in (("llm_stage", "llm"), ("end_to_end", "end_to_end")):
            got, ideal = r["speedup"][stage], r["ideal_speedup"][key]
            add(got >= 0.9 * ideal, f"{stage} speed-up >= 0.9 x FLOP-ideal", f"{where}: x{got:.2f} vs ideal x{ideal:.2f}")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_kind.setdefault(r["method"], []).append(r)
    for method, rs in by_kind.items():
        pts = sorted((r["tokens"], r["peak_gib"]) for r in rs if r["peak_gib"] is not None)
        if len(pts) < 3:
            add(None, "peak memory linear in clip length", f"{method}: needs 3 clip lengths, got {len(pts)}")
            continue
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        worst = max(abs(y - (y0 + (y1 - y0) * (x - x0) / (x1 - x0))) / y for x, y in pts[1:-1])
        add(worst <= 0.05, "peak memory linear in clip length",
            f"{method}: largest deviation from the chord {100 * worst:.1f}% (limit 5%)")
    longest = max((r for r in rows if r["kind"] == "full"), key=lambda r: r["seconds"], default=None)
    if longest is None or longest["seconds"] < 120:
        add(None, "full model fits a 120 s clip in 80 GB", "no full-model row at >= 120 s")
    else:
        add(longest["peak_gib"] < 80, "full model fits a 120 s clip in 80 GB",
            f"{longest['seconds']:g} s: peak {longest['peak_gib']:.1f} GiB")
    return out


# ------------------------------------------------------------------------------------------ output
def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def to_markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        f"# Efficiency: Qwen2.5-Omni-{m['model']} thinker prefill on {m['device']}",
        "",
        *([] if m.get("complete", True) else ["**PARTIAL: the run stopped before every configuration was measured.**", ""]),
        f"Command: `{m['command']}`  ",
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}, {m['date']}  ",
        f"dtype {m['dtype']}, attention {m['attn']}, logits on {m['logits']} token(s), batch {m['batch_size']}, "
        f"warm-up {m['warmup']}, median of {m['repeats']} ({m['timer']}); {m['num_layers']} decoder layers.  ",
        "Rows are recipes (label = file stem), each run with its own reducer, budget and rotary layout; "
        "the configs of each row and its reducer are listed below the tables.  ",
        f"Peak memory: {m['peak_memory']}. GiB = 2^30 bytes. FLOP-ideal = full FLOPs / method FLOPs "
        "(ep_kit.flops, from the realised per-layer token counts; the reducer's own schedule gives the same "
        "counts). Paper: Qwen2.5-Omni-3B on Daily-Omni (clip length not stated per row).",
        "",
    ]
    for sec, c in result["clips"].items():
        lines += [
            f"## {float(sec):g} s clip: {c['video']} video + {c['audio']} audio + {c['text']} text = {c['total']} tokens "
            f"({c['frames']} frames of {c['height']}x{c['width']})",
            "",
            "| method | end-to-end ms | speed-up | LLM-stage ms (sieve) | LLM speed-up | FLOP-ideal LLM / e2e "
            "| peak GiB | mem. reduction | paper ms | paper speed-up | paper GB | paper mem. reduction |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in result["rows"] if str(r["seconds"]) == sec):
            sp = r["speedup"] or {}
            name = r["label"] if r["kind"] == "full" else f"{r['label']} ({r['kind']}, {100 * r['keep_ratio']:g}%)"
            lines.append(
                f"| {name} "
                f"| {r['ms']['end_to_end']:.1f} | {_fmt(sp.get('end_to_end'), '.2f', 'x')} "
                f"| {r['ms']['llm_stage']:.1f} ({r['ms']['sieve']:.1f}) | {_fmt(sp.get('llm_stage'), '.2f', 'x')} "
                f"| {r['ideal_speedup']['llm']:.2f}x / {r['ideal_speedup']['end_to_end']:.2f}x "
                f"| {_fmt(r['peak_gib'], '.2f')} | {_fmt(r['memory_reduction'], '.2f', 'x')} "
                f"| {_fmt(r['paper_ms'])} | {_fmt(r['paper_speedup'], '.2f', 'x')} | {_fmt(r['paper_gb'])} "
                f"| {_fmt(r['paper_memory_reduction'], '.2f', 'x')} |"
            )
        lines.append("")
    first: dict[str, dict[str, Any]] = {}
    for r in result["rows"]:
        first.setdefault(r["method"], r)
    if first:
        lines += ["## Recipes", "", "| row | configs | reducer |", "|---|---|---|"]
        lines += [f"| {name} | {' + '.join(r.get('recipe', []))} | {r['reducer'] or 'none (full model)'} |"
                  for name, r in first.items()]
        lines.append("")
    if result["skipped"]:
        lines += ["## Skipped methods", ""] + [f"- {s['method']}: {s['reason']}" for s in result["skipped"]] + [""]
    if m["timer"] != "cuda events":
        lines += ["CPU timings are not comparable with GPU or paper numbers: the machine may be shared and the "
                  "first configurations carry one-off costs; use them to see that every path runs.", ""]
    lines += ["## Targets", ""]
    if result["checks"]:
        lines += [f"- **{c['status']}** {c['check']}: {c['detail']}" for c in result["checks"]]
    else:
        lines.append("- Not checked: the targets are defined for a CUDA run (timings and memory on CPU are not comparable).")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency and peak memory against clip length per method, and speed-ups (measured / ideal / paper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method in methods:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seconds"])
        xs = [r["seconds"] for r in rs]
        axes[0].plot(xs, [r["ms"]["end_to_end"] for r in rs], marker="o", label=method)
        if all(r["peak_gib"] is not None for r in rs):
            axes[1].plot(xs, [r["peak_gib"] for r in rs], marker="o", label=method)
    axes[0].set(xlabel="clip length (s)", ylabel="prefill end-to-end (ms)", title="latency")
    axes[1].set(xlabel="clip length (s)", ylabel="peak memory (GiB)", title="peak memory")
    if not axes[1].lines:
        axes[1].text(0.5, 0.5, "peak memory n/a on CPU", ha="center", va="center", transform=axes[1].transAxes)
    first = min(r["seconds"] for r in rows)
    rs = [r for r in rows if r["seconds"] == first and r["kind"] != "full"]
    xs = range(len(rs))
    width = 0.27
    axes[2].bar([x - width for x in xs], [(r["speedup"] or {}).get("end_to_end") or 0 for r in rs], width, label="measured")
    axes[2].bar(list(xs), [r["ideal_speedup"]["end_to_end"] for r in rs], width, label="FLOP-ideal")
    axes[2].bar([x + width for x in xs], [r["paper_speedup"] or 0 for r in rs], width, label="paper (3B)")
    axes[2].set_xticks(list(xs), [r["method"] for r in rs], rotation=30, ha="right")
    axes[2].set(ylabel="end-to-end speed-up vs full", title=f"speed-up at {first:g} s")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Qwen2.5-Omni-{result['meta']['model']} prefill on {result['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], out: Path, tag: str, with_plot: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"efficiency_{result['meta']['device_slug']}" + (f"_{tag}" if tag else "")
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=float) + "\n")
    paths["md"].write_text(to_markdown(result))
    if with_plot:
        plot(result, paths["png"])
    return paths


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("3b", "7b", "tiny"), default="3b")
    p.add_argument("--seconds", type=float, nargs="+", default=None, help="clip lengths (default 30 60 120)")
    p.add_argument("--methods", nargs="+", default=None, metavar="RECIPE",
                   help="recipe files, one row each (a baselines/ overlay runs on its evaluation base, a budget or "
                        "ablation overlay on cs2_ste_20.yaml); default: every main-table row (recipes/, or "
                        "recipes/toy/ with --smoke: full, cs2_ste_{20,10,5} and every baseline at 20%%)")
    p.add_argument("--eval-base", type=Path, default=None,
                   help="evaluation base of the baselines/ rows (default: the row folder's own, recipes/eval_3b.yaml "
                        "or recipes/toy/baselines/base.yaml; --model 7b: recipes/eval_7b.yaml)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output directory (default runs/efficiency; benchmarks/results holds the recorded runs)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on CPU with the toy recipes, short clips, 1 warm-up + 2 runs")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    p.add_argument("--logits", choices=("last", "all"), default="last", help="lm_head rows: prefill (last) or all")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; --smoke: 1, which avoids thread thrashing on a busy machine)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--max-pixels", type=int, default=105_000, help="per frame (16:9 1080p source resized)")
    p.add_argument("--height", type=int, default=None, help="frame height (multiple of 28), overrides --max-pixels")
    p.add_argument("--width", type=int, default=None, help="frame width (multiple of 28)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.model = "tiny"
        args.device = args.device or "cpu"
        args.seconds = args.seconds or [2.0, 4.0]
        args.repeats = args.repeats or 2
        args.warmup = args.warmup if args.warmup is not None else 1
        args.tag = args.tag or "smoke"
        args.threads = args.threads or 1
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.seconds = args.seconds or [30.0, 60.0, 120.0]
    args.repeats = args.repeats or 10
    args.warmup = 3 if args.warmup is None else args.warmup
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--repeats and --batch-size must be >= 1, --warmup >= 0")
    if any(s <= 0 for s in args.seconds):
        p.error("--seconds must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if args.methods is None:
        args.methods = [str(r) for r in default_recipes(args.smoke, (20,) if args.smoke else BUDGETS)]
    if args.eval_base is None and args.model == "7b":
        args.eval_base = ROOT / "recipes" / "eval_7b.yaml"
    try:
        args.recipes = load_methods(args.methods, args.eval_base)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    torch.manual_seed(0)
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args, on_row=lambda partial: write(partial, args.out, args.tag, with_plot=False))
    finally:
        torch.set_num_threads(previous_threads)
    paths = write(result, args.out, args.tag)
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return paths


if __name__ == "__main__":
    main()
