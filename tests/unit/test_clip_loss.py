"""The global-batch contrastive losses: 2 real gloo workers == one process on the whole batch."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raysl.methods.contrastive import all_reduce_grads, clip_loss, naive_clip_loss, siglip_loss

GLOBAL_B, D_IN, D = 12, 10, 6


def _towers() -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Parameter]:
    torch.manual_seed(0)
    img_net, txt_net = torch.nn.Linear(D_IN, D).double(), torch.nn.Linear(D_IN, D).double()
    bias = torch.nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    return img_net, txt_net, bias


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(GLOBAL_B, D_IN, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_B, D_IN, generator=g, dtype=torch.float64))


def _step(kind: str, x: torch.Tensor, t: torch.Tensor, chunk: int | None = None) -> tuple[float, list[torch.Tensor]]:
    img_net, txt_net, bias = _towers()
    img, txt = F.normalize(img_net(x), dim=-1), F.normalize(txt_net(t), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss = clip_loss(img, txt, scale, chunk) if kind == "softmax" else siglip_loss(img, txt, scale, bias, chunk)
    loss.backward()
    params = [*img_net.parameters(), *txt_net.parameters(), bias]
    all_reduce_grads(params)  # what DDP does: the mean of the workers' gradients
    return float(loss), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _worker(rank: int, port: int, kind: str, chunk: int | None, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, t = _data()
        rows = slice(rank * GLOBAL_B // 2, (rank + 1) * GLOBAL_B // 2)
        loss, grads = _step(kind, x[rows], t[rows], chunk)
        losses = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(losses)
        torch.save({"loss": float(losses) / 2, "grads": grads}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("chunk", [None, 4], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_two_workers_match_one_process_on_the_global_batch(kind: str, chunk: int | None, tmp_path: Path) -> None:
    """Also with the rows scored in recomputed blocks (6 local rows → blocks of 4 and 2)."""
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(_free_port(), kind, chunk, out), nprocs=2, join=True)
    ref_loss, ref_grads = _step(kind, *_data())
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["loss"] == pytest.approx(ref_loss, rel=1e-10)
        for g, r in zip(got["grads"], ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().max()) > 1e-6 for g in ref_grads)  # a vacuous all-zero match would not count


def test_local_loss_equals_naive_full_matrix_loss() -> None:
    x, t = _data()
    img, txt = F.normalize(x[:, :D], dim=-1), F.normalize(t[:, :D], dim=-1)
    scale = torch.tensor(7.0, dtype=torch.float64)
    assert float(clip_loss(img, txt, scale)) == pytest.approx(float(naive_clip_loss(img, txt, scale)), rel=1e-12)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_loss_is_symmetric_in_image_and_text(kind: str) -> None:
    x, t = _data()
    img, txt = F.normalize(x[:, :D], dim=-1), F.normalize(t[:, :D], dim=-1)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    fwd = clip_loss(img, txt, scale) if kind == "softmax" else siglip_loss(img, txt, scale, bias)
    swapped = clip_loss(txt, img, scale) if kind == "softmax" else siglip_loss(txt, img, scale, bias)
    assert float(fwd) == pytest.approx(float(swapped), rel=1e-12)
    # ... and it is a real contrastive loss: matched pairs give a lower loss than shuffled ones
    perm = torch.roll(torch.arange(len(img)), 1)
    aligned = clip_loss(img, img, scale) if kind == "softmax" else siglip_loss(img, img, scale, bias)
    shuffled = clip_loss(img, img[perm], scale) if kind == "softmax" else siglip_loss(img, img[perm], scale, bias)
    assert float(aligned) < float(shuffled)


def test_sigmoid_loss_has_no_batch_softmax() -> None:
    """Each pair is its own binary problem: adding a far-away negative pair only adds its own term."""
    x, t = _data()
    img, txt = F.normalize(x[:4, :D], dim=-1), F.normalize(t[:4, :D], dim=-1)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    full = siglip_loss(img, txt, scale, bias) * 4
    logits = scale * img @ txt.T + bias
    manual = -(F.logsigmoid(logits.diag()).sum() + F.logsigmoid(-logits).sum() - F.logsigmoid(-logits.diag()).sum())
    assert float(full) == pytest.approx(float(manual), rel=1e-12)


def _uneven_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, t = _data()
        rows = slice(0, 5) if rank == 0 else slice(5, GLOBAL_B)  # e.g. bad samples dropped on rank 0
        img_net, txt_net, _ = _towers()
        img, txt = F.normalize(img_net(x[rows]), dim=-1), F.normalize(txt_net(t[rows]), dim=-1)
        loss_sum = clip_loss(img, txt, torch.tensor(10.0, dtype=torch.float64)) * (rows.stop - rows.start)
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        torch.save({"loss_sum": float(total)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_workers_with_different_batch_sizes_still_score_every_pair(tmp_path: Path) -> None:
    """Undecodable samples leave ranks with unequal batches; the gather pads and cuts, and the summed
    per-row losses equal the single-process sum over the whole batch."""
    out = str(tmp_path / "uneven")
    mp.spawn(_uneven_worker, args=(_free_port(), out), nprocs=2, join=True)
    img_net, txt_net, _ = _towers()
    x, t = _data()
    img, txt = F.normalize(img_net(x), dim=-1), F.normalize(txt_net(t), dim=-1)
    ref = float(clip_loss(img, txt, torch.tensor(10.0, dtype=torch.float64))) * GLOBAL_B
    for rank in (0, 1):
        assert torch.load(f"{out}.{rank}", weights_only=True)["loss_sum"] == pytest.approx(ref, rel=1e-10)
