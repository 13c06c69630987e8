"""The base every recipe builds on: each configuration field, documented once.

Not a recipe itself. A field holds the value every recipe shares, or a
default that a recipe overrides once where it differs: a neutral one (no
resizing, flips, preconditioning, clipping or warmup; Adam's betas; float32
on one fsdp shard) or the paper recipes' cadence (a checkpoint every 10k
steps, an FID of 10k samples every 50k). Fields a recipe must choose (data,
model, process, learning rate, length, EMA, sampler, FID reference) are typed
placeholders, ``None`` until the recipe sets them. A recipe is
``c = base.get_config()`` followed by its own fields, each set once:

    from jaxgen.configs import base

    def get_config():
        c = base.get_config()
        c.data.source = ...
        return c
"""

import ml_collections
from ml_collections import FieldReference
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    """The shared defaults; every field is documented inline."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = placeholder(str)  # any jaxgen.data.open_source spec
    c.data.batch_size = placeholder(int)  # global, over all devices and processes
    c.data.resolution = placeholder(int)  # resize to (None: as stored)
    c.data.pad_to = placeholder(int)  # zero-pad to (None: no padding)
    c.data.flip = False  # random horizontal flips

    # Latent diffusion (jaxgen.train.latent): train on VAE latents of data.source, a latent
    # dataset of `python -m jaxgen.encode`; data.resolution is the images' resolution.
    c.latent = ml_collections.ConfigDict()
    c.latent.vae = ""  # the VAE's weight file or diffusers folder ("": train on pixels)
    c.latent.vae_model = "vae-sd"  # a jaxgen.models vae-* name
    c.latent.vae_kwargs = ml_collections.ConfigDict()  # fields of the VAE preset overridden
    # z = scale * (sample - shift), sample ~ the VAE posterior; each a number, or one per
    # latent channel (EDM2): --config.latent.scale=S1,S2,S3,S4 (or "(S1,S2,S3,S4)")
    c.latent.scale = FieldReference(0.18215, field_type=object)
    c.latent.shift = FieldReference(0.0, field_type=object)
    # The VAE takes and returns images in [0, 1], not [-1, 1] (LDM, DiT): EDM2's
    # StabilityVAEEncoder feeds the SD VAE x / 255, and its per-channel statistics are of those
    c.latent.unit_range = False

    c.model = ml_collections.ConfigDict()
    c.model.name = placeholder(str)  # a jaxgen.models.MODEL_NAMES entry
    c.model.kwargs = ml_collections.ConfigDict()  # the model's arguments (empty: its defaults)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.process = placeholder(str)  # vp | edm | flow | trigflow (sCM, Lu & Song 2024)
    c.diffusion.process_kwargs = ml_collections.ConfigDict()  # the process's arguments
    c.diffusion.prediction = placeholder(str)  # eps | x0 | v | velocity | score
    c.diffusion.precond = "none"  # none | edm (Karras et al. 2022; predicts x0) | consistency
    # (Song et al. 2023, Eq. 5: f(x, sigma_min) = x exactly; sampled by the consistency sampler)
    # | trigflow (process trigflow: the velocity sigma_d F(x_t / sigma_d, time_scale * t))
    c.diffusion.sigma_data = 0.5  # data scale: the EDM process, precond="edm" and weighting="edm"
    c.diffusion.time_scale = 1.0  # the network sees time_scale * t (precond="none")
    c.diffusion.time_shift = 0.0  # ... + time_shift (-1 with scale N: DDPM's 0-based index)
    c.diffusion.reverse_time = False  # the network sees 1 - t, a velocity negated (SiT's time)
    c.diffusion.time_sampler = placeholder(str)  # uniform | lognormal | logit_normal | discrete
    c.diffusion.time_sampler_kwargs = ml_collections.ConfigDict()
    c.diffusion.weighting = "uniform"  # uniform | min_snr | edm | p2
    c.diffusion.weighting_kwargs = ml_collections.ConfigDict()
    # denoising: jaxgen.diffusion.loss (time_sampler, weighting, prediction) | edm2: EDM2's
    # Eq. 21 with the model's learned uncertainty (process edm, lognormal times, edm weighting)
    # | ict: consistency training (Song & Dhariwal 2024) | cd: consistency distillation of
    # distill.teacher (Song et al. 2023, Alg. 2); ict and cd need process edm, precond consistency
    # | scm: continuous-time consistency (Lu & Song 2024; process and precond trigflow), from
    # data or distill.teacher | pd: progressive distillation of distill.teacher (Salimans & Ho)
    # | reflow: rectified-flow reflow of distill.teacher (Liu et al. 2023, Alg. 1; process
    # flow) | dmd2: a one- or few-step generator distilled from distill.teacher by distribution
    # matching with a fake score (Yin et al. 2024, no GAN term); sampled with --steps
    # distill.generator_steps
    c.diffusion.loss = "denoising"
    # "" | vlb: a learn_sigma model's variance channels trained by IDDPM's L_vlb added to the
    # denoising loss (jaxgen.diffusion.vlb; discrete VP, time_sampler discrete, precond none)
    c.diffusion.learned_variance = ""

    c.distill = ml_collections.ConfigDict()  # few-step training and distillation
    # cd, pd, reflow, dmd2, scm (sCD): the teacher's jaxgen.train workdir (not copied)
    c.distill.teacher = placeholder(str)
    c.distill.teacher_weights = placeholder(str)  # its EMA decay, 'params', ... (None: default)
    # cd: the teacher's ODE step; reflow: its ODE solver; a deterministic SOLVERS entry
    c.distill.solver = "heun"
    c.distill.target_ema = 0.0  # cd: target network theta- EMA decay mu (0: the student itself)
    # pd: the teacher's DDIM steps N (even, >= 2), the student's N/2; reflow: the teacher's
    # distill.solver steps from noise to each pair's x0 (>= 1)
    c.distill.teacher_steps = 0
    c.distill.fake_updates = 5  # dmd2: fake-score updates per generator update (DMD2's TTUR)
    c.distill.real_guidance = 1.0  # dmd2: CFG weight on the teacher's (real) score (1: none)
    c.distill.generator_steps = 1  # dmd2: the generator's sampling steps (eval.steps too)
    c.distill.adaptive_weight = True  # scm: learn sCM's adaptive weight w(t) (a logvar head)
    c.distill.init_from_teacher = False  # scm: start from a TrigFlow teacher's weights
    # Arguments of jaxgen.diffusion.consistency.ict_loss (s0, s1, rho, p_mean, p_std,
    # distance), cd_loss (num_scales, rho, distance, weighting), scm.scm_loss (p_mean,
    # p_std, warmup_steps, tangent_c), distillation.progressive_loss (weighting),
    # distillation.reflow_loss or dmd_loss (time_sampler); empty: the papers' values
    c.distill.loss_kwargs = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict()  # Adam(W)
    c.optim.lr = placeholder(float)  # peak learning rate
    c.optim.warmup_steps = 0  # linear ramp from 0 to lr (updates)
    c.optim.schedule = "constant"  # constant | cosine | inverse_sqrt (EDM2)
    c.optim.ref_steps = 0  # inverse_sqrt: t_ref, lr / sqrt(max(t / t_ref, 1)) (0: no decay)
    c.optim.final_lr_fraction = 0.0  # cosine: lr at the end / lr
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 disables
    c.optim.grad_accum = 1  # micro-batches per optimizer update

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = placeholder(int)
    c.train.minutes = 0.0  # stop after this many minutes of training (0: no limit)
    c.train.ema_decays = placeholder(tuple)  # () for none; evaluation samples the first
    # Power-function EMAs (EDM2), one per sigma_rel (3 decimals at most), e.g. (0.05, 0.1);
    # () for none. Evaluation samples the first when ema_decays is ().
    c.train.phema_sigma_rels = ()
    c.train.phema_snapshot_every = 0  # steps between power-EMA snapshots in WORKDIR/phema (0: none)
    c.train.ema_warmup = False  # decay min(d, (1+n)/(10+n)): fast start in short runs
    c.train.compute_dtype = "float32"  # float32 | bfloat16
    c.train.fsdp = 1  # size of the mesh's fsdp axis (parameter sharding)
    c.train.log_every = 50
    # REPA (Yu et al. 2025; jaxgen.train.repa): align a DiT/SiT's tokens after block `depth`,
    # through an MLP projector of width `projector_dim`, with a frozen encoder's patch
    # features; loss + lambda * (-cosine). encoder: "" (off) | dinov2-vit{s,b,l,g}14 |
    # inception (mixed_6/conv, offline); weights: its file ("": the default lookup).
    c.train.repa = ml_collections.ConfigDict(
        {"encoder": "", "depth": 8, "lambda": 0.5, "projector_dim": 2048, "weights": ""})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 10_000
    c.checkpoint.keep = 3

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 50_000  # 0: only at eval.at_minutes
    c.eval.at_minutes = ()  # minutes of training
    c.eval.solver = placeholder(str)  # a jaxgen.sampling.SOLVERS entry
    c.eval.steps = placeholder(int)
    c.eval.cfg_scale = 1.0
    c.eval.batch_size = 128
    c.eval.seed = 0
    c.eval.fid_samples = 10_000  # 0 disables FID
    c.eval.fid_reference = placeholder(str)  # a jaxgen.data.open_source spec
    c.eval.fid_reference_num = placeholder(int)  # None: all
    c.eval.fid_batch_size = 100

    c.parallel = ml_collections.ConfigDict()  # multi-host; None: from JAXGEN_* env or cluster
    c.parallel.coordinator = placeholder(str)
    c.parallel.num_processes = placeholder(int)
    c.parallel.process_id = placeholder(int)
    return c
