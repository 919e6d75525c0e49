"""Quality of the bundled digits model: does a classifier trained on real digits read the asked-for class?

A scikit-learn logistic regression is trained on the real 8x8 digits of the fixed training split
(``train_test_split(test_size=0.25, random_state=0)``, raw pixel values 0..16). Class-conditional samples
of ``fastdiff.sample`` (16x16 in [-1, 1]) are averaged down to 8x8 (2x2 area mean, the inverse of the
training upsampling up to blur), mapped to 0..16 and classified; the score is the fraction labelled with
the class they were drawn for. Reported per sampler at 10, 20 and 50 steps, with the classifier's own
accuracy on the real held-out quarter as the ceiling.

    python benchmarks/digits_quality.py                          # all samplers, 30 samples each
    python benchmarks/digits_quality.py --samplers dpmpp_2m --steps 20 --n 100

Prints a markdown table; ``--save`` writes ``benchmarks/results/digits_quality-cpu.json`` (the committed
result), ``--out FILE`` any other file (never by default; written to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, device_info, write_json_atomic  # noqa: E402


def real_digit_classifier():
    """(logistic regression fitted on the real 8x8 training split, its accuracy on the real test split)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data, d.target, test_size=0.25, random_state=0)
    clf = LogisticRegression(max_iter=5000)
    clf.fit(x_tr, y_tr)
    return clf, float(clf.score(x_te, y_te))


def to_8x8_features(samples: torch.Tensor) -> np.ndarray:
    """(N, 1, 16, 16) in [-1, 1] -> (N, 64) in 0..16, the layout of ``load_digits().data``."""
    x = F.avg_pool2d(samples.float().clamp(-1, 1), 2)  # (N, 1, 8, 8)
    return ((x + 1.0) * 8.0).reshape(x.shape[0], 64).cpu().numpy()


def accuracy(clf, denoiser, sampler: str, steps: int, n: int, guidance: float, seed: int = 0,
             dtype=None, batch_size=None) -> float:
    import fastdiff

    labels = torch.arange(n) % 10
    out = fastdiff.sample(denoiser, (n, 1, 16, 16), sampler=sampler, steps=steps, guidance_scale=guidance,
                          y=labels, seeds=seed, dtype=dtype, progress=False, batch_size=batch_size)
    pred = clf.predict(to_8x8_features(out))
    return float((pred == labels.numpy()).mean())


def markdown_table(record: dict) -> str:
    results = record["results"]
    steps_cols = sorted({r["steps"] for r in results})
    n = sorted({r["n"] for r in results})
    lines = [f"Classifier accuracy on class-conditional samples (guidance {record['guidance']:g}, "
             f"{'/'.join(map(str, n))} samples per cell, {record['dtype'].replace('torch.', '')}; the "
             f"classifier scores {record['classifier_real_test_accuracy']:.1%} on real held-out digits)", "",
             "| sampler | " + " | ".join(f"{s} steps" for s in steps_cols) + " |",
             "|---|" + "---|" * len(steps_cols)]
    for sampler in dict.fromkeys(r["sampler"] for r in results):
        cells = {r["steps"]: r["accuracy"] for r in results if r["sampler"] == sampler}
        row = " | ".join(f"{cells[s]:.0%}" if s in cells else "" for s in steps_cols)
        lines.append(f"| {sampler} | {row} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from fastdiff.models.digits import load_digits_model
    from fastdiff.samplers import SAMPLERS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samplers", nargs="+", default=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--n", type=int, default=30, help="samples per (sampler, steps), labels i mod 10")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (the CLI default)")
    p.add_argument("--dtype", default=None, help="default: the engine's policy (as the CLI)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results JSON here (default: nowhere)")
    p.add_argument("--save", action="store_true",
                   help="write benchmarks/results/digits_quality-cpu.json, the committed result")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    den = load_digits_model()
    guidance = float(den.metadata.get("default_guidance", 1.0)) if args.guidance is None else args.guidance
    clf, real_acc = real_digit_classifier()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    results = []
    for sampler in args.samplers:
        for steps in args.steps:
            t0 = time.perf_counter()
            acc = accuracy(clf, den, sampler, steps, args.n, guidance, dtype=dtype)
            dt = time.perf_counter() - t0
            results.append({"sampler": sampler, "steps": steps, "accuracy": acc, "n": args.n,
                            "seconds": round(dt, 2)})
            print(f"{sampler:20s} {steps:3d} steps: {acc:.3f} ({dt:.1f} s)", flush=True)
    import fastdiff.engine as engine

    record = {"benchmark": "digits_quality", "device": device_info("cpu"), "guidance": guidance,
              "dtype": str(dtype or engine.default_dtype("cpu")), "classifier_real_test_accuracy": real_acc,
              "weights_training": den.metadata.get("training"), "results": results}
    print("\n" + markdown_table(record))
    out = RESULTS_DIR / "digits_quality-cpu.json" if args.save else args.out
    if out:
        print(f"\nwrote {write_json_atomic(out, record)}")


if __name__ == "__main__":
    main()
