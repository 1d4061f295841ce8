"""Peak GPU memory of whatever runs while a `GpuMemory` is open, read the same way for every
side of a benchmark: `nvidia-smi`'s used memory of the whole GPU, sampled every 50 ms, minus
what was used before the run started. Per-process figures are not used because sandboxed GPU
machines often list no processes. One benchmark process at a time, so the difference is that
process's (CUDA context included, which PyTorch's own allocator counters leave out)."""

import subprocess
import threading


def used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


class GpuMemory:
    def __init__(self, interval=0.05):
        self.interval = interval
        self.baseline = used_mib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, used_mib())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_mib())

    @property
    def peak_mib(self):
        return self.peak - self.baseline
