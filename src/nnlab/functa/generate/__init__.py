"""Generative functa: generative models over functasets, decoded by the shared SIREN at any size.

"From data to functa" (Dupont et al. 2022) trains normalizing flows and diffusion models on
functa; no public functa code ships them. nnlab does:

* :mod:`~nnlab.functa.generate.diffusion` -- DDPM with a residual-MLP denoiser, DDPM and DDIM
  samplers, classifier-free guidance;
* :mod:`~nnlab.functa.generate.flow` -- RealNVP/Glow affine-coupling flow (ActNorm, LU linear);
* :mod:`~nnlab.functa.generate.gaussian` -- the full-covariance Gaussian baseline;
* :mod:`~nnlab.functa.generate.features`, :mod:`~nnlab.functa.generate.metrics` -- feature
  networks trained on the data's pixels, FID, k-NN precision/recall, memorisation;
* :mod:`~nnlab.functa.generate.model`, :mod:`~nnlab.functa.generate.train`,
  :mod:`~nnlab.functa.generate.run` -- config, checkpointed training, evaluation and figures.

Command line::

    nnlab functa generate RUN TRAIN.safetensors --model diffusion --conditional --time-limit 20 \\
        --data-dir ../shared/data/mnist --out runs/gen
    nnlab functa sample runs/gen --n 64 --class 3 --size 128 --out threes.png
"""
