"""abcache-examples: the demo, benchmark, training, Flax port and model zoo, beside the abcache library.

- :mod:`.data`: the 16x16 digits set (ships offline with scikit-learn).
- :mod:`.models`: the zoo (flow-matching DiTs, eps- and v-prediction UNets) and a small CNN classifier,
  built from fixed configs and loaded from ``weights``.
- :mod:`.pipelines`: :class:`FlowMatchDiTPipeline` (true classifier-free guidance) and diffusers' ``DDIMPipeline``.
- :mod:`.metrics`: PSNR, SSIM, Frechet distance on classifier features, classifier accuracy.
- :mod:`.compare`: side-by-side runs scored against the full sampler; :mod:`.bench`: ``nox -s bench``;
  :mod:`.cli`: ``abcache demo``.
- :mod:`.train`: the reproducible training script (``python -m abcache_examples.train``).
"""

__version__ = "0.2.0"
