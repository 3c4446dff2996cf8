"""
The label-free feature network for the embedded dataset: a small convolutional autoencoder trained on
the Fashion-MNIST training images without labels; its 128-d bottleneck is evaluate.py's "*_ae" space.
Why an autoencoder: the classifier's features keep only what tells the 10 classes apart, while the
bottleneck must keep what the decoder needs to redraw each image (silhouette, size, sleeve / heel shape,
brightness, print), i.e. the within-class variation; a contrastive encoder would be made invariant to
its augmentations (crops, flips, contrast), which are such variations, and trains far slower on a CPU.
Only the encoder is kept, shipped as models/weights/autoencoder-fashion-mnist-<training-set identity>.pt.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models.common import atomic_torch_save, one_thread

SHIPPED_AUTOENCODERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


class Encoder(nn.Module):
    """(N, C, 32, 32) in [-1, 1] -> (N, feature_dim): three stride-2 3x3 convolutions (32 -> 4
    pixels) and a linear bottleneck (no activation, so every direction of the code is used)."""

    def __init__(self, in_channels=1, feature_dim=128):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


class Decoder(nn.Module):
    """The mirror image of Encoder: (N, feature_dim) -> (N, C, 32, 32), pixels in [-1, 1]. Training only."""

    def __init__(self, in_channels=1, feature_dim=128):
        super().__init__()
        self.fc = nn.Linear(feature_dim, 64 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.up3 = nn.ConvTranspose2d(32, in_channels, 4, stride=2, padding=1)

    def forward(self, z):
        x = F.relu(self.fc(z)).view(len(z), 64, 4, 4)
        x = F.relu(self.up1(x))
        x = F.relu(self.up2(x))
        return self.up3(x)  # linear: a tanh here can saturate at -1 early on (mostly dark images) and stop learning


def to_input(images_uint8):
    """uint8 (N, H, W, C), numpy or torch -> float (N, C, H, W) in [-1, 1]."""
    x = images_uint8 if isinstance(images_uint8, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images_uint8))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def autoencoder_features(encoder, images_uint8, batch_size=500):
    """uint8 (N, H, W, C) -> float64 bottleneck features (N, D)."""
    encoder.eval()
    return torch.cat([encoder(to_input(images_uint8[s:s + batch_size])).double()
                      for s in range(0, len(images_uint8), batch_size)]).numpy()


@torch.no_grad()
def reconstruction_mse(encoder, decoder, images_uint8, batch_size=500):
    """Mean squared error per pixel (in [-1, 1] units) of the reconstructions of `images_uint8`."""
    total = 0.0
    for s in range(0, len(images_uint8), batch_size):
        x = to_input(images_uint8[s:s + batch_size])
        total += float(F.mse_loss(decoder(encoder(x)), x, reduction="sum"))
    return total / int(np.prod(images_uint8.shape))  # a Python float: torch.load(weights_only=True) reads it back


def train_autoencoder(train_x, test_x, epochs=4, min_steps=150, batch_size=128, lr=2e-3, feature_dim=128, seed=0, log=print):
    """train_x / test_x: uint8 (N, H, W, C). Minimises the pixel MSE of the reconstructions (Adam,
    lr decayed by cosine to 0) for `epochs` epochs, on one thread and with a fixed seed:
    deterministic. Small sets (the tests' fake data) train on smaller batches (>= 8 an epoch, >= 16
    images) for more epochs (>= min_steps steps), a few seconds. Returns (encoder, test MSE)."""
    batch_size = min(batch_size, max(16, len(train_x) // 8))
    steps_per_epoch = -(-len(train_x) // batch_size)
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    total = epochs * steps_per_epoch
    with one_thread():
        torch.manual_seed(seed)
        encoder, decoder = Encoder(train_x.shape[-1], feature_dim), Decoder(train_x.shape[-1], feature_dim)
        params = [*encoder.parameters(), *decoder.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + np.cos(np.pi * step / total)))
        x_all = to_input(train_x)
        g = torch.Generator().manual_seed(seed)
        bar = tqdm(total=total, desc="feature autoencoder", unit="batch", disable=None)  # a bar on a terminal
        for _ in range(epochs):  # no dropout or batch norm: train and eval modes compute alike
            for idx in torch.randperm(len(x_all), generator=g).split(batch_size):
                x = x_all[idx]
                loss = F.mse_loss(decoder(encoder(x)), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
        bar.close()
        mse = reconstruction_mse(encoder, decoder, test_x)
    log(f"feature autoencoder: {epochs} epochs, test reconstruction MSE {mse:.4f}")
    return encoder.eval(), mse


def load_or_train_autoencoder(path, load_split, log=print, shipped=None):
    """The encoder that ships with the repository for this training set (`shipped`, when that file
    exists), else the cached one at `path`, trained (and saved atomically) on first use.
    load_split(split) -> (uint8 NHWC images, labels) of the clean dataset (the labels are unused).
    Returns (encoder, test reconstruction MSE)."""
    for p in (shipped, path):
        if p and os.path.exists(p):
            state = torch.load(p, map_location="cpu", weights_only=True)
            encoder = Encoder(state["in_channels"], state["feature_dim"])
            encoder.load_state_dict(state["encoder"])
            return encoder.eval(), state["test_mse"]
    log(f"training the feature autoencoder on the clean training images (cached at {path})")
    train_x, test_x = load_split("train")[0], load_split("test")[0]
    encoder, mse = train_autoencoder(train_x, test_x, log=log)
    atomic_torch_save(path, {"encoder": encoder.state_dict(), "in_channels": train_x.shape[-1],
                             "feature_dim": encoder.fc.out_features, "test_mse": mse})
    return encoder, mse
