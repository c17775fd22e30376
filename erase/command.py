"""What every command shares: options from a dataclass, one-line errors, quiet libraries, the
versions written into every output, the default device, and checks of input made before any
model is loaded or image generated."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

__all__ = [
    "BadInput",
    "add_dataclass_arguments",
    "check_launch",
    "check_model",
    "check_positive",
    "check_prompts",
    "check_writable",
    "default_device",
    "one_line_errors",
    "options_from",
    "quiet_libraries",
    "run_command",
    "versions",
]

_TYPES = {"int": int, "float": float, "str": str}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, aliases: Mapping[str, Iterable[str]] = {},
                            skip: Iterable[str] = (), suppress: bool = False) -> None:
    """One `--dashed-name` option per field of the dataclass `cls` (its underscore spelling is an
    alias, as in diffusers' scripts), with the field's `help` and `choices` metadata. A field with no
    default is required (`positional` metadata: an argument without a dash); `bool` fields are flags,
    `list[str]` fields repeat (`--x a --x b`), `T | None` fields take a T; fields with `cli: False`
    metadata are left out. With `suppress`, options not given are absent from the result (so a
    caller can layer defaults), and a `bool` also has its `--no-` form."""
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        kwargs: dict[str, Any] = {"help": f.metadata.get("help")}
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kind = str(f.type)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=_TYPES.get(kind, str), **kwargs)
            continue
        names = list(dict.fromkeys([*aliases.get(f.name, ()), "--" + f.name.replace("_", "-"), "--" + f.name]))
        kwargs["dest"] = f.name
        if required:
            kwargs["required"] = True
        elif not suppress:
            kwargs["default"] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        else:
            kwargs["default"] = argparse.SUPPRESS
        if kind == "bool":  # layered defaults (suppress) can be turned off again: --no-NAME
            parser.add_argument(*names, action=argparse.BooleanOptionalAction if suppress else "store_true", **kwargs)
        elif kind == "list[str]":
            parser.add_argument(*names, action="append", **kwargs)
        else:
            parser.add_argument(*names, type=_TYPES.get(kind.removesuffix(" | None"), str), **kwargs)


def options_from(cls: type[T], namespace: argparse.Namespace | Mapping[str, Any]) -> T:
    """An instance of the dataclass `cls` from the parsed options that name its fields (its checks run)."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values})


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Bad command-line input ends with one `error:` line on stderr and exit status 2."""

    def error(message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    return parser


class BadInput(ValueError):
    """Bad input that only shows once work has begun (a mask that does not fit the loaded model, a
    launch that lost its processes): the command exits 2, as for any other bad input."""


T = TypeVar("T")
CHECK_ERRORS = (ValueError, OSError)  # raised while checking the input: bad input, exit 2
RUN_ERRORS = (ValueError, OSError, ImportError, RuntimeError)  # raised while running: exit 1 (BadInput: 2)


def run_command(check: Callable[[], T], run: Callable[[T], int | None]) -> int:
    """The one error path of every command. `check()` parses and checks the input before any model is
    loaded or image generated; `run(checked)` does the work. An error ends the command with one
    `error:` line on stderr: exit 2 for bad input (anything `check` raises, and `BadInput`), 1 for
    a failure at run time. Usage errors exit 2 through `one_line_errors`."""
    try:
        checked = check()
    except CHECK_ERRORS as err:
        return _one_line(err, 2)
    try:
        return run(checked) or 0
    except BadInput as err:
        return _one_line(err, 2)
    except RUN_ERRORS as err:
        return _one_line(err, 1)


def _one_line(err: BaseException, status: int) -> int:
    print(f"error: {err}".splitlines()[0], file=sys.stderr)
    return status


def check_launch(num_processes: int) -> None:
    """A command launched as N processes that runs as fewer refuses (without a GPU, `accelerate launch
    --multi_gpu` starts processes that each believe they are process 0 of 1, and all would write)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > num_processes:
        hint = " (no GPU here: set ACCELERATE_USE_CPU=1)" if not _cuda_available() else ""
        raise BadInput(f"launched as {launched} processes but running as {num_processes}{hint}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet_libraries(progress_bars: bool = True) -> None:
    """Keep a command's stderr to its own progress bars and one-line errors: no library notes
    (and, with `progress_bars=False`, no library loading bars either)."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        if not progress_bars:
            library.utils.logging.disable_progress_bar()


_VERSIONED = ("erase", "torch", "diffusers", "transformers", "accelerate", "safetensors", "torchmetrics", "nudenet",
              "onnxruntime", "scikit-learn", "numpy", "torch-fidelity")


def versions() -> dict[str, str]:
    """Versions of everything installed that can change a number this toolkit writes."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def default_device() -> str:
    """`cuda` where there is one, else `cpu` (the default of `--device` in the app and eval)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- input checks


def check_positive(**values: float | int | None) -> None:
    """Each value, where given, must be > 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name.replace('_', '-')} must be positive, got {value}")


def check_prompts(name: str, prompts: Iterable[str]) -> None:
    """Every prompt must hold some text."""
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{name.replace('_', '-')} must not be empty")


def check_writable(path: str | os.PathLike, what: str = "output", folder: bool = False) -> None:
    """`path` can be written: a file can be created in the nearest existing folder on its way (tried,
    not guessed: permission bits say yes for root on read-only and virtual file systems), and nothing
    stands in its place that cannot be replaced (with `folder`, a file where the folder would go)."""
    import tempfile

    path = Path(path).absolute()
    if path.exists() and not path.is_dir() and (folder or not os.access(path, os.W_OK)):
        raise ValueError(f"{what} {path} is a file" if folder else f"{what} {path} is not writable")
    if path.is_dir() and not folder:
        raise ValueError(f"{what} {path} is a folder")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write the {what} {path}: {parent} is not a writable folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-check-"):
            pass
    except OSError:
        raise ValueError(f"cannot write the {what} {path}: {parent} is not a writable folder") from None


def check_model(name_or_path: str, what: str = "model") -> None:
    """`digits`, a hub id, or a local diffusers pipeline folder (with model_index.json). A hub id
    is checked when it is loaded; a local path here."""
    from erase.defaults import DIGITS_FLOW_NAME, DIGITS_MODEL_NAME

    if name_or_path in (DIGITS_MODEL_NAME, DIGITS_FLOW_NAME):
        return
    path = Path(name_or_path)
    if not (path.is_absolute() or name_or_path.startswith(".") or path.exists()):
        return
    if not path.is_dir():
        raise ValueError(f"{what} folder not found: {name_or_path}")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{name_or_path} is not a diffusers pipeline folder (no model_index.json)")
