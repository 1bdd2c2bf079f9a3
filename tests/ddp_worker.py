"""Run by torchrun in the DDP tests: `ddp_worker.py MODULE flags...` trains as MODULE.py would,
then saves this rank's weights (and buffers) to <out>/rank{r}.pt."""

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

mod = importlib.import_module(sys.argv.pop(1))
cfg = common.parse(mod.Config, mod.__name__)
model = getattr(mod, "train_vqvae", getattr(mod, "train", None))(cfg)
if isinstance(model, tuple):  # (model, ema), (G, D, ema), (G, D): every module's state, prefixed
    model = [m.module if isinstance(m, common.EMA) else m for m in model]
    model = {
        f"{i}.{k}": v
        for i, m in enumerate(model)
        if isinstance(m, torch.nn.Module)
        for k, v in m.state_dict().items()
    }
else:
    model = model.state_dict()
torch.save(model, Path(cfg.out) / f"rank{common.rank()}.pt")
