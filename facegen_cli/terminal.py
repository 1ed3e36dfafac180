"""What every `facegen` command shares: the stderr console (the library's log lines and progress bars),
one-line errors and exit codes, the options every command spells the same way, the attribute flags, and
the report of a folder command's per-file results.

Results' paths go to stdout (one per line, for pipelines); everything else goes to stderr. The library
logs through `logging` (logger "facegen_cli"); this module shows those lines on the console.
"""

import functools
import inspect
import logging
import math
from typing import Annotated, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from .attributes import DEFAULT_ATTRIBUTES, flag_names
from .devices import DEVICE_HELP, PRECISION_HELP
from .errors import FacegenError

console = Console(stderr=True, soft_wrap=True)  # one log line stays one line in pipelines


def log(message):
    console.print(message, highlight=False, markup=False)


class ConsoleHandler(logging.Handler):
    """The library's log lines, as the command's own, on the stderr console."""

    def emit(self, record):
        log(record.getMessage())


_library_log = logging.getLogger("facegen_cli")
if not any(isinstance(h, ConsoleHandler) for h in _library_log.handlers):
    _library_log.addHandler(ConsoleHandler())
    _library_log.setLevel(logging.INFO)

# The options every command spells the same way.
MAX_SEED = 2**63 - 1  # torch generators take seeds below 2**64; seed + i stays there
MODEL_HELP = ("Model folder (a path), or a shipped model by name: faces (real faces; the default) or demo (built-in "
              "faces). A folder named like a shipped model is given as a path: ./faces.")
Model = Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)]
Device = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
Precision = Annotated[Optional[str], typer.Option("--precision", help=PRECISION_HELP)]
Seed = Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED,
                                             help="Seed of the noise: the same seed gives the same result.")]


class FieldsColumn(ProgressColumn):
    """Shows a task's extra fields (loss, speed, ...) with their formats; tasks without them show nothing."""

    def __init__(self, formats):
        super().__init__()
        self.formats = formats

    def render(self, task):
        return Text(" ".join(f"{name} {task.fields[name]:{fmt}}" for name, fmt in self.formats.items()
                             if name in task.fields))


def progress_bar(**formats):
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), FieldsColumn(formats),
                    TimeRemainingColumn(), console=console)


def describe_error(error):
    """One line for a FacegenError or an OSError ("out/face.png: Read-only file system")."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


def reports_errors(command):
    """Turn a FacegenError, or an operating-system error such as a read-only or full output folder, into
    one line on stderr and exit code 1, with no traceback. Anything else is a bug: its traceback is shown,
    and a line says so."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (FacegenError, OSError) as e:
            console.print(f"[bold red]error:[/] {escape(describe_error(e))}", highlight=False)
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, typer.TyperException):  # exits and usage errors pass through
            raise
        except Exception:
            console.print_exception(show_locals=False)
            console.print("[bold red]error:[/] this is a bug in facegen, not a problem with the input: please "
                          "report it with the traceback above", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def with_attribute_flags(command):
    """Add --male/--female, --beard/--no-beard ... (the default vocabulary) to a command.

    The command receives them as `wanted` and `unwanted` lists, joined with any --with/--without. Each
    side is a flag of its own, so that `--male --female` is refused instead of the last one winning.
    """
    params = [p for p in inspect.signature(command).parameters.values() if p.name not in ("wanted", "unwanted")]
    flags = [
        inspect.Parameter(f"{name}{side}", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, flag, show_default=False, rich_help_panel="Attributes"))
        for name in DEFAULT_ATTRIBUTES for side, flag in zip(("", "__against"), flag_names(name))
    ]
    extra = [
        inspect.Parameter("with_", inspect.Parameter.KEYWORD_ONLY, annotation=List[str],
                          default=typer.Option([], "--with", help="Ask for an attribute by name (any vocabulary).",
                                               rich_help_panel="Attributes")),
        inspect.Parameter("without", inspect.Parameter.KEYWORD_ONLY, annotation=List[str],
                          default=typer.Option([], "--without", help="Ask against an attribute by name.",
                                               rich_help_panel="Attributes")),
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        wanted = [n for n in DEFAULT_ATTRIBUTES if kwargs.pop(n)] + list(kwargs.pop("with_"))
        unwanted = [n for n in DEFAULT_ATTRIBUTES if kwargs.pop(f"{n}__against")] + list(kwargs.pop("without"))
        both = [" and ".join(flag_names(n)) for n in DEFAULT_ATTRIBUTES if n in wanted and n in unwanted]
        if both:
            raise typer.BadParameter(f"{'; '.join(both)} both given: ask for an attribute or against it")
        return command(wanted=wanted, unwanted=unwanted, **kwargs)

    wrapper.__signature__ = inspect.Signature(params + flags + extra)
    return wrapper


def load_pipeline(model, device, precision):
    """The model a command's --model, --device and --precision name."""
    from .devices import pick_device
    from .pipeline import FacegenPipeline

    return FacegenPipeline.load(model, pick_device(device), precision or "auto")


def finite(value):
    """Typer callback: refuse nan and inf (NaN passes every min/max check, and a NaN guidance paints black)."""
    values = value if isinstance(value, list) else [value]
    if any(v is not None and not math.isfinite(v) for v in values):
        raise typer.BadParameter(f"must be a finite number, not {value}")
    return value


def report_results(results, total, problems, describe):
    """Print each output's path as it comes and each problem on stderr, under one progress bar; then a
    count of each kind of result. `problems` are those found while collecting the inputs (unreadable).
    Returns the counts ({kind: number})."""
    from .files import Outcome

    counts = {kind: 0 for kind in Outcome}
    counts[Outcome.UNREADABLE] = len(problems)
    for problem in problems:
        log(problem)
    with progress_bar() as progress:
        task = progress.add_task(describe, total=total)
        for result in results:
            if result.output is not None:
                print(result.output, flush=True)
            else:
                log(f"{result.path}: {result.reason}" if result.kind != Outcome.SKIPPED else result.reason)
            counts[result.kind] += 1
            progress.advance(task)
    log(", ".join(f"{n} {kind}" for kind, n in counts.items() if n or kind == Outcome.DONE))
    return counts
