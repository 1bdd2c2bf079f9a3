"""Run by torchrun in the DDP test: train as ddpm_ddim.py would, then save this rank's weights."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import ddpm_ddim  # noqa: E402

cfg = common.parse(ddpm_ddim.Config, "ddpm_ddim")
model, _ = ddpm_ddim.train(cfg)
torch.save(model.state_dict(), Path(cfg.out) / f"rank{common.rank()}.pt")
