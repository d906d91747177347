"""Every fault and bad input tried on ep-kit, what was run, and what it did: one script regenerates the table.

    python benchmarks/reliability.py [--quick] [--out runs/tables]

Each case writes its bad input into a scratch folder, runs the kit's own entry point on it (the
reader, the data module, the CLI) and records the observed behaviour: the exception's type and first
line, the warnings, or the counts a skip report kept. The distributed cases (2-process CPU DDP kill
and resume, text-only batches under DDP) run their tests in a child ``pytest``; ``--quick`` leaves
them out. Writes ``reliability[_quick].md`` into ``--out`` (default ``runs/tables``; the recorded
table is ``benchmarks/results/reliability.md``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ep_kit.data.benchmarks import SkipReport, read_videomme  # noqa: E402
from ep_kit.data.synthetic import write_av_clip  # noqa: E402


@dataclass
class Case:
    """One fault: what it is, the command a user would run, and the function that runs it here."""

    fault: str
    command: str
    run: Callable[[Path], str]
    slow: bool = False


def observe(fn: Callable[[], object]) -> str:
    """``fn``'s outcome in one line: the exception (type and first line), else its warnings, else ``ok``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as err:  # the point is to record whatever it raises
            return f"**{type(err).__name__}**: {str(err).splitlines()[0]}"
    told = [f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught
            if "ep_kit" in w.filename or w.category.__module__.startswith("ep_kit")]
    if told:
        return "warns " + " / ".join(f"**{t.split(':', 1)[0]}**:{t.split(':', 1)[1]}" for t in told)
    return f"ok: {result}" if result is not None else "ok"


# ------------------------------------------------------------------------------ inputs
def clip(path: Path, frames: int = 8, size: tuple[int, int] = (56, 56), audio: bool = True) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (frames, *size, 3), dtype=np.uint8)
    wave = (0.3 * np.sin(2 * np.pi * 500 * np.arange(frames * 4000) / 16000)).astype(np.float32) if audio else None
    write_av_clip(path, pixels, 4.0, wave)
    return path


def row(video: str) -> dict:
    return {"messages": [{"role": "user", "content": "<video>Which colour?"},
                         {"role": "assistant", "content": "Red."}], "videos": [video]}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def data_module(ann: Path, skip_bad: bool = False):
    from ep_kit.data import AVDataModule, InstructSource

    return AVDataModule(InstructSource(train=str(ann), skip_bad=skip_bad), batch_size=2,
                        min_pixels=28 * 28, max_pixels=56 * 56)


VIDEOMME = {"videoID": "v", "question": "How many?", "options": ["A. 0", "B. 1"], "answer": "A",
            "task_type": "Counting"}


# ------------------------------------------------------------------------------- cases
def missing_video(d: Path) -> str:
    clip(d / "clip.mp4")
    return observe(lambda: data_module(jsonl(d / "train.jsonl", [row("clip.mp4"), row("gone.mp4")])).setup("fit"))


def missing_video_skipped(d: Path) -> str:
    clip(d / "clip.mp4")
    dm = data_module(jsonl(d / "train.jsonl", [row("clip.mp4"), row("gone.mp4")]), skip_bad=True)
    dm.setup("fit")
    return f"trains on {len(dm.datasets['train'][0][0])} row(s); report: {' '.join(dm.skip_report.summary().split())}"


def corrupt_video(d: Path, skip_bad: bool) -> str:
    clip(d / "clip.mp4")
    (d / "bad.mp4").write_bytes(b"\x00" * 4096)  # exists, passes the build-time check, fails to decode
    dm = data_module(jsonl(d / "train.jsonl", [row("clip.mp4"), row("bad.mp4")]), skip_bad=skip_bad)
    dm.setup("fit")
    ds = dm.datasets["train"][0][0]

    def decode_all() -> str:
        samples = [ds[i] for i in range(len(ds))]
        return f"{sum(s is None for s in samples)} of {len(samples)} skipped; {' '.join(ds.report.summary().split())}"

    return observe(decode_all)


def not_utf8(d: Path) -> str:
    from ep_kit.data.instruct import read_instruct_jsonl

    clip(d / "clip.mp4")
    ann = d / "train.jsonl"
    ann.write_bytes(json.dumps(row("clip.mp4")).encode().replace(b"Red.", b"Rouge \xe9clatant."))
    return observe(lambda: read_instruct_jsonl(ann))


def duplicate_ids(d: Path) -> str:
    ann = d / "videomme.json"
    ann.write_text(json.dumps([{**VIDEOMME, "question_id": "1"}, {**VIDEOMME, "question_id": "1"}]))
    return observe(lambda: read_videomme(ann, d))


def options_dict(d: Path) -> str:
    ann = d / "videomme.json"
    ann.write_text(json.dumps([{**VIDEOMME, "question_id": "1", "options": {"A": "0", "B": "1"}}]))
    return observe(lambda: read_videomme(ann, d))


def malformed_line_skipped(d: Path) -> str:
    ann = d / "videomme.jsonl"
    ann.write_text(json.dumps({**VIDEOMME, "question_id": "1"}) + "\n{broken\n")
    report = SkipReport()
    return observe(lambda: f"{len(read_videomme(ann, d, skip_bad=True, report=report))} read, {report.count} skipped")


def truncated(d: Path) -> str:
    import av

    from ep_kit.data.media import load_video

    src = clip(d / "clip.mp4", frames=16)
    fast = d / "fast.mp4"
    with av.open(str(src)) as inp, av.open(str(fast), "w", options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    fast.write_bytes(fast.read_bytes()[: int(fast.stat().st_size * 0.6)])
    return observe(lambda: load_video(fast, min_pixels=28 * 28, max_pixels=56 * 56, with_audio=True).num_frames)


def aspect(d: Path) -> str:
    from ep_kit.data.media import load_video

    return observe(lambda: load_video(clip(d / "wide.mp4", size=(28, 2000), audio=False), max_pixels=3136))


def one_frame(d: Path) -> str:
    from ep_kit.data.media import load_video

    return observe(lambda: load_video(clip(d / "clip.mp4"), max_frames=1))


def toy_cli(d: Path, *extra: str, run_subcommand: bool = True) -> str:
    from ep_kit.cli import program_argv, run

    args = ["--config", str(REPO / "recipes/toy/cs2_ste_20.yaml"), "--model.thinker.init_args.init_from=null",
            f"--data.init_args.source.init_args.root={d / 'synthetic'}", "--data.init_args.source.init_args.num_train=2",
            "--data.init_args.source.init_args.num_val=1", "--data.init_args.source.init_args.num_test=1",
            f"--trainer.logger.init_args.save_dir={d}", *extra]
    with program_argv():
        return observe(lambda: run((["fit"] if run_subcommand else []) + args, run_subcommand=run_subcommand) and None)


def bad_ckpt(d: Path) -> str:
    (d / "notes.ckpt").write_text("not a checkpoint")
    return toy_cli(d, f"--ckpt_path={d / 'notes.ckpt'}")


def bad_init_from(d: Path) -> str:
    torch.save({"weight": torch.zeros(2)}, d / "plain.ckpt")
    return toy_cli(d, f"--model.init_from={d / 'plain.ckpt'}", run_subcommand=False)


def bad_ratio(d: Path) -> str:
    return toy_cli(d, "--model.keep_ratio=1.5", run_subcommand=False)


def bin_only(d: Path) -> str:
    from ep_kit.models import OmniThinker, tiny_thinker_config
    from ep_kit.models.omni import random_thinker

    model = random_thinker(tiny_thinker_config(num_layers=1))
    model.config.save_pretrained(d / "model")
    torch.save(model.state_dict(), d / "model" / "pytorch_model.bin")
    return observe(lambda: OmniThinker.from_pretrained(d / "model"))


def deepspeed_missing(d: Path) -> str:
    import importlib.util

    from ep_kit.cli import run
    from ep_kit.standin import write_standin

    s = write_standin(d / "standin", questions=2)
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == "deepspeed" else real(name, *a)
    try:
        return observe(lambda: run(["fit", "--config", str(REPO / "recipes/cs2_ste_20.yaml"),
                                    "--config", str(s.paths_train), f"--trainer.logger.init_args.save_dir={d}"]))
    finally:
        importlib.util.find_spec = real


def pytest_case(node: str, behaviour: str) -> Callable[[Path], str]:
    """A case whose setup is a test (distributed runs, model internals): ``behaviour`` is what it asserts."""

    def run(d: Path) -> str:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", node]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        last = (out.stdout.strip().splitlines() or ["no output"])[-1]
        return f"{behaviour} (checked by `{node.split('::')[-1]}`: {last})" if out.returncode == 0 else (
            f"**NOT AS SPECIFIED**: `{node}` failed: {last}")

    return run


CASES = [
    Case("instruction row pointing at a missing video", "ep-kit fit (data module setup)", missing_video),
    Case("... with `skip_bad: true`", "ep-kit fit --data.init_args.source.init_args.skip_bad=true", missing_video_skipped),
    Case("instruction video that exists but cannot be decoded (mid-run)", "training step", lambda d: corrupt_video(d, False)),
    Case("... with `skip_bad: true`", "training step, skip_bad", lambda d: corrupt_video(d, True)),
    Case("instruction jsonl that is not UTF-8", "ep-kit fit", not_utf8),
    Case("benchmark with a repeated question id", "ep-kit test (reader)", duplicate_ids),
    Case("benchmark `options` given as a dict", "ep-kit test (reader)", options_dict),
    Case("malformed benchmark jsonl line, `skip_bad: true`", "ep-kit test (reader)", malformed_line_skipped),
    Case("mp4 truncated on disk, index (moov) at the start", "load_video (every sample)", truncated),
    Case("video of 28x2000 frames (extreme aspect ratio)", "load_video", aspect),
    Case("`max_frames: 1`", "load_video", one_frame),
    Case("`--ckpt_path` that is a text file", "ep-kit fit --ckpt_path notes.ckpt", bad_ckpt),
    Case("`--model.init_from` that is a bare state dict", "ep-kit fit --model.init_from plain.ckpt", bad_init_from),
    Case("budget outside (0, 1]", "ep-kit fit --model.keep_ratio=1.5", bad_ratio),
    Case("model directory with only pytorch_model.bin", "ep-kit fit (model.thinker.init_args.path)", bin_only),
    Case("DeepSpeed strategy without DeepSpeed installed", "ep-kit fit --config recipes/cs2_ste_20.yaml", deepspeed_missing),
    Case("answer length leaking into the sieve through the newline after <|im_end|>",
         "ep-kit fit (training samples)",
         pytest_case("tests/test_answer_leak.py", "the answer and everything after it are never sieve keys: "
                     "same scores and selection for answers of any length")),
    Case("single-process resume after the dataset or batch size changed", "ep-kit fit --ckpt_path last.ckpt",
         pytest_case("tests/test_resumable.py::test_single_process_resume_refuses_a_changed_dataset_or_batch_size",
                     "refused mid-epoch, naming what changed (old -> new) and what to do")),
    Case("2-process DDP run killed mid-epoch, resumed with --ckpt_path",
         "ep-kit fit --trainer.devices=2 --trainer.strategy=ddp ... --ckpt_path last.ckpt",
         pytest_case("tests/test_reliability_training.py::"
                     "test_ddp_fit_killed_mid_epoch_resumes_every_sample_once_and_to_the_same_weights",
                     "every sample of the epoch trained exactly once; final weights equal the uninterrupted run's"),
         slow=True),
    Case("text-only batches under 2-process DDP (no sieve gradient)", "ep-kit fit --trainer.devices=2 (instruction data)",
         pytest_case("tests/test_reliability_training.py::test_ddp_fit_on_instruction_data_with_text_only_rows",
                     "trains: unused sieve and scorer parameters get zero gradients"), slow=True),
]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="leave out the distributed cases (minutes each)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tables")
    args = parser.parse_args(argv)
    from ep_kit.runs import git_commit

    start = time.time()
    lines = [
        "# Reliability: faults and bad inputs tried" + (" (quick: distributed cases left out)" if args.quick else ""),
        "",
        f"Command: `python benchmarks/reliability.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Commit: `{git_commit(REPO)}`",
        "",
        "| Fault or bad input | Run | Observed |",
        "| --- | --- | --- |",
    ]
    for case in CASES:
        if case.slow and args.quick:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            observed = case.run(Path(tmp))
        observed = observed.replace(tmp, "<tmp>").replace("|", "\\|")
        print(f"[reliability] {case.fault}: {observed}", flush=True)
        fault = case.fault.replace("|", "\\|")
        lines.append(f"| {fault} | `{case.command}` | {observed} |")
    lines += ["", f"Wall time: {(time.time() - start) / 60:.1f} min."]
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / ("reliability" + ("_quick" if args.quick else "") + ".md")
    md.write_text("\n".join(lines) + "\n")
    return md


if __name__ == "__main__":
    print(main().read_text())
