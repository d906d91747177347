"""lmms-eval runs the kit: the README's commands on the stand-in equal ``ep-kit test`` / ``ep-kit predict``.

The README's "Evaluate with lmms-eval" block (between its ``<!-- snippet: lmms-eval`` markers) is run
as written with the stand-in's folder, an output folder and a CS2 checkpoint put in for
``/tmp/standin``, ``runs/lmms`` and the ``sieve=`` path: the real ``lmms-eval`` command line of the
lmms-eval environment (``.venv-lmms``, built by ``make test``; ``EP_KIT_LMMS_VENV`` names another),
with the ``ep_kit`` model found through its entry point and the kit's Daily-Omni task through
``--include_path``. The reference is independent of the plugin: ``ep-kit test`` (accuracy, realised
keep ratio, audio share) and ``ep-kit predict`` (each question's letter and kept tokens) of the same
environment on the same questions, recipe, budget, weights and batch size.

The unit tests below need no lmms-eval: argument errors, option and letter parsing, the task writer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from _toy import REPO

from ep_kit.lmms_eval.harness import ModelArgsError, lettered_options, parse_model_args
from ep_kit.lmms_eval.tasks import TEMPLATE, daily_omni_from_paths, write_tasks
from ep_kit.lmms_eval.tasks.daily_omni.utils import extract_letter

README = REPO / "README.md"
LMMS_VENV = Path(os.environ.get("EP_KIT_LMMS_VENV", REPO / ".venv-lmms"))
README_CKPT = "runs/ep-kit/version_0/checkpoints/last.ckpt"
#: each README lmms-eval command (by its --output_path name): the ep-kit arguments of the same row.
ROWS = {
    "cs2_10": ["--config", "recipes/cs2_ste_20.yaml", "--config", "recipes/eval_benchmarks.yaml", "--model.keep_ratio=0.1"],
    "fastv_20": ["--config", "recipes/eval_3b.yaml", "--config", "recipes/baselines/fastv_20.yaml"],
}
QUESTIONS = 4


def lmms_bin(name: str) -> Path:
    """A program of the lmms-eval environment; its absence fails the test (CI builds it: never a skip)."""
    path = LMMS_VENV / "bin" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the lmms-eval environment is not built; run `make lmms-env` "
                    "(make test builds it) or set EP_KIT_LMMS_VENV to one with `pip install -e .[lmms-eval]`")
    return path


def readme_commands() -> list[str]:
    """The README block's commands, continuation lines joined, comments dropped."""
    text = README.read_text()
    match = re.search(r"<!-- snippet: lmms-eval.*?-->\s*```bash\n(.*?)```\s*<!-- /snippet -->", text, re.S)
    assert match, "README.md has no lmms-eval block between its markers"
    joined = match.group(1).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def run(argv: list[str], cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def standin4(tmp_path_factory):
    """The stand-in with 4 questions per benchmark (2 batches of 2)."""
    from ep_kit.standin import write_standin

    return write_standin(tmp_path_factory.mktemp("standin4"), questions=QUESTIONS)


@pytest.fixture(scope="module")
def cs2_ckpt(standin4, tmp_path_factory) -> Path:
    """A Lightning checkpoint of the CS2 row whose sieve and scorer differ from their seeded initialisation.

    So a run that ignored ``sieve=`` would keep other tokens than ``ep-kit test --model.init_from``.
    """
    from ep_kit.cli import parse

    cli = parse(["--config", str(REPO / "recipes/cs2_ste_20.yaml"), "--config", str(REPO / "recipes/eval_benchmarks.yaml"),
                 "--config", str(standin4.paths_eval), "--config", str(standin4.cpu)])
    module = cli.parser.instantiate_classes(cli.config).model
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.model.reducer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    path = tmp_path_factory.mktemp("cs2") / "cs2.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": lightning.__version__}, path)
    return path


@pytest.fixture(scope="module")
def readme_run(standin4, cs2_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Run the README block (the task writer, then each lmms-eval command); returns each row's output folder."""
    out = tmp_path_factory.mktemp("lmms")
    subs = {"/tmp/standin": str(standin4.root), "runs/lmms": str(out), README_CKPT: str(cs2_ckpt),
            ".venv-lmms/bin/": f"{LMMS_VENV}/bin/"}
    lmms_bin("lmms-eval")
    rows = {}
    for command in readme_commands():
        if command.startswith("make "):
            continue  # the environment itself: built by `make test` before the tests
        for old, new in subs.items():
            command = command.replace(old, new)
        argv = shlex.split(command)
        run(argv)
        if "--output_path" in argv:
            rows[Path(argv[argv.index("--output_path") + 1]).name] = Path(argv[argv.index("--output_path") + 1])
    assert set(rows) == set(ROWS), "the README's lmms-eval commands and this test's reference rows differ"
    return rows


def kit_reference(standin, row: str, ckpt: Path, tmp: Path) -> tuple[dict[str, float], list[dict]]:
    """``ep-kit test`` metrics and ``ep-kit predict`` rows of ``row`` on the stand-in's Daily-Omni questions."""
    only = tmp / "daily_omni_only.yaml"
    entry = next(e for e in yaml.safe_load(standin.paths_eval.read_text())["data"]["init_args"]["source"]["init_args"]
                 ["benchmarks"] if e["init_args"]["name"] == "daily_omni")
    only.write_text(yaml.safe_dump({"data": {"init_args": {"eval_batch_size": 2, "source": {
        "class_path": "ep_kit.data.BenchmarkSuite", "init_args": {"benchmarks": [entry]}}}}}))
    args = [*ROWS[row], "--config", str(standin.paths_eval), "--config", str(standin.cpu), "--config", str(only)]
    if row.startswith("cs2"):
        args.append(f"--model.init_from={ckpt}")
    # `ep-kit test` then `ep-kit predict`, as the console script runs them (ep_kit.cli.main), in one process.
    both = ("import json, sys; from ep_kit.cli import main; a = json.loads(sys.argv[1]); "
            "main(['test', *a, sys.argv[2]]); main(['predict', *a, sys.argv[3]])")
    run([str(lmms_bin("python")), "-c", both, json.dumps(args), f"--trainer.logger.init_args.save_dir={tmp / 'test'}",
         f"--trainer.logger.init_args.save_dir={tmp / 'predict'}"])
    metrics = json.loads(next((tmp / "test").rglob("test_metrics.json")).read_text())
    rows = [json.loads(line) for line in next((tmp / "predict").rglob("predictions.jsonl")).read_text().splitlines()]
    return metrics, rows


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(ROWS))
def test_lmms_eval_daily_omni_equals_ep_kit_test(row, readme_run, standin4, cs2_ckpt, tmp_path):
    out = readme_run[row]
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]["daily_omni"]
    samples = [json.loads(line) for line in next(out.rglob("*_samples_daily_omni.jsonl")).read_text().splitlines()]
    metrics, predicted = kit_reference(standin4, row, cs2_ckpt, tmp_path)
    assert len(samples) == len(predicted) == QUESTIONS

    # Accuracy and where the budget went: the numbers ep-kit test reports.
    assert results["daily_omni_acc,none"] == pytest.approx(metrics["test/acc/daily_omni"], abs=1e-6)
    assert results["realised_keep_ratio,none"] == pytest.approx(metrics["test/realised_keep_ratio"], abs=1e-6)
    assert results["audio_share,none"] == pytest.approx(metrics["test/audio_share"], abs=1e-6)
    assert metrics["test/keep_ratio"] == pytest.approx(0.1 if row == "cs2_10" else 0.2)

    # Every question: the same letter and the same kept tokens as ep-kit predict.
    kit = {r["question_id"]: r for r in predicted}
    for s in samples:
        record = s["daily_omni_acc"]
        ref = kit[record["question_id"]]
        assert s["filtered_resps"] == record["pred_answer"] == ref["answer"], record["question_id"]
        assert record["score"] == float(ref["correct"]) and record["answer"] == ref["target"]
        spent = record["ep_kit"]
        assert {k: spent[k] for k in ("kept_video", "kept_audio", "n_video", "n_audio")} == {
            k: ref[k] for k in ("kept_video", "kept_audio", "n_video", "n_audio")}
        assert spent["keep_ratio"] == ref["keep_ratio"]
        assert spent["realised_keep_ratio"] == pytest.approx(spent["kept_candidates"] / spent["n_candidates"])
        assert spent["audio_share"] == pytest.approx(ref["kept_audio"] / (ref["kept_audio"] + ref["kept_video"]))
        assert spent["realised_keep_ratio"] <= spent["keep_ratio"] + 0.01
    if row == "cs2_10":  # the joint Top-K of CS2 meets its budget on the candidates it sees
        assert results["realised_keep_ratio,none"] == pytest.approx(0.1, abs=0.01)


@pytest.mark.slow
def test_generate_choice_equals_ep_kit_answer_and_sieve_weights_count(readme_run, standin4, tmp_path):
    """``choice=generate``: reduced prefill + cached greedy decoding, the text ``ep-kit answer`` generates.

    The same CS2 row without ``sieve=`` also keeps other tokens than the README's run with the
    checkpoint: the equality above depends on the weights being loaded.
    """
    recipes = ["recipes/cs2_ste_20.yaml", "recipes/eval_benchmarks.yaml", str(standin4.paths_eval), str(standin4.cpu)]
    args = ["config=" + "+".join(recipes), "keep_ratio=0.1", "choice=generate"]
    tasks = write_tasks(tmp_path / "tasks", *daily_omni_from_paths(standin4.paths_eval))
    run([str(lmms_bin("lmms-eval")), "--model", "ep_kit", "--model_args", ",".join(args), "--tasks", "daily_omni",
         "--include_path", str(tasks), "--batch_size", "1", "--device", "cpu", "--log_samples", "--limit", "1",
         "--output_path", str(tmp_path / "out")])
    sample = json.loads(next((tmp_path / "out").rglob("*_samples_daily_omni.jsonl")).read_text().splitlines()[0])
    spent = sample["daily_omni_acc"]["ep_kit"]
    vid = sample["daily_omni_acc"]["video_id"]
    config = [a for r in recipes for a in ("--config", r)]
    run([str(lmms_bin("ep-kit")), "answer", "--video", str(standin4.data / f"daily_omni/Videos/{vid}/{vid}_video.mp4"),
         "--question", sample["input"], *config, "--keep_ratio", "0.1", "--max_new_tokens", "16",
         "--output_dir", str(tmp_path / "answer")])
    ref = json.loads((tmp_path / "answer" / "kept.json").read_text())
    assert sample["filtered_resps"] == ref["answer"]
    assert (spent["kept_video"], spent["n_video"]) == (ref["counts"]["video"]["kept"], ref["counts"]["video"]["total"])
    assert (spent["kept_audio"], spent["n_audio"]) == (ref["counts"]["audio"]["kept"], ref["counts"]["audio"]["total"])
    trained = json.loads(next(readme_run["cs2_10"].rglob("*_samples_daily_omni.jsonl")).read_text().splitlines()[0])
    assert trained["daily_omni_acc"]["video_id"] == vid
    assert (spent["kept_video"], spent["kept_audio"]) != (trained["daily_omni_acc"]["ep_kit"]["kept_video"],
                                                         trained["daily_omni_acc"]["ep_kit"]["kept_audio"])


# ----------------------------------------------------------------------------- without lmms-eval
def test_model_args_errors_name_the_argument(tmp_path):
    recipe = str(REPO / "recipes/eval_3b.yaml")
    cases = {
        "model_args method: unknown": {"config": recipe, "method": "fastv"},
        "model_args config: missing": {"keep_ratio": 0.2},
        "model_args config: .*nope.yaml does not exist": {"config": f"{recipe}+nope.yaml"},
        "model_args pretrained: .* is not a directory": {"config": recipe, "pretrained": str(tmp_path / "none")},
        "model_args keep_ratio must be in": {"config": recipe, "keep_ratio": 1.5},
        "model_args weights and sieve": {"config": recipe, "weights": recipe, "sieve": recipe},
        "model_args sieve: .* does not exist": {"config": recipe, "sieve": str(tmp_path / "x.ckpt")},
        "model_args choice: expected letters or generate": {"config": recipe, "choice": "logits"},
        "model_args audio: expected true or false": {"config": recipe, "audio": "maybe"},
        "batch_size: expected a number": {"config": recipe, "batch_size": "auto"},
    }
    for message, args in cases.items():
        with pytest.raises(ModelArgsError, match=message):
            parse_model_args(args)


def test_model_args_become_the_ep_kit_test_overrides(tmp_path):
    ckpt = tmp_path / "w.ckpt"
    ckpt.write_bytes(b"")
    options = parse_model_args({
        "config": "recipes/eval_3b.yaml+recipes/baselines/fastv_20.yaml", "pretrained": str(tmp_path), "keep_ratio": 0.1,
        "sieve": str(ckpt), "data.init_args.max_tokens": 4096, "audio": False, "batch_size": "3", "device": "cpu",
    })
    assert options.argv == [
        "--config", "recipes/eval_3b.yaml", "--config", "recipes/baselines/fastv_20.yaml",
        f"--model.thinker.init_args.path={tmp_path}", "--model.keep_ratio=0.1", f"--model.init_from={ckpt}",
        "--data.init_args.max_tokens=4096",
    ]
    assert (options.audio, options.batch_size, options.device, options.choice) == (False, 3, "cpu", "letters")


def test_recipe_errors_before_the_model_is_built(standin4):
    """A placeholder model path, or a training recipe's data settings, are refused naming what to pass."""
    from ep_kit.lmms_eval.harness import KitAnswerer

    with pytest.raises(ModelArgsError, match=r"(?s)pretrained.*model\.thinker\.init_args\.path: /path/to"):
        KitAnswerer(parse_model_args({"config": str(REPO / "recipes/eval_3b.yaml")}))
    with pytest.raises(ModelArgsError, match=r"config: .*InstructSource.*recipes/eval_benchmarks.yaml"):
        KitAnswerer(parse_model_args({"config": str(REPO / "recipes/cs2_ste_20.yaml"),
                                      "pretrained": str(standin4.model)}))


@pytest.fixture(scope="module")
def toy_clip(tmp_path_factory) -> Path:
    from ep_kit.data.synthetic import Event, render_events, write_av_clip

    frames, audio = render_events([Event("flash", 0.25, 0.5, colour="red"), Event("tone", 1.0, 0.5, pitch="low")],
                                  seconds=2.0, fps=4.0, size=56)
    clip = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_av_clip(clip, frames, 4.0, audio)
    return clip


TOY_ROWS = sorted([*(REPO / "recipes/toy/baselines").glob("*_20.yaml"), REPO / "recipes/toy/baselines/full.yaml"])


@pytest.mark.slow
@pytest.mark.parametrize("overlay", TOY_ROWS, ids=lambda p: p.stem)
def test_every_training_free_row_answers_as_ep_kit_answer(overlay, toy_clip, tmp_path):
    """Each main-table baseline (toy scale, its base + overlay) through the plugin: ep-kit answer's letter and kept tokens."""
    from ep_kit.cli import answer
    from ep_kit.data.benchmarks import format_mc_prompt
    from ep_kit.lmms_eval.harness import KitAnswerer, Request

    base = REPO / "recipes/toy/baselines/base.yaml"
    question, options = "Which colour flashes?", ["red", "green", "blue", "yellow"]
    kit = KitAnswerer(parse_model_args({"config": f"{base}+{overlay}"}))
    [res] = kit.answer([Request(format_mc_prompt(question, options, instruction=None, suffix=None), str(toy_clip))])
    ref = answer(["--video", str(toy_clip), "--config", str(base), "--config", str(overlay), "--question", question,
                  "--options", *options, "--output_dir", str(tmp_path)])
    assert res.text == ref["answer"].split(".")[0]
    assert (res.budget["kept_video"], res.budget["kept_audio"]) == (ref["counts"]["video"]["kept"], ref["counts"]["audio"]["kept"])
    assert kit.keep_ratio == ref["keep_ratio"]


@pytest.mark.slow
def test_answers_equal_ep_kit_answer_on_the_toy_recipe(toy_clip, tmp_path):
    """Both answer paths of the plugin, batched together, give what ``ep-kit answer`` gives for each question.

    Multiple choice: the letter ``ep-kit answer --options`` picks; free form (``choice=generate``): the
    text ``ep-kit answer`` generates (the toy thinker's byte vocabulary decodes to text), with the same
    kept tokens. The toy recipe builds in seconds from the shipped base.
    """
    from ep_kit.cli import answer
    from ep_kit.data.benchmarks import format_mc_prompt
    from ep_kit.lmms_eval.harness import KitAnswerer, Request

    clip = toy_clip
    recipe = str(REPO / "recipes/toy/cs2_ste_20.yaml")
    question, options = "Which colour flashes?", ["red", "green", "blue", "yellow"]
    mc_prompt = format_mc_prompt(question, options, instruction=None, suffix=None)  # the toy benchmark's prompt
    got = {}
    for choice in ("letters", "generate"):
        kit = KitAnswerer(parse_model_args({"config": recipe, "choice": choice, "keep_ratio": 0.2}))
        got[choice] = kit.answer([Request(mc_prompt, str(clip), 8), Request("What happens?", str(clip), 8)])
    common = ["--video", str(clip), "--config", recipe, "--keep_ratio", "0.2", "--max_new_tokens", "8"]
    letter = answer([*common, "--question", question, "--options", *options, "--output_dir", str(tmp_path / "a")])
    text = answer([*common, "--question", mc_prompt, "--output_dir", str(tmp_path / "b")])
    free = answer([*common, "--question", "What happens?", "--output_dir", str(tmp_path / "c")])
    assert got["letters"][0].text == letter["answer"].split(".")[0]
    assert got["generate"][0].text == text["answer"] and got["generate"][1].text == free["answer"]
    assert got["letters"][1].text == free["answer"]  # no options in the prompt: generated in both modes
    assert text["answer"], "the toy thinker generates text (else the comparison above is empty)"
    for res, ref in ((got["letters"][0], letter), (got["generate"][0], text), (got["generate"][1], free)):
        assert (res.budget["kept_video"], res.budget["n_video"]) == (ref["counts"]["video"]["kept"], ref["counts"]["video"]["total"])
        assert (res.budget["kept_audio"], res.budget["n_audio"]) == (ref["counts"]["audio"]["kept"], ref["counts"]["audio"]["total"])


def test_precision_is_the_autocast_ep_kit_test_runs_under():
    from ep_kit.lmms_eval.harness import _precision

    cpu = torch.device("cpu")
    assert isinstance(_precision("bf16-mixed", cpu), torch.autocast)
    with _precision("bf16-mixed", cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with _precision("32-true", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ModelArgsError, match="trainer.precision 'transformer-engine'"):
        _precision("transformer-engine", cpu)


def test_lettered_options_are_counted_from_the_prompt():
    from ep_kit.data.benchmarks import format_mc_prompt

    assert lettered_options(format_mc_prompt("Which?", ["a", "b", "c", "d"])) == 4
    assert lettered_options("Q?\n(A) cat\n(B) dog\n(C) cow\nBest option: (") == 3  # MLVU's form
    assert lettered_options("Q?\nA. x\nB. y\nC. z\nA. again") == 3
    assert lettered_options("Describe the video.") == 0
    assert lettered_options("Q?\nA. only one") == 0
    assert lettered_options("Q?\nB. x\nC. y") == 0  # not from A


def test_extract_letter_reads_the_answer_as_mc_tasks_do():
    letters = ["A", "B", "C", "D"]
    cases = {
        "B": "B", "B. green": "B", "(C) blue": "C", "The answer is D.": "D", "the best answer is (A)": "A",
        "Not the first two; the correct option is C": "C", "A cat (B) no": "A", "It is red, so D": "D", "": "", "no idea": "",
        "E": "",  # not an option
    }
    for response, letter in cases.items():
        assert extract_letter(response, letters) == letter, response


def test_task_writer_names_the_data_and_includes_the_shipped_template(standin4, tmp_path):
    annotation, media = daily_omni_from_paths(standin4.paths_eval)
    assert annotation == standin4.data / "daily_omni/qa.json" and media == standin4.data / "daily_omni/Videos"
    task = yaml.safe_load((write_tasks(tmp_path, annotation, media) / "daily_omni.yaml").read_text())
    assert task["include"] == str(TEMPLATE) and TEMPLATE.is_file()
    assert task["dataset_kwargs"]["data_files"]["test"] == str(annotation)
    assert task["lmms_eval_specific_kwargs"]["default"]["media_root"] == str(media)
    with pytest.raises(FileNotFoundError, match="--daily_omni: annotation"):
        write_tasks(tmp_path, tmp_path / "qa.json", media)
    bad = tmp_path / "paths.yaml"
    bad.write_text(yaml.safe_dump({"model": {}}))
    with pytest.raises(ValueError, match="no daily_omni entry"):
        daily_omni_from_paths(bad)


def test_task_command_forms(standin4, tmp_path, capsys):
    """The README's task commands: print the shipped folder; write from qa.json + Videos, or from a paths file."""
    from ep_kit.lmms_eval.tasks import SHIPPED, main

    main([])
    assert capsys.readouterr().out.strip() == str(SHIPPED)
    annotation, media = daily_omni_from_paths(standin4.paths_eval)
    main([str(tmp_path / "a"), "--daily_omni", str(annotation), str(media)])
    main([str(tmp_path / "b"), "--paths", str(standin4.paths_eval)])
    assert (tmp_path / "a/daily_omni.yaml").read_text() == (tmp_path / "b/daily_omni.yaml").read_text()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "c")])  # neither data argument
