"""Images/s and data-wait fraction of the training loop as the device sees them, read on logging steps only.

Once a step no longer waits on the host, the CPU runs ahead of the GPU: host clocks would time kernel
launches, and a loader that is slower than the GPU would hide behind queued work. On CUDA the marks are
events on the current stream, timestamped when the GPU reaches them: the gap between "waiting for data"
(the previous step's work is done) and "data ready" (the batch is on the device) is time the GPU had
nothing to do. Reading them waits for the GPU, so it happens only when a log record is written. On the
CPU the work is done when the host gets there, and host clocks are the truth.
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    """`waiting_for_data()` before fetching a batch, `data_ready()` once it is on the device, `read(images)`
    on logging steps: {"images_per_s", "data_wait_fraction"} over the steps since the last read."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self.waiting = None
        self.waits: list = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, begin, end) -> float:
        return begin.elapsed_time(end) / 1000 if self.cuda else end - begin

    def waiting_for_data(self) -> None:
        self.waiting = self._mark()
        if self.start is None:  # an interval starts at its first step (evaluation and checkpoints stay out)
            self.start = self.waiting

    def data_ready(self) -> None:
        self.waits.append((self.waiting, self._mark()))

    def read(self, images_per_step: int) -> dict:
        end = self._mark()
        if self.cuda:
            end.synchronize()
        elapsed = self._seconds(self.start, end)
        waited = sum(self._seconds(begin, ready) for begin, ready in self.waits)
        result = {"images_per_s": images_per_step * len(self.waits) / elapsed, "data_wait_fraction": waited / elapsed}
        self.start, self.waits = None, []
        return result
