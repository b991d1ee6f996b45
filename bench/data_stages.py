"""Benchmark of the three data stages on the real corpus and a ten-times copy.

Runs parser_dataset.py, cleaner_text.py and create_dataset.py, each in its own
process, on ../shared/data/anekdot_dialogues.parquet and on a copy ten times
larger, and prints dialogues per second and peak memory (max RSS of the
process) for each. Streaming stages should scale about linearly in time and
stay nearly flat in memory; create_dataset.py also keeps about 100 bytes a
dialogue to put repeated dialogues into one split, so its memory grows a
little with the data (the check below still asks for under 2x at 10x).

    python bench/data_stages.py                 # 1x and 10x
    python bench/data_stages.py --scale 3

The larger copy repeats every dialogue with a numbered marker appended to its
first turn, so that the cleaner's duplicate filter does not shrink it back; the
copies are near-duplicates of each other, so create_dataset.py groups each
dialogue with its nine copies, the heaviest case for its grouping.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "anekdot_dialogues.parquet"


def make_scaled_copy(source, target, scale):
    table = pq.read_table(source, columns=["sample"])
    with pq.ParquetWriter(target, pa.schema([("sample", pa.list_(pa.string()))])) as writer:
        for k in range(scale):
            if k == 0:
                writer.write_table(table)
                continue
            rows = table.column("sample").to_pylist()
            marked = [[f"{turns[0]} ({k})"] + turns[1:] for turns in rows]
            writer.write_table(pa.table({"sample": marked}))


# ru_maxrss survives exec and so would report the benchmark's own peak; the
# kernel's VmHWM is per address space, so the stage reads its own at exit.
PEAK_WRAPPER = """
import runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("PEAK_KB", line.split()[1], file=sys.stderr)
"""


def run_stage(argv):
    """Run one stage; return (seconds, peak RSS in MiB) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"stage failed: {' '.join(argv)}\n{proc.stderr}")
    peak_kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")]
    return seconds, peak_kb[-1] / 1024


def bench_one(source, folder, dialogues):
    raw, clean = folder / "raw.parquet", folder / "clean.parquet"
    stages = [
        ("parser_dataset", ["parser_dataset.py", "--input", str(source), "--output", str(raw)]),
        ("cleaner_text", ["cleaner_text.py", "--input", str(raw), "--output", str(clean)]),
        ("create_dataset", ["create_dataset.py", "--input", str(clean), "--output", str(folder)]),
    ]
    return {name: run_stage(argv) for name, argv in stages}


def main(argv=None):
    parser = argparse.ArgumentParser(description="data stages: time and memory at 1x and Nx")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--input", default=str(CORPUS))
    args = parser.parse_args(argv)
    source = Path(args.input)
    if not source.is_file():
        print(f"skipped: {source} is absent (the benchmark needs ../shared/data)")
        return 0
    dialogues = pq.ParquetFile(source).metadata.num_rows
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / f"x{args.scale}.parquet"
        make_scaled_copy(source, big, args.scale)
        (tmp / "1x").mkdir()
        (tmp / "nx").mkdir()
        small_result = bench_one(source, tmp / "1x", dialogues)
        big_result = bench_one(big, tmp / "nx", dialogues * args.scale)
    print(f"{'stage':16s} {'size':>5s} {'dialogues':>10s} {'seconds':>8s} {'dial/s':>9s} {'peak MiB':>9s}")
    for name in small_result:
        for label, n, (sec, mib) in (("1x", dialogues, small_result[name]),
                                     (f"{args.scale}x", dialogues * args.scale, big_result[name])):
            print(f"{name:16s} {label:>5s} {n:>10d} {sec:>8.2f} {n / sec:>9.0f} {mib:>9.0f}")
        time_ratio = big_result[name][0] / small_result[name][0]
        mem_ratio = big_result[name][1] / small_result[name][1]
        print(f"{'':16s} time x{time_ratio:.1f} for {args.scale}x the data, peak memory x{mem_ratio:.2f}"
              f" ({'ok' if mem_ratio < 2 else 'OVER 2x'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
