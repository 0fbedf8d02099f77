"""A command module whose import fails (``--module broken_module_for_tests``)."""

raise RuntimeError("intentional import failure")
