"""``python -m ep_kit.lmms_eval.tasks OUT --daily_omni QA_JSON VIDEOS`` (see :mod:`ep_kit.lmms_eval.tasks`)."""

from ep_kit.lmms_eval.tasks import main

main()
