"""DeepSpeed ZeRO-2 settings shared by every TorchTrainer loop (the behaviour NN and the LoRA LLM).

ZeRO-2 partitions optimizer state and gradients across workers; on CPU it runs
over gloo inside Ray Train's process group. A plain torch optimizer is passed
in (DeepSpeed's fused Adam needs compiled ops), hence
``zero_allow_untested_optimizer``. Mixed precision only on GPU.
"""

from __future__ import annotations

import torch


def deepspeed_config(batch_size: int, grad_accum: int, device: torch.device, precision: str = "auto") -> dict:
    gpu = device.type == "cuda"
    bf16 = gpu and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": gpu and not bf16 and precision in ("auto", "fp16")},
        "steps_per_print": 10**9,
    }


def zero2_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, scheduler=None):
    """(engine, optimizer, scheduler) from ``deepspeed.initialize``; the engine replaces the DDP wrapper."""
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=config)
    return engine, optimizer, scheduler
