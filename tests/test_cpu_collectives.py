"""A late device thread at a CPU all-reduce: XLA aborts the process unless the collectives
are patient (jaxgen.cli.patient_cpu_collectives)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from jaxgen.cli import CPU_COLLECTIVE_TIMEOUT_FLAG, patient_cpu_collectives

# Device 0's thread reaches the psum SLEEP seconds after device 1's.
LATE_THREAD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from jaxgen.cli import patient_cpu_collectives
    patient_cpu_collectives()
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    def late(x):
        if x[0] == 0:
            time.sleep({sleep})
        return x

    def f(x):
        x = jax.pure_callback(late, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return jax.lax.psum(x.sum(), "d")

    mesh = Mesh(jax.devices(), ("d",))
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P()))
    print("sum", float(g(jax.device_put(jnp.arange(4.0), NamedSharding(mesh, P("d"))))))
""")


def test_the_flag_is_added_once_and_a_users_value_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    patient_cpu_collectives()
    patient_cpu_collectives()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2",
                     f"{CPU_COLLECTIVE_TIMEOUT_FLAG}=3600"]
    monkeypatch.setenv("XLA_FLAGS", f"{CPU_COLLECTIVE_TIMEOUT_FLAG}=7")
    patient_cpu_collectives()
    assert os.environ["XLA_FLAGS"] == f"{CPU_COLLECTIVE_TIMEOUT_FLAG}=7"


@pytest.mark.parametrize("terminate, survives", [(2, False), (None, True)])
def test_a_late_thread_aborts_only_impatient_collectives(terminate, survives):
    # XLA warns after warn_stuck seconds, then aborts terminate seconds later: with both
    # shrunk to 1-2 s a 6 s delay stands for the minute-long stalls of a loaded machine.
    flags = "--xla_force_host_platform_device_count=2 " \
            "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1"
    if terminate is not None:
        flags += f" {CPU_COLLECTIVE_TIMEOUT_FLAG}={terminate}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", LATE_THREAD.format(repo=repo, sleep=6)],
                       env=env, capture_output=True, text=True, timeout=120)
    if survives:
        assert r.returncode == 0 and "sum 6.0" in r.stdout, r.stderr[-2000:]
    else:
        assert r.returncode != 0 and "Termination timeout" in r.stderr
