"""A preload module that writes to stdout when imported (``--preload preload_prints_for_tests``)."""

print("preload-module-says-hello")
