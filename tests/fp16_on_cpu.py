"""Run facedist/train.py with Accelerate's fp16 path (autocast float16 + GradScaler) on the CPU.

Accelerate enables fp16 only on GPUs; CPU autocast and torch.amp.GradScaler("cpu") support float16, so
this gives the trainer's fp16 code (scaled backward, unscaling the head, overflow skips, scaler state in
checkpoints) something to run on without a GPU. Usage: python fp16_on_cpu.py INIT_SCALE TRAIN_ARGS...
"""

import runpy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

_init = Accelerator.__init__
INIT_SCALE = float(sys.argv[1]) if __name__ == "__main__" else 2.0**16


def _init_with_cpu_fp16(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.state.mixed_precision == "fp16" and self.device.type == "cpu":
        self.native_amp = True  # accelerator.autocast() -> torch.autocast("cpu", dtype=torch.float16)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)


if __name__ == "__main__":
    Accelerator.__init__ = _init_with_cpu_fp16
    train = str(Path(__file__).resolve().parent.parent / "facedist" / "train.py")
    sys.argv = [train, *sys.argv[2:]]
    runpy.run_path(train, run_name="__main__")
