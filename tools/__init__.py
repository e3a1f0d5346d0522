"""Tools that are not the plugin: the demo, loopback SGLang servers for tests and benches,
tiny offline test models, and diagnostics. Not installed with the package; run them from
the repository root (``python -m tools.demo``, ``make demo``)."""
