"""Fake humming-kernels 0.1.19 for CPU tests (see ../README.md). Importing it has no side effects;
`humming._fake.STATE` records what it compiled and was called with."""

__version__ = "0.1.19+fake"
