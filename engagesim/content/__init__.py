"""Content simulation: captions → prompt → LoRA-tuned LLM text, hashtags, diffusion images, best-of-N ranking."""
