"""runner: a declarative pipeline runner for LLM post-training and batch work on Ray."""

from __future__ import annotations

__version__ = "0.1.0"
