"""The models on a CUDA device against the same weights on the CPU: outputs and gradients (fp32), and the
bf16 autocast step close to fp32. Skipped without CUDA (``benchmarks/gpu.sh check`` runs them on the card).

kNN ranks neighbours by a matrix product whose last bits differ between devices; the seeded clouds here
have no neighbour that close to a tie, so the groups, and everything after them, agree.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pointbert.config import preset
from pointbert.heads import Classifier, PartSegmenter
from pointbert.tokenizer import DiscreteVAE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cloud(B: int, N: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (B, N, 3)).astype(np.float32))


def twins(name: str, model_cls: type) -> tuple:
    cfg = preset(name)
    cfg.backbone.drop_path_rate, cfg.head.dropout, cfg.partseg.dropout = 0.0, 0.0, 0.0  # no device-drawn noise
    torch.manual_seed(0)
    cpu = model_cls(cfg).train()
    return cfg, cpu, copy.deepcopy(cpu).cuda()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    b = b.float().cpu()
    err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    assert err < tol, f"relative error {err:.2e}"


def grads_close(cpu: torch.nn.Module, gpu: torch.nn.Module, tol: float = 1e-3) -> None:
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.grad is not None:
            assert q.grad is not None, name
            close(p.grad, q.grad, tol)


def test_classifier_matches_the_cpu():
    cfg, cpu, gpu = twins("tiny-classifier", Classifier)
    pts, labels = cloud(4, cfg.data.num_points), torch.tensor([0, 3, 5, 9])
    out_c, out_g = cpu(pts), gpu(pts.cuda())
    close(out_c, out_g)
    F.cross_entropy(out_c, labels).backward()
    F.cross_entropy(out_g, labels.cuda()).backward()
    grads_close(cpu, gpu)
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        close(cpu(pts), gpu(pts.cuda()))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            close(cpu(pts), gpu(pts.cuda()), 5e-2)  # bf16: about 2-3 significant digits


def test_part_segmenter_matches_the_cpu():
    cfg, cpu, gpu = twins("tiny-partseg", PartSegmenter)
    pts, category = cloud(2, cfg.data.num_points, 1), torch.tensor([0, 3])
    out_c, out_g = cpu(pts, category), gpu(pts.cuda(), category.cuda())
    close(out_c, out_g)
    out_c.square().mean().backward()
    out_g.square().mean().backward()
    grads_close(cpu, gpu)


def test_tokenizer_ids_and_decoding_match_the_cpu():
    cfg, cpu, gpu = twins("tiny-tokenizer", DiscreteVAE)
    pts = cloud(2, cfg.data.num_points, 2)
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        nb_c, c_c = cpu.group(pts)
        nb_g, c_g = gpu.group(pts.cuda())
        close(nb_c, nb_g, 1e-6)
        close(cpu.logits(nb_c, c_c), gpu.logits(nb_g, c_g))
        ids = cpu.tokenize(pts)
        assert torch.equal(ids, gpu.tokenize(pts.cuda()).cpu())
        close(cpu.decode(ids, c_c)[1], gpu.decode(ids.cuda(), c_g)[1])
