"""Console helpers every command line shares (``dfgen`` and ``dftrain``): quiet Hugging Face
logging, and one rich progress bar on stderr."""
from __future__ import annotations


def quiet_hf() -> None:
    """Offline hub, no transformers warnings or progress bars (commands print their own lines)."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def progress_bar(total: int | None, desc: str):
    """(a rich ``Progress`` on stderr, its task id); the task has a ``rate`` field for the caller."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), console=Console(stderr=True))
    return prog, prog.add_task(desc, total=total, rate="")
