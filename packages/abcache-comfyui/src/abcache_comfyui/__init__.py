"""AB-Cache for ComfyUI: the "AB-Cache" node (a MODEL in, a MODEL that skips diffusion-model calls out).

Install it into ComfyUI's environment (``pip install abcache-comfyui``) and link or copy the package folder into
``ComfyUI/custom_nodes/``; ComfyUI reads ``NODE_CLASS_MAPPINGS`` from its ``__init__.py``.
"""

from abcache_comfyui._node import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, ABCacheNode, patch_model
from abcache_comfyui._run import KEY, Run, Settings, diffusion_model_wrapper, outer_sample_wrapper

__all__ = [
    "KEY",
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "ABCacheNode",
    "Run",
    "Settings",
    "diffusion_model_wrapper",
    "outer_sample_wrapper",
    "patch_model",
]
