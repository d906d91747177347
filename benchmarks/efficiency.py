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
The default is every row of the main table, at every budget of it (20/10/5%), ``--smoke``
included: ``full``, EchoingPixels ``cs2_ste_{20,10,5}`` and every ``baselines/<method>_<pct>.yaml``
found (:func:`ep_kit.recipes.baseline_keys`), so a new baseline's recipes are measured with no edit here.

Timing. Every method is warmed up (``--warmup`` runs, at least one) before any is timed; then the
methods are timed round-robin: each of the ``--repeats`` rounds runs every method once, in an order
shuffled per round with a fixed seed (``--order-seed``; the orders are in the JSON), so a slow
phase of a shared machine hits every method alike instead of one block of rows. Each stage is
reported as median and min-max range. CUDA: bf16, CUDA events (no host sync inside a run). CPU:
float32, ``time.perf_counter``.

Targets (defined by FLOPs). For every row and clip: efficiency = achieved speed-up / FLOP-ideal
speed-up over the full model, for the LLM stage and end to end (FLOP-ideal from :mod:`ep_kit.flops`
with the per-layer token counts the row realised). PASS when >= 0.9 on CUDA; on CPU the same ratios
are printed, labelled informational. The sieve has no target of its own (by FLOPs alone it is
1.12-1.33x N/L of the full LLM stage at 30-120 s on the 3B, since it attends bidirectionally over every
token): its FLOP share of the row's LLM stage is printed beside its measured time share.

Memory. For the full model and every row with a sieve (CS2 at each budget): the peak above what is
resident before the operation, for inference (one prefill) and a training step (forward + backward of
the LM loss with labels on ``--answer-tokens`` answer tokens; also with gradient checkpointing, as the
3B recipes train). CUDA: ``torch.cuda.max_memory_allocated`` in process. CPU: peak RSS (VmHWM)
increase in a fresh subprocess per (row, clip), the peak reset after setup and warm-up. Beside it:
the analytic KV-cache and activation bytes of :func:`ep_kit.flops.prefill_bytes`.

Paper. Beside the paper's numbers: the end-to-end FLOP ceiling of CS2 at each budget for the 3B
geometry (``ep_kit.flops``, the shipped ``recipes/cs2_ste_*.yaml``), which of the paper's speed-ups
exceed it, and why.

Results: ``runs/efficiency/efficiency_<device>[_tag].{json,md,png}`` by default (``--out`` to choose;
``python benchmarks/efficiency.py --smoke --out benchmarks/results`` writes the recorded smoke).
Each names its command and commit.

Run on a GPU:   python benchmarks/efficiency.py --model 3b     (30/60/120 s, every main-table row, 3 warm-up + 10 rounds)
One method:     python benchmarks/efficiency.py --methods recipes/baselines/full.yaml recipes/baselines/fastv_20.yaml
CPU smoke:      python benchmarks/efficiency.py --smoke

Notes. Results are written after every clip (``meta.complete`` false until the end), so a run cut
short by a time limit still leaves its numbers. With ``--attn sdpa`` the vision encoder's window
attention runs through the kit's grouped function (:mod:`ep_kit.models.vision_attention`: one SDPA
call per window length and layer, 60 for any clip at 3B, where stock transformers makes one per
window, 6840 for 30 s); ``--attn flash_attention_2`` (needs ``flash_attn``) uses its varlen kernel. Rows
whose recipes share a reducer configuration (CS2 at three budgets) share one reducer, so the sieve
copy is built once.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
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
from ep_kit.runs import git_commit
from ep_kit.sequence import Modality

ROOT = Path(__file__).resolve().parents[1]
#: Default output directory (``benchmarks/results`` holds the recorded runs; pass ``--out`` to write there).
DEFAULT_OUT = ROOT / "runs" / "efficiency"
#: The paper's Qwen2.5-Omni-3B efficiency table (Daily-Omni, forward incl. sieve), by recipe stem: (ms, GB).
PAPER = {"full": (517.1, 32.0), "cs2_ste_20": (231.7, 14.2), "cs2_ste_10": (194.0, 13.1), "cs2_ste_5": (174.8, 12.3)}
#: Budgets of the main table, in row order.
BUDGETS = (20, 10, 5)
GIB = 2**30
MIB = 2**20
STAGES = ("encoders", "sieve", "llm", "llm_stage", "end_to_end")
#: Achieved / FLOP-ideal speed-up a CUDA run must reach, per stage (LLM stage and end to end).
TARGET_EFFICIENCY = 0.9
#: Stages with an efficiency target: (measured stage, key of the FLOP-ideal speed-up).
TARGET_STAGES = (("llm_stage", "llm"), ("end_to_end", "end_to_end"))
MEMORY_MODES = ("inference", "train", "train_ckpt")
PROBE_MARK = "EFFICIENCY_MEMORY_PROBE "


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
               device: torch.device, answer_tokens: int = 0) -> dict[str, Any]:
    """A processor-shaped batch with exactly the token counts of ``counts``.

    ``answer_tokens=0``: a prefill (no answer, no labels). Otherwise ``answer_tokens`` answer tokens
    follow the question, with labels on them (a training step's batch).
    """
    head = prompt_tokens * 3 // 8  # system prompt + user prefix before the media; question after it
    spec = SampleSpec(prompt_len=head, answer_len=answer_tokens, suffix_len=prompt_tokens - head,
                      frames=counts["frames"], height=counts["height"], width=counts["width"], fps=fps,
                      audio_seconds=counts["seconds"])
    batch = make_av_batch(config, [spec] * batch_size, with_labels=answer_tokens > 0)
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


# ----------------------------------------------------------------------------------------- timing
def interleaved_order(names: Sequence[str], repeats: int, seed: int = 0) -> list[list[str]]:
    """The timing rounds: each round runs every method once, in an order shuffled per round.

    ``random.Random(seed)`` draws the orders, so a rerun with the same seed times the methods in the
    same sequence; a slow phase of a shared machine then spreads over every method instead of
    falling on one block of rows.
    """
    rng = random.Random(seed)
    rounds = []
    for _ in range(repeats):
        order = list(names)
        rng.shuffle(order)
        rounds.append(order)
    return rounds


def stage_samples(samples: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Per-stage lists from ``[encoders, sieve, llm]`` ms per run, with ``llm_stage`` and ``end_to_end`` added."""
    out = {"encoders": [s[0] for s in samples], "sieve": [s[1] for s in samples], "llm": [s[2] for s in samples]}
    out["llm_stage"] = [a + b for a, b in zip(out["sieve"], out["llm"], strict=True)]
    out["end_to_end"] = [sum(s) for s in samples]
    return out


def summarize(per_stage: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every stage."""
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in per_stage.items()}


def prefill_info(model: OmniThinker, p: Any) -> dict[str, Any]:
    """What one prefill realised: tokens per decoder layer, A/V tokens before and after, reducer scalars."""
    return {
        "tokens_per_layer": realised_tokens(model, p.context, p.kept),
        "n_av": p.full.count(Modality.VIDEO, Modality.AUDIO).float().mean().item(),
        "kept_av_last_layer": p.kept.count(Modality.VIDEO, Modality.AUDIO).float().mean().item(),
        "reducer_stats": {k: v for k, v in p.context.stats.items() if isinstance(v, (int, float))},
    }


def time_methods(models: dict[str, OmniThinker], batch: dict[str, Any], device: torch.device, warmup: int,
                 repeats: int, logits: str, seed: int = 0) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any], list[list[str]]]:
    """Warm every method up, then time them round-robin (:func:`interleaved_order`).

    Returns ``(per-stage ms samples by method, prefill_info by method, the rounds' orders)``.
    """
    if warmup < 1:
        raise ValueError("warmup must be >= 1: every method is warmed up before any is timed")
    clock = Clock(device)
    info: dict[str, Any] = {}
    samples: dict[str, list[list[float]]] = {name: [] for name in models}
    orders = interleaved_order(list(models), repeats, seed)
    with torch.inference_mode():
        for name, model in models.items():
            for i in range(warmup):
                _, p = timed_prefill(model, batch, clock, logits)
                if i == warmup - 1:
                    info[name] = prefill_info(model, p)
                p = None  # free this run's outputs before the next one
        for order in orders:
            for name in order:
                samples[name].append(timed_prefill(models[name], batch, clock, logits)[0])
    return {name: stage_samples(s) for name, s in samples.items()}, info, orders


# ----------------------------------------------------------------------------------------- memory
def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS is what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_available() -> str | None:
    """None when the CPU peak can be measured here (Linux: VmHWM, reset through ``/proc/self/clear_refs``), else why not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status_bytes("VmHWM")
    except OSError as err:
        return f"peak RSS not resettable here ({type(err).__name__}: {err})"
    return None


class PeakMeter:
    """Peak memory of one operation above what was resident just before it.

    CUDA: ``max_memory_allocated`` above ``memory_allocated`` (peak stats reset at :meth:`start`).
    CPU: peak RSS (VmHWM) above RSS, after freed heap pages are returned and VmHWM is reset to the
    current RSS (``echo 5 > /proc/self/clear_refs``); used in a fresh process per configuration.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            _release_freed_memory()
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_status_bytes("VmRSS")

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, _proc_status_bytes("VmHWM") - self.base)


def memory_step(model: OmniThinker, batch: dict[str, Any], mode: str, logits: str) -> None:
    """One inference prefill (``mode="inference"``) or one training step's forward + backward of the LM loss."""
    if mode == "inference":
        model.eval()
        with torch.inference_mode():
            timed_prefill(model, batch, Clock(model.device), logits)
        return
    model.train()
    loss = model(batch, logits="labels").loss
    loss.backward()


def measure_memory(model: OmniThinker, batches: dict[str, dict[str, Any]], device: torch.device, modes: Sequence[str],
                   logits: str, warmup: int = 1) -> dict[str, Any]:
    """Peak bytes above the resident set of each of ``modes`` (``inference``, ``train``, ``train_ckpt``).

    ``batches["inference"]`` is a prefill batch, ``batches["train"]`` the same clip with labelled
    answer tokens. ``train_ckpt`` turns gradient checkpointing on (decoder, encoders and the sieve's
    copies; it stays on: run it last). Gradients are set to None before each measured step, so a
    training step's peak includes the gradients it creates. An out-of-memory error is recorded.
    """
    meter = PeakMeter(device)
    out: dict[str, Any] = {}
    for mode in modes:
        if mode == "train_ckpt":
            model.gradient_checkpointing_enable()
        batch = batches["inference" if mode == "inference" else "train"]
        try:
            for _ in range(warmup):
                memory_step(model, batch, mode, logits)
                model.zero_grad(set_to_none=True)
            meter.start()
            memory_step(model, batch, mode, logits)
            out[mode] = meter.stop()
        except torch.OutOfMemoryError as err:
            out[mode] = None
            out[f"{mode}_error"] = f"OutOfMemoryError: {str(err).splitlines()[0]}"
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.eval()
    return out


def probe_argv(args: argparse.Namespace, entry: str, seconds: float) -> list[str]:
    """The CLI of a memory probe: this run's geometry and settings, one recipe, one clip length."""
    argv = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--attn", args.attn,
            "--logits", args.logits, "--batch-size", str(args.batch_size), "--fps", str(args.fps),
            "--max-pixels", str(args.max_pixels), "--prompt-tokens", str(args.prompt_tokens),
            "--answer-tokens", str(args.answer_tokens), "--warmup", "1", "--seconds", repr(float(seconds)),
            "--methods", str(entry)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.height is not None:
        argv += ["--height", str(args.height), "--width", str(args.width)]
    if args.eval_base is not None:
        argv += ["--eval-base", str(args.eval_base)]
    return argv


def run_probe(argv: Sequence[str], timeout: float = 900.0) -> dict[str, Any]:
    """Measure one configuration's memory in a fresh Python process (CPU peak RSS needs one per configuration)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"memory probe exited with {proc.returncode}: {' | '.join(tail)}"}


def probe_main(args: argparse.Namespace) -> dict[str, Any]:
    """The memory probe process: build the thinker and the one recipe, measure every mode, print the result."""
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = make_scale(args)
    (method,) = args.recipes
    seconds = args.seconds[0]
    counts = flops.token_counts(seconds, fps=args.fps, max_pixels=args.max_pixels, prompt_tokens=scale.prompt_tokens,
                                height=scale.height, width=scale.width)
    thinker = build_thinker(scale.config, device, dtype)
    with torch.device(device):
        model = OmniThinker(thinker, rope=method.rope, reducer=method.reducer, keep_ratio=method.keep_ratio,
                            candidate_modalities=method.candidate_modalities).to(device).eval()
    batches = {
        "inference": clip_batch(scale.config, counts, args.fps, scale.prompt_tokens, args.batch_size, device),
        "train": clip_batch(scale.config, counts, args.fps, scale.prompt_tokens, args.batch_size, device,
                            answer_tokens=args.answer_tokens),
    }
    why = None if device.type == "cuda" else cpu_peak_available()
    result: dict[str, Any] = {"method": method.name, "seconds": seconds}
    if why is not None:
        result["error"] = why
    else:
        result.update(measure_memory(model, batches, device, MEMORY_MODES, args.logits, warmup=args.warmup))
        if device.type != "cuda":
            result["process_peak_rss"] = _proc_status_bytes("VmHWM")
    print(PROBE_MARK + json.dumps(result), flush=True)
    return result


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


def memory_rows(methods: Sequence[RecipeMethod], config: Any, counts: dict[str, Any]) -> list[str]:
    """Rows whose memory is measured: the full model and every row with a sieve (CS2 at each budget)."""
    out = []
    for m in methods:
        if m.reducer is None or flops.schedule_of(config, counts, m.reducer, m.keep_ratio).sieve_layers:
            out.append(m.name)
    return out


def run(
    args: argparse.Namespace,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Build the model once, time every recipe interleaved on every clip, measure memory, return the record.

    ``args.recipes`` holds the methods (:func:`load_methods`); ``on_row`` receives the partial record
    after every clip (``meta.complete`` False).
    """
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    scale = make_scale(args)
    config = scale.config
    num_layers = config.text_config.num_hidden_layers
    methods: list[RecipeMethod] = args.recipes
    entries = dict(zip((m.name for m in methods), args.methods, strict=True))
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
    orders: dict[str, list[list[str]]] = {}
    memory: list[dict[str, Any]] = []
    cpu_memory_why = None if device.type == "cuda" or args.memory == "skip" else cpu_peak_available()
    meta = {
        "device": device_name(device), "device_slug": device_slug(device), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/efficiency.py", *args.argv]),
        "commit": git_commit(ROOT),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "dtype": args.dtype, "attn": args.attn, "logits": args.logits,
        "batch_size": args.batch_size, "warmup": args.warmup, "repeats": args.repeats, "order_seed": args.order_seed,
        "fps": args.fps, "max_pixels": args.max_pixels, "num_layers": num_layers, "smoke": args.smoke,
        "answer_tokens": args.answer_tokens,
        "recipes": {m.name: [_relative(c) for c in m.configs] for m in methods},
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "memory": (
            "skipped (--memory skip)" if args.memory == "skip"
            else "torch.cuda.max_memory_allocated above memory_allocated, in process" if device.type == "cuda"
            else f"n/a: {cpu_memory_why}" if cpu_memory_why
            else "peak RSS (VmHWM) above RSS, fresh process per (row, clip), peak reset after setup and one warm-up"
        ),
    }

    ceiling = paper_ceilings(args)

    def record(rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        add_relative(rows)
        checks = efficiency_checks(rows, enforce=device.type == "cuda")
        if complete:
            for c in checks:
                log(f"{c['status']}: {c['stage']} {c['method']} @ {c['seconds']:g} s -- x{c['achieved']:.2f} of "
                    f"x{c['ideal']:.2f} FLOP-ideal = {c['efficiency']:.2f}")
        return {
            "meta": {**meta, "complete": complete},
            "clips": clips,
            "orders": orders,
            "rows": rows,
            "skipped": skipped,
            "checks": checks,
            "sieve": sieve_shares(rows),
            "memory": memory,
            "paper": {k: {"ms": v[0], "gb": v[1]} for k, v in PAPER.items()},
            "paper_ceiling": ceiling,
        }

    for seconds in args.seconds:
        counts = flops.token_counts(seconds, fps=args.fps, max_pixels=args.max_pixels, prompt_tokens=scale.prompt_tokens,
                                    height=scale.height, width=scale.width)
        clips[str(seconds)] = counts
        batch = clip_batch(config, counts, args.fps, scale.prompt_tokens, args.batch_size, device)
        batch_bytes = tensor_bytes(batch)
        log(f"\n## {seconds:g} s clip: {counts['video']} video + {counts['audio']} audio + {counts['text']} text "
            f"= {counts['total']} tokens ({counts['frames']} frames of {counts['height']}x{counts['width']})")
        samples, info, order = time_methods(wrappers, batch, device, args.warmup, args.repeats, args.logits,
                                            seed=args.order_seed)
        orders[str(seconds)] = order
        for m in methods:
            if m.name not in wrappers:
                continue
            model = wrappers[m.name]
            reducer, ratio, label = model.reducer, m.keep_ratio, m.name
            res = info[label]
            stats = summarize(samples[label])
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
                "ms": {k: v["median"] for k, v in stats.items()},
                "ms_range": {k: [v["min"], v["max"]] for k, v in stats.items()},
                "ms_samples": samples[label],
                "weights_gib": (thinker_bytes + param_bytes(reducer)) / GIB,
                "inputs_gib": batch_bytes / GIB,
                "flops_tera": {k: v / 1e12 for k, v in fl.items() if isinstance(v, int)},
                "ideal_speedup": {"llm": realised["llm"], "end_to_end": realised["end_to_end"]},
                "ideal_speedup_analytic": analytic,
                "estimated_gib": {k: v / GIB for k, v in est.items()},
                "paper_ms": PAPER.get(label, (None, None))[0],
                "paper_gb": PAPER.get(label, (None, None))[1],
            }
            rows.append(row)
            log(f"{label:>16}: end-to-end {row['ms']['end_to_end']:9.1f} ms "
                f"[{stats['end_to_end']['min']:.1f}-{stats['end_to_end']['max']:.1f}] | LLM stage "
                f"{row['ms']['llm_stage']:9.1f} ms (sieve {row['ms']['sieve']:.1f}) | FLOP-ideal x{realised['llm']:.2f} "
                f"LLM, x{realised['end_to_end']:.2f} e2e")

        if on_row is not None:  # partial results survive a run cut short (device time limits)
            on_row(record(rows, complete=False))
        del batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.memory == "measure" and not cpu_memory_why:
        measured = [m for m in methods if m.name in wrappers]
        for seconds in args.memory_seconds:
            counts = flops.token_counts(seconds, fps=args.fps, max_pixels=args.max_pixels,
                                        prompt_tokens=scale.prompt_tokens, height=scale.height, width=scale.width)
            log(f"\n## memory, {seconds:g} s clip ({counts['total']} tokens)")
            batches = None
            if device.type == "cuda":  # in process; train_ckpt of every row comes after (checkpointing stays on)
                batches = {"inference": clip_batch(config, counts, args.fps, scale.prompt_tokens, args.batch_size, device),
                           "train": clip_batch(config, counts, args.fps, scale.prompt_tokens, args.batch_size, device,
                                               answer_tokens=args.answer_tokens)}
            for name in memory_rows(measured, config, counts):
                m = next(x for x in measured if x.name == name)
                if batches is not None:
                    got = measure_memory(wrappers[name], batches, device, ("inference", "train"), args.logits)
                else:
                    got = run_probe(probe_argv(args, entries[name], seconds))
                est = flops.prefill_bytes(config, counts, m.reducer, m.keep_ratio, torch.finfo(dtype).bits // 8,
                                          args.logits)
                entry = {"method": name, "full": m.reducer is None, "seconds": seconds, "tokens": counts["total"],
                         "weights_gib": (thinker_bytes + param_bytes(wrappers[name].reducer)) / GIB,
                         "analytic_mib": {k: est[k] / MIB for k in ("kv_cache", "activation")},
                         **{k: v for k, v in got.items() if k not in ("method", "seconds")}}
                if batches is not None and entry.get("inference") is not None:
                    entry["peak_gib"] = entry["weights_gib"] + (tensor_bytes(batches["inference"]) + entry["inference"]) / GIB
                memory.append(entry)
                log(f"{name:>16}: above resident: " + ", ".join(
                    f"{k} {_fmt(None if entry.get(k) is None else entry[k] / MIB, '.1f')} MiB"
                    for k in MEMORY_MODES if k in entry) + (f" ({entry['error']})" if "error" in entry else ""))
            del batches
            if on_row is not None:
                on_row(record(rows, complete=False))
        if device.type == "cuda":
            for seconds in args.memory_seconds:
                counts = flops.token_counts(seconds, fps=args.fps, max_pixels=args.max_pixels,
                                            prompt_tokens=scale.prompt_tokens, height=scale.height, width=scale.width)
                batches = {"train": clip_batch(config, counts, args.fps, scale.prompt_tokens, args.batch_size, device,
                                               answer_tokens=args.answer_tokens)}
                for entry in (e for e in memory if e["seconds"] == seconds):
                    entry.update(measure_memory(wrappers[entry["method"]], batches, device, ("train_ckpt",), args.logits))
                del batches
    return record(rows, complete=True)


# ------------------------------------------------------------------------------------- analysis
def add_relative(rows: list[dict[str, Any]]) -> None:
    """Speed-up and FLOP efficiency of every row against the full model on the same clip, and the paper's."""
    full = {r["seconds"]: r for r in rows if r["kind"] == "full"}
    paper_full = PAPER["full"]
    for r in rows:
        base = full.get(r["seconds"])
        r["speedup"] = None if base is None else {s: base["ms"][s] / r["ms"][s] if r["ms"][s] else None
                                                  for s in ("end_to_end", "llm_stage", "llm")}
        r["flop_efficiency"] = None if r["speedup"] is None else {
            stage: (r["speedup"][stage] / r["ideal_speedup"][key] if r["speedup"][stage] else None)
            for stage, key in TARGET_STAGES
        }
        r["paper_speedup"] = paper_full[0] / r["paper_ms"] if r["paper_ms"] else None
        r["paper_memory_reduction"] = paper_full[1] / r["paper_gb"] if r["paper_gb"] else None


def efficiency_checks(rows: list[dict[str, Any]], enforce: bool, threshold: float = TARGET_EFFICIENCY) -> list[dict[str, Any]]:
    """The targets: achieved / FLOP-ideal speed-up per stage (LLM stage, end to end), per row and clip.

    ``status`` is PASS when the ratio is >= ``threshold`` and FAIL otherwise when ``enforce`` (a CUDA
    run), ``INFO`` otherwise (CPU: the same ratios, informational). Rows need a full-model row on
    the same clip (:func:`add_relative` first); the full model's own rows are left out (1 by definition).
    """
    out = []
    for r in rows:
        if r["kind"] == "full" or not r.get("flop_efficiency"):
            continue
        for stage, key in TARGET_STAGES:
            eff = r["flop_efficiency"][stage]
            status = "INFO" if not enforce else ("PASS" if eff is not None and eff >= threshold else "FAIL")
            out.append({"status": status, "stage": stage, "method": r["method"], "seconds": r["seconds"],
                        "achieved": r["speedup"][stage], "ideal": r["ideal_speedup"][key], "efficiency": eff,
                        "threshold": threshold})
    return out


def sieve_shares(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every row with a sieve: its FLOP share vs its measured time share (of the row's LLM stage and end to end),
    and sieve FLOPs and time over N/L of the full model's LLM stage (what the old, infeasible target bounded)."""
    full = {r["seconds"]: r for r in rows if r["kind"] == "full"}
    out = []
    for r in rows:
        if not r.get("sieve_layers"):
            continue
        f, ms = r["flops_tera"], r["ms"]
        base = full.get(r["seconds"])
        entry = {
            "method": r["method"], "seconds": r["seconds"], "sieve_layers": r["sieve_layers"],
            "flop_share_llm_stage": f["sieve"] / f["llm_stage"], "time_share_llm_stage": ms["sieve"] / ms["llm_stage"],
            "flop_share_end_to_end": f["sieve"] / f["end_to_end"], "time_share_end_to_end": ms["sieve"] / ms["end_to_end"],
        }
        if base is not None:
            layers = len(r["tokens_per_layer"])
            share = r["sieve_layers"] / layers
            entry["flops_over_nl_full_llm"] = f["sieve"] / (share * base["flops_tera"]["llm_stage"])
            entry["time_over_nl_full_llm"] = ms["sieve"] / (share * base["ms"]["llm_stage"])
        out.append(entry)
    return out


def paper_ceilings(args: argparse.Namespace) -> dict[str, Any]:
    """The end-to-end and LLM-stage FLOP ceilings of CS2 on the paper's model (3B, ``recipes/cs2_ste_*.yaml``).

    Clip lengths: this run's for ``--model 3b`` (its geometry), else 30/60/120 s at the 3B benchmark's
    default geometry. Per clip also the encoders' and the sieve's share of the full model's end-to-end
    FLOPs, the ceiling with no A/V token kept at all, and the analytic bytes (bf16) of full and CS2.
    """
    cfg = qwen_omni_3b_config()
    L = cfg.text_config.num_hidden_layers
    own = args.model == "3b"
    seconds = list(args.seconds) if own else [30.0, 60.0, 120.0]
    geometry = {"fps": args.fps, "max_pixels": args.max_pixels, "prompt_tokens": args.prompt_tokens if own else 128,
                "height": args.height if own else None, "width": args.width if own else None}
    methods = {pct: method_from_recipe(method_configs(ROOT / "recipes" / f"cs2_ste_{pct}.yaml")) for pct in BUDGETS}
    clips = []
    for s in seconds:
        counts = flops.token_counts(s, **geometry)
        full = flops.prefill_flops(cfg, counts)
        full_bytes = flops.prefill_bytes(cfg, counts, None, 1.0, 2)
        budgets = {}
        for pct, m in methods.items():
            ideal = flops.ideal_speedup(cfg, counts, m.reducer, m.keep_ratio)
            red = flops.prefill_flops(cfg, counts, m.reducer, m.keep_ratio)
            b = flops.prefill_bytes(cfg, counts, m.reducer, m.keep_ratio, 2)
            budgets[str(pct)] = {
                "end_to_end": ideal["end_to_end"], "llm_stage": ideal["llm"],
                "paper_speedup": PAPER["full"][0] / PAPER[f"cs2_ste_{pct}"][0],
                "sieve_share_end_to_end": red["sieve"] / full["end_to_end"],
                "bytes_gib": {k: v / GIB for k, v in b.items()},
            }
        cs2 = methods[BUDGETS[-1]]
        sieve_layers = flops.schedule_of(cfg, counts, cs2.reducer, cs2.keep_ratio).sieve_layers
        none_kept = flops.ideal_speedup(cfg, counts, cs2.reducer, cs2.keep_ratio, tokens=[int(counts["text"])] * L)
        clips.append({
            "seconds": s, "tokens": counts["total"], "video": counts["video"], "audio": counts["audio"],
            "encoder_share": full["encoders"] / full["end_to_end"], "sieve_layers": sieve_layers,
            "ceiling_no_av_kept": none_kept["end_to_end"], "budgets": budgets,
            "full_bytes_gib": {k: v / GIB for k, v in full_bytes.items()},
        })
    return {"model": "3b", "geometry": {**geometry, "source": "this run" if own else "3B benchmark default"},
            "clips": clips}


# ------------------------------------------------------------------------------------------ output
def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _range(r: dict[str, Any], stage: str) -> str:
    lo, hi = r["ms_range"][stage]
    return f"{r['ms'][stage]:.1f} [{lo:.1f}-{hi:.1f}]"


def _paper_lines(result: dict[str, Any]) -> list[str]:
    pc = result["paper_ceiling"]
    full_ms, full_gb = PAPER["full"]
    paper_x = {pct: full_ms / PAPER[f"cs2_ste_{pct}"][0] for pct in BUDGETS}
    lines = [
        "## The paper's numbers and the FLOP ceiling",
        "",
        f"Paper (Qwen2.5-Omni-3B, Daily-Omni, forward incl. sieve): {full_ms} ms -> "
        + "/".join(f"{PAPER[f'cs2_ste_{p}'][0]}" for p in BUDGETS)
        + " ms at 20/10/5% (" + "/".join(f"{paper_x[p]:.2f}x" for p in BUDGETS) + f"); {full_gb} GB -> "
        + "/".join(f"{PAPER[f'cs2_ste_{p}'][1]}" for p in BUDGETS) + " GB. The paper does not state the clip "
        "length of these rows.",
        "",
        f"FLOP ceilings below: ep_kit.flops on the 3B config with the shipped recipes/cs2_ste_{{20,10,5}}.yaml "
        f"(N={pc['clips'][0]['sieve_layers']} sieve layers), {pc['geometry']['source']} geometry "
        f"({pc['geometry']['fps']:g} fps, max {pc['geometry']['max_pixels']} pixels per frame, "
        f"{pc['geometry']['prompt_tokens']} prompt tokens). The end-to-end ceiling is the largest speed-up a "
        "forward that includes the encoders can show if every stage runs at the same FLOP rate as in the full model.",
        "",
        "| clip | tokens | encoders / full e2e FLOPs | e2e ceiling 20/10/5% | LLM-stage ceiling 20/10/5% "
        "| e2e ceiling, no A/V token kept | paper speed-ups above the e2e ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in pc["clips"]:
        b = c["budgets"]
        above = [f"{paper_x[p]:.2f}x ({p}%)" for p in BUDGETS if paper_x[p] > b[str(p)]["end_to_end"]]
        lines.append(
            f"| {c['seconds']:g} s | {c['tokens']} | {100 * c['encoder_share']:.1f}% "
            f"| {' / '.join(_x(b[str(p)]['end_to_end']) for p in BUDGETS)} "
            f"| {' / '.join(_x(b[str(p)]['llm_stage']) for p in BUDGETS)} "
            f"| {c['ceiling_no_av_kept']:.2f}x | {', '.join(above) or 'none'} |"
        )
    first = pc["clips"][0]
    all_above = all(paper_x[p] > c["budgets"][str(p)]["end_to_end"] for c in pc["clips"] for p in BUDGETS)
    cap = [f"{paper_x[p]:.2f}x" for p in BUDGETS if paper_x[p] > first["ceiling_no_av_kept"]]
    below_llm = all(paper_x[p] <= c["budgets"][str(p)]["llm_stage"] for c in pc["clips"] for p in BUDGETS)
    lines += [
        "",
        ("All three of the paper's forward speed-ups are above the end-to-end FLOP ceiling at every clip length "
         "here. " if all_above else "Paper speed-ups above the ceiling are listed per clip in the table. ")
        + f"Why: the audio and vision encoders are never reduced and are {100 * first['encoder_share']:.0f}% of the "
        f"full model's end-to-end FLOPs at {first['seconds']:g} s, and the sieve runs its "
        f"{first['sieve_layers']} decoder layers bidirectionally over every token "
        f"({100 * first['budgets'][str(BUDGETS[-1])]['sieve_share_end_to_end']:.1f}% of the full model's end-to-end "
        f"FLOPs at {first['seconds']:g} s), so even a CS2 that kept no A/V token at all would be capped at "
        f"{first['ceiling_no_av_kept']:.2f}x end to end"
        + (f" (the paper's {', '.join(cap)} are above even that cap). " if cap else ". ")
        + ("The paper's speed-ups are below the LLM-stage ceilings, so they are reachable only for a timing that "
           "leaves the encoders out, or with a full-model baseline that runs at a lower FLOP rate than the reduced "
           "one; the paper does not say which." if below_llm else ""),
        "",
        "Memory (analytic, ep_kit.flops.prefill_bytes, bf16, SDPA-style attention that never stores the score "
        "matrix, logits on the last token): "
        + "; ".join(
            f"{c['seconds']:g} s: full {c['full_bytes_gib']['total']:.2f} GiB (KV {c['full_bytes_gib']['kv_cache']:.2f}, "
            f"activation {c['full_bytes_gib']['activation']:.2f}), CS2 5% "
            f"{c['budgets']['5']['bytes_gib']['total']:.2f} GiB (KV {c['budgets']['5']['bytes_gib']['kv_cache']:.2f}, "
            f"activation {c['budgets']['5']['bytes_gib']['activation']:.2f})"
            for c in pc["clips"]
        )
        + f". Weights dominate both (CS2 adds its {first['sieve_layers']}-layer sieve copy), the KV cache is what "
        "shrinks, and CS2's widest activation is its sieve layer over the full sequence, as wide as the full "
        "model's first layer: full / CS2 5% = "
        + "/".join(f"{c['full_bytes_gib']['total'] / c['budgets']['5']['bytes_gib']['total']:.2f}x" for c in pc["clips"])
        + " at " + "/".join(f"{c['seconds']:g}" for c in pc["clips"]) + " s. By this accounting the paper's "
        f"{full_gb} GB -> {PAPER['cs2_ste_5'][1]} GB ({full_gb / PAPER['cs2_ste_5'][1]:.2f}x) is not a saving of "
        "the inference peak under SDPA (the paper does not say how it measured memory); the measured numbers are in "
        "the memory section.",
        "",
    ]
    return lines


def _memory_lines(result: dict[str, Any]) -> list[str]:
    m = result["meta"]
    lines = ["## Memory: what CS2 saves and what it does not", "", f"Measured: {m['memory']}.", ""]
    memory = result["memory"]
    if not memory:
        return lines + ["Not measured in this run.", ""]
    cuda = m["timer"] == "cuda events"
    lines += [
        "Peak above what is resident before the operation, in MiB: inference = one prefill (logits on the last "
        f"token); train = forward + backward of the LM loss with labels on {m['answer_tokens']} answer tokens "
        "(the gradients it creates included, no optimizer state); train (ckpt) = the same with gradient "
        "checkpointing (decoder, encoders and sieve layers), as the 3B recipes train. Analytic = "
        "ep_kit.flops.prefill_bytes of the prefill at this run's dtype: the KV cache, and the live activations "
        "of the widest layer (for CS2 its sieve layer over the full sequence)."
        + (" Peak GiB = weights + inputs + the inference peak." if cuda else
           " On CPU peak RSS moves in pages and carries allocator and first-touch effects of the order of 1 MiB: "
           "differences of that size (short tiny-model clips, whose analytic activations are well under 1 MiB) are "
           f"noise, and a clip whose full-model peak is under {CPU_RESOLUTION // MIB} MiB is not read as a saving "
           "below; longer clips are where activations dominate."),
        "",
        "| row | clip (tokens) | inference | train | train (ckpt) | vs full: inference / train / train (ckpt) "
        "| analytic KV cache | analytic activation |" + (" peak GiB |" if cuda else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    full = {e["seconds"]: e for e in memory if e.get("full")}

    def mib(e: dict[str, Any], k: str) -> str:
        if e.get(k) is None:
            return e.get(f"{k}_error", e.get("error", "n/a"))
        return f"{e[k] / MIB:.1f}"

    def vs(e: dict[str, Any], k: str) -> str:
        base = full.get(e["seconds"], {}).get(k)
        return "n/a" if not base or e.get(k) is None else f"{e[k] / base:.2f}x"

    for e in memory:
        a = e.get("analytic_mib", {})
        lines.append(
            f"| {e['method']} | {e['seconds']:g} s ({e.get('tokens', '?')}) | {mib(e, 'inference')} | {mib(e, 'train')} "
            f"| {mib(e, 'train_ckpt')} | {' / '.join(vs(e, k) for k in MEMORY_MODES)} "
            f"| {_fmt(a.get('kv_cache'), '.2f')} | {_fmt(a.get('activation'), '.2f')} |"
            + (f" {_fmt(e.get('peak_gib'), '.2f')} |" if cuda else "")
        )
    lines += ["", *memory_statement(memory, 0 if cuda else CPU_RESOLUTION), ""]
    return lines


#: Below this many bytes above resident, a CPU peak-RSS difference is not read as a saving (pages, allocator).
CPU_RESOLUTION = 4 * MIB


def memory_statement(memory: list[dict[str, Any]], resolution: int = 0) -> list[str]:
    """What the measured numbers say CS2 saves: per mode and clip, the range of CS2 / full over the budgets.

    A clip whose full-model peak is below ``resolution`` bytes is reported as unresolved, not as a saving.
    """
    full = {e["seconds"]: e for e in memory if e.get("full")}
    names = {"inference": "Inference (prefill) peak", "train": "Training-step peak",
             "train_ckpt": "Training-step peak with gradient checkpointing"}
    out = ["Measured, CS2 / full model (range over the budgets):", ""]
    for mode in MEMORY_MODES:
        parts = []
        for seconds, base in sorted(full.items()):
            ratios = [e[mode] / base[mode] for e in memory if not e.get("full") and e["seconds"] == seconds
                      and e.get(mode) is not None and base.get(mode)]
            if not ratios:
                continue
            lo, hi = min(ratios), max(ratios)
            saved = f"{100 * (1 - hi):.0f}" + ("" if round(100 * hi) == round(100 * lo) else f"-{100 * (1 - lo):.0f}")
            verdict = (f"below what peak RSS resolves: the full model's peak is {base[mode] / MIB:.1f} MiB"
                       if base[mode] < resolution else "no saving" if lo >= 1.0 else
                       "within 10%: little or no saving" if lo >= 0.9 else f"CS2 needs {saved}% less")
            ratio = f"{lo:.2f}" + ("" if f"{lo:.2f}" == f"{hi:.2f}" else f"-{hi:.2f}")
            parts.append(f"{seconds:g} s: {ratio}x ({verdict})")
        if parts:
            out.append(f"- {names[mode]}: " + "; ".join(parts) + ".")
    out += [
        "",
        "What CS2 does and does not reduce, by construction: the KV cache and the decoder's activations shrink "
        "with the budget (analytic KV column); the encoders still run on the whole clip and the sieve runs full "
        "decoder layers over every token, so its widest layer is as wide as the full model's first layer (analytic "
        "activation column: equal) and bounds the inference peak from below under SDPA; in a training step the "
        "sieve's full-length activations are kept for its backward (with checkpointing: its layer inputs, each "
        "layer recomputed in turn), while the decoder's shrink with the budget. Where the measured lines above "
        "disagree with this, the measurement stands.",
    ]
    return out


def to_markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    cuda = m["timer"] == "cuda events"
    lines = [
        f"# Efficiency: Qwen2.5-Omni-{m['model']} thinker prefill on {m['device']}",
        "",
        *([] if m.get("complete", True) else ["**PARTIAL: the run stopped before every configuration was measured.**", ""]),
        f"Command: `{m['command']}`  ",
        f"Commit: `{m.get('commit', 'unknown')}`  ",
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}, {m['date']}  ",
        f"dtype {m['dtype']}, attention {m['attn']}, logits on {m['logits']} token(s), batch {m['batch_size']}, "
        f"{m['num_layers']} decoder layers.  ",
        f"Timing ({m['timer']}): every method warmed up ({m['warmup']} run(s) each) before any is timed, then "
        f"{m['repeats']} round(s), each running every method once in an order shuffled per round (seed "
        f"{m['order_seed']}; orders in the JSON). Each stage: median [min-max] over the rounds, in ms.  ",
        "Rows are recipes (label = file stem), each run with its own reducer, budget and rotary layout; "
        "the configs of each row and its reducer are listed below the tables.  ",
        "FLOP-ideal = full FLOPs / method FLOPs (ep_kit.flops, from the realised per-layer token counts). "
        "FLOP efficiency = achieved speed-up / FLOP-ideal speed-up (1 = the reduced model runs at the full model's "
        "FLOP rate).",
        "",
    ]
    if not cuda:
        lines += [
            "**CPU run on a shared, noisy machine** (other jobs ran at the same time): timings, speed-ups and "
            "efficiencies are not comparable with GPU or paper numbers, and the tiny smoke model is dominated by "
            "per-call overheads rather than FLOPs. They show that every path runs and how the numbers are derived.",
            "",
        ]
    for sec, c in result["clips"].items():
        rs = [r for r in result["rows"] if str(r["seconds"]) == sec]
        lines += [
            f"## {float(sec):g} s clip: {c['video']} video + {c['audio']} audio + {c['text']} text = {c['total']} tokens "
            f"({c['frames']} frames of {c['height']}x{c['width']})",
            "",
            "| method | encoders | sieve | LLM (decoder + head) | LLM stage | end to end |",
            "|---|---|---|---|---|---|",
        ]
        for r in rs:
            name = r["label"] if r["kind"] == "full" else f"{r['label']} ({r['kind']}, {100 * r['keep_ratio']:g}%)"
            lines.append(f"| {name} | " + " | ".join(_range(r, s) for s in STAGES) + " |")
        lines += [
            "",
            "| method | LLM-stage speed-up | FLOP-ideal | efficiency | end-to-end speed-up | FLOP-ideal | efficiency |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            if r["kind"] == "full":
                continue
            sp, eff = r["speedup"] or {}, r["flop_efficiency"] or {}
            lines.append(
                f"| {r['label']} | {_fmt(sp.get('llm_stage'), '.2f', 'x')} | {r['ideal_speedup']['llm']:.2f}x "
                f"| {_fmt(eff.get('llm_stage'), '.2f')} | {_fmt(sp.get('end_to_end'), '.2f', 'x')} "
                f"| {r['ideal_speedup']['end_to_end']:.2f}x | {_fmt(eff.get('end_to_end'), '.2f')} |"
            )
        lines.append("")
    lines += ["## Targets (defined by FLOPs)", ""]
    checks = result["checks"]
    if cuda:
        failed = [c for c in checks if c["status"] != "PASS"]
        lines.append(f"Efficiency = achieved / FLOP-ideal speed-up, LLM stage and end to end, every row and clip; "
                     f"PASS when >= {TARGET_EFFICIENCY}. {len(checks) - len(failed)} of {len(checks)} pass.")
        lines += ["", *(f"- **{c['status']}** {c['stage']} {c['method']} @ {c['seconds']:g} s: x{c['achieved']:.2f} "
                        f"of x{c['ideal']:.2f} = {c['efficiency']:.2f}" for c in checks)]
    else:
        effs = [c["efficiency"] for c in checks if c["efficiency"] is not None]
        lines.append(f"Informational (CPU): the target is efficiency >= {TARGET_EFFICIENCY} per stage on a GPU; the "
                     "ratios above are this CPU run's"
                     + (f" (range {min(effs):.2f}-{max(effs):.2f}); no PASS/FAIL on CPU." if effs else "."))
    lines.append("")
    if result["sieve"]:
        lines += [
            "## Sieve: FLOP share vs time share",
            "",
            "No target of its own: by FLOPs alone the sieve (N bidirectional layers over every token + scorer) is "
            "more than N/L of the full model's LLM stage. Shares are of the row's own LLM stage and end to end.",
            "",
            "| row | clip | N | FLOPs / LLM stage | time / LLM stage | FLOPs / end to end | time / end to end "
            "| sieve FLOPs / (N/L x full LLM stage) | sieve time / (N/L x full LLM stage) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in result["sieve"]:
            lines.append(
                f"| {s['method']} | {s['seconds']:g} s | {s['sieve_layers']} | {100 * s['flop_share_llm_stage']:.1f}% "
                f"| {100 * s['time_share_llm_stage']:.1f}% | {100 * s['flop_share_end_to_end']:.1f}% "
                f"| {100 * s['time_share_end_to_end']:.1f}% | {_fmt(s.get('flops_over_nl_full_llm'), '.2f', 'x')} "
                f"| {_fmt(s.get('time_over_nl_full_llm'), '.2f', 'x')} |"
            )
        lines.append("")
    lines += _memory_lines(result)
    lines += _paper_lines(result)
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
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any]) -> Any:
    """Latency per method, speed-ups (measured / FLOP-ideal / paper), measured memory (inference, training).

    The memory panels draw what the run measured: on CUDA ``max_memory_allocated``, on CPU the peak RSS
    of a fresh process per (row, clip) above what was resident. A :class:`matplotlib.figure.Figure`
    built directly, so drawing never selects a backend.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(15, 9))
    axes = fig.subplots(2, 2)
    cmap = colormaps["tab20"]
    color = {m: cmap(i % 20) for i, m in enumerate(methods)}
    ax = axes[0][0]
    for method in methods:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seconds"])
        xs = [r["seconds"] for r in rs]
        ys = [r["ms"]["end_to_end"] for r in rs]
        err = [[y - r["ms_range"]["end_to_end"][0] for y, r in zip(ys, rs, strict=True)],
               [r["ms_range"]["end_to_end"][1] - y for y, r in zip(ys, rs, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=method, color=color[method])
    ax.set(xlabel="clip length (s)", ylabel="prefill end-to-end (ms): median, min-max", title="latency")
    first = min(r["seconds"] for r in rows)
    rs = [r for r in rows if r["seconds"] == first and r["kind"] != "full"]
    xs = range(len(rs))
    width = 0.27
    ax = axes[0][1]
    ax.bar([x - width for x in xs], [(r["speedup"] or {}).get("end_to_end") or 0 for r in rs], width, label="measured")
    ax.bar(list(xs), [r["ideal_speedup"]["end_to_end"] for r in rs], width, label="FLOP-ideal")
    ax.bar([x + width for x in xs], [r["paper_speedup"] or 0 for r in rs], width, label="paper (3B)")
    ax.set_xticks(list(xs), [r["method"] for r in rs], rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="end-to-end speed-up vs full", title=f"speed-up at {first:g} s")
    memory = result["memory"]
    unit = "MiB above resident" + (" (peak RSS, fresh process)" if result["meta"]["timer"] != "cuda events"
                                   else " (max_memory_allocated)")
    for ax, modes, title in ((axes[1][0], ("inference",), "inference (prefill) peak"),
                             (axes[1][1], ("train", "train_ckpt"), "training step peak (solid: plain, dashed: ckpt)")):
        for name in dict.fromkeys(e["method"] for e in memory):
            es = sorted((e for e in memory if e["method"] == name), key=lambda e: e["seconds"])
            for mode in modes:
                pts = [(e["seconds"], e[mode] / MIB) for e in es if e.get(mode) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", linestyle="--" if mode == "train_ckpt" else "-",
                            color=color.get(name), label=name if mode != "train_ckpt" else None)
        ax.set(xlabel="clip length (s)", ylabel=unit, title=title)
        if not ax.lines:
            ax.text(0.5, 0.5, f"memory not measured: {result['meta']['memory']}", ha="center", va="center",
                    transform=ax.transAxes, wrap=True)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2 if ax is axes[0][0] else 1)
        ax.grid(alpha=0.3)
    m = result["meta"]
    fig.suptitle(f"Qwen2.5-Omni-{m['model']} prefill on {m['device']} (commit {m.get('commit', 'unknown')})")
    fig.tight_layout()
    return fig


def plot(result: dict[str, Any], path: Path) -> None:
    figure(result).savefig(path, dpi=110)


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
                        "ablation overlay on cs2_ste_20.yaml); default: every main-table row at 20/10/5%% (recipes/, "
                        "or recipes/toy/ with --smoke): full, cs2_ste_{20,10,5} and every baseline found")
    p.add_argument("--eval-base", type=Path, default=None,
                   help="evaluation base of the baselines/ rows (default: the row folder's own, recipes/eval_3b.yaml "
                        "or recipes/toy/baselines/base.yaml; --model 7b: recipes/eval_7b.yaml)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, every method once per round (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs of every method before timing (>= 1, default 3)")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the per-round method order")
    p.add_argument("--memory", choices=("measure", "skip"), default="measure",
                   help="peak memory of the full model and every row with a sieve: inference and a training step "
                        "(CPU: one fresh process per row and clip)")
    p.add_argument("--memory-seconds", type=float, nargs="+", default=None,
                   help="clip lengths of the memory measurement (default: --seconds; --smoke: 4 60, since the tiny "
                        "model's activations at 2-4 s are below what peak RSS resolves)")
    p.add_argument("--answer-tokens", type=int, default=None, help="labelled answer tokens of the training step "
                   "(default 16; --smoke: 4)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output directory (default runs/efficiency; benchmarks/results holds the recorded runs)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on CPU with the toy recipes, 2 and 4 s clips, 1 warm-up + 5 rounds")
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
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)  # internal: one memory configuration
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.model = "tiny"
        args.device = args.device or "cpu"
        args.seconds = args.seconds or [2.0, 4.0]
        args.repeats = args.repeats or 5
        args.warmup = args.warmup if args.warmup is not None else 1
        args.tag = args.tag or "smoke"
        args.threads = args.threads or 1
    if args.answer_tokens is None:
        args.answer_tokens = 4 if args.model == "tiny" else 16
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.seconds = args.seconds or [30.0, 60.0, 120.0]
    args.memory_seconds = args.memory_seconds or ([4.0, 60.0] if args.smoke else list(args.seconds))
    args.repeats = args.repeats or 10
    args.warmup = 3 if args.warmup is None else args.warmup
    if args.repeats < 1 or args.warmup < 1 or args.batch_size < 1 or args.answer_tokens < 1:
        p.error("--repeats, --batch-size and --answer-tokens must be >= 1, --warmup >= 1 (every method is warmed "
                "up before timing)")
    if any(s <= 0 for s in [*args.seconds, *args.memory_seconds]):
        p.error("--seconds must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if args.methods is None:
        args.methods = [str(r) for r in default_recipes(args.smoke)]
    if args.eval_base is None and args.model == "7b":
        args.eval_base = ROOT / "recipes" / "eval_7b.yaml"
    try:
        args.recipes = load_methods(args.methods, args.eval_base)
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    if args.memory_probe and (len(args.recipes) != 1 or len(args.seconds) != 1):
        p.error("--memory-probe measures one recipe on one clip length")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    if args.memory_probe:
        probe_main(args)
        return {}
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
