"""Demo models trained on scikit-learn's digits and shipped with the package.

- :mod:`.data`: the 16x16 digits set (ships offline with scikit-learn).
- :mod:`.models`: a class-conditional flow-matching DiT, a DDPM/DDIM UNet and a small CNN classifier,
  built from fixed configs and loaded from ``demo/weights``.
- :mod:`.pipelines`: :class:`FlowMatchDiTPipeline` (true classifier-free guidance) and diffusers' ``DDIMPipeline``.
- :mod:`.metrics`: PSNR, SSIM, Frechet distance on classifier features, classifier accuracy.
- :mod:`.train`: the reproducible training script (``python -m abcache_diffusers.demo.train``).
"""
