"""The CPU memory policy (pointbert.memory): freed large blocks are reused instead of faulted in afresh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pointbert import engine, memory
from pointbert.patches import PatchEmbed
from tests.test_engine import ToyTask, toy_cfg

FAULTS = """
import resource, sys, torch
from pointbert import memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory() and memory.keep_freed_memory()  # applied, idempotent

def step():  # a small training-like step: 64 MiB activations and gradients, freed at its end
    w = torch.randn(256, 1024, requires_grad=True)
    (torch.randn(16384, 256) @ w).relu().square().sum().backward()

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(memory._glibc() is None, reason="needs Linux with glibc")
def test_kept_memory_is_reused_without_most_page_faults():
    """Steady-state steps in a fresh process: glibc's default maps every large block afresh (a page
    fault per 4 KiB page, ~130k per step here); with the policy most freed pages are reused (0 to 33k)."""
    def faults(policy: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, policy], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default = faults("default")
    assert default > 3 * 3 * 64 * 2**20 // 4096  # at least three 64 MiB blocks per step mapped afresh
    assert faults("keep") < default / 2


def test_off_linux_the_policy_reports_it_is_not_applied(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(memory, "_applied", None)
    assert memory.keep_freed_memory() is False
    assert memory._applied is False  # tried once: the models' hook does not look for glibc again


@pytest.mark.parametrize("keep", [True, False])
def test_fit_applies_the_policy_on_cpu_unless_switched_off(tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(memory, "automatic", True)
    engine.fit(ToyTask(toy_cfg(epochs=1, keep_memory=keep)), tmp_path / "run", device="cpu", quiet=True)
    assert bool(calls) == keep
    assert memory.automatic == keep  # switched off: not by the models' first training forward either


def test_models_apply_the_policy_at_a_training_forward_on_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory, "automatic", True)
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1))
    embed, x = PatchEmbed(16, (8, 16, 32)), torch.randn(2, 4, 8, 3)
    embed.eval()(x)
    with torch.no_grad():
        embed.train()(x)
    assert not calls  # inference and forwards without autograd keep glibc's default
    embed(x)
    assert calls == [1]
    monkeypatch.setattr(memory, "automatic", False)
    embed(x)
    assert calls == [1]


APPLIED = """
import torch
from pointbert import memory
from pointbert.config import preset
from pointbert.heads import Classifier
model = Classifier(preset("tiny-classifier"))
model(torch.rand(2, 64, 3)).sum().backward()
print(memory._applied, memory.automatic)
"""


@pytest.mark.skipif(memory._glibc() is None, reason="needs Linux with glibc")
@pytest.mark.parametrize("env, expected", [(None, "True True"), ("0", "None False"), ("off", "None False")])
def test_a_training_loop_of_ones_own_gets_the_policy_unless_the_environment_says_no(env, expected):
    env = {k: v for k, v in os.environ.items() if k != "POINTBERT_KEEP_MEMORY"} | (
        {"POINTBERT_KEEP_MEMORY": env} if env else {})
    out = subprocess.run([sys.executable, "-c", APPLIED], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-2:] == expected.split()
