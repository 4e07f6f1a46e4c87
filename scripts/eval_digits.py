"""Evaluate a digits model from train_rf_dit.py: class accuracy and Frechet distance of generated samples.

    python scripts/eval_digits.py --run outputs/rf_dit_digits [--num_per_class 100 --sampler flow_euler --steps 20]

A small MLP classifier (scikit-learn) is trained once on the real train split at the model's resolution
and its weights cached under cache_dir as safetensors (not a pickle: unpickling can run code).
Reported: the classifier's accuracy on real test digits; the fraction of generated samples classified as
the requested class; the Frechet distance (Heusel et al. 2017, as FID
but in the classifier's hidden-layer features) of generated samples to the real train digits and, as a
like-for-like floor (the estimate is biased upwards at small n), of the first 360 samples and of the 360
real test digits. As a memorization check, the median pixel L2 distance to the nearest training digit of
generated samples and of real test digits.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.training.config import parse_config  # noqa: E402
from diffusion.training.data import load_digits_images  # noqa: E402


@dataclass
class EvalConfig:
    """Sample a trained digits model and score it with a cached digit classifier."""

    run: str = field(default="outputs/rf_dit_digits", metadata={"help": "run dir, checkpoint dir or .safetensors"})
    num_per_class: int = field(default=100, metadata={"help": "generated samples per class"})
    sampler: Optional[str] = field(default=None, metadata={"help": "sampler (default: the run's)"})
    steps: Optional[int] = field(default=None, metadata={"help": "sampler steps (default: the run's)"})
    cfg_scale: Optional[float] = field(default=None, metadata={"help": "guidance scale (default: the run's)"})
    ema: bool = field(default=True, metadata={"help": "use the EMA weights"})
    seed: int = field(default=10_000, metadata={"help": "seed of the first sample (sample i uses seed + i)"})
    batch_size: int = field(default=250, metadata={"help": "sampling batch size"})
    cache_dir: str = field(default="outputs/eval_digits", metadata={"help": "where the classifier is cached"})
    output_json: Optional[str] = field(default=None, metadata={"help": "also write the figures as JSON here"})
    save_grid: Optional[str] = field(default=None, metadata={"help": "write a PNG grid of samples here"})
    threads: Optional[int] = field(default=None, metadata={"help": "torch intra-op threads (1 is fastest on a "
                                                                   "busy machine)"})


# ----------------------------------------------------------------------------------------------- classifier
class DigitMLP:
    """The weights of a fitted sklearn MLPClassifier (ReLU hidden layers, softmax output) and its predict, so the
    cache is plain arrays in safetensors rather than a pickled estimator."""

    def __init__(self, coefs: list, intercepts: list, classes: np.ndarray):
        self.coefs_, self.intercepts_, self.classes_ = coefs, intercepts, classes

    @classmethod
    def from_sklearn(cls, clf) -> "DigitMLP":
        if clf.activation != "relu" or clf.out_activation_ != "softmax":
            raise ValueError(f"DigitMLP needs a relu / softmax MLP, got {clf.activation} / {clf.out_activation_}")
        return cls(list(clf.coefs_), list(clf.intercepts_), np.asarray(clf.classes_))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """As MLPClassifier.predict: layers in the weights' dtype, argmax of the output (softmax is monotone)."""
        h = np.asarray(x, dtype=self.coefs_[0].dtype)
        for i, (w, b) in enumerate(zip(self.coefs_, self.intercepts_)):
            h = h @ w + b
            if i < len(self.coefs_) - 1:
                h = np.maximum(h, 0)
        return self.classes_[h.argmax(1)]

    def save(self, path) -> None:
        from safetensors.numpy import save_file

        arrays = {f"coef_{i}": w for i, w in enumerate(self.coefs_)}
        arrays.update({f"intercept_{i}": b for i, b in enumerate(self.intercepts_)})
        arrays["classes"] = self.classes_
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "DigitMLP":
        from safetensors.numpy import load_file

        path = Path(path)
        try:
            a = load_file(str(path))
            n = sum(k.startswith("coef_") for k in a)
            return cls([a[f"coef_{i}"] for i in range(n)], [a[f"intercept_{i}"] for i in range(n)], a["classes"])
        except Exception as e:
            head = path.read_bytes()[:2]
            if head == b"PK" or (head[:1] == b"\x80" and head[1:] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise ValueError(f"refusing to unpickle {path}: the classifier cache holds pickle data (planted or "
                                 f"from elsewhere; unpickling can run arbitrary code); delete it to retrain the "
                                 f"classifier") from None
            raise ValueError(f"cannot read the classifier cache {path} ({type(e).__name__}: {e}); delete it to "
                             f"retrain the classifier") from None


def digit_classifier(size: int, cache_dir="outputs/eval_digits") -> DigitMLP:
    """sklearn MLP (64 hidden ReLU units) on real train digits at size x size; trained once, weights cached."""
    import sklearn
    from sklearn.neural_network import MLPClassifier

    path = Path(cache_dir) / f"digit_mlp_{size}px_sklearn{sklearn.__version__}.safetensors"
    if path.is_file():
        return DigitMLP.load(path)
    x, y = load_digits_images(size, "train")
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=600, random_state=0)
    clf.fit(x.flatten(1).numpy(), y.numpy())
    mlp = DigitMLP.from_sklearn(clf)
    mlp.save(path)
    return mlp


def features(clf, images: torch.Tensor) -> np.ndarray:
    """Hidden-layer activations relu(x W1 + b1) of the MLP: (N, 64)."""
    x = images.flatten(1).numpy().astype(np.float64)
    return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussian fits (Heusel et al. 2017).
    Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD form that is stable when singular."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def nearest_train_l2(images: torch.Tensor, train: torch.Tensor) -> float:
    """Median over `images` of the L2 distance (pixels in [-1, 1]) to the nearest training image."""
    return float(torch.cdist(images.flatten(1).double(), train.flatten(1).double()).min(1).values.median())


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(images: torch.Tensor, labels: torch.Tensor, size: int, cache_dir="outputs/eval_digits") -> dict:
    """Scores for generated digits `images` (N, 1, size, size) in [-1, 1] meant to show `labels`."""
    clf = digit_classifier(size, cache_dir)
    x_train, _ = load_digits_images(size, "train")
    x_test, y_test = load_digits_images(size, "test")
    f_train = features(clf, x_train)
    live = f_train.std(0) > 1e-6  # drop ReLU units that are dead on real digits (singular covariance)
    pred = clf.predict(images.flatten(1).numpy())
    return {
        "classifier_test_accuracy": float((clf.predict(x_test.flatten(1).numpy()) == y_test.numpy()).mean()),
        "class_accuracy": float((pred == labels.numpy()).mean()),
        "frechet_distance": frechet_distance(features(clf, images)[:, live], f_train[:, live]),
        # the estimate is biased upwards at small n: compare real test digits with as many generated ones
        f"frechet_distance_n{len(x_test)}": frechet_distance(features(clf, images[:len(x_test)])[:, live],
                                                              f_train[:, live]),
        "frechet_distance_real_test": frechet_distance(features(clf, x_test)[:, live], f_train[:, live]),
        "feature_dim": int(live.sum()),
        "nn_l2_generated": nearest_train_l2(images, x_train), "nn_l2_real_test": nearest_train_l2(x_test, x_train),
        "num_samples": int(len(images)), "num_real_test": int(len(x_test)),
    }


def main(argv=None) -> dict:
    cfg = parse_config(EvalConfig, argv, prog="eval_digits.py")
    from diffusion.training.rf_dit import load_trained, make_grid, sample_images

    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    net, run_cfg, extra = load_trained(cfg.run, ema=cfg.ema)
    if run_cfg.dataset != "digits" or run_cfg.backbone != "dit":
        raise ValueError(f"{cfg.run} is a {run_cfg.backbone} model on {run_cfg.dataset}; eval_digits needs "
                         f"a class-conditional DiT trained on digits")
    labels = torch.arange(10).repeat(cfg.num_per_class)
    t0 = time.time()
    images = sample_images(net, run_cfg, extra["conditioner"], extra["codec"], extra["x_shape"], labels=labels.tolist(),
                           seed=cfg.seed, cfg_scale=cfg.cfg_scale, sampler=cfg.sampler, steps=cfg.steps,
                           batch_size=cfg.batch_size)
    seconds = time.time() - t0
    result = evaluate(images, labels, run_cfg.resolution, cfg.cache_dir)
    result.update({"run": cfg.run, "step": extra["step"], "ema": cfg.ema, "sampler": cfg.sampler or run_cfg.sampler,
                   "steps": cfg.steps or run_cfg.validation_inference_steps,
                   "cfg_scale": run_cfg.validation_guidance_scale if cfg.cfg_scale is None else cfg.cfg_scale,
                   "sampling_seconds": round(seconds, 1)})
    for k, v in result.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    if cfg.output_json:
        Path(cfg.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output_json).write_text(json.dumps(result, indent=1))
    if cfg.save_grid:
        from PIL import Image
        g = make_grid(images[:100], 10)
        Image.fromarray(g).resize((4 * g.shape[1], 4 * g.shape[0]), Image.NEAREST).save(cfg.save_grid)
    return result


if __name__ == "__main__":
    main()
