"""A training script of your own (plain PyTorch, inputs normalised with mean 0.3 and std 0.37), writing a state
dict. Usage: python examples/own_model/train.py IMAGE_FOLDER WEIGHTS.pt"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import build  # noqa: E402

folder, weights = Path(sys.argv[1]), sys.argv[2]
files = sorted((folder / "train").glob("*/*.png"))
x = torch.tensor(np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files]))[:, None]
y = torch.tensor([int(f.parent.name) for f in files])
x = (x - 0.3) / 0.37
torch.manual_seed(0)
net = build()
optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
for _ in range(15):
    perm = torch.randperm(len(x))
    for i in range(0, len(x), 64):
        idx = perm[i : i + 64]
        optimizer.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        optimizer.step()
torch.save(net.state_dict(), weights)
print(f"wrote {weights}")
