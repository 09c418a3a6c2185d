"""Training-step speed: a plain timm loop against dogbreeds' settings, interleaved step by step.

plain:     timm model in NCHW, torch.optim.AdamW defaults (for-loop update on CPU), CE loss, fp32.
dogbreeds: `prepare_for_training(model)` (ConvNeXt MLPs as 1x1 convolutions: oneDNN
           convolutions instead of MKL's matmul, which runs slowly on AMD CPUs; channels_last)
           and `training_optimizer(...)` (AdamW fused=True: one kernel for all parameters), fp32.
No bf16: this CPU's bf16 is not used by the project (see DESIGN/brief), and the comparison is fp32.
"""
from __future__ import annotations

import time

import numpy as np


def prepare_for_training(model):
    """The same network, laid out to train faster on CPU: ConvNeXt blocks with 1x1-conv MLPs
    (identical weights, reshaped; checked against the original) in channels_last memory.
    Other models only get channels_last. Returns the model in train mode.

    For the training loop, the equivalent is `create_model(name, ..., conv_mlp=True)` for
    ConvNeXt names (the kwarg travels in the checkpoint sidecar) plus `model.to(memory_format=
    torch.channels_last)` and channels_last inputs."""
    import torch

    from ..infer.runtime_torch import inference_layout

    was_training = model.training
    model = inference_layout(model)
    return model.train(was_training).to(memory_format=torch.channels_last)


def training_optimizer(params, lr: float = 1e-3, weight_decay: float = 0.05):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def measure(name: str = "convnext_tiny", batch: int = 16, size: int = 224, steps: int = 3, log=print) -> dict:
    """Images/s of both loops at `batch`, `steps` timed steps each (after one warm-up step)."""
    import timm
    import torch

    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, num_classes=1000).train()
    tuned = timm.create_model(name, pretrained=False, num_classes=1000)
    tuned.load_state_dict(plain.state_dict())
    tuned.dogbreeds_name = name
    tuned = prepare_for_training(tuned.train())
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.05)
    tuned_opt = training_optimizer(tuned.parameters())
    x = torch.randn(batch, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(model, opt, inputs):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    loops = {"plain timm loop": (plain, plain_opt, x), "dogbreeds settings": (tuned, tuned_opt, x_cl)}
    times = {k: [] for k in loops}
    first_losses = {k: step(*v) for k, v in loops.items()}  # warm-up; same weights and data: same loss
    for i in range(steps):
        for k in (loops if i % 2 == 0 else list(loops)[::-1]):
            start = time.perf_counter()
            step(*loops[k])
            times[k].append(time.perf_counter() - start)
    out = {"model": name, "batch": batch, "size": size, "steps": steps,
           "first_loss": first_losses, "images_per_s": {k: batch / float(np.median(v)) for k, v in times.items()}}
    out["ratio"] = out["images_per_s"]["dogbreeds settings"] / out["images_per_s"]["plain timm loop"]
    log(f"  training {name} batch {batch}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in out["images_per_s"].items())
        + f" -> {out['ratio']:.2f}x")
    return out
