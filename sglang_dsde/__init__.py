"""sglang-dsde: dynamic speculative decoding with KL-divergence stability for SGLang.

Installing the package adds the ``sglang.srt.plugins`` entry point ``dsde``
(``sglang_dsde.plugin:register``), which makes ``--speculative-algorithm DSDE`` resolve
in stock SGLang 0.5.23. Importing this package imports nothing from SGLang.
"""

__version__ = "0.1.0"

ALGORITHM_NAME = "DSDE"
