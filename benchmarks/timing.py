"""CUDA-event timing shared by the benchmarks (PERF.md): warm-up, then one event pair around each
step, the steps rotating over input sets so that the L2 cache does not hold the inputs."""


def cuda_step_times(steps, warmup, repeats):
    """``(times_ms, peak_bytes)`` of ``repeats`` calls of ``steps[i % len(steps)]`` after ``warmup``
    calls: each call's CUDA-event time, and the peak allocation beyond what was allocated before."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    for i in range(warmup):
        steps[i % len(steps)]()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for i, (start, end) in enumerate(events):
        start.record()
        steps[i % len(steps)]()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events], torch.cuda.max_memory_allocated() - baseline
