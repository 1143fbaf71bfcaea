"""genq: an LLM generation job runner. The `genq` command lives here, above callers and workers."""

__version__ = "0.1.0"
