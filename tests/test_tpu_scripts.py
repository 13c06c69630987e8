"""tpu/ scripts: the exact commands of --dry-run, that a dry run runs nothing, that a real
run (against fake gcloud/git/sbatch on PATH) runs exactly what the dry run printed, usage
errors (exit 2), and shellcheck. No network, no cloud: every program they call is faked."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = sorted(p.name for p in TPU.glob("*.sh") if p.name != "common.sh")
FAKED = ("gcloud", "git", "sbatch", "srun")
# Variables the scripts read defaults from; cleared so the caller's shell cannot leak in.
SCRIPT_ENV = (
    "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "BUCKET", "RUN_NAME",
    "CONFIG", "JAXGEN_REPO", "JAXGEN_REF", "PYTHON_VERSION", "WORKER", "NODES",
    "GPUS_PER_NODE", "PARTITION", "ACCOUNT", "PYTHON",
)
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
WHERE = ["--zone=us-central2-b"]
INSTALL = (
    "python3 -m pip install --quiet --user --upgrade uv && rm -rf jaxgen-venv"
    " && python3 -m uv venv --quiet --python 3.12 jaxgen-venv"
    " && python3 -m uv pip install --quiet --python jaxgen-venv/bin/python"
    " -e './jaxgen[tfds,gcs]' 'jax[tpu]'"
)


@pytest.fixture
def env(tmp_path):
    """Environment with fake gcloud/git/sbatch/srun first on PATH, logging argv to calls.jsonl."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in FAKED:
        prog = fake / name
        prog.write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            "with open(os.environ['FAKE_LOG'], 'a') as f:\n"
            "    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
        )
        prog.chmod(0o755)
    out = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    out.update(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path),
               FAKE_LOG=str(tmp_path / "calls.jsonl"))
    return out


def script(name, *args, env, check=True):
    r = subprocess.run(["bash", str(TPU / name), *args], env=env, capture_output=True,
                       text=True, timeout=30)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def calls(env):
    log = Path(env["FAKE_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def dry(name, *args, env):
    """The commands a dry run prints, as argv lists; asserts nothing was executed."""
    r = script(name, "--dry-run", *args, env=env)
    assert not Path(env["FAKE_LOG"]).exists(), "a dry run executed a command"
    assert r.stderr == ""
    return [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]


def remote(argv):
    """The shell command of a `gcloud ... ssh --command=...` argv."""
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return command


def test_create_defaults(env):
    assert dry("create.sh", env=env) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "jaxgen", *WHERE,
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
    ]]


def test_create_from_flags_and_env(env):
    env.update(ACCELERATOR_TYPE="v5p-64", PROJECT="proj-env", ZONE="us-east5-a")
    assert dry("create.sh", "--name=pod", "--project", "proj", "--spot", env=env) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-east5-a",
        "--project=proj", "--accelerator-type=v5p-64", "--version=tpu-ubuntu2204-base",
        "--spot",
    ]]
    assert dry("create.sh", "--preemptible", "--version", "v2-alpha-tpuv5", env=env)[0][-2:] == [
        "--version=v2-alpha-tpuv5", "--preemptible"]


def test_create_queued(env):
    assert dry("create.sh", "--queued", "--spot", "--accelerator-type", "v4-8", env=env) == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "jaxgen",
        "--node-id=jaxgen", *WHERE, "--accelerator-type=v4-8",
        "--runtime-version=tpu-ubuntu2204-base", "--spot",
    ]]


def test_setup_from_this_checkout(env):
    tarball = f"{env['TMPDIR']}/jaxgen-pod.tar.gz"
    assert dry("setup.sh", "--name", "pod", env=env) == [
        ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pod:jaxgen.tar.gz", *WHERE,
         "--worker=all"],
        [*SSH, "pod", *WHERE, "--worker=all",
         "--command=rm -rf jaxgen && mkdir jaxgen && tar -xzf jaxgen.tar.gz -C jaxgen && "
         + INSTALL],
    ]


def test_setup_from_git_with_data(env):
    (ssh,) = dry("setup.sh", "--repo", "https://example.com/me/jaxgen.git", "--ref", "v0.1",
                 "--tfds-data", "gs://bkt/tensorflow_datasets", "--python=3.11", env=env)
    assert ssh[:-1] == [*SSH, "jaxgen", *WHERE, "--worker=all"]
    assert remote(ssh) == (
        "rm -rf jaxgen && git clone --quiet https://example.com/me/jaxgen.git jaxgen"
        " && git -C jaxgen checkout --quiet v0.1 && "
        + INSTALL.replace("--python 3.12", "--python 3.11")
        + " && mkdir -p tensorflow_datasets"
        " && gcloud storage rsync --recursive gs://bkt/tensorflow_datasets tensorflow_datasets"
    )


def test_launch(env):
    (ssh,) = dry("launch.sh", "--config", "jaxgen/configs/cifar10_flow.py", "--bucket", "gs://bkt/",
                 "--run", "c10", "--", "--config.data.batch_size=256",
                 "--config.eval.at_minutes=()", env=env)
    assert ssh[:-1] == [*SSH, "jaxgen", *WHERE, "--worker=all"]
    command = remote(ssh)
    assert command == (
        "mkdir -p jaxgen-logs && cd jaxgen && { nohup env JAXGEN_DISTRIBUTED=1"
        " ../jaxgen-venv/bin/python -m jaxgen.train"
        " --config jaxgen/configs/cifar10_flow.py --workdir gs://bkt/runs/c10"
        " --config.data.batch_size=256 '--config.eval.at_minutes=()'"
        " > ../jaxgen-logs/c10.log 2>&1 < /dev/null & echo $! > ../jaxgen-logs/c10.pid; }"
    )
    # The trainer's argv as the worker's shell will see it.
    train = shlex.split(command.split("nohup ")[1].split(" > ")[0])
    assert train == ["env", "JAXGEN_DISTRIBUTED=1", "../jaxgen-venv/bin/python", "-m",
                     "jaxgen.train", "--config", "jaxgen/configs/cifar10_flow.py",
                     "--workdir", "gs://bkt/runs/c10",
                     "--config.data.batch_size=256", "--config.eval.at_minutes=()"]


DISTRIBUTED_ENV = ("JAXGEN_DISTRIBUTED", "JAXGEN_COORDINATOR", "JAXGEN_NUM_PROCESSES",
                   "JAXGEN_PROCESS_ID", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")


@pytest.mark.parametrize(("environ", "calls"), [
    ({}, []),  # a single machine: no-op
    ({"JAXGEN_DISTRIBUTED": "1"}, [()]),  # what launch.sh sets: JAX detects the TPU slice
    ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, [()]),
    ({"SLURM_JOB_ID": "7"}, [()]),
    ({"SLURM_JOB_ID": "7", "JAXGEN_DISTRIBUTED": "0"}, []),  # forced off
    ({"JAXGEN_DISTRIBUTED": "1", "JAXGEN_COORDINATOR": "h:1234", "JAXGEN_NUM_PROCESSES": "2",
      "JAXGEN_PROCESS_ID": "1"}, [("h:1234", 2, 1)]),  # explicit values win
])
def test_initialize_distributed_from_environment(monkeypatch, environ, calls):
    """The environment launch.sh (and SLURM) sets decides how jax.distributed starts."""
    import jax

    from jaxgen.parallel import initialize_distributed

    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: seen.append(args))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # gloo: not in this process
    initialize_distributed()
    assert seen == calls


def test_initialize_distributed_rejects_unknown_switch(monkeypatch):
    from jaxgen.errors import InputError
    from jaxgen.parallel import initialize_distributed

    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAXGEN_DISTRIBUTED", "yes")
    with pytest.raises(InputError, match="JAXGEN_DISTRIBUTED='yes'"):
        initialize_distributed()


def test_launch_workdir_and_env_defaults(env):
    env.update(TPU_NAME="pod", BUCKET="ignored", CONFIG="jaxgen/configs/imagenet_dit_b2.py")
    (ssh,) = dry("launch.sh", "--workdir", "gs://other/exp 1", "--tfds-data-dir",
                 "/mnt/tfds", "--project", "p", env=env)
    assert ssh[:-1] == [*SSH, "pod", *WHERE, "--project=p", "--worker=all"]
    assert ("{ nohup env JAXGEN_DISTRIBUTED=1 TFDS_DATA_DIR=/mnt/tfds"
            " ../jaxgen-venv/bin/python -m jaxgen.train"
            " --config jaxgen/configs/imagenet_dit_b2.py --workdir 'gs://other/exp 1' >"
            " ../jaxgen-logs/pod.log") in remote(ssh)


def test_logs_stop_delete(env):
    assert dry("logs.sh", "--run", "c10", env=env) == [
        [*SSH, "jaxgen", *WHERE, "--worker=0", "--command=tail -n 100 -F jaxgen-logs/c10.log"]]
    assert dry("logs.sh", "--worker", "all", "--lines=5", env=env)[0][-2:] == [
        "--worker=all", "--command=tail -n 5 -F jaxgen-logs/jaxgen.log"]
    assert dry("stop.sh", "--run", "c10", env=env) == [
        [*SSH, "jaxgen", *WHERE, "--worker=all",
         '--command=kill -TERM "$(cat jaxgen-logs/c10.pid)"']]
    assert dry("delete.sh", env=env) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "jaxgen", *WHERE]]
    assert dry("delete.sh", "--queued", "--yes", env=env) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "jaxgen", *WHERE, "--force",
         "--quiet"]]


SBATCH = """#!/bin/bash
#SBATCH --job-name=dit
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output={w}/slurm/%x-%j.out
#SBATCH --partition=gpu
# Written by tpu/slurm.sh. One task per GPU: jaxgen calls jax.distributed.initialize(),
# which reads the job step's SLURM_* variables; task i of a node uses its GPU i.
set -eo pipefail  # no -u: `module` and conda's activate read unset variables
cd {root}
source ~/venv/bin/activate
export TFDS_DATA_DIR=/shared/tfds
srun --kill-on-bad-exit=1 --output={w}/slurm/%x-%j-%t.out python3 -m jaxgen.train \
--config jaxgen/configs/imagenet_dit_b2.py --workdir {w} --config.data.batch_size=512
"""
SLURM_ARGS = ("--config", "jaxgen/configs/imagenet_dit_b2.py", "--nodes", "4", "--partition=gpu",
              "--job-name", "dit", "--setup", "source ~/venv/bin/activate",
              "--tfds-data-dir", "/shared/tfds", "--", "--config.data.batch_size=512")


def test_slurm(env, tmp_path):
    w = tmp_path / "runs" / "dit"
    r = script("slurm.sh", "--dry-run", "--workdir", str(w), *SLURM_ARGS, env=env)
    assert r.stdout == (
        f"+ mkdir -p {w}/slurm\n+ cat > {w}/slurm/dit.sbatch <<'EOF'\n"
        + SBATCH.format(w=w, root=ROOT) + f"EOF\n+ sbatch {w}/slurm/dit.sbatch\n"
    )
    assert not w.exists() and not Path(env["FAKE_LOG"]).exists()


def test_slurm_relative_workdir_no_submit(env, tmp_path):
    r = subprocess.run(["bash", str(TPU / "slurm.sh"), "--dry-run", "--config=c.py",
                        "--workdir=w", "--script=job.sbatch", "--no-submit"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"+ mkdir -p {tmp_path}/w/slurm ."
    assert lines[1] == "+ cat > job.sbatch <<'EOF'"
    assert "#SBATCH --gpus-per-node=8" in lines
    assert lines[-2].endswith(f"--config c.py --workdir {tmp_path}/w")
    assert lines[-1] == "EOF"


REAL_RUNS = [
    ("create.sh", ("--queued", "--spot", "--project", "p")),
    ("setup.sh", ("--name", "pod")),
    ("setup.sh", ("--repo", "https://example.com/j.git", "--tfds-data", "gs://b/tfds")),
    ("launch.sh", ("--config", "jaxgen/configs/cifar10_flow.py", "--bucket", "b", "--",
                   "--config.eval.at_minutes=()")),
    ("logs.sh", ("--worker", "0,2")),
    ("stop.sh", ()),
    ("delete.sh", ("--yes",)),
]


@pytest.mark.parametrize(("name", "args"), REAL_RUNS)
def test_real_run_runs_what_dry_run_printed(env, name, args):
    printed = dry(name, *args, env=env)
    r = script(name, *args, env=env)
    assert calls(env) == printed
    assert r.stderr == "".join(f"+ {shlex.join(c)}\n" for c in printed)
    assert r.stdout == ""


def test_real_slurm_writes_the_printed_script(env, tmp_path):
    w = tmp_path / "w"
    printed = script("slurm.sh", "--dry-run", "--workdir", str(w), *SLURM_ARGS, env=env).stdout
    assert not w.exists()
    script("slurm.sh", "--workdir", str(w), *SLURM_ARGS, env=env)
    job = w / "slurm" / "dit.sbatch"
    assert calls(env) == [["sbatch", str(job)]]
    assert job.read_text() == SBATCH.format(w=w, root=ROOT)
    assert job.read_text() in printed


BAD = [
    ("create.sh", ("--bogus",), "unknown option --bogus"),
    ("create.sh", ("--zone",), "--zone needs a value"),
    ("create.sh", ("--zone", "--spot"), "--zone needs a value"),
    ("create.sh", ("--spot=yes",), "--spot takes no value"),
    ("create.sh", ("extra",), "unexpected argument 'extra'"),
    ("create.sh", ("--spot", "--preemptible"), "not both"),
    ("create.sh", ("--queued", "--preemptible"), "take --spot"),
    ("create.sh", ("--zone=",), "missing --zone"),
    ("delete.sh", ("--", "x"), "unexpected arguments after --"),
    ("setup.sh", ("--tfds-data", "/local/dir"), "must be a gs:// path"),
    ("launch.sh", ("--bucket", "b"), "missing --config (or set CONFIG)"),
    ("launch.sh", ("--config", "jaxgen/configs/x.py"), "missing --workdir or --bucket"),
    ("launch.sh", ("--config", "c.py", "--bucket", "b", "--run", "a/b"), "run name"),
    ("logs.sh", ("--worker", "first"), "--worker must be"),
    ("logs.sh", ("--lines", "x"), "--lines must be a number"),
    ("slurm.sh", ("--config", "c.py"), "missing --workdir"),
    ("slurm.sh", ("--config", "c.py", "--workdir", "/w", "--nodes", "0"), "--nodes must be"),
    ("slurm.sh", ("--config", "c.py", "--workdir", "/w", "--zone", "z"), "unknown option"),
]


@pytest.mark.parametrize(("name", "args", "message"), BAD)
def test_usage_errors_exit_2(env, name, args, message):
    for dry_run in ((), ("--dry-run",)):
        r = script(name, *dry_run, *args, env=env, check=False)
        assert r.returncode == 2
        assert r.stdout == ""
        assert r.stderr.startswith(f"{name}: error: ") and message in r.stderr
        assert r.stderr.count("\n") == 1
    assert calls(env) == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(env, name):
    for flag in ("--help", "-h"):
        r = script(name, flag, env=env)
        assert r.stdout.startswith(f"usage: tpu/{name}")
        assert "--dry-run" in r.stdout
    assert calls(env) == []


@pytest.mark.parametrize("word", ["", "plain-1.2/x:y,z@%+=", "a b", "it's", "$HOME", "a*",
                                  "ü", "--config.eval.at_minutes=()", "tab\there"])
def test_quote_matches_shlex(word):
    r = subprocess.run(["bash", "-c", 'source "$0"; quote "$1"', str(TPU / "common.sh"), word],
                       capture_output=True, text=True, timeout=30, check=True)
    assert r.stdout == shlex.quote(word)


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/install.sh installs it)")
    r = subprocess.run(["shellcheck", *sorted(str(p.relative_to(ROOT)) for p in TPU.glob("*.sh"))],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
