"""``lmms-eval --model ep_kit``: the kit's reduced prefill (and cached generation) as an lmms-eval model.

::

    lmms-eval --model ep_kit --model_args config=recipes/cs2_ste_20.yaml+recipes/eval_benchmarks.yaml,\\
        pretrained=/data/Qwen2.5-Omni-3B,keep_ratio=0.2,sieve=last.ckpt --tasks daily_omni --include_path DIR

A thin adapter: ``model_args`` are read by :func:`ep_kit.lmms_eval.harness.parse_model_args`, the
recipe is built and every batch answered by :class:`~ep_kit.lmms_eval.harness.KitAnswerer` (the code
``ep-kit test`` runs). Requests are answered in the harness's order, ``batch_size`` at a time.

Per-sample budget: each answered request records its sample's kept and total tokens, realised keep
ratio and audio share in :data:`ep_kit.lmms_eval.harness.BUDGETS`, keyed by the question's document;
the kit's Daily-Omni task puts it into its per-sample record, which ``--log_samples`` writes. (A
task's record is its own ``process_results``' output, so lmms-eval's own tasks do not log it.)
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ep_kit.lmms_eval.harness import (
    KitAnswerer,
    ModelArgsError,
    Request,
    batches,
    parse_model_args,
    record_budget,
)


class EPKit(lmms):
    """An ep-kit recipe (any main-table method: EchoingPixels, FastV, PyramidDrop, OmniZip, ...) in lmms-eval."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.options = parse_model_args(model_args)
        self.kit = KitAnswerer(self.options)
        self.batch_size = self.options.batch_size

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request (prompt + the video its task's ``doc_to_visual`` gives) with the kit."""
        out: list[str] = []
        for chunk in batches(requests, self.batch_size):
            asked = [self._request(r) for r in chunk]
            for instance, answer in zip(chunk, self.kit.answer(asked), strict=True):
                _, _, _, doc_id, task, split = instance.args
                record_budget(self.task_dict[task][split][doc_id], {"keep_ratio": self.kit.keep_ratio, **answer.budget})
                out.append(answer.text)
        return out

    def _request(self, instance: Instance) -> Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        videos = [v for v in (visuals or []) if isinstance(v, str)]
        if len(videos) != 1 or len(visuals) != 1:
            raise ModelArgsError(
                f"task {task}: the ep_kit model answers about one video file per question; doc {doc_id} gives "
                f"{len(visuals or [])} visual(s) ({', '.join(type(v).__name__ for v in visuals or [])})"
            )
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        return Request(
            prompt=str(context),
            video=videos[0],
            max_new_tokens=int(kwargs.get("max_new_tokens") or 32),
            until=[until] if isinstance(until, str) else list(until),
        )

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the ep_kit model answers generate_until tasks (multiple-choice video QA)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the ep_kit model answers single-round questions")
