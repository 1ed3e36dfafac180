"""Where `facegen generate`'s wall time goes, beside the time of importing torch, in one run.

    python benchmarks/startup.py                 # the shipped faces model, --male --beard -n 16
    python benchmarks/startup.py --repeats 5 --imports 15

Prints Markdown: the median wall time of `python -c pass`, `python -c "import torch"`, `facegen --help` and
`facegen generate --male --beard -n 16` (fresh processes, taking turns, so that a busy machine slows them
alike), the generate's ratio to importing torch (issue 28's bar: at most 2.5), then the phases of one
generate timed inside a process (imports, model load, sampling, writing), and the modules whose imports
cost the most (`python -X importtime`, cumulative), which says what a command loads without using it.
No tcmalloc is preloaded unless the caller does it: the times are a user's default.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PHASES = r"""
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from facegen_cli.attributes import AttributeRequest
from facegen_cli.gallery import FaceWriter, make_faces
from facegen_cli.pipeline import FacegenPipeline
t2 = time.perf_counter()
pipe = FacegenPipeline.load("faces", "cpu", "auto")
t3 = time.perf_counter()
request = AttributeRequest(pipe.attributes, ["male", "beard"], [])
settings = pipe.settings()
writer = FaceWriter(pipe, request, settings, sys.argv[1], model_name="faces")
made = []  # when each batch was sampled (before it is written)
t4 = time.perf_counter()
for paths in make_faces(pipe, request, list(range(16)), settings, writer,
                        on_batch=lambda k: made.append(time.perf_counter())):
    pass
t5 = time.perf_counter()
writer.finish()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {made[-1] - t4:.3f} {t5 - made[-1]:.3f}")
"""


def wall(command, env=None):
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def import_costs(command, top):
    """The `top` costliest imports (cumulative ms, nesting depth, module) of `python COMMAND`, at the first
    two depths of nesting: what the command itself imports, and what those import."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True,
                            check=True)
    rows = []
    for line in result.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name = fields[2].rstrip()
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        if depth <= 1:
            rows.append((int(fields[1]) / 1000, depth, name.strip()))
    return sorted(rows, reverse=True)[:top]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--imports", type=int, default=12, help="modules listed by import cost")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "facegen --help": [sys.executable, "-m", "facegen_cli.cli", "--help"],
            "facegen generate --male --beard -n 16": None,
        }
        times = {name: [] for name in commands}
        for round_ in range(args.repeats):
            for name, command in commands.items():
                if command is None:
                    command = [sys.executable, "-m", "facegen_cli.cli", "generate", "--male", "--beard", "-n", "16",
                               "--seed", "0", "--out", os.path.join(tmp, f"faces-{round_}")]
                times[name].append(wall(command))
        medians = {name: statistics.median(values) for name, values in times.items()}
        torch_time = medians['python -c "import torch"']
        print(f"## Wall time, median of {args.repeats} (fresh processes, taking turns)\n")
        print("| command | seconds | / import torch |")
        print("| --- | --- | --- |")
        for name, value in medians.items():
            print(f"| `{name}` | {value:.2f} | {value / torch_time:.2f} |")

        phases = subprocess.run([sys.executable, "-c", PHASES, os.path.join(tmp, "phases")], capture_output=True,
                                text=True, check=True).stdout.split()
        print("\n## One generate's phases, in one process (s)\n")
        print("| import torch | import facegen's pipeline | load the model | sample 16 faces | write the last batch |")
        print("| --- | --- | --- | --- | --- |")
        print("| " + " | ".join(phases) + " |")

        print(f"\n## The {args.imports} costliest imports of `facegen generate` (cumulative ms)\n")
        print("| module | depth | ms |")
        print("| --- | --- | --- |")
        command = ["-m", "facegen_cli.cli", "generate", "--male", "--beard", "-n", "1", "--seed", "0", "--out",
                   os.path.join(tmp, "imports")]
        for ms, depth, name in import_costs(command, args.imports):
            print(f"| {name} | {depth} | {ms:.0f} |")


if __name__ == "__main__":
    main()
