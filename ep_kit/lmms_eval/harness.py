"""The kit's side of the lmms-eval plugin: ``model_args`` -> a recipe, a built module, answers.

Why a module of its own (no ``lmms_eval`` import): everything that decides an answer lives here and
is the code ``ep-kit test`` runs, so it is tested without the harness installed, and the plugin class
(:mod:`ep_kit.lmms_eval.model`) stays a thin adapter.

* The recipe is parsed by the kit's own parser (:func:`ep_kit.cli.parse`) and built as ``ep-kit answer``
  builds it; ``pretrained`` / ``keep_ratio`` / ``weights`` (alias ``sieve``) become the same overrides
  as ``--model.thinker.init_args.path`` / ``--model.keep_ratio`` / ``--model.init_from``, and any
  dotted ``model_args`` key (``data.init_args.max_tokens=4096``) is passed through as an override.
* A prompt is encoded by the recipe's data module (its processor, frame rate, pixel and token
  bounds), exactly as :class:`~ep_kit.data.datamodule.MCDataset` encodes a benchmark question.
* A multiple-choice prompt (lettered options ``A.`` ``B.`` ... on their own lines, as every MC video
  task writes them) is answered as ``ep-kit test`` answers: :meth:`EPKitModule.answer`, the option
  letter whose next-token logit is highest after the reduced prefill (``choice=letters``, the
  default); with ``choice=generate``, or for a prompt without options, the reduced prefill is followed
  by KV-cached greedy decoding (:meth:`OmniThinker.generate`), lmms-eval's free-generation protocol.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ep_kit.budget import check_ratio
from ep_kit.data.benchmarks import LETTERS

Choice = Literal["letters", "generate"]
#: ``model_args`` the plugin reads itself (every other key must be a dotted recipe override).
KNOWN_ARGS = ("config", "pretrained", "keep_ratio", "weights", "sieve", "device", "audio", "choice",
              "batch_size", "max_batch_size")
#: separator of several recipe files in ``config=`` (model_args are comma-separated already).
CONFIG_SEP = "+"
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[\.\):]\s+\S")


class ModelArgsError(ValueError):
    """A ``model_args`` value the plugin cannot use; the message names the argument."""


@dataclass
class Request:
    """One question as the harness gives it: the prompt text and its video."""

    prompt: str
    video: str
    max_new_tokens: int = 32
    until: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """The response text and where the budget went for that sample (the kit's per-sample counts)."""

    text: str
    budget: dict[str, float]


def lettered_options(prompt: str) -> int:
    """How many lettered options (``A. ...``, ``(B) ...``, ``C) ...``) the prompt lists, from A on; 0 if none.

    Counts the run of consecutive letters A, B, C, ... on their own lines; fewer than two is not a
    multiple-choice prompt.
    """
    letters = [m.group(1) for line in prompt.splitlines() if (m := _OPTION_LINE.match(line))]
    n = 0
    for letter in letters:
        if letter == LETTERS[n]:
            n += 1
            if n == len(LETTERS):
                break
        elif n and letter == LETTERS[0]:  # a second list starts: keep the first
            break
    return n if n >= 2 else 0


def _text(value: Any) -> str:
    """A ``model_args`` value back as the text the kit's parser takes (lmms-eval turns "true" into True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _flag(value: Any, name: str) -> bool:
    text = _text(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ModelArgsError(f"model_args {name}: expected true or false, got {value!r}")


@dataclass
class Options:
    """What ``model_args`` asks for: the recipe argument list and the plugin's own settings."""

    argv: list[str]
    device: str | None = None
    audio: bool | None = None
    choice: Choice = "letters"
    batch_size: int = 1


def parse_model_args(args: Mapping[str, Any]) -> Options:
    """``model_args`` (already split into a dict) -> :class:`Options`; a bad value raises :class:`ModelArgsError`.

    ``config`` (required): recipe file(s), ``+``-separated, in ``ep-kit test --config`` order;
    ``pretrained``: the model directory; ``keep_ratio``: the budget; ``weights`` / ``sieve``: a ``.ckpt``
    of ``ep-kit fit``; ``device``; ``audio``: feed each video's audio track (default: the recipe's
    ``use_audio_in_video``); ``choice``: ``letters`` or ``generate``; dotted keys: recipe overrides.
    """
    unknown = sorted(k for k in args if k not in KNOWN_ARGS and "." not in k)
    if unknown:
        raise ModelArgsError(
            f"model_args {', '.join(unknown)}: unknown; expected {', '.join(KNOWN_ARGS)} or a dotted recipe "
            "override such as data.init_args.max_tokens=4096"
        )
    config = args.get("config")
    if config is None or not _text(config).strip():
        raise ModelArgsError(
            "model_args config: missing; name the recipe(s) as ep-kit test takes them, e.g. "
            "config=recipes/eval_3b.yaml+recipes/baselines/fastv_20.yaml"
        )
    argv: list[str] = []
    for name in _text(config).split(CONFIG_SEP):
        path = Path(name.strip())
        if not path.is_file():
            raise ModelArgsError(f"model_args config: {path} does not exist")
        argv += ["--config", str(path)]
    if args.get("pretrained") is not None:
        root = Path(_text(args["pretrained"]))
        if not root.is_dir():
            raise ModelArgsError(f"model_args pretrained: {root} is not a directory (a local Qwen2.5-Omni model)")
        argv.append(f"--model.thinker.init_args.path={root}")
    if args.get("keep_ratio") is not None:
        try:
            ratio = check_ratio(float(args["keep_ratio"]), "model_args keep_ratio")
        except ValueError as err:
            raise ModelArgsError(str(err)) from None
        argv.append(f"--model.keep_ratio={ratio}")
    weights = [k for k in ("weights", "sieve") if args.get(k) is not None]
    if len(weights) > 1:
        raise ModelArgsError("model_args weights and sieve: give one (sieve is another name for weights)")
    if weights:
        path = Path(_text(args[weights[0]]))
        if not path.exists():
            raise ModelArgsError(f"model_args {weights[0]}: {path} does not exist (a .ckpt of ep-kit fit)")
        argv.append(f"--model.init_from={path}")
    argv += [f"--{k}={_text(v)}" for k, v in args.items() if "." in k]
    choice = _text(args.get("choice", "letters"))
    if choice not in ("letters", "generate"):
        raise ModelArgsError(f"model_args choice: expected letters or generate, got {choice!r}")
    batch = args.get("batch_size") or 1
    try:
        batch_size = int(batch)
    except (TypeError, ValueError):
        raise ModelArgsError(f"batch_size: expected a number, got {batch!r} (auto is not supported)") from None
    if batch_size < 1:
        raise ModelArgsError(f"batch_size: must be >= 1, got {batch_size}")
    audio = _flag(args["audio"], "audio") if args.get("audio") is not None else None
    device = _text(args["device"]) if args.get("device") is not None else None
    return Options(argv=argv, device=device, audio=audio, choice=choice, batch_size=batch_size)  # type: ignore[arg-type]


def _precision(precision: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast ``ep-kit test`` runs under for the recipe's ``trainer.precision`` (Lightning's rule)."""
    text = str(precision)
    if text in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if text.startswith("bf16") else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    if text in ("32", "32-true", "None", "64", "64-true", "bf16-true", "16-true"):
        return contextlib.nullcontext()
    raise ModelArgsError(f"trainer.precision {text!r} of the recipe is not supported by the lmms-eval plugin")


class KitAnswerer:
    """The recipe's module and data module, built once; answers batches of :class:`Request`."""

    def __init__(self, options: Options) -> None:
        from ep_kit.cli import parse, unset_paths

        self.options = options
        cli = parse(options.argv, exit_on_error=False)
        config = cli.config
        problems = [p for p in unset_paths(config) if p.startswith(("model.", "init_from"))]
        if problems:
            raise ModelArgsError(
                "model_args pretrained / weights: the recipe's model paths are not set:\n  "
                + "\n  ".join(problems)
                + "\nPass pretrained=DIR (the local Qwen2.5-Omni directory) or a paths file in config=..."
            )
        source = str(config.data.init_args.source.class_path)
        if source.endswith("InstructSource"):  # training data: its module encodes with the training settings
            raise ModelArgsError(
                f"model_args config: the recipe's data source is {source.rsplit('.', 1)[-1]} (training data); add "
                "the evaluation overlay as ep-kit test does, e.g. "
                "config=recipes/cs2_ste_20.yaml+recipes/eval_benchmarks.yaml"
            )
        built = cli.parser.instantiate_classes(config)
        self.module = built.model
        self.data = built.data
        self.module.eval()
        accelerator = str(config.trainer.get("accelerator") or "auto")
        self.device = torch.device(options.device or ("cpu" if accelerator == "cpu" or not torch.cuda.is_available()
                                                      else "cuda"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelArgsError(f"device: {options.device} asked for, but torch sees no CUDA device")
        self.module.to(self.device)
        self.autocast = lambda: _precision(config.trainer.get("precision"), self.device)
        self.audio = self.data.use_audio_in_video if options.audio is None else options.audio

    @property
    def keep_ratio(self) -> float:
        return float(self.module.keep_ratio)

    def _encode(self, request: Request, n_options: int) -> dict[str, Any]:
        """One sample as the data module encodes an evaluation question (the user turn: video, then text)."""
        encoder = self.data.encoder_for(self.audio)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": request.prompt}]}]
        item: dict[str, Any] = dict(encoder.encode(messages, [request.video], add_generation_prompt=True))
        if n_options:
            letters = list(LETTERS[:n_options])
            item["choice_token_ids"] = torch.tensor(encoder.builder.letter_ids(letters), dtype=torch.long)
            item["answer_index"] = -1  # unknown to the model: the task scores the response
            item["question_id"], item["category"], item["benchmark"] = "lmms-eval", "lmms-eval", "lmms-eval"
        return item

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from ep_kit.data.collate import collate_av

        batch = collate_av(items, pad_token_id=int(self.data.tokenizer.pad_token_id), use_audio_in_video=self.audio)
        return move_data_to_device(batch, self.device)

    def answer(self, requests: Sequence[Request]) -> list[Answer]:
        """Answers in request order; multiple-choice and free-form requests run as separate batches."""
        n_options = [lettered_options(r.prompt) if self.options.choice == "letters" else 0 for r in requests]
        out: list[Answer | None] = [None] * len(requests)
        mc = [i for i, n in enumerate(n_options) if n]
        free = [i for i, n in enumerate(n_options) if not n]
        with torch.no_grad(), self.autocast():
            if mc:
                for i, a in zip(mc, self._letters([requests[i] for i in mc], [n_options[i] for i in mc]), strict=True):
                    out[i] = a
            if free:
                for i, a in zip(free, self._generate([requests[i] for i in free]), strict=True):
                    out[i] = a
        return [a for a in out if a is not None]

    def _letters(self, requests: list[Request], n_options: list[int]) -> list[Answer]:
        batch = self._collate([self._encode(r, n) for r, n in zip(requests, n_options, strict=True)])
        res = self.module.answer(batch)
        return [Answer(LETTERS[int(k)], budget(res["stats"], i)) for i, k in enumerate(res["predicted"])]

    def _generate(self, requests: list[Request]) -> list[Answer]:
        batch = self._collate([self._encode(r, 0) for r in requests])
        model = self.module.model
        steps = max(r.max_new_tokens for r in requests)
        tokens = model.generate(batch, max_new_tokens=steps)
        stats = model.prefill(batch).stats  # what the prefill of generate kept (the same deterministic prefill)
        tokenizer = self.data.tokenizer
        answers = []
        for i, r in enumerate(requests):
            text = tokenizer.decode(tokens[i, : r.max_new_tokens].tolist(), skip_special_tokens=True)
            for stop in r.until:
                if stop:
                    text = text.split(stop, 1)[0]
            answers.append(Answer(text.strip(), budget(stats, i)))
        return answers


def budget(stats: Mapping[str, Any], i: int) -> dict[str, float]:
    """Sample ``i``'s kept and total tokens, its realised keep ratio and the audio share of its kept A/V tokens.

    The same counts ``ep-kit test`` sums into ``test/realised_keep_ratio`` (kept / candidate tokens)
    and ``test/audio_share`` (kept audio / kept audio + video).
    """
    keys = ("n_video", "n_audio", "kept_video", "kept_audio", "n_candidates", "kept_candidates")
    row = {k: int(torch.as_tensor(stats[k])[i]) for k in keys}
    kept_av = row["kept_audio"] + row["kept_video"]
    return {
        **row,
        "realised_keep_ratio": row["kept_candidates"] / max(1, row["n_candidates"]),
        "audio_share": row["kept_audio"] / max(1, kept_av),
    }


#: per-sample budget records of this process, keyed by :func:`doc_key` of the question's document: the
#: plugin writes them, a task's ``process_results`` (which sees only the document) reads them.
BUDGETS: dict[str, dict[str, float]] = {}


def doc_key(doc: Mapping[str, Any]) -> str:
    """A document's identity for :data:`BUDGETS` (its fields as sorted json)."""
    return json.dumps(dict(doc), sort_keys=True, default=str)


def record_budget(doc: Mapping[str, Any], record: dict[str, float]) -> None:
    BUDGETS[doc_key(doc)] = record


def budget_for(doc: Mapping[str, Any]) -> dict[str, float] | None:
    """The budget the ``ep_kit`` model spent on ``doc`` in this process, or None (another model answered)."""
    return BUDGETS.get(doc_key(doc))


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in order, ``size`` at a time (the harness's ``batch_size``)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
