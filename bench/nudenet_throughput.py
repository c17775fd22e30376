"""NudeNet scoring throughput on this CPU: images per second at 512x512 and 64x64.

The protocol's detector (NudeNet 3.4, bundled 320n ONNX model) scores real photographs
shipped with scikit-image, resized to each size, through the same call `eval.nudity` makes
(`detect` on a BGR array, then `count_exposed`). Each setting runs with onnxruntime on one
thread and with its default thread count. NudeNet resizes every image to 320x320 inside,
so the size mostly changes the cost of that resize. The machine may be shared: the load
average is recorded with the numbers.

    python bench/nudenet_throughput.py --out bench/results/nudenet_throughput.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from erase.atomic import write_json
from erase.command import versions
from eval.nudity import count_exposed, protocol, to_bgr

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 64], help="square image sides in pixels")
    parser.add_argument("--images", type=int, default=48, help="images scored per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--out", default="bench/results/nudenet_throughput.json")
    return parser.parse_args(argv)


def photos(size: int, n: int) -> list[np.ndarray]:
    """n BGR arrays cycling through scikit-image's photographs, resized to size x size."""
    from skimage import data

    base = [Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.LANCZOS)
            for name in PHOTOS]
    return [to_bgr(base[i % len(base)]) for i in range(n)]


def detector(threads: int | None):
    """NudeNet's detector; with `threads`, its ONNX session rebuilt on that many threads."""
    import onnxruntime
    from nudenet import NudeDetector

    det = NudeDetector()
    if threads is not None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        det.onnx_session = onnxruntime.InferenceSession(det.onnx_session._model_path, options,
                                                        providers=["CPUExecutionProvider"])
    return det


def time_scoring(det, images: list[np.ndarray], repeats: int) -> dict:
    for im in images[:4]:  # warm-up
        det.detect(im)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for im in images:
            count_exposed(det.detect(im))
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"images_per_second": round(len(images) / median, 2), "ms_per_image": round(1000 * median / len(images), 1),
            "seconds_per_repeat": [round(s, 3) for s in seconds]}


def markdown(result: dict) -> str:
    lines = ["# NudeNet scoring throughput (CPU)", "",
             f"NudeNet {result['protocol']['nudenet_version']}, model `{result['protocol']['model_file']}`, "
             f"{result['settings']['images']} photographs per repeat, median of {result['settings']['repeats']} "
             f"repeats; {result['machine']['cpu_count']} cores, load average at start "
             f"{result['machine']['load_average_start']} (a shared machine).", "",
             "| image size | onnxruntime threads | images/s | ms/image |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['size']}x{row['size']} | {row['threads']} | {row['images_per_second']:.1f} "
                     f"| {row['ms_per_image']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for threads in (1, None):
        det = detector(threads)
        for size in args.sizes:
            timing = time_scoring(det, photos(size, args.images), args.repeats)
            rows.append({"size": size, "threads": threads or "default"} | timing)
            print(f"{size}x{size}, threads {threads or 'default'}: {timing['images_per_second']:.1f} images/s")
    result = {
        "rows": rows, "protocol": protocol(detector(None)),
        "settings": {"images": args.images, "repeats": args.repeats, "sizes": args.sizes, "photos": list(PHOTOS)},
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(),
    }
    out = Path(args.out)
    write_json(result, out)
    out.with_suffix(".md").write_text(markdown(result))
    print(f"-> {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
