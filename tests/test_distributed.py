"""The training loop under torch.distributed: 2 CPU processes (gloo), a few steps, replicas stay identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _nets import tiny_net
from torch import nn

from nenni_deploy.training import TrainConfig, make_method, train
from nenni_deploy.training import checkpoint as ckpt

WORLD = 2


def _no_bn_net() -> nn.Module:
    """Without batch norm, the mean loss over the global batch is the mean of the ranks' losses, so a
    data-parallel step equals a single-process step on the whole batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)


STANDARD = TrainConfig(epochs=2, batch_size=16, lr=0.1, max_steps_per_epoch=3, val_split=0.25)
ADVERSARIAL = TrainConfig(epochs=1, batch_size=16, lr=0.05, max_steps_per_epoch=2, val_split=0.25)


def _adversarial_method():
    return make_method("trades", steps=2, slim_layers=["block", "down"])


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        net = _no_bn_net()
        train(net, x, y, STANDARD, Path(out) / "standard", progress=False, curves=False)
        ckpt.save_model(Path(out) / f"standard-{rank}.safetensors", net, "x")
        # batch norm, a two-forward method (TRADES: clean and adversarial) and SLIM's random draws
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        net = tiny_net(seed=rank).train()
        train(net, x, y, ADVERSARIAL, Path(out) / "trades", method=_adversarial_method(), progress=False, curves=False)
        ckpt.save_model(Path(out) / f"trades-{rank}.safetensors", net, "x")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes: seconds of start-up each
def test_two_processes_keep_identical_replicas_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    for case in ("standard", "trades"):
        a = ckpt.load_tensors(tmp_path / f"{case}-0.safetensors")
        b = ckpt.load_tensors(tmp_path / f"{case}-1.safetensors")
        assert a.keys() == b.keys()
        for k in a:  # parameters and batch-norm buffers alike
            assert torch.equal(a[k], b[k]), (case, k)
    initial = tiny_net(seed=0).state_dict()
    trained = ckpt.load_tensors(tmp_path / "trades-0.safetensors")
    assert not torch.equal(initial["conv1.weight"], trained["conv1.weight"])

    # rank 0 alone wrote the run directory, one record per epoch
    records = ckpt.read_metrics(tmp_path / "standard")
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 6
    assert json.loads((tmp_path / "standard" / ckpt.LAST_STATE).read_text())["step"] == 6

    # two processes on halves of each batch == one process on whole batches (gradients are averaged)
    torch.set_num_threads(1)
    x, y = _data()
    single = _no_bn_net()
    train(single, x, y, STANDARD, tmp_path / "single", progress=False, curves=False)
    ddp = ckpt.load_tensors(tmp_path / "standard-0.safetensors")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)
    single_records = ckpt.read_metrics(tmp_path / "single")
    assert records[-1]["train_loss"] == pytest.approx(single_records[-1]["train_loss"], rel=1e-5)
    assert records[-1]["train_acc"] == single_records[-1]["train_acc"]
