"""`erase`: one console command, a subcommand per entry point (as `accelerate` and `huggingface-cli` do).

    erase train --model digits --concept seven --output-dir seven-erased
    erase eval compare digits seven-erased --out report/
    erase attack --model seven-erased --original digits --attack inversion --out inversion.json

Every `python -m ...` form and `accelerate launch erase/train.py` keep working; each subcommand runs the
same `main`. It lives in eval/ because eval may import erase and never the other way round.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, what it does); each module has main(argv) -> int
COMMANDS = {
    "train": ("erase.train", "erase concepts from a diffusion model (several processes: accelerate launch -m erase.train)"),
    "export": ("erase.export.__main__", "export an erasure as a LoRA, a single file or a delta"),
    "eval": ("eval.__main__", "evaluate: classes, nudity, fid, compare, attack"),
    "attack": ("eval.__main__", "attack an erasure (erase eval attack)"),
    "digits": ("erase.digits.__main__", "rebuild the embedded digits model or its classifier"),
    "worst-case": ("erase.worst_case.cli", "find the forget set hardest to unlearn"),
    "classifier": ("erase.classifier.__main__", "unlearn data from an image classifier"),
    "app": ("app", "the before/after demo app (from a checkout: app.py is not in the wheel)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: erase COMMAND [options]   (erase COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"error: `erase {name}` runs from a checkout of this project (python app.py); the wheel does not ship it",
              file=sys.stderr)
        return 1
    sys.argv = [f"erase {name}", *rest]
    return module.main(["attack", *rest] if name == "attack" else rest) or 0


if __name__ == "__main__":
    sys.exit(main())
