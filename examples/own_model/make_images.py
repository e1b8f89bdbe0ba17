"""Write scikit-learn's digits as an image-folder data set (train/<class>/*.png, test/<class>/*.png): a stand-in
for your own images. Usage: python examples/own_model/make_images.py OUT_FOLDER"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

out = Path(sys.argv[1])
digits = load_digits()
parts = train_test_split(np.arange(len(digits.target)), test_size=0.25, random_state=0)
splits = dict(zip(("train", "test"), parts, strict=True))
for split, index in splits.items():
    for i in index:
        folder = out / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
print(f"wrote {out}/train and {out}/test")
