"""`python -m erase.classifier`: check the input, unlearn, write the report."""

from __future__ import annotations

import argparse
import logging
import sys

from erase.atomic import write_json
from erase.classifier.methods import UnlearnConfig, run
from erase.command import add_dataclass_arguments, check_writable, one_line_errors, run_command

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = one_line_errors(argparse.ArgumentParser(prog="python -m erase.classifier", description=__doc__.split("\n\n")[0]))
    add_dataclass_arguments(parser, UnlearnConfig)
    parser.add_argument("--out", required=True, help="JSON report path")
    logging.basicConfig(level=logging.WARNING)

    def check() -> tuple[UnlearnConfig, str]:
        args = vars(parser.parse_args(argv))
        out = args.pop("out")
        check_writable(out, "report")
        return UnlearnConfig(**args), out

    return run_command(check, lambda checked: unlearn_and_write(*checked))


def unlearn_and_write(cfg: UnlearnConfig, out: str) -> None:
    report = run(cfg)
    write_json(report, out)
    m = report["metrics"]
    noisy = f", {report['forget_mislabeled']} of {report['forget_size']} forget labels flipped" if cfg.label_noise else ""
    print(f"{cfg.method}: UA {m['UA']:.2f}  RA {m['RA']:.2f}  TA {m['TA']:.2f}  MIA {m['MIA']:.2f}  "
          f"({report['seconds']:.1f} s{noisy}) -> {out}")


if __name__ == "__main__":
    sys.exit(main())
