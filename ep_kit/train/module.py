"""The LightningModule behind ``ep-kit fit|validate|test|predict``.

It owns one :class:`~ep_kit.models.omni.OmniThinker` built from YAML-friendly parts: a
:class:`~ep_kit.train.sources.ThinkerSource` (where the transformers thinker comes from), a rotary
layout, a token reducer and a keep ratio. Training is the paper's: LM loss on the answer tokens of
the reduced sequence, the LLM fine-tuned with the sieve and the scorer (``train_llm``), encoders
frozen, AdamW with linear warm-up and cosine decay (:class:`~ep_kit.train.schedules.WarmupCosine`).
Evaluation is multiple choice: the next-token logits at the end of the prompt, restricted to each
option's letter token, argmax, compared with the answer -- accuracy overall, per benchmark and per
category (torchmetrics, synced across ranks), plus where the budget went (kept ratio, audio vs video
share).

Weights for an evaluation at another budget are loaded by the module itself (``init_from``), never
through ``--ckpt_path`` hyper-parameters, so ``--model.keep_ratio`` on the command line is the
budget that runs (and the realised one is logged).

Built by ``ep-kit`` (LightningCLI), the module saves its configuration (every component as its
``class_path`` and ``init_args``) as hyper-parameters, so ``EPKitModule.load_from_checkpoint(ckpt)``
rebuilds it from a checkpoint alone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from ep_kit.budget import check_ratio
from ep_kit.models.feature_cache import EncoderFeatureCache
from ep_kit.models.omni import OmniThinker
from ep_kit.reducers.base import TokenReducer
from ep_kit.rope import MultiAxisRoPE
from ep_kit.sequence import TokenSequence
from ep_kit.train.metrics import (
    BudgetShare,
    MultipleChoiceAccuracy,
    QuestionOutcome,
    QuestionOutcomes,
    option_letter,
)
from ep_kit.train.schedules import LRScheduleCallable, WarmupCosine
from ep_kit.train.sources import ThinkerSource, write_base_marker

STAGES = ("val", "test")
#: per-question test outcomes, one json object a line, beside ``test_metrics.json``.
OUTCOMES_FILE = "test_questions.jsonl"

#: ``__init__`` arguments that are components (objects): saved as hyper-parameters only in their
#: ``class_path`` form, i.e. when the module is built by the CLI.
COMPONENTS = ("thinker", "rope", "reducer", "optimizer", "lr_scheduler")
#: ``__init__`` arguments never saved as hyper-parameters: ``init_from`` (a checkpoint carries its own
#: weights) and ``feature_cache`` (a machine-local directory that never changes results; a module
#: rebuilt from a checkpoint runs its encoders unless given one again).
NOT_SAVED = ("init_from", "feature_cache")


def prompt_end_index(seq: TokenSequence) -> Tensor:
    """``(B,)`` index of the token whose next-token logits answer the question.

    The last real token of each row, or the token just before the first answer token when the
    batch carries its answer (teacher-forced evaluation batches).
    """
    L = seq.attention_mask.shape[1]
    last = seq.attention_mask.sum(-1) - 1
    cols = torch.arange(L, device=seq.attention_mask.device).expand_as(seq.attention_mask)
    first_answer = torch.where(seq.answer_mask, cols, torch.full_like(cols, L)).amin(-1)
    has_answer = seq.answer_mask.any(-1)
    return torch.where(has_answer, first_answer - 1, last).clamp(min=0)


def metadata_lists(batch: Mapping[str, Any], size: int) -> dict[str, list[str]]:
    """``question_id`` / ``category`` / ``benchmark`` lists of an evaluation batch.

    Read from the batch's top-level lists (``ep_kit.data.collate_av``) or from ``batch["metadata"]``
    (a list of per-sample dicts or a dict of lists); a missing field raises ``ValueError``.
    """
    meta = batch.get("metadata")
    out: dict[str, list[str]] = {}
    for key in ("question_id", "category", "benchmark"):
        if key in batch:
            values = batch[key]
        elif isinstance(meta, Mapping):
            values = meta.get(key)
        elif meta is not None:
            values = [m.get(key) if isinstance(m, Mapping) else getattr(m, key, None) for m in meta]
        else:
            values = None
        if values is None or len(values) != size or any(v is None for v in values):
            raise ValueError(f"evaluation batch lacks '{key}' for some of its {size} samples")
        out[key] = [str(v) for v in values]
    return out


def read_lightning_checkpoint(path: Path, field: str) -> Mapping[str, Any]:
    """A Lightning ``.ckpt`` file's contents (memory-mapped), or a ``ValueError`` naming ``field`` and the file.

    Any other file (a safetensors file, a text file, a plain ``state_dict``) would otherwise fail deep
    inside Lightning or torch (``KeyError: 101``, ``KeyError: 'pytorch-lightning_version'``).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for non-checkpoint files
        raise ValueError(
            f"{field}: {path} is not a Lightning checkpoint (.ckpt written by ep-kit fit): {type(err).__name__}"
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        raise ValueError(
            f"{field}: {path} is not a Lightning checkpoint (.ckpt written by ep-kit fit): it has no "
            "'state_dict' and 'pytorch-lightning_version'"
        )
    return ckpt


def _deepspeed_state_dict(root: Path) -> dict[str, Tensor]:
    """The full fp32 state dict of a Lightning DeepSpeed checkpoint directory (ZeRO shards gathered)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            f"model.init_from: {root} is a DeepSpeed checkpoint; reading it needs DeepSpeed: "
            'pip install "ep-kit[deepspeed]"'
        )
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fp32.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(str(root), str(out))
        return torch.load(out, map_location="cpu", weights_only=False)["state_dict"]


class EPKitModule(LightningModule):
    """Train and evaluate a Qwen2.5-Omni thinker with a token reducer.

    Args:
        thinker: where the transformers thinker comes from (``PretrainedThinker`` / ``TinyThinker``).
        rope: rotary layout of the sieve and the LLM (``TMRoPE`` / ``SyncRoPE``); None = the
            checkpoint's own TMRoPE.
        reducer: token-reduction method (``CS2`` or a baseline); None = full model.
        keep_ratio: budget ``r`` in (0, 1] over the candidate A/V tokens of each sample.
        candidate_modalities: pool the budget is taken from (default video and audio).
        train_llm: fine-tune the LLM too (paper); False trains only the reducer.
        freeze_encoders: keep the audio and vision encoders frozen (paper); False for pretraining
            the toy thinker from scratch.
        optimizer: optimizer factory over the trainable parameters (default AdamW, lr 2e-5).
        lr_scheduler: learning-rate schedule, built as ``lr_scheduler(optimizer, num_training_steps=N)``
            with ``N`` the run's optimizer steps and stepped every optimizer step (default
            :class:`~ep_kit.train.schedules.WarmupCosine`: 5% linear warm-up, cosine decay to 0, the
            paper's); None = the optimizer's learning rate throughout.
        gradient_checkpointing: recompute decoder and sieve layers in backward (real scale).
        init_from: weights to load after building: a Lightning ``.ckpt`` file (its ``state_dict``,
            hyper-parameters ignored) or a directory written by
            :func:`ep_kit.models.checkpoint.save_kit_weights`. Use this, not ``--ckpt_path``, for a
            budget sweep: the command line's ``keep_ratio`` is the one that runs. Not a
            hyper-parameter: ``load_from_checkpoint`` takes the weights from the checkpoint itself.
        export_thinker: after ``fit``, save the thinker (``save_pretrained``) to this directory as a
            base other recipes initialise from (``TinyThinker.init_from``).
        print_metrics: print a one-line accuracy summary after every validation/test epoch.
        feature_cache: on-disk cache of the frozen encoders' outputs
            (:class:`~ep_kit.models.feature_cache.EncoderFeatureCache`), shared by every run that
            points at the same directory; None = encoders run on every batch. Needs
            ``freeze_encoders``. Results equal the uncached run (float rounding aside; see its module).
    """

    def __init__(
        self,
        thinker: ThinkerSource,
        rope: MultiAxisRoPE | None = None,
        reducer: TokenReducer | None = None,
        keep_ratio: float = 1.0,
        candidate_modalities: list[str] | None = None,
        train_llm: bool = True,
        freeze_encoders: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRScheduleCallable | None = WarmupCosine,
        gradient_checkpointing: bool = False,
        init_from: str | None = None,
        export_thinker: str | None = None,
        print_metrics: bool = True,
        feature_cache: EncoderFeatureCache | None = None,
    ) -> None:
        super().__init__()
        # Under LightningCLI the hyper-parameters Lightning saves are the parsed configuration (components
        # as class_path / init_args, with the CLI's instantiator): load_from_checkpoint rebuilds the module
        # from them. Built in Python, the components are objects a checkpoint can neither hold as
        # hyper-parameters nor rebuild from: only the plain arguments are saved. NOT_SAVED never are.
        # The first call only reads what Lightning saves for thinker.
        self.save_hyperparameters("thinker", logger=False)
        from_config = isinstance(self.hparams["thinker"], Mapping)
        self.save_hyperparameters(ignore=[*NOT_SAVED] if from_config else [*NOT_SAVED, *COMPONENTS])
        if not isinstance(thinker, ThinkerSource):
            raise TypeError(f"model.thinker must be a ThinkerSource (class_path), got {type(thinker).__name__}")
        check_ratio(keep_ratio, "model.keep_ratio")
        self.source = thinker
        self.model: OmniThinker = thinker.build(
            rope=rope,
            reducer=reducer,
            keep_ratio=keep_ratio,
            candidate_modalities=tuple(candidate_modalities or ("video", "audio")),
            freeze_encoders=freeze_encoders,
            train_llm=train_llm,
            feature_cache=feature_cache,
        )
        # transformers' from_pretrained hands the thinker back in eval mode, and Lightning keeps each
        # submodule's mode: without this the LLM trained in eval mode, where transformers skips
        # activation checkpointing (it only runs when `module.training`). Lightning's loops switch to
        # eval for validate/test/predict themselves.
        self.model.train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.export_thinker = export_thinker
        self.print_metrics = print_metrics
        self.accuracy = torch.nn.ModuleDict({s: MultipleChoiceAccuracy() for s in STAGES})
        self.budget = torch.nn.ModuleDict({s: BudgetShare() for s in STAGES})
        # Per-question records of the test stage (statistics over questions; never logged), and the
        # records of the last test epoch (:attr:`test_outcomes`).
        self.outcomes = QuestionOutcomes()
        self.test_outcomes: list[QuestionOutcome] = []
        if init_from is not None:
            self.load_weights(init_from)

    # ------------------------------------------------------------------ setup
    @property
    def keep_ratio(self) -> float:
        return self.model.keep_ratio

    def load_weights(self, path: str) -> None:
        """Load ``init_from``: a Lightning checkpoint's ``state_dict`` or a kit weights directory."""
        root = Path(path)
        if root.is_dir() and (root / "checkpoint").is_dir():
            state = _deepspeed_state_dict(root)  # a DeepSpeed (ZeRO) checkpoint is a directory
            return self._load_lightning_state(state, root)
        if root.is_dir():
            from ep_kit.models.checkpoint import KIT_WEIGHTS, load_kit_weights

            if not (root / KIT_WEIGHTS).is_file():
                raise FileNotFoundError(
                    f"model.init_from: {root} holds no {KIT_WEIGHTS}; give a Lightning .ckpt file or a directory "
                    "written by ep_kit.models.checkpoint.save_kit_weights (a full model directory goes in "
                    "model.thinker instead)"
                )
            load_kit_weights(self.model, root, strict=True)
            return
        if not root.is_file():
            raise FileNotFoundError(f"model.init_from: {root} does not exist")
        state = read_lightning_checkpoint(root, "model.init_from")["state_dict"]
        self._load_lightning_state(state, root)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the configuration of a checkpoint written by the CLI when built from it in Python.

        ``load_from_checkpoint`` builds the components outside the CLI, so only the plain arguments
        would be saved again: the checkpoint's configuration is kept instead, and a checkpoint of the
        rebuilt module rebuilds it too.
        """
        saved = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY) or {}
        if "_instantiator" in saved and not any(k in self.hparams for k in COMPONENTS):
            self.hparams.update({k: v for k, v in saved.items() if k in (*COMPONENTS, "_instantiator")})

    def _load_lightning_state(self, state: Mapping[str, Tensor], root: Path) -> None:
        state = {k: v for k, v in state.items() if k.startswith("model.")}
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k.startswith("model.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"model.init_from: {root} does not fit this model: missing {missing[:10]} "
                f"({len(missing)} in all), unexpected {result.unexpected_keys[:10]} "
                f"({len(result.unexpected_keys)} in all). Was it trained with the same reducer and thinker?"
            )

    # ------------------------------------------------------------------ train
    def forward(self, batch: Mapping[str, Any]):
        return self.model(batch)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        if batch.get("labels") is None:
            raise ValueError("training batch has no 'labels': the LM loss needs them")
        out = self.model(batch, logits="labels")
        B = int(batch["input_ids"].shape[0])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=B, sync_dist=True)
        stats = out.stats
        kept_av = float(stats["kept_audio"].sum() + stats["kept_video"].sum())
        self.log("train/kept_ratio", float(stats["realised_keep_ratio"]), batch_size=B, sync_dist=True)
        self.log("train/audio_share", float(stats["kept_audio"].sum()) / max(1.0, kept_av), batch_size=B, sync_dist=True)
        self.log("train/video_share", float(stats["kept_video"].sum()) / max(1.0, kept_av), batch_size=B, sync_dist=True)
        return self._with_unused_parameters(out.loss)

    def _with_unused_parameters(self, loss: Tensor) -> Tensor:
        """``loss`` plus zero times one element of every trainable parameter the loss does not reach.

        Why: a batch without audio/video tokens (text-only rows of instruction data) never runs the
        CS2 sieve and scorer, and a batch without one modality can leave parameters of the other
        idle. DDP then stops with "parameters that were not used in producing the loss" (or hangs
        waiting for their gradients on the other ranks). Touching each unused parameter once with
        zero weight gives it a zero gradient, so every rank reduces the same parameters, the loss
        value is unchanged, and DDP keeps ``find_unused_parameters=False``.

        Added without a trainer (the caller may reduce gradients across processes) and under
        DDP-style strategies (DDP, DeepSpeed ZeRO-1/2), whose parameters are whole replicas. Not on a
        single device, where a parameter without a gradient is simply not stepped (a zero gradient
        would let AdamW's momentum and weight decay move it), nor where parameters are sharded outside
        the forward (FSDP, DeepSpeed ZeRO-3, model parallel), which do not need it.
        """
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        if trainer is not None:
            from lightning.pytorch.strategies import DDPStrategy

            strategy = trainer.strategy
            if not isinstance(strategy, DDPStrategy) or getattr(strategy, "zero_stage_3", False):
                return loss
        if loss.grad_fn is None:
            return loss
        reached = self._graph_leaf_ids(loss)
        unused = [p for p in self.parameters() if p.requires_grad and p.numel() > 0 and id(p) not in reached]
        if not unused:
            return loss
        touched = torch.stack([p.reshape(-1)[0].to(loss.dtype) for p in unused]).sum()
        return loss + 0.0 * touched

    @staticmethod
    def _graph_leaf_ids(loss: Tensor) -> set[int]:
        """``id`` of every tensor ``loss.backward()`` would give a gradient (the autograd graph's leaves)."""
        seen: set[Any] = set()
        found: set[int] = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it writes
            if variable is not None:
                found.add(id(variable))
            stack.extend(next_node for next_node, _ in node.next_functions)
        return found

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen (check train_llm and the reducer)")
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer, num_training_steps=self._total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps of the run, for the schedule.

        Counted from a fresh training loader of the data module rather than through
        ``trainer.estimated_stepping_batches``: that property sets up the fit loop's loader before a
        checkpoint's loop state is restored, so a resumed run would restart its epoch from the first
        batch (the loader's saved position is never loaded).
        """
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return max(1, int(trainer.estimated_stepping_batches))
        loader = datamodule.train_dataloader()
        batches = len(loader)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None:
            batches = int(batches * float(limit))
        # A loader sharded across ranks (ep_kit.data.resumable) already counts its batches per rank.
        shards = int(getattr(getattr(loader, "sampler", None), "num_replicas", 1) or 1)
        per_rank = math.ceil(batches / max(1, trainer.world_size // shards))
        per_epoch = math.ceil(per_rank / max(1, trainer.accumulate_grad_batches))
        return max(1, per_epoch * max(1, int(trainer.max_epochs or 1)))

    def on_fit_end(self) -> None:
        if self.export_thinker is None or not self.trainer.is_global_zero:
            return
        root = Path(self.export_thinker)
        root.mkdir(parents=True, exist_ok=True)
        self.model.thinker.save_pretrained(str(root))
        write_base_marker(
            root,
            {"global_step": int(self.trainer.global_step), "epochs": int(self.trainer.current_epoch)},
        )

    # --------------------------------------------------------------- evaluate
    @torch.no_grad()
    def answer(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Run the reduced prefill and pick an option per sample.

        Only the logits at the end of each prompt are computed (the lm_head never runs on the
        whole sequence). Returns ``predicted`` (B,), ``target`` (B,), ``num_options`` (B,),
        ``choice_logits`` (B, n_options), ``stats`` (budget), ``prefill`` (the
        :class:`~ep_kit.models.omni.Prefill`: which tokens were kept) and the metadata lists.
        """
        choices = batch.get("choice_token_ids")
        target = batch.get("answer_index")
        if choices is None or target is None:
            raise ValueError("evaluation batch needs 'choice_token_ids' (B, n_options) and 'answer_index' (B,)")
        p = self.model.prefill(batch)
        seq = p.kept
        rows = torch.arange(seq.batch_size, device=seq.hidden.device)
        logits = self.model.head(seq.hidden[rows, prompt_end_index(seq)]).float()
        valid = batch.get("choice_mask")
        valid = choices >= 0 if valid is None else valid.bool() & (choices >= 0)
        choice_logits = torch.gather(logits, 1, choices.clamp(min=0))
        choice_logits = choice_logits.masked_fill(~valid, float("-inf"))
        stats = p.stats
        meta = metadata_lists(batch, seq.batch_size)
        return {
            "predicted": choice_logits.argmax(-1),
            "target": target.long(),
            "num_options": valid.sum(-1),
            "choice_logits": choice_logits,
            "stats": stats,
            "prefill": p,
            **meta,
        }

    def _evaluate(self, stage: str, batch: Mapping[str, Any]) -> None:
        if "choice_token_ids" not in batch:
            # Instruction data (no options): score the LM loss on the answer tokens instead.
            if batch.get("labels") is None:
                raise ValueError(f"{stage} batch has neither 'choice_token_ids' nor 'labels': nothing to evaluate")
            out = self.model(batch, logits="labels")
            B = int(batch["input_ids"].shape[0])
            self.log(f"{stage}/loss", out.loss, batch_size=B, sync_dist=True, prog_bar=True)
            self.budget[stage].update(out.stats)
            return
        res = self.answer(batch)
        self.accuracy[stage].update(
            res["predicted"], res["target"], res["benchmark"], res["category"], res["question_id"], res["num_options"]
        )
        self.budget[stage].update(res["stats"])
        if stage == "test":
            self.outcomes.update(
                res["predicted"], res["target"], res["benchmark"], res["category"], res["question_id"], res["stats"]
            )

    # An evaluation suite gives one loader per benchmark (each with its own audio setting); the
    # metrics already key every record by benchmark, so the loader index is not needed.
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch)

    def _log_epoch(self, stage: str) -> dict[str, float]:
        acc = self.accuracy[stage].compute() if self.accuracy[stage].update_count else {}
        budget = self.budget[stage].compute() if self.budget[stage].update_count else {}
        self.accuracy[stage].reset()
        self.budget[stage].reset()
        values = {f"{stage}/{k}": v for k, v in acc.items()}
        values.update({f"{stage}/{k}": v for k, v in budget.items()})
        values[f"{stage}/keep_ratio"] = torch.tensor(self.keep_ratio)
        # Already synced by torchmetrics: log as is (no second reduction).
        for key, value in values.items():
            self.log(key, value, prog_bar=key == f"{stage}/acc", rank_zero_only=False, sync_dist=False)
        return {k: float(v) for k, v in values.items()}

    def _report(self, stage: str, values: Mapping[str, float]) -> None:
        if not self.print_metrics or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        if f"{stage}/acc" not in values:
            return
        name = {"val": "validation", "test": "test"}[stage]
        print(
            f"[ep-kit] epoch {self.current_epoch} {name} accuracy {values[f'{stage}/acc']:.4f} "
            f"(n={int(values[f'{stage}/count'])}, chance {values[f'{stage}/chance']:.4f}) | keep ratio "
            f"{self.keep_ratio:g} (realised {values[f'{stage}/realised_keep_ratio']:.4f}, audio share "
            f"{values[f'{stage}/audio_share']:.3f}, video share {values[f'{stage}/video_share']:.3f})",
            flush=True,
        )
        cats = {k: v for k, v in values.items() if k.startswith(f"{stage}/acc/")}
        if cats:
            print("[ep-kit]   " + "  ".join(f"{k[len(stage) + 5:]}={v:.3f}" for k, v in cats.items()), flush=True)
        groups = {k: v for k, v in values.items() if k.startswith(f"{stage}/acc_group/") and k.count("/") == 2}
        if groups:
            print("[ep-kit]   groups: " + "  ".join(f"{k.rsplit('/', 1)[1]}={v:.3f}" for k, v in groups.items()),
                  flush=True)

    def on_validation_epoch_end(self) -> None:
        self._report("val", self._log_epoch("val"))

    def on_test_epoch_end(self) -> None:
        self.test_outcomes = self.outcomes.outcomes() if self.outcomes.update_count else []
        self.outcomes.reset()
        values = self._log_epoch("test")
        self._report("test", values)
        self._write_metrics(values)

    def _write_metrics(self, values: Mapping[str, float]) -> None:
        """``test_metrics.json`` in the run's log directory: every test number, for scripts and tables;
        ``test_questions.jsonl``: one :class:`~ep_kit.train.metrics.QuestionOutcome` per line."""
        log_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero or log_dir is None or self.trainer.sanity_checking:
            return
        path = Path(log_dir) / "test_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(values.items())), indent=2))
        # Each question's outcome beside them (gathered from every rank): intervals and paired comparisons
        # of runs need the questions, not only the accuracy (ep_kit.stats).
        with (path.parent / OUTCOMES_FILE).open("w", encoding="utf-8") as f:
            for outcome in self.test_outcomes:
                f.write(json.dumps(asdict(outcome)) + "\n")

    # ---------------------------------------------------------------- predict
    def predict_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """Per-sample answers: question, options, answer (predicted letter), target, correctness, kept tokens.

        ``question`` / ``options`` are None for a batch that does not carry them (a data source of
        its own); ``target`` and ``correct`` are None for a question without a known answer.
        """
        res = self.answer(batch)
        stats = res["stats"]
        questions, options = batch.get("question"), batch.get("options")
        records = []
        for i in range(res["predicted"].shape[0]):
            pred, gold = int(res["predicted"][i]), int(res["target"][i])
            opts = list(options[i]) if options is not None else None
            records.append(
                {
                    "question_id": res["question_id"][i],
                    "benchmark": res["benchmark"][i],
                    "category": res["category"][i],
                    "question": questions[i] if questions is not None else None,
                    "options": opts,
                    "answer": option_letter(pred),
                    "answer_text": opts[pred] if opts is not None and pred < len(opts) else None,
                    "target": option_letter(gold) if gold >= 0 else None,
                    "correct": pred == gold if gold >= 0 else None,
                    "keep_ratio": self.keep_ratio,
                    "kept_video": int(stats["kept_video"][i]),
                    "kept_audio": int(stats["kept_audio"][i]),
                    "n_video": int(stats["n_video"][i]),
                    "n_audio": int(stats["n_audio"][i]),
                }
            )
        return records
