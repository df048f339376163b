"""The launchers in scripts/: the TPU VM launcher's dry runs for a 4-host slice, and the SLURM batch
script run under a stand-in `srun` (one process per task, with srun's per-task variables) for a
2-node job, its processes read by JAX's own SLURM detection; the GPU XLA flags parse."""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "scripts" / "launch_tpu_vm.py"
SBATCH = ROOT / "scripts" / "slurm_train.sbatch"
CONFIG = "configs/llama-3.1-8b-tpu-wsd.yaml"


def tpu(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TPU), *args, "--dry-run"], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_tpu_dry_run_for_a_four_host_v5p_slice(tmp_path):
    where = ["--name", "cpt", "--zone", "us-east5-a"]
    created = tpu("create", *where, "--accelerator", "v5p-32", "--spot")
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines() == [
        "# v5p-32: 4 hosts; `run` starts cptjax on each",
        "gcloud compute tpus tpu-vm create cpt --zone=us-east5-a --accelerator-type=v5p-32 "
        "--version=v2-alpha-tpuv5 --spot"]

    setup = tpu("setup", *where).stdout.splitlines()
    assert [shlex.split(line)[:6] for line in setup] == [
        ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "--output=/tmp/cptjax-src.tar.gz"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/cptjax-src.tar.gz"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cpt"]]
    assert "--worker=all" in shlex.split(setup[1]) and "--worker=all" in shlex.split(setup[2])
    remote = shlex.split(setup[2])[-1].removeprefix("--command=")
    assert remote.endswith('cd ~/cptjax && python3 -m pip install -q -e ".[tpu,gcs]"')

    # run: from another folder, with a config path relative to it and an override with spaces
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tpu("run", *where, "--config", str(Path(os.path.relpath(ROOT / CONFIG, elsewhere))),
              "--set", "run_dir=gs://bucket/my run", cwd=elsewhere)
    assert run.returncode == 0, run.stderr
    (line,) = run.stdout.splitlines()
    argv = shlex.split(line)
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cpt", "--zone=us-east5-a", "--worker=all",
                        argv[8]]
    remote = argv[8].removeprefix("--command=")
    assert remote.startswith("cd ~/cptjax && nohup ") and remote.endswith(" > ~/cptjax-train.log 2>&1 < /dev/null &")
    train = shlex.split(remote.removeprefix("cd ~/cptjax && nohup ").split(" > ")[0])
    assert train == ["cptjax", "train", "--config", CONFIG, "--set", "run_dir=gs://bucket/my run"]

    assert tpu("delete", *where).stdout.strip() == "gcloud compute tpus tpu-vm delete cpt --zone=us-east5-a --quiet"


@pytest.mark.parametrize("args,expected", [
    (["create", "--accelerator", "h100-8"], "--accelerator h100-8: expected a TPU type such as v5p-32"),
    (["run", "--config", "configs/nope.yaml"], "--config configs/nope.yaml: no such file"),
    (["run", "--config", "/etc/hostname"], "--config /etc/hostname: not inside this clone"),
])
def test_tpu_launcher_refuses_bad_input_in_one_line(args, expected):
    refused = tpu(args[0], "--name", "cpt", "--zone", "z", *args[1:])
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and expected in refused.stderr, refused.stderr


FAKE_SRUN = r"""#!/bin/bash
# srun's stand-in: one process per task of the allocation, with srun's per-task variables.
if [ -n "${FAKE_WAIT_FOR_TERM:-}" ]; then
  trap 'echo TERM > "$FAKE/srun_got"; exit 0' TERM
  # SIGTERM to the batch script while it is still starting srun (its pid not yet recorded).
  if [ -n "${FAKE_TERM_PARENT:-}" ]; then kill -TERM "$PPID"; fi
fi
while [[ $1 == --* ]]; do echo "$1" >> "$FAKE/srun_options"; shift; done
if [ -n "${FAKE_WAIT_FOR_TERM:-}" ]; then
  echo started > "$FAKE/srun_started"
  for ((i = 0; i < 100; i++)); do sleep 0.1; done
  echo "never got SIGTERM" > "$FAKE/srun_got"; exit 1
fi
per_node=$((SLURM_NTASKS / SLURM_NNODES))
for ((p = 0; p < SLURM_NTASKS; p++)); do
  SLURM_PROCID=$p SLURM_LOCALID=$((p % per_node)) SLURM_NODEID=$((p / per_node)) \
  SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_NODES=$SLURM_NNODES "$@" > "$FAKE/task$p" &
done
wait
"""
# cptjax's stand-in: what each process was started with.
FAKE_CPTJAX = r"""#!/usr/bin/env python3
import json, os, sys
keep = ("SLURM_", "XLA_", "NCCL_DEBUG")
print(json.dumps({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith(keep)}}))
"""


@pytest.fixture
def slurm(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("cptjax", FAKE_CPTJAX),
                       ("scontrol", '#!/bin/bash\necho "$@" >> "$FAKE/scontrol_calls"\n')):
        (fake / name).write_text(text)
        (fake / name).chmod((fake / name).stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS"))}
    env.update(PATH=f"{fake}:{env['PATH']}", FAKE=str(fake), SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="gpu[007-008]", SLURM_NNODES="2", SLURM_NTASKS="16",
               SLURM_NTASKS_PER_NODE="8")
    return fake, env


def test_slurm_two_nodes_start_sixteen_processes_that_jax_places(slurm):
    fake, env = slurm
    done = subprocess.run(["bash", str(SBATCH), "configs/llama-3.1-8b-8xh100.yaml", "--set", "training.steps=10"],
                          env=env, cwd="/", capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert (fake / "srun_options").read_text().split() == ["--kill-on-bad-exit=1"]
    tasks = [json.loads((fake / f"task{p}").read_text()) for p in range(16)]
    from jax._src.clusters.slurm_cluster import SlurmCluster

    from cptjax.train.distributed import _cluster_detected

    for p, task in enumerate(tasks):
        assert task["argv"] == ["train", "--config", "configs/llama-3.1-8b-8xh100.yaml", "--set", "training.steps=10"]
        assert "--xla_gpu_enable_latency_hiding_scheduler=true" in task["env"]["XLA_FLAGS"]
        assert task["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
        with pytest.MonkeyPatch.context() as patch:  # what jax.distributed.initialize() reads
            for key in [k for k in os.environ if k.startswith("SLURM_")]:
                patch.delenv(key)
            for key, value in task["env"].items():
                patch.setenv(key, value)
            assert SlurmCluster.is_env_present() and _cluster_detected()
            assert SlurmCluster.get_coordinator_address(None, None) == f"gpu007:{4242 % 4096 + 61440}"
            assert (SlurmCluster.get_process_count(), SlurmCluster.get_process_id()) == (16, p)
            assert SlurmCluster.get_local_process_id() == p % 8  # its GPU on its node


def test_slurm_sigterm_saves_through_srun_and_requeues(slurm):
    fake, env = slurm
    env["FAKE_WAIT_FOR_TERM"] = "1"
    job = subprocess.Popen(["bash", str(SBATCH), "configs/llama-3.1-8b-8xh100.yaml"], env=env, cwd="/",
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (fake / "srun_started").exists():
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 sends before the time limit
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert (fake / "srun_got").read_text().strip() == "TERM"
    assert (fake / "scontrol_calls").read_text().split() == ["requeue", "4242"]
    assert "saved and stopped; requeueing job 4242" in out


def test_slurm_sigterm_while_srun_starts_still_reaches_it(slurm):
    # The trap used to run with no pid to pass the signal to, and the job then waited for the time
    # limit's SIGKILL without saving: about 1 start in 10 when the signal lands in that window.
    fake, env = slurm
    env.update(FAKE_WAIT_FOR_TERM="1", FAKE_TERM_PARENT="1")
    for attempt in range(20):
        for name in ("srun_got", "scontrol_calls"):
            (fake / name).unlink(missing_ok=True)
        done = subprocess.run(["bash", str(SBATCH), "configs/llama-3.1-8b-8xh100.yaml"], env=env, cwd="/",
                              capture_output=True, text=True, timeout=60, check=False)
        assert (fake / "srun_got").read_text().strip() == "TERM", f"start {attempt}: {done.stdout}"
        assert done.returncode == 0 and "saved and stopped; requeueing job 4242" in done.stdout, done.stderr
        assert (fake / "scontrol_calls").read_text().split() == ["requeue", "4242"]


def test_slurm_script_refuses_a_missing_config_in_one_line(slurm):
    fake, env = slurm
    done = subprocess.run(["bash", str(SBATCH), "configs/nope.yaml"], env=env, cwd="/", capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "config configs/nope.yaml: no such file" in done.stderr
    assert not (fake / "srun_options").exists()


def test_the_gpu_xla_flags_exist_in_this_jax():
    flags = subprocess.run(["bash", "-c", f"source {ROOT / 'scripts/gpu_env.sh'} && echo \"$XLA_FLAGS\""],
                           capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout.strip()
    assert flags.count("--xla_gpu_") == 9
    # XLA parses every flag at start-up, GPU ones too, and aborts on one it does not know.
    started = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
                             env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
                             capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stderr[-2000:]
    bogus = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2)"],
                           env={**os.environ, "XLA_FLAGS": "--xla_gpu_no_such_flag=true", "JAX_PLATFORMS": "cpu"},
                           capture_output=True, text=True, timeout=120, check=False)
    assert bogus.returncode != 0 and "Unknown flag" in bogus.stderr  # the check can fail
