"""How the benchmarks measure (benchmarks/step.py, sampling.py): the machine and its load, peak memory of a block,
the network calls, model FLOPs and host-device syncs of one iteration, timed blocks, and the search for the
largest batch that fits. A ``runner`` has ``B`` (the batch), ``phase(name)(div)`` (one iteration), ``task``,
``device``, ``grad_ckpt``, ``clear()`` and ``clear_logs()`` (benchmarks/step.py's Runner)."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import resource
import socket
import statistics
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from tasks import denoisers, networks, set_grad_ckpt

ROOT = Path(__file__).resolve().parents[1]


def load_note() -> dict:
    la = os.getloadavg()
    n = os.cpu_count() or 1
    return {"loadavg": [round(x, 2) for x in la], "cpu_count": n, "under_load": la[0] > 0.5 * n}


def env_info(device: torch.device) -> dict:
    import diffusers

    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": socket.gethostname(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, device_memory_gb=round(p.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            info["device_name"] = names[0] if names else info["device_name"]
        except OSError:
            pass
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
        return True
    except ImportError:
        return False


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or on CPU the largest RSS a 10 ms sampler saw (ru_maxrss only
    ever grows, so it cannot tell one block from another)."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else ("cpu_rss" if _has_psutil() else
                                                                          "cpu_ru_maxrss")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if not _has_psutil():  # no sampler: fall back to the process high-water mark
            self._thread = None
            return self
        import psutil
        proc, self._stop = psutil.Process(), threading.Event()
        self.peak_bytes = proc.memory_info().rss

        def sample():
            while not self._stop.wait(0.01):  # ~1% of one core at most
                self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join()
            import psutil
            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


def rss_mb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(times, peaks, B, mem_kind) -> dict:
    med = statistics.median(times)
    return {"time_s_median": med, "time_s_min": min(times), "time_s_max": max(times), "time_s_all": times,
            "images_per_s": B / med, "peak_mem_mb": round(max(peaks) / 2 ** 20, 1), "peak_mem_kind": mem_kind}


class CallCounter:
    """Forward calls and rows per network (forward pre-hooks); backward passes through each network (a hook on
    its input when that requires grad, and post-accumulate hooks on its parameters), per iteration."""

    def __init__(self, nets: dict):
        self.nets = nets
        self.handles = []
        self.fwd = Counter()
        self.rows = Counter()
        self.flag_input = set()
        self.flag_params = set()
        for name, m in nets.items():
            self.handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            for p in m.parameters():
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(
                        lambda _p, name=name: self.flag_params.add(name)))

    def _pre(self, name):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            xs = x if isinstance(x, (list, tuple)) else [x]
            self.fwd[name] += 1
            self.rows[name] += int(xs[0].shape[0]) if torch.is_tensor(xs[0]) else 0
            for t in xs:
                if torch.is_tensor(t) and t.requires_grad:
                    t.register_hook(lambda g, name=name: self.flag_input.add(name))
        return hook

    def result(self) -> dict:
        out = {}
        for name in self.nets:
            back = name in self.flag_input or name in self.flag_params
            out[name] = {"forward": self.fwd[name], "backward": int(back), "rows": self.rows[name],
                         "param_grads": name in self.flag_params}
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def count_calls(fn, task, device) -> dict:
    """Network calls of one ``fn()`` (an iteration): CallCounter's, plus each Denoiser's calls by mode."""
    dens = denoisers(task)
    for d in dens.values():
        d.reset_calls()
    cc = CallCounter(networks(task))
    try:
        fn()
        sync(device)
    finally:
        cc.close()
    res = cc.result()
    for name, d in dens.items():
        res.setdefault(name, {})["modes"] = dict(d.calls)
        d.reset_calls()
    return res


def find_syncs(fn, device) -> dict | None:
    """Host-device synchronisations of one ``fn()``, by source line (CUDA's sync debug mode)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    where = Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    return {"count": sum(where.values()), "where": dict(where.most_common())}




def count_flops(runner, phase, div, small: int = 4) -> int | None:
    """Model FLOPs of one iteration at the running batch (torch's FlopCounterMode: matmuls, convolutions,
    attention's two matmuls; forward and backward). Counted at a small batch without checkpointing and scaled:
    every counted op is per sample, so the count is exactly linear in the batch, and checkpointing's
    recomputation (hardware FLOPs, not model FLOPs) stays out."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = runner.B
    runner.B = b = min(B, small)
    set_grad_ckpt(runner.task, False)
    try:
        fc = FlopCounterMode(display=False)
        # attention as explicit matmuls: counted alike on every device (the CPU's fused kernel has no formula)
        with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
            warnings.simplefilter("ignore")
            with fc:
                runner.phase(phase)(div)
        sync(runner.device)
    finally:
        runner.B = B
        set_grad_ckpt(runner.task, runner.grad_ckpt)
    return int(fc.get_total_flops()) * B // b



def time_block(runner, phase, div, iters) -> tuple[float, int, dict]:
    fn = runner.phase(phase)
    dens = denoisers(runner.task)
    for d in dens.values():
        d.reset_calls()
    with PeakMemory(runner.device) as pm:
        sync(runner.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(div)
        sync(runner.device)
        dt = (time.perf_counter() - t0) / iters
    runner.clear_logs()
    calls = {n: {k: v / iters for k, v in d.calls.items()} for n, d in dens.items()}
    return dt, pm.peak_bytes, calls



def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(runner):
    runner.clear()
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()


def search_batch(runner, div, candidates, budget_s) -> tuple[int, list]:
    """The largest batch in ``candidates`` (ascending) for which one critic and one generator iteration run;
    stops at the first out-of-memory error, or when the next try would exceed the time budget."""
    trials, best, t_start = [], None, time.perf_counter()
    for b in candidates:
        runner.B = b
        t0 = time.perf_counter()
        try:
            runner.critic(div)
            runner.generator_iter(div)
            sync(runner.device)
            ok, err = True, None
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            ok, err = False, "out of memory"
        dt = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(runner.device) if runner.device.type == "cuda" else None
        trials.append({"batch": b, "ok": ok, "seconds": round(dt, 3), "error": err,
                       "peak_mem_gb": round(mem / 2 ** 30, 2) if mem else None})
        print(f"[step] batch search: {b} {'ok' if ok else err} ({dt:.1f} s)", flush=True)
        free(runner)
        if not ok:
            break
        best = b
        if runner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runner.device)
        # iterations grow ~linearly with the batch: stop before a try that would overrun the budget
        if time.perf_counter() - t_start + 2.5 * dt > budget_s:
            break
    if best is None:
        raise SystemExit(f"no batch in {candidates} fits")
    runner.B = best
    return best, trials


