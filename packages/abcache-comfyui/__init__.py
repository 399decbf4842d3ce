"""ComfyUI's entry point when this folder is linked or copied into ``ComfyUI/custom_nodes/``.

The nodes live in the ``abcache_comfyui`` package: installed with pip into ComfyUI's environment, or found in
``src/`` beside this file.
"""

import os
import sys

try:
    from abcache_comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # not pip-installed: the source tree beside this file
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from abcache_comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
