"""The first run of a new user: `snakemake --cores 2` on a fresh clone with the embedded default data.

Clones this project (a commit, or the working tree as it is) into a temporary folder, runs the
pipeline there with the clone's own code (PYTHONPATH=<clone>/src, this interpreter's venv for the
tools), and prints the pipeline's wall time and each job's, read from Snakemake's log. Run it
alone on the machine: every other process on the cores lengthens every number.

    python benchmarks/first_run.py                      # the working tree, committed or not
    python benchmarks/first_run.py --rev HEAD~1         # a commit, e.g. before a change
    python benchmarks/first_run.py --cores 2 --out benchmarks/results/first_run.json
    python benchmarks/first_run.py --keep -- --set-threads vqgan=1   # more snakemake arguments
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
STARTED = re.compile(r"^(?:local)?rule (\w+):$")
WILDCARDS = re.compile(r"^\s+wildcards: (.+)$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+)")


def clone(dest: Path, rev: str | None) -> None:
    """`rev`: a commit of this repository; None: the working tree's tracked and untracked,
    not ignored, files (what a commit of the working tree would hold)."""
    if rev:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
        subprocess.run(["git", "checkout", "--quiet", rev], cwd=dest, check=True)
        return
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, stdout=subprocess.PIPE).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_symlink() or src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)


def cpu_model() -> str:
    """The CPU's model name (Linux): the same 2-core run takes 1.8x longer on some machines than on
    others (README), so a wall time means little without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def job_times(log: str) -> list[dict]:
    """[{"job": "ablation[variant=full]", "rule": "ablation", "start": s, "end": s}] from a
    Snakemake log, seconds since the first job started, in the order the jobs started."""
    stamp, jobs, pending, by_id = None, [], None, {}
    for line in log.splitlines():
        if m := STAMP.match(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
        elif m := STARTED.match(line):
            pending = {"rule": m.group(1), "job": m.group(1), "start": stamp}
            jobs.append(pending)
        elif pending and (m := WILDCARDS.match(line)):
            pending["job"] = f"{pending['rule']}[{m.group(1)}]"
        elif pending and (m := JOBID.match(line)):
            by_id[m.group(1)] = pending
        elif (m := FINISHED.match(line)) and m.group(1) in by_id:
            by_id[m.group(1)]["end"] = stamp
    origin = min((j["start"] for j in jobs), default=0.0)
    return [{**j, "start": j["start"] - origin, "end": j["end"] - origin} for j in jobs if "end" in j]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="a commit to clone (default: the working tree as it is)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary project and print its path")
    parser.add_argument("--out", type=Path, help="also write the timings here as JSON")
    parser.add_argument("snakemake_args", nargs="*", help="more snakemake arguments, after --")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="latent-inpaint-first-run-"))
    project = work / "project"
    project.mkdir()
    clone(project, args.rev)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(project / "src")}  # the clone's code, not the editable install's
    for name in ("MLFLOW_TRACKING_URI", "LATENT_INPAINT_INVOCATION", "LATENT_INPAINT_TRACKING"):
        env.pop(name, None)
    t0 = time.perf_counter()
    proc = subprocess.run(["snakemake", "--cores", str(args.cores), *args.snakemake_args], cwd=project, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"snakemake failed after {wall:.0f} s (project kept at {project}):\n{proc.stdout[-5000:]}")
    log = max((project / ".snakemake" / "log").glob("*.snakemake.log")).read_text()
    jobs = job_times(log)

    print(f"{'job':42s} {'start s':>8s} {'wall s':>8s}")
    for j in jobs:
        print(f"{j['job']:42s} {j['start']:8.0f} {j['end'] - j['start']:8.0f}")
    per_rule: dict[str, float] = {}
    for j in jobs:
        per_rule[j["rule"]] = per_rule.get(j["rule"], 0.0) + j["end"] - j["start"]
    print("\nper rule (job wall times summed; jobs may overlap):")
    for rule, seconds in per_rule.items():
        print(f"  {rule:20s} {seconds:7.0f} s")
    cpu = cpu_model()
    print(f"\nsnakemake --cores {args.cores} on a fresh clone ({args.rev or 'working tree'}): "
          f"{wall:.0f} s = {wall / 60:.1f} min wall on {cpu} ({os.cpu_count()} CPUs)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rev": args.rev or "working tree", "cores": args.cores, "wall_s": wall,
                                        "cpu_count": os.cpu_count(), "cpu": cpu, "machine": platform.platform(),
                                        "jobs": jobs, "per_rule_s": per_rule}, indent=2) + "\n")
    if args.keep:
        print(f"project kept at {project}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
