"""Swap verification without the layer in memory (mesh/verify.py): every expert's sha256 streamed,
a sample probed, one expert's weights held at a time."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from experts import ExpertGroup, load_spec
from experts.builtin import build_model, save_checkpoint
from mesh.verify import PROBE_ROWS_PER_EXPERT, SwapVerifier, probe_sample
from tests.checkpoints import zoo  # noqa: F401


def test_the_sample_is_drawn_from_the_experts_and_fixed_by_its_seed():
    experts = list(range(0, 256, 2))
    sample = probe_sample(experts, 8, seed=3)
    assert len(sample) == 8 and set(sample) <= set(experts) and sample == sorted(sample)
    assert probe_sample(experts, 8, seed=3) == sample != probe_sample(experts, 8, seed=4)
    assert probe_sample([5, 1, 5], 8, seed=0) == [1, 5] and probe_sample(experts, 0, seed=0) == []


def _staged(path, layer: int, experts: list[int], verifier: SwapVerifier) -> dict:
    """What a group holding `experts` reports from stage_experts (experts/actor.py), computed here."""
    group = ExpertGroup.from_checkpoint(path, {layer: experts}, torch.float32)
    probed, rows = verifier.probe(experts)
    out = group.forward(layer, rows, probed, [PROBE_ROWS_PER_EXPERT] * len(probed)) if probed else None
    return {"checksums": group.layers[layer].checksums, "probe": out}


def test_a_holders_report_is_checked_on_every_hash_and_the_sampled_probes(zoo):
    path = zoo.checkpoint("mixtral")
    spec = load_spec(path)
    layer, experts = spec.moe_layers[0], list(range(spec.num_experts))
    verifier = SwapVerifier(spec, str(path), layer, experts, torch.float32, num_sampled=2)
    read = ExpertGroup.from_checkpoint(path, {layer: experts}).layers[layer].checksums
    assert verifier.versions() == {e: c[:12] for e, c in zip(experts, read)}
    assert len(verifier.sampled) == 2
    holder = sorted({verifier.sampled[0], *[e for e in experts if e not in verifier.sampled][:2]})
    good = _staged(path, layer, holder, verifier)
    verifier.check("g0", holder, good)
    with pytest.raises(ValueError, match="g0: sha256"):
        verifier.check("g0", holder, {**good, "checksums": good["checksums"][::-1]})
    with pytest.raises(ValueError, match="g0 ran no probe"):
        verifier.check("g0", holder, {**good, "probe": None})
    with pytest.raises(ValueError, match="g0: probe output differs"):
        verifier.check("g0", holder, {**good, "probe": good["probe"] * 1.01})
    with pytest.raises(ValueError, match="NaN"):
        verifier.check("g0", holder, {**good, "probe": good["probe"] * float("nan")})
    unsampled = [e for e in experts if e not in verifier.sampled][:2]
    assert verifier.probe(unsampled) == ([], None)
    verifier.check("g1", unsampled, _staged(path, layer, unsampled, verifier))  # hashes alone


def test_another_architecture_is_refused_by_name(zoo):
    spec = load_spec(zoo.checkpoint("mixtral"))
    with pytest.raises(ValueError, match="another shape"):
        SwapVerifier(spec, str(zoo.checkpoint("qwen3_moe")), spec.moe_layers[0], [0], torch.float32)


PEAK_SCRIPT = """
import sys, threading, time, torch
import experts.checkpoint, experts.group, experts.safetensors
from experts import load_spec
from mesh.verify import SwapVerifier, hand_back_large_frees
hand_back_large_frees()  # as the controller does
def rss_anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))
x = torch.randn(64, 64); (x @ x).sum()  # torch warm, as an idle controller's
idle, peak, done = rss_anon(), [0], threading.Event()
def sample():  # RssAnon every 0.5 ms (file pages, a library loaded on first use, are not the bound's)
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
path = sys.argv[1]
SwapVerifier(load_spec(path), path, 0, list(range(16)), torch.float32, 8)
done.set()
sampler.join()
print(peak[0] - idle)
"""


def test_a_whole_layer_swap_holds_about_two_experts_not_the_layer(tmp_path):
    """16 experts of 6 MB (fp32, H=512, I=1024), 8 probed: the process's anonymous RSS (sampled every
    0.5 ms) peaks about two experts' bytes over idle (one read, one packed for the probe), not the
    layer's 96 MB."""
    hidden, inter = 512, 1024
    path = save_checkpoint(build_model("mixtral", seed=0, hidden_size=hidden, intermediate_size=inter,
                                       num_local_experts=16, num_hidden_layers=1), tmp_path / "ckpt")
    one_expert = 3 * hidden * inter * 4
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert int(out) <= 2.5 * one_expert, f"peak rose by {int(out) / one_expert:.2f} experts' bytes"
