"""Devices and precision: one vocabulary for every command.

    --device     auto (a GPU when there is one), cpu, cuda, cuda:N
    --precision  auto (bf16 where the device runs it natively, else fp32), fp32, bf16, fp16

Networks run under autocast in the 16-bit precisions; latents are integrated and weights kept in float32.
Training hands the same names to accelerate, which calls fp32 "no". torch is imported where it is used:
the CLI reads the help texts here before any command runs.
"""

from .errors import FacegenError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N."
PRECISION_HELP = ("auto (bf16 where the device runs it natively: about twice as fast; else fp32), fp32 (the same "
                  "bits on every machine), bf16 or fp16.")


def pick_device(device="auto"):
    """The torch device a --device value names, refused in one line when it is not there."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise FacegenError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
    if kind not in ("cpu", "cuda"):
        raise FacegenError(f"unknown device {device!r}; use {DEVICE_HELP}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FacegenError(f"--device {device} asked for, but no CUDA device is available")
    return device


def fast_bf16(device):
    """Whether bfloat16 matrix products are native on `device` (recent GPUs; CPUs with AVX-512 BF16 or
    AMX): there sampling in bf16 takes about half the time. Elsewhere it is emulated, and slower."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision, device):
    """fp32, bf16 or fp16 for a --precision value on `device` (auto picks bf16 where it is native)."""
    if precision not in PRECISIONS:
        raise FacegenError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def accelerate_precision(precision, device):
    """accelerate's name for a precision: no, bf16 or fp16."""
    resolved = resolve_precision(precision, device)
    return "no" if resolved == "fp32" else resolved


def autocast(device, precision):
    """The context networks run in: autocast to the 16-bit type of a resolved precision, else nothing."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return torch.autocast(torch.device(device).type, dtypes.get(precision, torch.bfloat16), enabled=precision in dtypes)
