"""A test node pack for ComfyUI's graph executor: tiny random-init models, conditioning, latents, a capture node."""

import comfy_env
import torch


class FamilyAndSeed:
    """A node whose inputs are a model family and a seed."""

    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["flux", "sd15"],), "seed": ("INT", {"default": 0, "min": 0})}}


class TinyModel(FamilyAndSeed):
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    def load(self, family, seed):
        return (comfy_env.counted(comfy_env.tiny_model(family, seed)),)


class TinyConditioning(FamilyAndSeed):
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING",)

    def make(self, family, seed):
        return (comfy_env.conditioning(family, seed),)


class TinyLatent:
    CATEGORY = "testing"
    FUNCTION = "make"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "family": (["flux", "sd15"],),
                "size": ("INT", {"default": 16, "min": 8}),
                "batch": ("INT", {"default": 1, "min": 1}),
            }
        }

    def make(self, family, size, batch):
        return ({"samples": torch.zeros(batch, comfy_env.latent_channels(family), size, size)},)


class CaptureLatent:
    CATEGORY = "testing"
    FUNCTION = "capture"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": "out"})}}

    def capture(self, samples, name):
        comfy_env.CAPTURED[name] = samples["samples"].clone()
        return ()


NODE_CLASS_MAPPINGS = {
    "TinyModel": TinyModel,
    "TinyConditioning": TinyConditioning,
    "TinyLatent": TinyLatent,
    "CaptureLatent": CaptureLatent,
}
