"""
The offline feature network for the embedded dataset: a small CNN trained once on the clean
Fashion-MNIST training set. evaluate.py uses its penultimate layer (128-d) as the feature space
for FID / KID / precision-recall / RMD / memorisation ("*_fmnist" metrics, not comparable with
Inception numbers) and its logits for IS and condition accuracy.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models.common import atomic_torch_save


class FashionClassifier(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, feature_dim=128):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        """x: (N, C, 32, 32) in [-1, 1] -> (N, feature_dim)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def features_and_logits(model, images_uint8, batch_size=500):
    """uint8 (N, H, W, C) -> float64 features (N, D) and logits (N, K)."""
    feats, logits = [], []
    model.eval()
    for start in range(0, len(images_uint8), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images_uint8[start: start + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
        f = model.features(x)
        feats.append(f.double())
        logits.append(model.head(f).double())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


# classifiers that ship with the repository, named fashion-mnist-<identity of the training split>.pt:
# the real training set's (seed 0, 5 epochs, 2 threads; test accuracy 0.8940), evaluate.py's default
SHIPPED_CLASSIFIERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def train_classifier(train_x, train_y, test_x, test_y, epochs=5, min_steps=300, seed=0, log=print):
    """train_x/test_x: uint8 (N, H, W, C); returns (model, test accuracy). Trains for `epochs`
    epochs of batch 256, more on small sets (>= min_steps)."""
    epochs = max(epochs, -(-min_steps // -(-len(train_y) // 256)))
    torch.manual_seed(seed)
    model = FashionClassifier(num_classes=int(train_y.max()) + 1, in_channels=train_x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = torch.from_numpy(np.ascontiguousarray(train_x)).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(train_y).long()
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * -(-len(y_all) // 256), desc="feature classifier", unit="batch", disable=None)  # a bar on a terminal
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_all), generator=g).split(256):
            loss = F.cross_entropy(model(x_all[idx].float() / 127.5 - 1), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
    bar.close()
    _, logits = features_and_logits(model, test_x)
    acc = float((logits.argmax(1) == test_y).mean())
    log(f"feature classifier: {epochs} epochs, test accuracy {acc:.4f}")
    return model.eval(), acc


def load_or_train_classifier(path, load_split, log=print, shipped=None):
    """The classifier that ships with the repository for this training set (`shipped`, when that
    file exists), else the cached one at `path`, trained (and saved atomically) on first use.
    load_split(split) -> (uint8 NHWC images, labels) of the clean dataset."""
    for p in (shipped, path):
        if p and os.path.exists(p):
            state = torch.load(p, map_location="cpu", weights_only=True)
            model = FashionClassifier(state["num_classes"], state["in_channels"])
            model.load_state_dict(state["model"])
            return model.eval(), state["test_accuracy"]
    log(f"training the feature classifier on the clean training set (cached at {path})")
    (train_x, train_y), (test_x, test_y) = load_split("train"), load_split("test")
    model, acc = train_classifier(train_x, train_y, test_x, test_y, log=log)
    atomic_torch_save(path, {"model": model.state_dict(), "num_classes": model.head.out_features,
                             "in_channels": train_x.shape[-1], "test_accuracy": acc})
    return model, acc
