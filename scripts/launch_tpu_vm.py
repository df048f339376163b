"""Runs cptjax on a Cloud TPU VM slice: create it, put this clone on every host, start the same
training command on all of them, delete it. `--dry-run` prints the gcloud commands instead.

    python scripts/launch_tpu_vm.py create --name cpt --zone us-east5-a --accelerator v5p-32 [--spot]
    python scripts/launch_tpu_vm.py setup  --name cpt --zone us-east5-a [--git URL --commit SHA]
    python scripts/launch_tpu_vm.py run    --name cpt --zone us-east5-a --config configs/X.yaml [--set k=v ...]
    python scripts/launch_tpu_vm.py logs   --name cpt --zone us-east5-a [--worker 0]
    python scripts/launch_tpu_vm.py delete --name cpt --zone us-east5-a

- setup: without --git, the files git tracks in this clone (`git archive HEAD`, so commit first) are
  copied to every host; with --git, every host clones URL at --commit. Then `pip install -e
  ".[tpu,gcs]"` in ~/cptjax on every host.
- run: `cptjax train` starts on every host at once (`--worker=all`), detached, its output in
  ~/cptjax-train.log on each host. Nothing else is needed: on a TPU VM, JAX finds the other hosts
  itself and cptjax starts jax.distributed (distributed.mode: auto). The config's run_dir should be
  on gs:// so that every host, and a re-created slice, sees the same checkpoints.
- Preemption (--spot slices): every host gets SIGTERM, all save the same step and exit. Re-create
  the slice and repeat setup and run: the run resumes from its last checkpoint in run_dir.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REMOTE_DIR = "~/cptjax"
LOG = "~/cptjax-train.log"
# TPU VM software versions (gcloud's --version) per TPU generation.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
CHIPS_PER_HOST = 4  # every generation above, in a slice of more than one host
# The number in a slice's name counts TensorCores for v4 and v5p (two per chip), chips for v5e and v6e.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}


class Refused(Exception):
    """Bad input: one line for the user, exit 2."""


def hosts(accelerator: str) -> int:
    """Hosts of a slice: v5p-32 -> 16 chips -> 4 hosts."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator)
    if not match:
        raise Refused(f"--accelerator {accelerator}: expected a TPU type such as v5p-32, v5e-16, v6e-64 "
                      f"or v4-32 (generations: {', '.join(RUNTIMES)})")
    generation, chips = match.group(1), int(match.group(2)) // CORES_PER_CHIP[match.group(1)]
    if generation in ("v5e", "v5litepod", "v6e") and chips <= 8:
        return 1  # up to 8 chips on one host
    return max(1, chips // CHIPS_PER_HOST)


def _tpu(args, verb: str, *rest: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}",
            *([f"--project={args.project}"] if args.project else []), *rest]


def _on_all_hosts(args, command: str, worker: str = "all") -> list[str]:
    return _tpu(args, "ssh", f"--worker={worker}", f"--command={command}")


def create(args) -> list[list[str]]:
    count = hosts(args.accelerator)
    print(f"# {args.accelerator}: {count} host{'s' * (count > 1)}; `run` starts cptjax on each", flush=True)
    version = args.version or RUNTIMES[args.accelerator.split("-")[0]]
    return [_tpu(args, "create", f"--accelerator-type={args.accelerator}", f"--version={version}",
                 *(["--spot"] if args.spot else []))]


def setup(args) -> list[list[str]]:
    install = f'cd {REMOTE_DIR} && python3 -m pip install -q -e ".[tpu,gcs]"'
    if args.git:
        fetch = (f"rm -rf {REMOTE_DIR} && git clone -q {shlex.quote(args.git)} {REMOTE_DIR} && "
                 f"git -C {REMOTE_DIR} checkout -q {shlex.quote(args.commit)}")
        return [_on_all_hosts(args, f"{fetch} && {install}")]
    archive = "/tmp/cptjax-src.tar.gz"
    return [["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
            ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{args.name}:cptjax-src.tar.gz",
             f"--zone={args.zone}", *([f"--project={args.project}"] if args.project else []), "--worker=all"],
            _on_all_hosts(args, f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
                                f"tar -xzf ~/cptjax-src.tar.gz -C {REMOTE_DIR} && {install}")]


def run(args) -> list[list[str]]:
    config = Path(args.config).expanduser().absolute()
    if not config.is_file():
        raise Refused(f"--config {args.config}: no such file (give a config of this clone, e.g. "
                      "configs/llama-3.1-8b-tpu-wsd.yaml; setup copies the clone to the hosts)")
    if not config.resolve().is_relative_to(ROOT):
        raise Refused(f"--config {args.config}: not inside this clone ({ROOT}), so setup does not copy it "
                      "to the hosts; put it under configs/ and commit it")
    train = ["cptjax", "train", "--config", config.resolve().relative_to(ROOT).as_posix()]
    for override in args.set or []:
        train += ["--set", override]
    # Detached, so that the ssh sessions may end; each host's output in its own LOG.
    command = f"cd {REMOTE_DIR} && nohup {shlex.join(train)} > {LOG} 2>&1 < /dev/null &"
    return [_on_all_hosts(args, command)]


def logs(args) -> list[list[str]]:
    return [_on_all_hosts(args, f"tail -n 50 {LOG}", worker=args.worker)]


def delete(args) -> list[list[str]]:
    return [_tpu(args, "delete", "--quiet")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("create", create), ("setup", setup), ("run", run), ("logs", logs), ("delete", delete)):
        sub = commands.add_parser(name)
        sub.set_defaults(func=func)
        sub.add_argument("--name", required=True, help="the TPU VM slice's name")
        sub.add_argument("--zone", required=True)
        sub.add_argument("--project", help="default: gcloud's configured project")
        sub.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        if name == "create":
            sub.add_argument("--accelerator", required=True, help="e.g. v5p-32 (4 hosts), v6e-64, v5e-16")
            sub.add_argument("--version", help="TPU VM software version (default: per generation)")
            sub.add_argument("--spot", action="store_true", help="a preemptible (Spot) slice")
        if name == "setup":
            sub.add_argument("--git", help="clone this URL on every host instead of copying this clone")
            sub.add_argument("--commit", default="HEAD", help="with --git: the commit to check out")
        if name == "run":
            sub.add_argument("--config", required=True, help="a train config, as a path in this clone")
            sub.add_argument("--set", action="append", metavar="KEY=VALUE", help="config overrides")
        if name == "logs":
            sub.add_argument("--worker", default="0", help="a host's index, or all")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = args.func(args)
    except Refused as err:
        print(f"launch_tpu_vm: error: {err}", file=sys.stderr)
        return 2
    for command in commands:
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            done = subprocess.run(command, check=False)
            if done.returncode != 0:
                print(f"launch_tpu_vm: this command failed (exit {done.returncode}); nothing after it ran",
                      file=sys.stderr)
                return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
