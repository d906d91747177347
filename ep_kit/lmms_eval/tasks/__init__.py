"""lmms-eval task definitions shipped with the kit, and the command that points them at local data.

lmms-eval reads a task's data location from its yaml, and a file inside an installed package is no
place to edit, so the shipped folder holds the task *template* (``daily_omni/_default_template_yaml``
and its helpers) and :func:`write_tasks` writes a small folder for ``--include_path`` whose
``daily_omni.yaml`` includes the template and names your ``qa.json`` and ``Videos`` folder::

    python -m ep_kit.lmms_eval.tasks lmms_tasks --daily_omni /data/Daily-Omni/qa.json /data/Daily-Omni/Videos
    python -m ep_kit.lmms_eval.tasks lmms_tasks --paths paths_eval.yaml   # the kit's own paths file
    python -m ep_kit.lmms_eval.tasks                                       # prints the shipped folder
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

SHIPPED = Path(__file__).resolve().parent
TEMPLATE = SHIPPED / "daily_omni" / "_default_template_yaml"


def daily_omni_from_paths(paths_file: str | Path) -> tuple[Path, Path]:
    """Daily-Omni's ``annotation`` and ``media_root`` in a kit paths file (README "Real scale", ``paths_eval.yaml``)."""
    config = yaml.safe_load(Path(paths_file).read_text()) or {}
    try:
        benchmarks = config["data"]["init_args"]["source"]["init_args"]["benchmarks"]
    except (KeyError, TypeError):
        benchmarks = []
    for entry in benchmarks:
        args = entry.get("init_args", {}) if isinstance(entry, dict) else {}
        if args.get("name") == "daily_omni":
            return Path(args["annotation"]), Path(args["media_root"])
    raise ValueError(f"--paths: {paths_file} has no daily_omni entry under data.init_args.source.init_args.benchmarks")


def write_tasks(out: str | Path, annotation: str | Path, media_root: str | Path, with_audio: bool = True) -> Path:
    """Write ``out/daily_omni.yaml`` (the shipped template + your data); returns ``out`` for ``--include_path``."""
    annotation, media_root = Path(annotation).resolve(), Path(media_root).resolve()
    if not annotation.is_file():
        raise FileNotFoundError(f"--daily_omni: annotation {annotation} does not exist (Daily-Omni's qa.json)")
    if not media_root.is_dir():
        raise FileNotFoundError(f"--daily_omni: media root {media_root} is not a directory (Daily-Omni's Videos)")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    task = {
        "include": str(TEMPLATE),
        "task": "daily_omni",
        "dataset_kwargs": {"data_files": {"test": str(annotation)}},
        "lmms_eval_specific_kwargs": {"default": {"media_root": str(media_root), "with_audio": with_audio}},
    }
    header = "# Written by `python -m ep_kit.lmms_eval.tasks`: the kit's Daily-Omni task on local data.\n"
    (root / "daily_omni.yaml").write_text(header + yaml.safe_dump(task, sort_keys=False))
    return root


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ep_kit.lmms_eval.tasks",
                                description="Write the kit's lmms-eval tasks for local data into OUT "
                                "(for --include_path OUT); without OUT, print the shipped task folder.")
    p.add_argument("out", nargs="?", help="folder to write (daily_omni.yaml)")
    p.add_argument("--daily_omni", nargs=2, metavar=("QA_JSON", "VIDEOS"), help="Daily-Omni's qa.json and Videos folder")
    p.add_argument("--paths", help="a kit paths file (paths_eval.yaml) naming the daily_omni benchmark")
    args = p.parse_args(argv)
    if args.out is None:
        print(SHIPPED)
        return
    if (args.daily_omni is None) == (args.paths is None):
        p.error("give --daily_omni QA_JSON VIDEOS or --paths FILE")
    annotation, media = args.daily_omni if args.daily_omni else daily_omni_from_paths(args.paths)
    root = write_tasks(args.out, annotation, media)
    print(f"[ep-kit] wrote {root / 'daily_omni.yaml'}: lmms-eval --tasks daily_omni --include_path {root} ...")
