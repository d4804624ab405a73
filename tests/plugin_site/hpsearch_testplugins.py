"""Model plugins for the tests, installed by putting this folder on the path (its .dist-info registers them):
one whose build always fails, one that brings its own training loop, and one whose own loop checkpoints."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = {"name": "hidden", "type": "int", "low": 4, "high": 16, "domain": [1, 64], "note": "Hidden width."}


class BrokenBuild:
    hyperparameters = [HIDDEN]

    @staticmethod
    def build(params: dict[str, Any], dataset: Any) -> nn.Module:
        raise RuntimeError("this network cannot be built")


class OwnLoop:
    hyperparameters = [HIDDEN, {"name": "lr", "type": "float", "low": 1e-3, "high": 1e-1, "log": True,
                                "domain": [1e-6, 1.0], "note": "Adam's step size."}]

    @staticmethod
    def build(params: dict[str, Any], dataset: Any) -> nn.Module:
        n_in = 1
        for d in dataset.input_shape:
            n_in *= d
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, int(params["hidden"])), nn.ReLU(),
                             nn.Linear(int(params["hidden"]), dataset.n_outputs))

    @staticmethod
    def train(params: dict[str, Any], data: Any, device: str, report: Any) -> nn.Module:
        from types import SimpleNamespace

        info = SimpleNamespace(input_shape=tuple(data.x_train.shape[1:]), n_outputs=int(data.y_train.max()) + 1)
        net = OwnLoop.build(params, info).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=float(params["lr"]))
        for epoch in range(1, 100):
            net.train()
            loss = F.cross_entropy(net(data.x_train), data.y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
            net.eval()
            with torch.no_grad():
                out = net(data.x_val)
                val_loss = float(F.cross_entropy(out, data.y_val))
                acc = float((out.argmax(1) == data.y_val).float().mean())
            if report(epoch, {"train_loss": float(loss), "val_loss": val_loss, "val_accuracy": acc}):
                break
        return net


class ResumableLoop:
    """An own loop that checkpoints: shuffled mini-batches and dropout (both drawn from torch's global
    generator), its state handed to `report` every epoch, continued from `resume`."""

    hyperparameters = OwnLoop.hyperparameters

    @staticmethod
    def build(params: dict[str, Any], dataset: Any) -> nn.Module:
        n_in = 1
        for d in dataset.input_shape:
            n_in *= d
        hidden = int(params["hidden"])
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(0.2),
                             nn.Linear(hidden, dataset.n_outputs))

    @staticmethod
    def train(params: dict[str, Any], data: Any, device: str, report: Any, resume: Any = None) -> nn.Module:
        from types import SimpleNamespace

        info = SimpleNamespace(input_shape=tuple(data.x_train.shape[1:]), n_outputs=int(data.y_train.max()) + 1)
        net = ResumableLoop.build(params, info).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=float(params["lr"]))
        start = 1
        if resume is not None:
            net.load_state_dict(resume.state["model"])
            opt.load_state_dict(resume.state["optimizer"])
            resume.restore_random_state()
            start = resume.epoch + 1
        for epoch in range(start, 1000):
            net.train()
            total = 0.0
            for batch in torch.randperm(len(data.x_train), device=device).split(16):
                loss = F.cross_entropy(net(data.x_train[batch]), data.y_train[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
            net.eval()
            with torch.no_grad():
                out = net(data.x_val)
                val_loss = float(F.cross_entropy(out, data.y_val))
                acc = float((out.argmax(1) == data.y_val).float().mean())
            metrics = {"train_loss": total / len(data.x_train), "val_loss": val_loss, "val_accuracy": acc}
            if report(epoch, metrics, state={"model": net.state_dict(), "optimizer": opt.state_dict()}):
                break
        return net
