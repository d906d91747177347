"""Training step with the lm_head on every kept token vs on the labelled rows only (CPU, measured).

Why: training's loss reads the logits of the answer tokens only, yet the stock path runs the
151,936-wide lm_head (and its float32 upcast for the loss) on every kept token. This script
measures what computing only the labelled rows (``OmniThinker.forward(batch, logits="labels")``,
what :class:`~ep_kit.train.EPKitModule` trains with) saves, against ``logits="all"`` (the previous
training path), at two sizes:

* ``toy``: the toy recipes' scale (hidden 64, 4 layers, the kit's 272-token vocabulary);
* ``mid``: hidden 768, 9 layers, the released 151,936-token vocabulary, one ~2k-token clip.

Both with CS2 at a 20% budget and one sample. Step = forward + backward of the LM loss (no
optimizer: its cost does not depend on the logits). Time: one thread, the two modes interleaved
(A B A B ...), median and range of ``--repeats`` steps after a warm-up. Peak memory: a fresh
subprocess per (size, mode) builds the model, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``) and reports the peak RSS increase of ``--mem-steps`` steps.

    python benchmarks/label_logits.py                      # -> runs/label_logits/label_logits_cpu.{json,md}
    python benchmarks/label_logits.py --out benchmarks/results   # the recorded run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "label_logits"
MODES = ("all", "labels")


def build(size: str) -> tuple[Any, dict[str, Any]]:
    """A CS2 (20%) model and one training batch of the given size, seeded."""
    from ep_kit.models import OmniThinker
    from ep_kit.models.tiny import SampleSpec, make_av_batch, tiny_thinker_config
    from ep_kit.reducers import CS2

    torch.manual_seed(0)
    if size == "toy":
        config = tiny_thinker_config(hidden_size=64, num_layers=4)
        spec = SampleSpec(prompt_len=20, answer_len=2, frames=8, height=56, width=84, audio_seconds=4.0)
        sieve = 2
    elif size == "mid":
        config = tiny_thinker_config(vocab="qwen", hidden_size=768, num_layers=9, num_heads=12, num_kv_heads=2,
                                     intermediate_size=2048)
        spec = SampleSpec(prompt_len=64, answer_len=2, frames=40, height=224, width=224, audio_seconds=20.0)
        sieve = 3
    else:
        raise ValueError(f"size must be toy or mid, got {size!r}")
    model = OmniThinker.from_config(config, reducer=CS2(num_layers=sieve), keep_ratio=0.2).train()
    batch = make_av_batch(config, [spec])
    return model, batch


def step(model: Any, batch: dict[str, Any], mode: str) -> float:
    out = model(batch, logits=mode)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def peak_rss_child(size: str, mode: str, steps: int) -> None:
    """(Subprocess) print the peak RSS increase, in MiB, of ``steps`` training steps."""
    torch.set_num_threads(1)
    model, batch = build(size)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    for _ in range(steps):
        step(model, batch, mode)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(size: str, repeats: int, mem_steps: int) -> dict[str, Any]:
    model, batch = build(size)
    n_tokens = int(batch["attention_mask"].sum())
    labelled = int((batch["labels"] != -100).sum())
    losses = {m: step(model, batch, m) for m in MODES}  # warm-up, and the two losses
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(repeats):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            start = time.perf_counter()
            step(model, batch, mode)
            times[mode].append((time.perf_counter() - start) * 1e3)
    del model
    peaks = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", size, mode, str(mem_steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        peaks[mode] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    return {
        "size": size,
        "tokens": n_tokens,
        "labelled_rows": labelled,
        "loss": losses,
        "step_ms": {m: {"median": statistics.median(t), "min": min(t), "max": max(t)} for m, t in times.items()},
        "peak_rss_increase_mib": peaks,
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Training step: lm_head on all kept tokens vs on the labelled rows only",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: `{result['commit']}`; {result['machine']}; torch {result['torch']}; one thread, fp32, batch 1, "
        "CS2 at 20%.  ",
        f"Step = forward + backward of the LM loss; median (min-max) of {result['repeats']} interleaved steps. "
        f"Peak = resident-set increase over {result['mem_steps']} steps in a fresh process.",
        "",
        "| size | input tokens / labelled rows | loss all / labels | step ms, all | step ms, labels | speed-up | "
        "peak MiB, all | peak MiB, labels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        a, b = r["step_ms"]["all"], r["step_ms"]["labels"]
        lines.append(
            f"| {r['size']} | {r['tokens']} / {r['labelled_rows']} | {r['loss']['all']:.6f} / {r['loss']['labels']:.6f} | "
            f"{a['median']:.1f} ({a['min']:.1f}-{a['max']:.1f}) | {b['median']:.1f} ({b['min']:.1f}-{b['max']:.1f}) | "
            f"{a['median'] / b['median']:.2f}x | {r['peak_rss_increase_mib']['all']:.0f} | "
            f"{r['peak_rss_increase_mib']['labels']:.0f} |"
        )
    lines += ["", "The machine may be shared; the interleaving keeps both modes under the same load."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        peak_rss_child(argv[1], argv[2], int(argv[3]))
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["toy", "mid"], choices=("toy", "mid"))
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default runs/label_logits)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "command": "python benchmarks/label_logits.py " + " ".join(argv),
        "commit": commit + (" + uncommitted changes" if dirty else ""),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "mem_steps": args.mem_steps,
        "rows": [measure(s, args.repeats, args.mem_steps) for s in args.sizes],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_logits_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "label_logits_cpu.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
