#!/usr/bin/env python
"""Photo-like 500x375 JPEGs (``common.make_jpeg_folder``) for the benchmarks to share: ``--parts``
folders of ``--per-part`` files, written in parallel, one process per core; ``--half`` also
links the first half of the folders into a second one, for runs that read fewer.

    python benchmarks/make_jpegs.py /tmp/jpegs --parts 16 --per-part 256 --half /tmp/jpegs_half
"""

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import common


def parse_args(argv):
    p = common.parser(__doc__, "make_jpegs.json")
    p.add_argument("out", help="the folder to write (one subfolder per part)")
    p.add_argument("--parts", type=int, default=16)
    p.add_argument("--per-part", type=int, default=256)
    p.add_argument("--half", help="a folder of links to the first half of the parts")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    folders = [os.path.join(os.path.abspath(args.out), f"part{k:02d}") for k in range(args.parts)]
    start = time.perf_counter()
    with ProcessPoolExecutor(min(args.parts, os.cpu_count() or 1)) as pool:
        sizes = [args.per_part] * args.parts
        list(pool.map(common.make_jpeg_folder, folders, sizes, range(args.parts)))
    result = {"jpegs": args.parts * args.per_part, "seconds": time.perf_counter() - start}
    if args.half:
        os.makedirs(args.half, exist_ok=True)
        for folder in folders[: args.parts // 2]:
            os.symlink(folder, os.path.join(args.half, os.path.basename(folder)))
        result["half_jpegs"] = args.parts // 2 * args.per_part
    row = [result["jpegs"], result["seconds"], result.get("half_jpegs")]
    common.print_table(["JPEGs", "seconds", "linked in --half"], [row])
    summary = f"{result['jpegs']} JPEGs in {common.fmt(result['seconds'])} s"
    common.write_json(args.json, {**result, "config": common.config(args), "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
