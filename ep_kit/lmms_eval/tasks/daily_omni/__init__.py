"""The Daily-Omni task (``_default_template_yaml`` + :mod:`.utils`)."""
