"""Real-data checks of the feature extractor with the bundled digits model.

Data: the quarter of scikit-learn's digits the model never saw (``train_test_split(test_size=0.25,
random_state=0)``, the 0.25 part: 450 images, 16x16 in [-1, 1] as the model takes them), conditioned on
the null label (unconditional features).

1. Linear probe (StandardScaler + LogisticRegression, the same pipeline for every input) on
   - raw pixels: the 8x8 originals (64 values) and the 16x16 model inputs (256 values);
   - diffusion features: each layer at each timestep, ensemble-averaged, globally average-pooled (DDAE),
     for a sweep of layers at two timesteps; and, for a fixed set of layers and timesteps chosen before
     looking at the results, their concatenation, globally pooled and pooled to a 2x2 grid.
   With full labels: 5-fold stratified cross-validation inside the quarter (train on 4/5, test on the
   rest). With 10 labels per class: 10 draws of 10 training images per class, tested on the other 350.
2. DIFT-style correspondence (:func:`fastdiff.features.correspondence`, cosine argmax) on digit pairs
   whose truth is known: each digit against a copy shifted by (dy, dx) in [-2, 2]^2 pixels, every stroke
   pixel of the source matched in the target; PCK@1 (within one pixel of the truth) of the features,
   upsampled to 16x16, against 3x3 raw-pixel patches as the baseline.

    python benchmarks/digits_features.py          # prints the tables
    python benchmarks/digits_features.py --save   # ... and writes results/digits_features.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff.features import FeatureExtractor, correspondence

PROBE_LAYERS = ["input_blocks.5", "middle_block", "output_blocks.0", "output_blocks.1", "output_blocks.2",
                "output_blocks.3", "output_blocks.4"]
PROBE_TIMESTEPS = [50, 200]  # the per-layer sweep (each probe is ~15 s of scikit-learn on 2 cores)
# Fixed a priori (not chosen on the results): the decoder's low-resolution half at small noise levels.
COMBINED = dict(layers=["middle_block", "output_blocks.1", "output_blocks.2"], timesteps=[50, 100])


def heldout():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fastdiff.train_digits import load_digits_split

    data = load_digits()
    _, x8, _, y8 = train_test_split(data.data, data.target, test_size=0.25, random_state=0)
    images, labels = load_digits_split("test")
    assert np.array_equal(labels.numpy(), y8)
    return images, labels.numpy(), x8.astype(np.float32)


def probe_scores(features: np.ndarray, labels: np.ndarray, draws: int = 10) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit_score(tr, te):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        clf.fit(features[tr], labels[tr])
        return float(clf.score(features[te], labels[te]))

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    full = [fit_score(tr, te) for tr, te in folds.split(features, labels)]
    few = []
    for d in range(draws):
        rng = np.random.default_rng(d)
        tr = np.concatenate([rng.choice(np.flatnonzero(labels == c), 10, replace=False) for c in range(10)])
        te = np.setdiff1d(np.arange(len(labels)), tr)
        few.append(fit_score(tr, te))
    return {"full": float(np.mean(full)), "full_std": float(np.std(full)),
            "ten_per_class": float(np.mean(few)), "ten_per_class_std": float(np.std(few))}


def grid_pool(maps: torch.Tensor, g: int) -> torch.Tensor:
    return F.adaptive_avg_pool2d(maps, g).flatten(1)


def shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (C, H, W) by (dy, dx) pixels, filling with the background value (-1)."""
    out = torch.full_like(img, -1.0)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def patches(img: torch.Tensor) -> torch.Tensor:
    """3x3 raw-pixel patches as a (9C, H, W) map (the baseline descriptor)."""
    c, h, w = img.shape
    return F.unfold(img[None], 3, padding=1).reshape(9 * c, h, w)


def correspondence_check(den, images: torch.Tensor, layer: str, t: int, ensemble: int, pairs: int) -> dict:
    rng = np.random.default_rng(0)
    picks = rng.choice(len(images), pairs, replace=False)
    offsets = [(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))) for _ in range(pairs)]
    src = images[picks]
    tgt = torch.stack([shift(img, dy, dx) for img, (dy, dx) in zip(src, offsets, strict=True)])
    fx = FeatureExtractor(den, None, layers=[layer], timesteps=[t], ensemble=ensemble, upsample_to="input")
    fs, ft = fx(src)[layer][t], fx(tgt, start=len(src))[layer][t]
    hits = {"features": [], "pixels": []}
    for k, (dy, dx) in enumerate(offsets):
        h, w = src.shape[2:]
        pts = torch.nonzero(src[k, 0] > 0)                       # stroke pixels of the source
        inside = ((pts[:, 0] + dy >= 0) & (pts[:, 0] + dy < h) & (pts[:, 1] + dx >= 0) & (pts[:, 1] + dx < w))
        pts = pts[inside]
        truth = pts + torch.tensor([dy, dx])
        for name, (a, b) in {"features": (fs[k], ft[k]),
                             "pixels": (patches(src[k]), patches(tgt[k]))}.items():
            found = correspondence(a, b, pts)
            hits[name].append(((found - truth).abs().max(dim=1).values <= 1).float().mean().item())
    return {f"pck1_{name}": float(np.mean(v)) for name, v in hits.items()} | {"layer": layer, "t": t,
                                                                                 "pairs": pairs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="digits weights (default: the bundled ones)")
    p.add_argument("--ensemble", type=int, default=4)
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="", help="write the results JSON here (default: nowhere)")
    p.add_argument("--save", action="store_true",
                   help="write benchmarks/results/digits_features.json, the committed result")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastdiff.models.digits import load_digits_model

    den = load_digits_model(args.checkpoint)
    images, labels, x8 = heldout()
    results = {"images": len(labels), "ensemble": args.ensemble,
               "model_training": den.metadata.get("training", {}), "probe": {}}
    print(f"held-out quarter: {len(labels)} images; null label {den.y_null}; ensemble {args.ensemble}",
          flush=True)

    results["probe"]["pixels 8x8"] = probe_scores(x8, labels)
    results["probe"]["pixels 16x16"] = probe_scores(images.flatten(1).numpy(), labels)

    start = time.perf_counter()
    timesteps = sorted(set(PROBE_TIMESTEPS) | set(COMBINED["timesteps"]))
    fx = FeatureExtractor(den, None, layers=PROBE_LAYERS, timesteps=timesteps, ensemble=args.ensemble,
                          seed=0, batch_size=512)
    maps = fx(images)
    results["extract_seconds"] = time.perf_counter() - start
    for layer in PROBE_LAYERS:
        for t in PROBE_TIMESTEPS:
            m = maps[layer][t]
            results["probe"][f"{layer} t={t} avg"] = probe_scores(m.mean(dim=(2, 3)).numpy(), labels)
    combined_avg = torch.cat([maps[name][t].mean(dim=(2, 3)) for t in COMBINED["timesteps"]
                              for name in COMBINED["layers"]], dim=1)
    combined_grid = torch.cat([grid_pool(maps[name][t], 2) for t in COMBINED["timesteps"]
                               for name in COMBINED["layers"]], dim=1)
    results["probe"]["combined avg"] = probe_scores(combined_avg.numpy(), labels)
    results["probe"]["combined avg2x2"] = probe_scores(combined_grid.numpy(), labels)
    results["combined"] = COMBINED

    print(f"\nlinear probe accuracy (5-fold CV, full labels | 10 labels per class, 10 draws); "
          f"features in {results['extract_seconds']:.1f} s")
    print(f"{'input':40s} {'dims':>6s} {'full':>7s} {'10/class':>9s}")
    dims = {"pixels 8x8": 64, "pixels 16x16": 256, "combined avg": combined_avg.shape[1],
            "combined avg2x2": combined_grid.shape[1]}
    for name, r in results["probe"].items():
        channels = maps[name.split()[0]][PROBE_TIMESTEPS[0]].shape[1] if name not in dims else 0
        d = dims.get(name) or channels * (4 if "2x2" in name else 1)
        print(f"{name:40s} {d:6d} {r['full']:7.3f} {r['ten_per_class']:9.3f}")

    results["correspondence"] = [correspondence_check(den, images, layer, t, args.ensemble, args.pairs)
                                 for layer, t in (("output_blocks.4", 50), ("output_blocks.3", 50),
                                                  ("output_blocks.2", 100))]
    print("\ncorrespondence on shifted copies (PCK@1 over stroke pixels)")
    for r in results["correspondence"]:
        print(f"{r['layer']} t={r['t']}: features {r['pck1_features']:.3f}   3x3 pixel patches "
              f"{r['pck1_pixels']:.3f}   ({r['pairs']} pairs)")
    out = Path(__file__).resolve().parent / "results" / "digits_features.json" if args.save else args.json
    if out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_json_atomic

        print(f"wrote {write_json_atomic(out, results)}")


if __name__ == "__main__":
    main()
