"""Helpers shared by the tests (tiny models, data, run comparisons); imported as ``helpers.<name>``."""
