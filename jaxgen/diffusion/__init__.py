"""The math of diffusion and flow models: processes, predictions, losses (no Flax).

Everything reduces to ``x_t = alpha(t) x0 + sigma(t) eps``; a model reaches
this package as a plain function ``model_fn(params, x_t, t, cond) -> prediction``
(the weights always a traced argument).
"""

from jaxgen.diffusion.losses import (
    DISTANCES,
    TIME_SAMPLERS,
    WEIGHTINGS,
    discrete_time,
    drop_labels,
    edm_weight,
    logit_normal_time,
    lognormal_time,
    loss,
    min_snr,
    mse,
    p2_weight,
    pseudo_huber,
    uniform_time,
    uniform_weight,
)
from jaxgen.diffusion.mixture import GaussianMixture
from jaxgen.diffusion.predictions import (
    PREDICTIONS,
    convert,
    edm_precond,
    from_x0_eps,
    prediction_weight,
    to_x0_eps,
)
from jaxgen.diffusion.processes import EDM, VP, Flow, Process
from jaxgen.diffusion.scm import TrigFlow

__all__ = [
    "DISTANCES",
    "EDM",
    "PREDICTIONS",
    "TIME_SAMPLERS",
    "VP",
    "WEIGHTINGS",
    "Flow",
    "GaussianMixture",
    "Process",
    "TrigFlow",
    "convert",
    "discrete_time",
    "drop_labels",
    "edm_precond",
    "edm_weight",
    "from_x0_eps",
    "logit_normal_time",
    "lognormal_time",
    "loss",
    "min_snr",
    "mse",
    "p2_weight",
    "prediction_weight",
    "pseudo_huber",
    "to_x0_eps",
    "uniform_time",
    "uniform_weight",
]
