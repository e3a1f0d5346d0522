"""Repository-root conftest: its folder goes on ``sys.path`` (pytest's default import mode),
so tests import the helpers under ``tools/`` and ``bench/`` that are not installed."""
