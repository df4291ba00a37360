import os

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(min(2, os.cpu_count() or 1))


class ConvMLP(torch.nn.Module):
    """Small net with every branch of the rules: a factored 4-D conv weight, a factored and an
    unfactored linear weight, and 1-D biases."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)  # (32,16,3,3): factored
        self.fc1 = torch.nn.Linear(512, 64)  # (64,512): factored
        self.fc2 = torch.nn.Linear(64, 10)  # (10,64): not factored

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, 8, 8, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return x, y


def make_net(seed=0):
    torch.manual_seed(seed)
    return ConvMLP()


def train(net, opt, batch, steps, start=0):
    """``steps`` updates on rotating 8-example slices of ``batch``; returns the losses."""
    x, y = batch
    losses = []
    for i in range(start, start + steps):
        xi, yi = x[(i % 4) * 8:(i % 4) * 8 + 8], y[(i % 4) * 8:(i % 4) * 8 + 8]
        net.zero_grad()
        loss = F.cross_entropy(net(xi), yi)
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
    return losses
