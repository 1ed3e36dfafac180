"""Speed of LatentDiT per preset, beside diffusers' DiTTransformer2DModel of the same size.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/bench_models.py
    python benchmarks/bench_models.py --device cuda --presets dit-l-face128 --compile     # on a GPU

Prints a Markdown table: parameters, GFLOPs per image forward, forward ms per batch, training
images/s (forward, backward, AdamW step), seconds to sample 16 images at the preset's steps with
classifier-free guidance (one batched forward of 32 per step, as both samplers do), fp32 and bf16
autocast, peak GPU memory of training, and each beside diffusers' number as a ratio
(> 1: facegen is faster). Each time is the best of --repeats rounds in which the two models take turns.
Without tcmalloc, CPU timings vary by up to 3x between runs. On a GPU,
--compile wraps both models in torch.compile and MFU is reported against --peak-tflops.
"""

import argparse
import os
import platform
import time

import torch
from diffusers import DiTTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from facegen_cli.attributes import DEFAULT_ATTRIBUTES
from facegen_cli.config import load_preset
from facegen_cli.model import LatentDiT


def build_facegen(preset):
    return preset.model.build(DEFAULT_ATTRIBUTES)


def build_diffusers(preset):
    m = preset.model
    return DiTTransformer2DModel(
        num_attention_heads=m.num_heads, attention_head_dim=m.hidden_size // m.num_heads,
        in_channels=m.latent_channels, out_channels=m.latent_channels, num_layers=m.depth,
        sample_size=m.latent_size, patch_size=m.patch_size, num_embeds_ada_norm=1000,
        activation_fn="gelu",  # LatentDiT's exact GELU (diffusers' default is the tanh approximation)
    )


def forward_fn(model, batch, preset, device):
    m = preset.model
    x = torch.randn(batch, m.latent_channels, m.latent_size, m.latent_size, device=device)
    if isinstance(model, LatentDiT) or isinstance(getattr(model, "_orig_mod", None), LatentDiT):
        t, y = torch.rand(batch, device=device), torch.randn(batch, len(DEFAULT_ATTRIBUTES), device=device).sign()
        return lambda: model(x, t, y)
    t, labels = torch.randint(0, 1000, (batch,), device=device), torch.randint(0, 1000, (batch,), device=device)
    return lambda: model(x, timestep=t, class_labels=labels).sample


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_of(fns, repeats, device):
    """The best time of each function over `repeats` rounds, the functions taking turns within a round (so a
    slow spell of the machine falls on both models alike), after one warm-up (and compilation) call each.
    As timeit says, the minimum is the figure least disturbed by other work on the machine."""
    for fn in fns:
        fn()
    times = [[seconds(fn, device) for fn in fns] for _ in range(repeats)]
    return [min(column) for column in zip(*times)]


def gflops_per_image(model, preset, device):
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        forward_fn(model, 2, preset, device)()
    return counter.get_total_flops() / 2 / 1e9


def workloads(model, preset, batch, bf16, device):
    """The timed jobs of one model: forward of a batch, a training step on it (forward, backward, AdamW), and
    sampling 16 images at the preset's steps (one guided forward of 32 per step)."""
    forward = forward_fn(model, batch, preset, device)
    guided = forward_fn(model, 32, preset, device)  # 16 images, conditional + unconditional
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as facegen train steps
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def train_step():
        with autocast():
            loss = forward().float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inference():
        with torch.inference_mode(), autocast():
            forward()

    def sample16():
        with torch.inference_mode(), autocast():
            for _ in range(preset.sample.steps):
                guided()

    return inference, train_step, sample16


def peak_training_memory(train_step, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats()
    train_step()
    return torch.cuda.max_memory_allocated() / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "demo", "dit-s", "dit-l-face128"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--no-sampling", action="store_true", help="skip the (slow on CPUs) sampling column")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's measured peak, for MFU")
    args = parser.parse_args()

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, batch {args.batch}, "
          f"compile {args.compile}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '(none)')}\n")
    print("| preset | params | GFLOPs/img | precision | fwd ms/batch | diffusers | ratio | train img/s | diffusers "
          "| ratio | sample 16 s | diffusers | ratio | peak train GiB | MFU train |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        preset = load_preset(name)
        torch.manual_seed(0)
        ours, theirs = (build(preset).to(args.device) for build in (build_facegen, build_diffusers))
        params = sum(p.numel() for p in ours.parameters()) / 1e6
        flops = gflops_per_image(ours, preset, args.device)
        if args.compile:
            ours, theirs = torch.compile(ours), torch.compile(theirs)
        for precision in args.precisions:
            bf16 = precision == "bf16"
            (fwd, train_step, sample), (fwd_d, train_step_d, sample_d) = (
                workloads(m, preset, args.batch, bf16, args.device) for m in (ours, theirs))
            fwd, fwd_d, train, train_d = best_of([fwd, fwd_d, train_step, train_step_d], args.repeats, args.device)
            train, train_d = args.batch / train, args.batch / train_d
            sample, sample_d = (best_of([sample, sample_d], max(1, args.repeats // 2), args.device)
                                if not args.no_sampling else (float("nan"), float("nan")))
            memory = peak_training_memory(train_step, args.device)
            mfu = f"{100 * 3 * flops * train / 1e3 / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a"
            print(f"| {name} | {params:.1f}M | {flops:.2f} | {precision} "
                  f"| {fwd * 1e3:.0f} | {fwd_d * 1e3:.0f} | {fwd_d / fwd:.2f} "
                  f"| {train:.1f} | {train_d:.1f} | {train / train_d:.2f} "
                  f"| {sample:.2f} | {sample_d:.2f} | {sample_d / sample:.2f} | {memory:.2f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
