"""How much memory a model takes, and how much the machine gives the worker.

A model's size is first read from its files (the sum of its `.safetensors` files, or its `.gguf`):
weights are most of what a server holds, and the files are there before anything loads. Once its
server runs, the server's resident memory is measured and replaces that guess: it adds the KV cache,
the runtime and the Python interpreter around them. The gap seen on one model (measured minus files)
is added to the file size of models not measured yet, so the first load of a second model is not
under-counted by a whole interpreter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Apple Silicon shares one memory between CPU and GPU, and macOS lets the GPU wire about three
# quarters of it by default (Metal's recommendedMaxWorkingSetSize; `iogpu.wired_limit_mb` raises
# it). Past that, Metal fails allocations and mlx_lm.server dies. The rest is the OS's, the worker's
# and the other apps'. The same fraction is a fair default elsewhere: the worker is rarely alone.
DEFAULT_BUDGET_FRACTION = 0.75

GIB = 1024**3


def physical_memory_bytes() -> int:
    """The machine's RAM (sysconf works on Linux and macOS)."""
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def default_budget_bytes() -> int:
    return int(physical_memory_bytes() * DEFAULT_BUDGET_FRACTION)


def file_size_bytes(path: str) -> int:
    """The bytes of a model's weights on disk: a `.gguf` file, or a folder's `*.safetensors` (and
    `*.gguf`) files; 0 for a path not on disk (a hub repo id not downloaded yet)."""
    target = Path(path).expanduser()
    if target.is_file():
        return target.stat().st_size
    if target.is_dir():
        return sum(f.stat().st_size for f in target.iterdir() if f.suffix in (".safetensors", ".gguf") and f.is_file())
    return 0


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory, None when it is gone. /proc on Linux; psutil elsewhere when it is
    installed (a Mac's Metal buffers show in its footprint, not always in RSS: the file size then
    stays the floor, see ModelSizes.measured)."""
    status = Path(f"/proc/{pid}/status")
    if sys.platform.startswith("linux"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


class ModelSizes:
    """The recorded size of each model: files first, measured once loaded, raised after a crash."""

    def __init__(self, files: dict[str, int]) -> None:
        self.files = dict(files)
        self._measured: dict[str, int] = {}
        self._raised: dict[str, int] = {}
        self._overhead = 0  # resident minus files, the largest seen on any model

    def size(self, model: str) -> int:
        if model in self._raised:
            return self._raised[model]
        if model in self._measured:
            return self._measured[model]
        return self.files.get(model, 0) + self._overhead

    def measured(self, model: str, resident: int) -> None:
        """A measurement of the model's loaded server; never below its files (see resident_bytes)."""
        size = max(resident, self.files.get(model, 0))
        self._measured[model] = max(size, self._measured.get(model, 0))
        self._overhead = max(self._overhead, size - self.files.get(model, 0))

    def raise_to(self, model: str, floor: int) -> None:
        """The server died under this model (out of memory, most likely): from now on it counts as at
        least `floor` (the whole budget: it loads alone), whatever is measured later."""
        self._raised[model] = max(floor, self.size(model))

    def raised(self, model: str) -> bool:
        return model in self._raised

    def known(self, model: str) -> bool:
        """Whether the size is more than the files: measured, raised, or the files plus an overhead
        measured on another model. Before any server ran, a model's size is its weights alone, which
        can be a small part of what its server holds (a tiny model's interpreter and runtime dwarf
        its weights), so what fits beside it is not known yet."""
        return model in self._measured or model in self._raised or self._overhead > 0
