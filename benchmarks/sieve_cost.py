"""Where the CS2 sieve's time goes, and its share of CS2's prefill, at 1k-8k tokens on CPU.

Why this script exists: on a mid-size thinker the sieve (CS2's trainable copy of the first ``N``
decoder layers, run bidirectionally over prompt + audio/video tokens, then the scorer and Top-K)
was measured at 46% / 61% / 69% of CS2's prefill at 20 / 10 / 5 % budgets, growing with length.
This script measures that share and splits the sieve's time by part, so what is avoidable
(padding rows, answer tokens, mask materialisation) can be told from what is inherent (N layers on
every candidate token, attention quadratic in the length).

Setup (all in one process, one thread by default, float32, CPU):

* a random-weight Qwen2.5-Omni thinker of the issue's size (``--layers 9 --hidden 768``; 6 heads of
  128, 2 KV heads, MLP 4128 = the 3B's 11008/2048 ratio), Sync-RoPE as in the recipes, CS2 with
  ``N = --sieve-layers`` (default 1 = the recipe's 4 of 36 layers scaled to 9), MLP scorer, STE Top-K;
* synthetic clips (2 fps, 252x448 frames = 144 video tokens per second + 25 audio tokens per
  second, interleaved in 2-second chunks as the processor does) sized so a sample has about
  ``--lengths`` tokens, a 128-token prompt (48 before the media, 80 after); the sequence is built
  through :meth:`OmniThinker.embed` (real ``get_rope_index`` positions and modality ids) without
  running the media encoders (they are not part of what is measured), plus small noise so the
  placeholder embeddings differ;
* variants: ``infer`` (batch 1, no answer), ``train`` (batch 1, a ``--answer-tokens`` answer: the
  training batch shape; forward only), ``train_b2`` (batch 2 with answers, the second clip
  ``--short-fraction`` as long: a right-padded batch).

Per length and variant, ``repeats`` rounds, each round one prefill per budget (20, 10, 5 %) in
turn (interleaved), timed through the model's one prefill path (:meth:`OmniThinker.prefill` with a
clock; ``embed`` returns the prepared sequence): ``sieve`` = the pre-LLM stage (sieve layers,
scorer, Top-K, gather), ``llm`` = the decoder + final norm and lm_head on each sample's last token.
The share is ``sieve / (sieve + llm)`` per run (median and range). One more, instrumented, sieve
run per length and variant splits the sieve's time by part with forward hooks and wrappers
(exclusive CPU time): attention kernel (SDPA), GQA key/value repeat (the
copy transformers makes when a mask is passed), q/k/v/o projections, MLP, RMS norms, rotary
(cos/sin build once, rotation per layer), mask building (:meth:`AttentionMode.layer_kwargs`),
scorer, Top-K, and the rest (gathers/scatters, keep, glue). It also counts the token rows and the
query-key pairs the sieve layers computed against the ones that can matter.

Times are this thread's CPU time (``time.thread_time``; with one torch thread every op runs on it, so
other processes on a shared machine do not inflate it as they do wall time), wall time alongside.

Run:     python benchmarks/sieve_cost.py                    (about 250 s of CPU time)
Quick:   python benchmarks/sieve_cost.py --lengths 1024 2048 --repeats 2
Compare: python benchmarks/sieve_cost.py --before OLD.json... --after NEW.json...   (a markdown table)
Output: ``runs/sieve_cost/sieve_cost_cpu[_tag].{json,md}`` (``--out`` to choose; the recorded comparison is
``benchmarks/results/sieve_cost_cpu.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.integrations import sdpa_attention

from ep_kit.budget import keep_count
from ep_kit.masks import Bidirectional, Causal, IntraModal
from ep_kit.models import OmniThinker
from ep_kit.models.tiny import SampleSpec, make_av_batch, tiny_thinker_config
from ep_kit.reducers import CS2
from ep_kit.rope import SyncRoPE
from ep_kit.selectors import STETopK
from ep_kit.sequence import TokenSequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "sieve_cost"
BUDGETS = (20, 10, 5)
#: variant -> (batch size, with answer tokens)
VARIANTS = {"infer": (1, False), "train": (1, True), "train_b2": (2, True)}
MODES = {"bidirectional": Bidirectional, "causal": Causal, "intramodal": IntraModal}
FRAME = (252, 448)  # 9 x 16 merged patches = 144 video tokens per temporal grid (1 s at 2 fps)
AUDIO_PER_SECOND = 25
PROMPT_HEAD, PROMPT_TAIL = 48, 80
#: Parts of the split, in table order.
PARTS = (
    "attention kernel", "gqa kv repeat", "qkvo projections", "mlp", "norms", "rotary (cos/sin)",
    "rotary (apply)", "mask building", "scorer", "top-k", "other (gather/scatter/keep, glue)",
)


# ---------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace) -> OmniThinker:
    """The issue's mid-size thinker (random weights) with CS2 as the recipes build it."""
    cfg = tiny_thinker_config(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 128, num_kv_heads=2, head_dim=128,
        intermediate_size=args.hidden * 11008 // 2048, vision_depth=1, vision_hidden_size=32, audio_layers=1,
        audio_d_model=32, attn_implementation=args.attn,
    )
    torch.manual_seed(0)
    reducer = CS2(num_layers=args.sieve_layers, attention=MODES[args.attention](), prefusion=not args.no_prefusion,
                  selector=STETopK())
    return OmniThinker.from_config(cfg, rope=SyncRoPE(), reducer=reducer, keep_ratio=0.2).eval()


def clip_seconds(tokens: int, answer: int) -> int:
    """Seconds of 2 fps video + audio for about ``tokens`` tokens in all (prompt and answer included)."""
    per_second = (FRAME[0] // 28) * (FRAME[1] // 28) + AUDIO_PER_SECOND
    return max(2, round((tokens - PROMPT_HEAD - PROMPT_TAIL - answer - 4) / per_second))


def make_sequence(model: OmniThinker, tokens: int, variant: str, args: argparse.Namespace) -> TokenSequence:
    """The merged sequence of the variant's batch, through ``embed`` without the media encoders."""
    batch_size, answers = VARIANTS[variant]
    answer = args.answer_tokens if answers else 0
    seconds = clip_seconds(tokens, answer)
    lengths = [seconds] + [max(2, round(seconds * args.short_fraction))] * (batch_size - 1)
    specs = [
        SampleSpec(prompt_len=PROMPT_HEAD, answer_len=answer, suffix_len=PROMPT_TAIL, frames=2 * s,
                   height=FRAME[0], width=FRAME[1], fps=2.0, audio_seconds=float(s))
        for s in lengths
    ]
    batch = make_av_batch(model.config, specs, with_labels=answers)
    for key in ("pixel_values_videos", "input_features"):  # positions and layout only: no encoders
        batch.pop(key)
    with torch.no_grad():
        seq = model.embed(batch)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(seq.hidden.shape, generator=gen) * 0.02
    return seq.replace(hidden=(seq.hidden + noise) * seq.attention_mask[..., None])


@contextlib.contextmanager
def fixed_input(model: OmniThinker, seq: TokenSequence) -> Iterator[None]:
    """``model.embed`` returns ``seq``: the prefill path runs from the merged sequence on."""
    model.embed = lambda batch: seq  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.embed


def clock() -> tuple[float, float]:
    """(wall, this thread's CPU time) in seconds."""
    return time.perf_counter(), time.thread_time()


def timed_prefill(model: OmniThinker, seq: TokenSequence, ratio: float) -> dict[str, tuple[float, float]]:
    """``{"sieve": (cpu ms, wall ms), "llm": ...}`` of one prefill at ``ratio``.

    ``llm`` includes the final norm and lm_head on each sample's last token.
    """
    model.keep_ratio = ratio
    with fixed_input(model, seq):
        p = model.prefill({}, clock=clock)
    head = [clock()]
    rows = torch.arange(p.kept.batch_size)
    model.head(p.kept.hidden[rows, p.kept.lengths - 1])
    head.append(clock())

    def ms(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        return (b[1] - a[1]) * 1e3, (b[0] - a[0]) * 1e3

    sieve, llm, extra = ms(p.marks[1], p.marks[2]), ms(p.marks[2], p.marks[3]), ms(*head)
    return {"sieve": sieve, "llm": (llm[0] + extra[0], llm[1] + extra[1])}


# ------------------------------------------------------------------------------------ the split
class Tracer:
    """Exclusive CPU time (this thread's) per label of nested regions (one thread, synchronous ops)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.stack: list[list[Any]] = []  # [label, start, child time]

    def push(self, label: str) -> None:
        self.stack.append([label, time.thread_time(), 0.0])

    def pop(self) -> None:
        label, start, child = self.stack.pop()
        elapsed = time.thread_time() - start
        self.totals[label] = self.totals.get(label, 0.0) + elapsed - child
        if self.stack:
            self.stack[-1][2] += elapsed

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **kw: Any) -> Any:
            self.push(label)
            try:
                return fn(*a, **kw)
            finally:
                self.pop()

        return wrapped


@contextlib.contextmanager
def instrumented(model: OmniThinker, tracer: Tracer, work: dict[str, float]) -> Iterator[None]:
    """Hooks and wrappers that attribute the sieve stage's time to its parts (undone on exit).

    ``work`` accumulates the rows (``B * n``) and query-key pairs (``B * n * n``) each sieve layer
    call computed.
    """
    reducer = model.reducer
    handles = []

    def module(mod: torch.nn.Module, label: str) -> None:
        handles.append(mod.register_forward_pre_hook(lambda m, a: tracer.push(label)))
        handles.append(mod.register_forward_hook(lambda m, a, o: tracer.pop()))

    def count(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        B, n = hidden.shape[:2]
        work["rows"] += B * n
        work["pairs"] += B * n * n

    for i, layer in enumerate(reducer.layers):
        if i == 0:
            handles.append(layer.register_forward_pre_hook(count, with_kwargs=True))
        module(layer, "other (gather/scatter/keep, glue)")
        # By module type and name, so no transformers attribute is named here (tests/test_boundary.py).
        for name, sub in layer.named_modules():
            if name == "mlp":
                module(sub, "mlp")
            elif name.startswith("mlp."):
                continue
            elif type(sub).__name__.endswith("RMSNorm"):
                module(sub, "norms")
            elif isinstance(sub, torch.nn.Linear):
                module(sub, "qkvo projections")
    module(model.rope, "rotary (cos/sin)")
    module(reducer.scorer, "scorer")
    module(reducer.selector, "top-k")
    mode = reducer.attention
    hf_omni = sys.modules[type(reducer.layers[0]).__module__]  # the decoder layer's modeling module
    saved = {
        (hf_omni, "apply_rotary_pos_emb"): hf_omni.apply_rotary_pos_emb,
        (sdpa_attention, "repeat_kv"): sdpa_attention.repeat_kv,
        (torch.nn.functional, "scaled_dot_product_attention"): torch.nn.functional.scaled_dot_product_attention,
    }
    hf_omni.apply_rotary_pos_emb = tracer.wrap("rotary (apply)", hf_omni.apply_rotary_pos_emb)
    sdpa_attention.repeat_kv = tracer.wrap("gqa kv repeat", sdpa_attention.repeat_kv)
    torch.nn.functional.scaled_dot_product_attention = tracer.wrap(
        "attention kernel", torch.nn.functional.scaled_dot_product_attention
    )
    mode.layer_kwargs = tracer.wrap("mask building", mode.layer_kwargs)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
        del mode.layer_kwargs


def refined_rows(model: OmniThinker, seq: TokenSequence) -> torch.Tensor:
    """``(B, L)``: the rows whose sieve output is used (the rows that can matter): with pre-fusion the
    prompt + A/V tokens of each sample with media, without it the A/V tokens."""
    if model.reducer.prefusion:
        return seq.attention_mask & ~seq.answer_mask & seq.av_mask.any(-1, keepdim=True)
    return seq.av_mask


def sieve_split(model: OmniThinker, seq: TokenSequence, ratio: float) -> dict[str, Any]:
    """One instrumented pre-LLM stage: ms per part, and the rows / pairs the sieve layers computed."""
    tracer = Tracer()
    work = {"rows": 0.0, "pairs": 0.0}
    model.keep_ratio = ratio
    with torch.no_grad(), instrumented(model, tracer, work):
        full = seq
        ctx = model.context(full)
        tracer.push("other (gather/scatter/keep, glue)")
        model.reduce_before_llm(full, ctx)
        tracer.pop()
    ms = {part: tracer.totals.get(part, 0.0) * 1e3 for part in PARTS}
    needed = refined_rows(model, seq).sum(-1).double()
    return {
        "ms": ms,
        "total_ms": sum(ms.values()),
        "rows": work["rows"] / len(model.reducer.layers),
        "pairs": work["pairs"] / len(model.reducer.layers),
        "needed_rows": float(needed.sum()),
        "needed_pairs": float((needed**2).sum()),
    }


# ------------------------------------------------------------------------------------------- run
def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(model: OmniThinker, seq: TokenSequence, repeats: int, warmup: int) -> dict[str, Any]:
    """Interleaved budgets: ``repeats`` rounds of one prefill per budget; sieve ms and share per budget.

    Times are this thread's CPU time (``cpu``; robust to other processes on a shared machine) and
    wall time (``wall``).
    """
    with torch.no_grad():
        for _ in range(warmup):
            timed_prefill(model, seq, BUDGETS[-1] / 100)
        runs: dict[int, list[dict[str, tuple[float, float]]]] = {b: [] for b in BUDGETS}
        for _ in range(repeats):
            for budget in BUDGETS:
                runs[budget].append(timed_prefill(model, seq, budget / 100))
    out: dict[str, Any] = {"budgets": {}}
    for c, clock_name in enumerate(("cpu", "wall")):
        for budget, samples in runs.items():
            sieve = [s["sieve"][c] for s in samples]
            llm = [s["llm"][c] for s in samples]
            out["budgets"].setdefault(str(budget), {})[clock_name] = {
                "sieve_ms": spread(sieve),
                "llm_ms": spread(llm),
                "share": spread([s / (s + m) for s, m in zip(sieve, llm, strict=True)]),
                "samples": list(zip(sieve, llm, strict=True)),
            }
        out[f"sieve_ms_{clock_name}"] = spread([s["sieve"][c] for samples in runs.values() for s in samples])
    return out


def flop_shares(model: OmniThinker, seq: TokenSequence) -> dict[str, float]:
    """The sieve's share of CS2's prefill FLOPs per budget, if only the rows that matter are computed.

    Per layer and token, the linear maps cost ``2 * (q, k, v, o, MLP weights)``; attention costs
    ``4 * heads * head_dim`` per query-key pair. The sieve: ``N`` layers over :func:`refined_rows`,
    every pair (as bidirectional). The decoder: every layer over the kept tokens (text, answers,
    ``keep_count`` A/V), causal (half the pairs). Scorer, Top-K and lm_head are left out.
    """
    text = model.text_config
    heads, kv, hd, d = text.num_attention_heads, text.num_key_value_heads, model.head_dim, text.hidden_size
    linear = 2 * (2 * d * heads * hd + 2 * d * kv * hd + 3 * d * text.intermediate_size)
    pair = 4 * heads * hd
    av = seq.av_mask.sum(-1).tolist()
    rows = refined_rows(model, seq).sum(-1).tolist()
    real = seq.lengths.tolist()
    sieve = len(model.reducer.layers) * sum(linear * n + pair * n * n for n in rows)
    out = {}
    for budget in BUDGETS:
        kept = [t - a + keep_count(a, budget / 100) for t, a in zip(real, av, strict=True)]
        llm = text.num_hidden_layers * sum(linear * t + pair * t * t / 2 for t in kept)
        out[str(budget)] = sieve / (sieve + llm)
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha} with uncommitted changes" if dirty else sha


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    model = build_model(args)
    text = model.text_config
    log(f"# thinker: {text.num_hidden_layers} layers, hidden {text.hidden_size}, {text.num_attention_heads} heads x "
        f"{model.head_dim} ({text.num_key_value_heads} KV), MLP {text.intermediate_size}; sieve N={args.sieve_layers} "
        f"({args.attention}, prefusion {not args.no_prefusion}); {torch.get_num_threads()} thread(s), fp32")
    rows = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for tokens in args.lengths:
        repeats = args.repeats if tokens < args.long_from else args.long_repeats
        for variant in args.variants:
            seq = make_sequence(model, tokens, variant, args)
            timing = measure(model, seq, repeats, args.warmup if tokens < args.long_from else 0)
            split = sieve_split(model, seq, BUDGETS[0] / 100)
            row = {
                "tokens": tokens, "variant": variant, "repeats": repeats,
                "lengths": seq.lengths.tolist(),
                "answers": int(seq.answer_mask.sum()),
                "av": int(seq.av_mask.sum()),
                **timing, "split": split, "flop_share": flop_shares(model, seq),
            }
            rows.append(row)
            shares = " ".join(f"{b}%: {row['budgets'][str(b)]['cpu']['share']['median']:.0%}" for b in BUDGETS)
            log(f"{tokens:>5} {variant:<9} L={row['lengths']} sieve {row['sieve_ms_cpu']['median']:8.1f} ms cpu "
                f"({row['sieve_ms_wall']['median']:.1f} wall)  share {shares}"
                f"  rows {split['rows'] / split['needed_rows']:.2f}x  pairs {split['pairs'] / split['needed_pairs']:.2f}x"
                f"  [{time.perf_counter() - started:.0f} s]")
    return {
        "meta": {
            "command": "python benchmarks/sieve_cost.py " + " ".join(args.argv),
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} thread(s)"
                       " (CPU shared with other processes: timings are noisy)",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.hidden // 128, "kv_heads": 2,
                      "head_dim": 128, "mlp": args.hidden * 11008 // 2048, "attn": args.attn},
            "sieve": {"layers": args.sieve_layers, "attention": args.attention, "prefusion": not args.no_prefusion},
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
        },
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------- output
def to_markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        f"Command: `{m['command']}`  ",
        f"Commit: {m['commit']}; {m['date']}; {m['machine']}; torch {m['torch']}, transformers {m['transformers']}.  ",
        f"Thinker: {m['model']['layers']} layers, hidden {m['model']['hidden']}, {m['model']['heads']} heads x 128 "
        f"({m['model']['kv_heads']} KV), MLP {m['model']['mlp']}, {m['model']['attn']}; sieve N={m['sieve']['layers']} "
        f"({m['sieve']['attention']}, prefusion {m['sieve']['prefusion']}). Run took {m['seconds']} s"
        + (f" ({m['cpu_seconds']} s of CPU).  " if "cpu_seconds" in m else ".  "),
        "Times are the benchmark thread's CPU time (one torch thread, so every op runs on it; other processes on "
        "the shared machine do not inflate it), median and range over the runs; wall-clock medians in brackets. "
        "Share = sieve / (sieve + LLM) per run, the sieve stage being everything before the decoder (sieve layers, "
        "scorer, Top-K, gather). FLOP share: the same ratio in FLOPs when only the rows that matter are computed "
        "(sieve: N layers, every prompt + A/V pair; decoder: all layers on the kept tokens, causal), see `flop_shares`.",
        "",
        "| tokens | variant (rounds) | lengths | sieve ms | share @20% | share @10% | share @5% | rows run / needed | "
        "pairs run / needed | FLOP share @20/10/5% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s, w = r["sieve_ms_cpu"], r["sieve_ms_wall"]
        shares = [r["budgets"][str(b)]["cpu"]["share"] for b in BUDGETS]
        sp = r["split"]
        lines.append(
            f"| {r['tokens']} | {r['variant']} (x{r['repeats']}) | {'+'.join(map(str, r['lengths']))} | "
            f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) [{w['median']:.0f}] | "
            + " | ".join(f"{x['median']:.0%} ({x['min']:.0%}-{x['max']:.0%})" for x in shares)
            + f" | {sp['rows'] / sp['needed_rows']:.2f} | {sp['pairs'] / sp['needed_pairs']:.2f} | "
            + ("/".join(f"{r['flop_share'][str(b)]:.0%}" for b in BUDGETS) if "flop_share" in r else "-")
            + " |"
        )
    lines += ["", "Split of one instrumented sieve stage (CPU ms, exclusive; % of its total):", "",
              "| tokens | variant | total | " + " | ".join(PARTS) + " |", "|---|---|---|" + "---|" * len(PARTS)]
    for r in result["rows"]:
        sp = r["split"]
        cells = [f"{sp['ms'][p]:.0f} ({sp['ms'][p] / sp['total_ms']:.0%})" for p in PARTS]
        lines.append(f"| {r['tokens']} | {r['variant']} | {sp['total_ms']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_markdown(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> str:
    """Before -> after per (attention, tokens, variant) found in both: sieve CPU ms, shares, rows/pairs run."""

    def index(results: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
        out = {}
        for res in results:
            s = res["meta"]["sieve"]
            mode = s["attention"] + ("" if s["prefusion"] else ", no pre-fusion")
            for r in res["rows"]:
                out[(mode, r["tokens"], r["variant"])] = r
        return out

    a, b = index(before), index(after)
    lines = [
        "| sieve | tokens | variant | sieve CPU ms before -> after | change | share @20% | share @10% | share @5% | "
        "rows run / needed | pairs run / needed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in [k for k in a if k in b]:
        x, y = a[key], b[key]
        sx, sy = x["sieve_ms_cpu"]["median"], y["sieve_ms_cpu"]["median"]
        shares = " | ".join(
            f"{x['budgets'][str(q)]['cpu']['share']['median']:.0%} -> {y['budgets'][str(q)]['cpu']['share']['median']:.0%}"
            for q in BUDGETS
        )
        work = " | ".join(
            f"{x['split'][k] / x['split']['needed_' + k]:.2f} -> {y['split'][k] / y['split']['needed_' + k]:.2f}"
            for k in ("rows", "pairs")
        )
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {sx:.0f} -> {sy:.0f} | {sy / sx - 1:+.0%} | {shares} | {work} |")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path, tag: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = "sieve_cost_cpu" + (f"_{tag}" if tag else "")
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(to_markdown(result))
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="tokens per (longest) sample")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=3, help="rounds (one prefill per budget each) below --long-from")
    p.add_argument("--long-repeats", type=int, default=1, help="rounds from --long-from tokens on (no warm-up there)")
    p.add_argument("--long-from", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--hidden", type=int, default=768, help="a multiple of 128 (heads of 128)")
    p.add_argument("--sieve-layers", type=int, default=1, help="N (default 1: the recipe's 4 of 36, scaled to 9)")
    p.add_argument("--attention", choices=sorted(MODES), default="bidirectional")
    p.add_argument("--no-prefusion", action="store_true")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--short-fraction", type=float, default=0.6, help="train_b2: the second clip's length fraction")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tag", default="")
    p.add_argument("--before", nargs="+", type=Path, metavar="JSON",
                   help="with --after: print a before -> after table of these result files instead of measuring")
    p.add_argument("--after", nargs="+", type=Path, metavar="JSON")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.hidden % 128 or args.repeats < 1 or args.long_repeats < 1:
        p.error("--hidden must be a multiple of 128, --repeats/--long-repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if args.before or args.after:
        if not (args.before and args.after):
            raise SystemExit("--before and --after go together")
        print(compare_markdown([json.loads(f.read_text()) for f in args.before],
                               [json.loads(f.read_text()) for f in args.after]), end="")
        return []
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run(args)
    finally:
        torch.set_num_threads(previous)
    paths = write(result, args.out, args.tag)
    print("\n".join(f"wrote {p}" for p in paths))
    return paths


if __name__ == "__main__":
    main()
