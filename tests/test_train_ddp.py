"""fastctx.train under 2 processes (gloo, CPU): DDP + SyncBatchNorm replicas stay identical and
match a single-process run with the same global batch."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastctx.train import SyntheticScenes, TrainConfig, train
from fastctx.train.dist import CPUSyncBatchNorm
from tests.test_train import TinySeg

ITERS = 4


def _cfg(out_dir, batch_size):
    return TrainConfig(iters=ITERS, batch_size=batch_size, crop=(32, 32), ckpt_every=ITERS, log_every=1,
                       device="cpu", out_dir=out_dir, model_name="tiny")


def _data():
    return SyntheticScenes("train", length=12, size=(40, 40), num_classes=5)


def _model():
    torch.manual_seed(5)
    return TinySeg(5, width=8, dropout=0.0)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        res = train(_model(), _data(), _cfg(os.path.join(out, "ddp"), batch_size=2))
        net = res["model"]
        assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
        n_sync = sum(isinstance(m, CPUSyncBatchNorm) for m in net.modules())
        torch.save({"losses": res["losses"], "state": net.module.state_dict(), "n_sync": n_sync},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["n_sync"] == 2 and r1["n_sync"] == 2  # both BatchNorms synchronized
    for k, v in r0["state"].items():  # replicas identical, bit for bit (running stats included)
        assert torch.equal(v, r1["state"][k]), k
    assert r0["losses"] == r1["losses"]  # the logged loss is the all-reduced mean

    single = train(_model(), _data(), _cfg(str(tmp_path / "single"), batch_size=4))
    np.testing.assert_allclose(r0["losses"], single["losses"], rtol=1e-5)
    for k, v in single["model"].state_dict().items():
        torch.testing.assert_close(r0["state"][k].to(v.dtype), v, rtol=1e-4, atol=1e-5, msg=k)
    assert os.path.isfile(tmp_path / "ddp" / "latest.pth") and (tmp_path / "ddp" / "log.jsonl").read_text().count("\n") == ITERS
