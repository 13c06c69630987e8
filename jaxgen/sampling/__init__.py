"""Sampling: solvers as small pure functions, time grids, guidance, one jitted driver."""

from jaxgen.sampling.consistency import consistency_sample, consistency_times, generator_times
from jaxgen.sampling.driver import SOLVERS, SolverSpec, generate, sample, to_uint8
from jaxgen.sampling.grids import (
    GRIDS,
    iddpm,
    karras,
    leading,
    logsnr,
    make_grid,
    shifted,
    trailing,
    uniform,
)
from jaxgen.sampling.guidance import Denoiser, Guidance, make_denoiser
from jaxgen.sampling.solvers import (
    TABLEAUS,
    ddim,
    ddpm_learned,
    dpmpp_2m,
    dpmpp_3m,
    euler_maruyama,
    restart,
    runge_kutta,
    sa_solver,
    step_noise,
    unipc,
)

__all__ = [
    "GRIDS",
    "SOLVERS",
    "TABLEAUS",
    "Denoiser",
    "Guidance",
    "SolverSpec",
    "consistency_sample",
    "consistency_times",
    "ddim",
    "ddpm_learned",
    "dpmpp_2m",
    "dpmpp_3m",
    "euler_maruyama",
    "generate",
    "generator_times",
    "iddpm",
    "karras",
    "leading",
    "logsnr",
    "make_denoiser",
    "make_grid",
    "restart",
    "runge_kutta",
    "sa_solver",
    "sample",
    "shifted",
    "step_noise",
    "to_uint8",
    "trailing",
    "uniform",
    "unipc",
]
