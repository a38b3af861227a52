"""Peak RSS of a few training steps of eva02_base_patch14_224 (pretrained=False, CPU, batch 1) with [ema] off,
"same" or "cpu" (issue 18): the EMA built by trainctl's own build_ema, as the trainer builds it. One process per
configuration, since peak RSS only grows:

    for m in off same cpu; do python bench/ema_memory.py $m 3; done
"""
import resource
import sys
import time
import types

import timm
import timm.optim
import torch
import torch.nn.functional as F

from trainctl.worker.model import build_ema

mode, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
torch.manual_seed(0)
torch.set_num_threads(2)
model = timm.create_model("eva02_base_patch14_224", pretrained=False, num_classes=1000)
cfg = types.SimpleNamespace(ema=types.SimpleNamespace(enabled=mode != "off", decay=0.9998, warmup=False,
                                                      device="cpu" if mode == "cpu" else "same"))
ema = build_ema(cfg, model, torch.device("cpu"))   # as the trainer: while the model is on the CPU
opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
x, y = torch.randn(1, 3, 224, 224), torch.tensor([3])
started = time.monotonic()
for step in range(1, steps + 1):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model, step=step)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
params = sum(p.numel() for p in model.parameters())
print(f"ema={mode} steps={steps} params={params / 1e6:.1f}M peak_rss={peak:.0f} MiB "
      f"({(time.monotonic() - started) / steps:.1f} s/step)")
