"""Speed of LatentDiT per preset, beside diffusers' DiTTransformer2DModel of the same size.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/bench_models.py

Prints a Markdown table: parameters, forward ms per batch, training images/s (forward, backward,
AdamW step), fp32 and bf16 autocast, and the ratio diffusers / facegen (> 1: facegen is faster).
Without tcmalloc, CPU timings vary by up to 3x between runs.
"""

import argparse
import os
import platform
import time

import torch
from diffusers import DiTTransformer2DModel

from facegen_cli.attributes import DEFAULT_ATTRIBUTES
from facegen_cli.config import load_preset
from facegen_cli.model import LatentDiT


def build_facegen(preset):
    return LatentDiT(attributes=DEFAULT_ATTRIBUTES, **preset.model)


def build_diffusers(preset):
    m = preset.model
    return DiTTransformer2DModel(
        num_attention_heads=m["num_heads"], attention_head_dim=m["hidden_size"] // m["num_heads"],
        in_channels=m["latent_channels"], out_channels=m["latent_channels"], num_layers=m["depth"],
        sample_size=m["latent_size"], patch_size=m["patch_size"], num_embeds_ada_norm=1000,
    )


def forward_fn(model, batch, preset):
    m = preset.model
    x = torch.randn(batch, m["latent_channels"], m["latent_size"], m["latent_size"])
    if isinstance(model, LatentDiT):
        t, y = torch.rand(batch), torch.randn(batch, len(DEFAULT_ATTRIBUTES)).sign()
        return lambda: model(x, t, y)
    t, labels = torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,))
    return lambda: model(x, timestep=t, class_labels=labels).sample


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure(model, preset, batch, repeats, bf16):
    forward = forward_fn(model, batch, preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward().float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inference():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            forward()

    return timed(inference, repeats), batch / timed(train_step, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "dit-s", "dit-l-face128"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, batch {args.batch}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '(none)')}\n")
    print("| preset | params | diffusers params | precision | fwd ms/batch | diffusers fwd | fwd ratio "
          "| train img/s | diffusers train | train ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        preset = load_preset(name)
        torch.manual_seed(0)
        ours, theirs = build_facegen(preset), build_diffusers(preset)
        params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (ours, theirs)]
        repeats = 1 if params[0] > 100 else args.repeats
        for bf16 in (False, True):
            (fwd, train), (fwd_d, train_d) = (measure(m, preset, args.batch, repeats, bf16) for m in (ours, theirs))
            print(f"| {name} | {params[0]:.1f}M | {params[1]:.1f}M | {'bf16' if bf16 else 'fp32'} "
                  f"| {fwd * 1e3:.0f} | {fwd_d * 1e3:.0f} | {fwd_d / fwd:.2f} "
                  f"| {train:.1f} | {train_d:.1f} | {train / train_d:.2f} |", flush=True)


if __name__ == "__main__":
    main()
