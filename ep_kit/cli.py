"""``ep-kit fit|validate|test|predict --config FILE``: the kit's LightningCLI.

Every component is chosen by ``class_path`` in YAML: the thinker source, the rotary layout, the
reducer with its attention mode, scorer factory and selector, the data module, the trainer's
strategy and callbacks. Several ``--config`` files may be given; later ones override earlier ones
(the recipes are a shared base plus one overlay per ablation row).

Differences from a bare ``LightningCLI``, each for a pitfall seen in practice:

* ``--ckpt_path`` does NOT re-apply the checkpoint's saved hyper-parameters over the command line
  (stock Lightning does, so ``test --model.keep_ratio 0.1`` would silently evaluate the training
  budget, and a resumed ``fit`` would take the model directory recorded in the checkpoint over the
  one given). The configuration given is the one that runs; the weights (and for ``fit`` the
  training state) still come from the checkpoint. ``--model.init_from`` loads weights without any
  of it. A ``--ckpt_path`` that is missing or not a Lightning checkpoint is reported with the flag
  and the file.
* The module's hyper-parameters are its configuration, so ``EPKitModule.load_from_checkpoint(ckpt)``
  rebuilds a trained module from the checkpoint alone (Lightning's ``load_from_checkpoint_support``).
* Every run logs into its own version directory (``CSVLogger`` by default), so the saved
  ``config.yaml`` never collides with another run's; re-running a saved config reproduces the run.
* ``predict`` writes answers as jsonl (:class:`~ep_kit.train.callbacks.AnswerWriter`, configured
  under ``answers``: ``--answers.output_path FILE``; default ``<log dir>/predictions.jsonl``).
* Every run ends with a summary of where it went (run directory, checkpoints, metrics, the next
  command: :func:`~ep_kit.train.callbacks.run_summary`); with stdout off a terminal, progress is
  logged as periodic lines (:class:`~ep_kit.train.callbacks.LineProgress`) instead of a live bar.
* Configuration mistakes are reported before anything is built, all at once and without a
  traceback from the console script: no recipe at all, and every ``/path/to`` placeholder or
  missing input path (:func:`unset_paths`); ``--print_config`` lists the unset ones on stderr.
* ``ep-kit answer ...`` asks about one clip (:mod:`ep_kit.answer`): not a Lightning subcommand.

Programmatic use (the ablation benchmark, tests): :func:`run` returns the CLI object.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ep_kit.data import AVDataModule
from ep_kit.train.callbacks import AnswerWriter, LineProgress, run_summary
from ep_kit.train.metrics import QuestionOutcome
from ep_kit.train.module import EPKitModule, read_lightning_checkpoint

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: how the shipped real-scale recipes mark the paths a user must set.
PLACEHOLDER = "/path/to/"
#: config keys (last component) that hold an input file or directory which must exist when set. Not
#: ``init_from`` (weights or the toy base: their loaders name the command that builds a missing one),
#: nor the linked ``data.init_args.processor`` (it repeats ``model.thinker.init_args.path``).
INPUT_PATH_KEYS = ("path", "train", "val", "annotation", "media_root")
NOT_PATHS = ("shipped",)
LINKED = ("data.init_args.processor",)


class ConfigError(ValueError):
    """The configuration cannot run as given (the message lists every problem and how to fix it)."""


def missing_recipe(args: Sequence[str]) -> str | None:
    """Why ``args`` cannot run, when they name a subcommand but no recipe at all; else None.

    Without a ``--config`` (or ``--model``) nothing says which model and data to use, and the
    parser would only fail inside a link function. Help requests are left to the parser.
    """
    args = [str(a) for a in args]
    sub = next((a for a in args if a in SUBCOMMANDS), None)
    if sub is None or any(a in ("-h", "--help") or ".help" in a for a in args):
        return None
    if any(a.split("=", 1)[0] in ("-c", "--config", "--model", "--model.thinker") for a in args):
        return None
    return (
        f"ep-kit {sub} needs a recipe: --config FILE, e.g.\n"
        f"  ep-kit {sub} --config recipes/toy/cs2_ste_20.yaml\n"
        "A recipe sets model.thinker (which model), model.reducer (which method) and data (which data "
        "module); see recipes/ and `ep-kit " + sub + " --help`."
    )


def unset_paths(config: Any) -> list[str]:
    """Every ``/path/to`` placeholder and every missing input path of a parsed config, one line each.

    Placeholders are found in any string value; existence is checked for the keys in
    :data:`INPUT_PATH_KEYS` (model directory, data files, weights). Link targets are skipped (they
    repeat their source).
    """
    found: list[str] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, (str, Path)) and not key.endswith(LINKED):
            text = str(value)
            if text.startswith(PLACEHOLDER):
                found.append(f"{key}: {text} (placeholder)")
            elif key.rsplit(".", 1)[-1] in INPUT_PATH_KEYS and text not in NOT_PATHS and not Path(text).exists():
                found.append(f"{key}: {text} (does not exist)")

    walk(config.as_dict() if hasattr(config, "as_dict") else config, "")
    return found


def unset_paths_message(problems: Sequence[str]) -> str:
    """One short message for :func:`unset_paths`' lines, with how to set them."""
    return (
        f"{len(problems)} path(s) of this configuration are not set:\n"
        + "\n".join(f"  {p}" for p in problems)
        + "\nSet each on the command line (e.g. --model.thinker.init_args.path=/data/Qwen2.5-Omni-3B) or in a "
        "paths file given as one more --config (README \"Real scale\")."
    )


def processor_for(thinker: Any) -> str:
    """The processor the data module must use for ``model.thinker``: the checkpoint's own, or ``tiny``.

    Linked once here so the tokenizer can never disagree with the model's vocabulary.
    """
    if thinker is None:
        raise ConfigError("model.thinker is not set: give a recipe (--config FILE) or --model.thinker")
    class_path = getattr(thinker, "class_path", None) or thinker["class_path"]
    init_args = getattr(thinker, "init_args", None) or thinker.get("init_args", {})
    if class_path.rsplit(".", 1)[-1] == "PretrainedThinker":
        return str(init_args["path"] if isinstance(init_args, dict) else init_args.path)
    return "tiny"


def context_length_for(thinker: Any) -> int | None:
    """``max_position_embeddings`` of ``model.thinker``'s checkpoint (None: tiny thinker, or no readable config).

    Linked into the data module so a sample longer than the model's context is reported with its file.
    """
    class_path = getattr(thinker, "class_path", None) or thinker["class_path"]
    if class_path.rsplit(".", 1)[-1] != "PretrainedThinker":
        return None
    from ep_kit.models.omni import read_thinker_config

    try:
        config = read_thinker_config(processor_for(thinker))
    except (FileNotFoundError, ValueError):
        return None  # a placeholder path: the model source reports it when it is built
    return int(config.text_config.max_position_embeddings)


class MissingExtraError(ImportError):
    """An optional extra of ep-kit is needed by the configuration (the message names the pip command)."""


_NESTED_NULL = re.compile(r"^--(?P<owner>[\w.]+\.init_args\.[\w]+)\.init_args\.(?P<name>\w+)$")


def nested_nulls(args: Sequence[str]) -> list[str]:
    """Rewrite ``--a.init_args.b.init_args.c=null`` as ``--a.init_args.b={"init_args": {"c": null}}``.

    jsonargparse 4.x turns ``null`` given for an argument of a class nested inside another class's
    ``init_args`` into the string ``"None"`` (it re-parses ``--c=None``); the dict form it parses
    right. So ``--data.init_args.source.init_args.val=null`` means None, as it does one level up.
    Both ``--key=null`` and ``--key null`` are rewritten.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = str(args[i])
        key, eq, value = arg.partition("=")
        spaced = not eq and i + 1 < len(args) and str(args[i + 1]) == "null"
        m = _NESTED_NULL.match(key)
        if m and (value == "null" or spaced):
            out.append(f'--{m["owner"]}={{"init_args": {{"{m["name"]}": null}}}}')
            i += 2 if spaced else 1
            continue
        out.append(arg)
        i += 1
    return out


#: arguments of a subcommand's run (Trainer.fit/validate/test/predict), not of the configuration.
RUN_ARGUMENTS = ("ckpt_path", "verbose", "return_predictions", "weights_only")


class SaveRecipe(SaveConfigCallback):
    """Save the run's configuration (trainer, model, data, answers) without the subcommand's run arguments.

    Why: ``config.yaml`` then works with every subcommand (``ep-kit test --config <fit run>/config.yaml``
    and ``ep-kit predict --config <test run>/config.yaml``: a ``verbose`` key saved by ``test`` would
    be refused by ``predict``). The weights go on the command line (``--ckpt_path``), as the end-of-run
    summary prints them.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, *args: Any, **kwargs: Any) -> None:
        config = config.clone()
        for key in RUN_ARGUMENTS:
            if key in config:
                del config[key]
        super().__init__(parser, config, *args, **kwargs)


class EPKitCLI(LightningCLI):
    """LightningCLI for :class:`~ep_kit.train.module.EPKitModule` and :class:`~ep_kit.data.AVDataModule`.

    ``data.init_args.processor`` and ``data.init_args.max_position_embeddings`` are linked from
    ``model.thinker`` (set the checkpoint path once). ``answers`` configures the
    :class:`~ep_kit.train.callbacks.AnswerWriter` every run has (it only acts in ``predict``).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.thinker", "data.init_args.processor", compute_fn=processor_for)
        parser.link_arguments("model.thinker", "data.init_args.max_position_embeddings", compute_fn=context_length_for)
        parser.add_lightning_class_args(AnswerWriter, "answers")

    def instantiate_classes(self) -> None:
        """Build the configured objects; first fail early, with the fix, on unset paths or a missing extra."""
        problems = unset_paths(self._subcommand_config())
        if problems:
            raise ConfigError(unset_paths_message(problems))
        self._check_extras()
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer; with stdout off a terminal, progress as :class:`LineProgress` lines unless a bar is configured."""
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if (
            not sys.stdout.isatty()
            and trainer.get("enable_progress_bar") is not False
            and not any(isinstance(cb, ProgressBar) for cb in callbacks)
            and "callbacks" not in kwargs
        ):
            kwargs["callbacks"] = [*callbacks, LineProgress()]
        return super().instantiate_trainer(**kwargs)

    def _summarise(self, subcommand: str) -> None:
        log_dir = self.trainer.log_dir  # on every rank: the property broadcasts
        if self.trainer.is_global_zero:
            ckpt = self._held_ckpt_path if isinstance(self._held_ckpt_path, str) else None
            lines = run_summary(self.trainer, subcommand, ckpt, log_dir=log_dir)
            print("\n".join(f"[ep-kit] {line}" for line in lines), flush=True)

    def after_fit(self) -> None:
        self._summarise("fit")

    def after_validate(self) -> None:
        self._summarise("validate")

    def after_test(self) -> None:
        self._summarise("test")

    def after_predict(self) -> None:
        self._summarise("predict")

    def _subcommand_config(self) -> Any:
        """The parsed config of the subcommand being run (the whole config when run without one)."""
        subcommand = self.config.get("subcommand")
        return self.config.get(subcommand) if subcommand else self.config

    def _check_extras(self) -> None:
        config = self._subcommand_config()
        strategy = config.get("trainer", {}).get("strategy") if config is not None else None
        name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "") or ""
        if "deepspeed" in str(name).lower() and importlib.util.find_spec("deepspeed") is None:
            raise MissingExtraError(
                f"trainer.strategy={name!r} needs DeepSpeed, which is not installed: pip install \"ep-kit[deepspeed]\" "
                "(or train with FSDP: --trainer recipes/_base/trainer_4gpu_fsdp.yaml, or on one device: "
                "--trainer.strategy=auto)"
            )

    def before_predict(self) -> None:
        """``predict`` answers the test split when the data module defines no predict split."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        dm = self.datamodule
        if dm is not None and not is_overridden("predict_dataloader", dm):
            dm.predict_dataloader = dm.test_dataloader

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (None: ``sys.argv[1:]``) into ``self.config``, then check ``--ckpt_path``.

        As LightningCLI parses, except:

        * ``null`` for an argument of a nested class means None (see :func:`nested_nulls`);
        * ``args``, when given, is the whole command line (:func:`run` from Python: tests, the table
          drivers), so ``sys.argv`` is not looked at and LightningCLI's warning about ``args`` beside a
          non-empty ``sys.argv`` does not apply;
        * ``ckpt_path`` is held back until the configuration is final (:meth:`before_instantiate_classes`),
          so the checkpoint's hyper-parameters, which LightningCLI reads for any ``ckpt_path`` it finds
          after parsing, never replace this configuration (nor is a whole checkpoint loaded just for
          them). The subcommand still gets the ``ckpt_path``: weights and training state come from it.
        """
        if args is None:
            args = sys.argv[1:]
        if isinstance(args, (list, tuple)):
            args = nested_nulls(args)
            missing = missing_recipe(args)
            if missing is not None:
                parser.error(missing)
            self._note_unset_paths(parser, args)
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        self._check_ckpt_path()
        subcommand = self.config.get("subcommand")
        self._held_ckpt_path = None
        if subcommand:
            self._held_ckpt_path = self.config[subcommand].get("ckpt_path")
            self.config[subcommand]["ckpt_path"] = None

    @staticmethod
    def _note_unset_paths(parser: LightningArgumentParser, args: Sequence[str]) -> None:
        """With ``--print_config``: list the configuration's unset paths on stderr (the YAML on stdout stays clean)."""
        if not any(str(a).startswith("--print_config") for a in args):
            return
        rest = [a for a in args if not str(a).startswith("--print_config")]
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                config = parser.parse_args(rest)
        except SystemExit:
            return  # the real parse below reports the error
        sub = config.get("subcommand")
        problems = unset_paths(config.get(sub) if sub else config)
        if problems:
            print("# " + unset_paths_message(problems).replace("\n", "\n# "), file=sys.stderr, flush=True)

    def before_instantiate_classes(self) -> None:
        """Give the subcommand its ``ckpt_path`` back (held back in :meth:`parse_arguments`)."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            self.config[subcommand]["ckpt_path"] = self._held_ckpt_path

    def _check_ckpt_path(self) -> None:
        """``--ckpt_path``: a Lightning checkpoint file (or a DeepSpeed checkpoint folder), said clearly if not."""
        config = self._subcommand_config()
        path = config.get("ckpt_path") if config is not None else None
        if not path or path in ("last", "best", "hpc", "registry"):
            return
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"--ckpt_path: {root} does not exist")
        if root.is_file():
            read_lightning_checkpoint(root, "--ckpt_path")


def run(args: Sequence[str] | dict | None = None, run_subcommand: bool = True) -> EPKitCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line (None = ``sys.argv``)."""
    return _build(args, run_subcommand)


@contextlib.contextmanager
def program_argv() -> Iterator[None]:
    """``sys.argv`` holding only the program name while the CLI runs in this process.

    For scripts (tables, benchmarks) that call :func:`run` with their own argument list: the CLI
    then sees exactly those arguments, never the calling script's flags.
    """
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


@dataclass
class FitTestResult:
    """What :func:`fit_then_test_run` gives back: the logged test metrics, each question's outcome, the CLI.

    ``outcomes`` hold one record per test question (:class:`~ep_kit.train.metrics.QuestionOutcome`),
    counted as the metrics count them (their mean is ``metrics["test/acc"]``); ``cli`` gives the
    fitted module and the data module (e.g. the synthetic benchmark's jsonl rows).
    """

    metrics: dict[str, float]
    outcomes: list[QuestionOutcome]
    cli: EPKitCLI


def fit_then_test_run(args: Sequence[str]) -> FitTestResult:
    """``ep-kit fit`` with ``args`` (config files and overrides), then test the fitted weights.

    The test runs on the same data module's test split with the weights as they are at the end of
    ``fit`` (no checkpoint reload, so no saved hyper-parameters override ``args``). The benchmarks
    train their rows through this one path.
    """
    cli = run(["fit", *args])
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False, ckpt_path=None)
    return FitTestResult({k: float(v) for k, v in results[0].items()}, list(cli.model.test_outcomes), cli)


def fit_then_test(args: Sequence[str]) -> dict[str, float]:
    """:func:`fit_then_test_run`'s logged ``test/...`` metrics only."""
    return fit_then_test_run(args).metrics


class ParseOnlyCLI(EPKitCLI):
    """The ``ep-kit`` parser (same classes, links, nested files and ``null`` handling); nothing is built."""

    def instantiate_classes(self) -> None:
        self.config_init = self.config


def parse(args: Sequence[str], exit_on_error: bool = True) -> ParseOnlyCLI:
    """Parse ``args`` (config files and overrides, no subcommand) exactly as ``ep-kit`` does, building nothing.

    For tools that read recipes (:func:`ep_kit.recipes.method_from_recipe`, the recipe tests): the
    result's ``config`` is the resolved configuration and ``parser`` parses further argument lists.
    Placeholder paths are fine, since no model, data or trainer is built. The recipe's
    ``seed_everything`` still seeds the global generators, as any LightningCLI parse does; pass
    ``--seed_everything=false`` to leave them alone.
    """
    return _build(list(args), run_subcommand=False, cli_class=ParseOnlyCLI, parser_kwargs={"exit_on_error": exit_on_error})


def _build(
    args: Sequence[str] | dict | None,
    run_subcommand: bool,
    cli_class: type[EPKitCLI] = EPKitCLI,
    parser_kwargs: dict[str, Any] | None = None,
) -> EPKitCLI:
    # Given arguments are the whole command line: hide the caller's own sys.argv from LightningCLI (it would
    # otherwise warn that both are set, and nothing of the caller's flags is meant for it).
    with program_argv() if args is not None else contextlib.nullcontext():
        return _construct(args, run_subcommand, cli_class, parser_kwargs)


def _construct(
    args: Sequence[str] | dict | None,
    run_subcommand: bool,
    cli_class: type[EPKitCLI],
    parser_kwargs: dict[str, Any] | None,
) -> EPKitCLI:
    return cli_class(
        EPKitModule,
        AVDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        # A resumed run (fixed logger version, e.g. ep_kit.runs) rewrites its own config.yaml; fresh runs
        # each get a new version directory, so nothing else is ever overwritten.
        save_config_callback=SaveRecipe,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "ep-kit"},
            },
        },
        parser_kwargs=parser_kwargs or {},
        args=args,
        run=run_subcommand,
    )


def answer(argv: Sequence[str]) -> dict[str, Any]:
    """``ep-kit answer ...`` (:mod:`ep_kit.answer`): the recipe's module and data module built by :func:`parse`."""
    from ep_kit.answer import answer_clip, arguments, recipe_args

    args, overrides = arguments().parse_known_args(list(argv))
    cli = parse(recipe_args(args, overrides))
    built = cli.parser.instantiate_classes(cli.config)
    return answer_clip(built.model, built.data, args.video, args.question, args.options, args.output_dir,
                       args.max_new_tokens)


class _DropTips(logging.Filter):
    """Drops Lightning's promotional tips (``💡 Tip: ...``: litlogger, litmodels); it offers no switch for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


def quiet_third_party_notices() -> None:
    """Silence, by exact message, the notices of the stack that a user of ``ep-kit`` can do nothing about.

    Lightning's tips go through the ``rank_zero`` logger (a logging filter is the documented way to drop
    records); Lightning's own ``LeafSpec`` deprecation comes from its pytree helper under torch >= 2.10 and
    is fixed upstream, not here. The same message is filtered in the pytest configuration.
    """
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point ``ep-kit``: ``answer`` (one clip), ``export`` (checkpoint -> model directory) or a
    Lightning subcommand.

    A configuration error (unset paths, a missing extra) ends with its message and status 2, no traceback.
    """
    argv = list(args) if args is not None else sys.argv[1:]
    quiet_third_party_notices()
    try:
        if argv[:1] == ["answer"]:
            answer(argv[1:])
            return
        if argv[:1] == ["export"]:  # not a Lightning subcommand: ep_kit.export
            from ep_kit.export import main as export_main

            export_main(argv[1:])
            return
        run(argv if args is not None else None)
    except (ConfigError, MissingExtraError) as err:
        print(f"ep-kit: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Destroy the process group a multi-process run (DDP/FSDP) left behind, before the interpreter exits.

    Lightning leaves it open after ``fit``; a gloo group torn down by interpreter exit instead aborted a
    2-process CPU fit after it had finished ("terminate called without an active exception", status -6).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
