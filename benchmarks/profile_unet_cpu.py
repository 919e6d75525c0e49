"""Where the CPU time of a U-Net forward goes: fastdiff's DDPMUNet against diffusers' UNet2DModel.

The DDPM-CIFAR10 configuration (random weights, the same state dict in both), bf16 + channels_last (the
engine's CPU policy, and hand-tuned diffusers with SDPA), batch 8 at 32x32, eager or under
``torch.compile``. Forwards of the two models alternate; each row reports the minimum and median of the
process CPU time and of the wall time (CPU time is less disturbed by other work on a shared machine; with
``--threads 1`` it is the work done). ``--ops`` adds each model's self CPU time per aten op (summed over
``--reps`` profiled forwards), the table that shows which ops differ. Prints only; writes nothing.

    python benchmarks/profile_unet_cpu.py --threads 1 --reps 15
    python benchmarks/profile_unet_cpu.py --compile --threads 1 --reps 9
    python benchmarks/profile_unet_cpu.py --threads 1 --reps 4 --ops
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(batch: int):
    from diffusers import UNet2DModel

    from fastdiff.models import PRESETS, preset

    torch.manual_seed(0)
    ours = preset("ddpm-cifar10").eval()
    theirs = UNet2DModel(**PRESETS["ddpm-cifar10"][1]).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    fmt = dict(dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32).to(**fmt)
    t = torch.full((batch,), 500, dtype=torch.long)
    return ours.to(**fmt), theirs.to(**fmt), x, t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="both models under torch.compile (default mode)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ops", action="store_true", help="per-op self CPU time of each model")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs, x, t = build(args.batch)
    if args.compile:
        ours, theirs = torch.compile(ours, dynamic=False), torch.compile(theirs, dynamic=False)
    fns = {"fastdiff": lambda: ours(x, t), "diffusers": lambda: theirs(x, t).sample}
    mode = "compile" if args.compile else "eager"
    times = {k: [] for k in fns}
    per_op = {k: collections.Counter() for k in fns}
    with torch.no_grad():
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            fn()
            print(f"{name}: first two calls {time.perf_counter() - t0:.1f} s")
        for _ in range(args.reps):
            for name, fn in fns.items():
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                times[name].append((time.process_time() - c0, time.perf_counter() - w0))
        if args.ops:
            from torch.profiler import profile

            for _ in range(args.reps):
                for name, fn in fns.items():
                    with profile() as prof:
                        fn()
                    for e in prof.key_averages():
                        per_op[name][e.key] += e.self_cpu_time_total / 1e3
    print(f"bf16 channels_last, batch {args.batch}, {mode}, {torch.get_num_threads()} threads, {args.reps} "
          "interleaved forwards each (ms)")
    for name, r in times.items():
        cpu, wall = sorted(a for a, _ in r), sorted(b for _, b in r)
        print(f"  {name:10s} cpu min {cpu[0] * 1e3:7.1f} median {cpu[len(cpu) // 2] * 1e3:7.1f} | "
              f"wall min {wall[0] * 1e3:7.1f} median {wall[len(wall) // 2] * 1e3:7.1f}")
    cpu_min = {k: min(a for a, _ in r) for k, r in times.items()}
    print(f"  fastdiff / diffusers speed (cpu min): {cpu_min['diffusers'] / cpu_min['fastdiff']:.3f}x")
    if args.ops:
        names = set()
        for c in per_op.values():
            names |= {n for n, _ in c.most_common(20)}
        print(f"{'op':55s} {'fastdiff':>10s} {'diffusers':>10s}   self CPU ms over {args.reps} forwards")
        for n in sorted(names, key=lambda n: -max(per_op['fastdiff'][n], per_op['diffusers'][n])):
            print(f"{n[:55]:55s} {per_op['fastdiff'][n]:10.1f} {per_op['diffusers'][n]:10.1f}")
        print(f"{'total':55s} {sum(per_op['fastdiff'].values()):10.1f} {sum(per_op['diffusers'].values()):10.1f}")


if __name__ == "__main__":
    main()
