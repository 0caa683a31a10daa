"""DaaR probes: psi_dom (domain classifier) and psi_div (entropy regressor). No Data-Juicer import.

Method (DaaR, arXiv 2502.04380, steps 3-4):

* psi_dom: an MLP ``d -> 2d -> d -> d/2 -> 256 -> K`` with ReLU, trained with cross-entropy on the
  pseudo-domain labels of layer-k features.
* The diversity reward target of a sample is the entropy ``H(x) = -sum_k p_k ln p_k`` (nats, at most
  ``ln K``) of psi_dom's softmax.
* psi_div: the same body with a single output, freshly initialised, trained with MSE to regress
  ``H`` from the same features. Its prediction is the score used for selection.

Both probes share a seeded train/validation split (paper: 97/3). Optional feature standardisation
(mean/std of the training split, stored as buffers inside the module so a checkpoint carries it) is
a project addition: raw decoder-layer outputs have a few very large coordinates, which makes plain
AdamW at a CPU-friendly learning rate train poorly. The paper's setting (AdamW, lr 1e-5,
single-sample batches, 1 epoch, no standardisation) is available through :class:`TrainConfig`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

OPTIMIZERS = ("adamw", "adam", "sgd")


def default_hidden(feature_dim: int) -> list[int]:
    """The paper's body: d -> 2d -> d -> d/2 -> 256."""
    return [2 * feature_dim, feature_dim, max(1, feature_dim // 2), 256]


class ProbeMLP(nn.Module):
    """``in_dim -> hidden... -> n_out`` MLP with ReLU, preceded by a fixed affine standardisation.

    ``feature_mean`` / ``feature_scale`` are buffers (identity unless set), so they are part of the
    state dict and travel with a checkpoint.
    """

    def __init__(self, in_dim: int, n_out: int, hidden: Sequence[int] | None = None):
        super().__init__()
        if in_dim < 1 or n_out < 1:
            raise ValueError(f"in_dim and n_out must be >= 1, got {in_dim}, {n_out}")
        self.in_dim, self.n_out = int(in_dim), int(n_out)
        self.hidden = list(hidden) if hidden is not None else default_hidden(in_dim)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_scale", torch.ones(in_dim))
        dims = [in_dim, *self.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], n_out))
        self.net = nn.Sequential(*layers)

    def set_standardization(self, mean: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor
                            ) -> None:
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.feature_mean) / self.feature_scale)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class TrainConfig:
    """Probe training settings (one config for both probes).

    Defaults train in about 25 s on 5,000 SmolLM2 samples on a 2-core CPU: AdamW, mini-batches
    of 32, lr 3e-5, 3 epochs, standardised features. The paper's setting is :meth:`paper`
    (AdamW, lr 1e-5, batch 1, 1 epoch, raw features; ~8 min here). Measured on 5,000 pool samples
    with their true domains (docs/daar_stage2.md): the defaults reach 96% psi_dom validation
    accuracy with a spread of entropies (std 0.21 nats); lr 1e-3 x 5 epochs reaches 98% but its
    entropies collapse to ~0 (std 0.09), leaving psi_div little to learn.

    ``restore_best`` keeps, for each probe, the weights of the epoch with the lowest validation
    loss (early stopping). This matters for DaaR beyond accuracy: psi_div's targets are psi_dom's
    entropies on the *training* samples, and an overfitted psi_dom is confidently right on every
    training sample, so its training-set entropies collapse to ~0 and carry no signal.
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    val_fraction: float = 0.03
    seed: int = 0
    standardize: bool = True
    device: str = "cpu"
    hidden: list[int] | None = None
    eval_batch_size: int = 1024
    restore_best: bool = True

    @classmethod
    def paper(cls, **overrides: Any) -> "TrainConfig":
        values = dict(epochs=1, batch_size=1, lr=1e-5, optimizer="adamw", weight_decay=0.01,
                      val_fraction=0.03, standardize=False)
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProbeTrainingResult:
    dom: ProbeMLP
    div: ProbeMLP
    domains: list[str]
    train_idx: np.ndarray
    val_idx: np.ndarray
    entropy_targets: np.ndarray  # [N] entropy of psi_dom's softmax, nats
    metrics: dict[str, Any]
    history: dict[str, Any] = field(default_factory=dict)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split: (train indices, validation indices), each sorted.

    The validation part has ``round(n * val_fraction)`` samples, at least 1 when
    ``val_fraction > 0`` and ``n >= 2``.
    """
    if n < 1:
        raise ValueError("cannot split an empty dataset")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def entropy_nats(probs: np.ndarray) -> np.ndarray:
    """Row-wise Shannon entropy in nats; 0 log 0 = 0."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return (-terms.sum(axis=1)).astype(np.float32)


def _make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _seeded_probe(in_dim: int, n_out: int, cfg: TrainConfig, seed: int) -> ProbeMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeMLP(in_dim, n_out, cfg.hidden)


@torch.no_grad()
def predict(model: ProbeMLP, features: np.ndarray, batch_size: int = 1024,
            device: str | torch.device = "cpu") -> np.ndarray:
    """Raw outputs (logits, or the regression value) of ``model`` for ``features`` [N, d].

    Batch-invariant: every forward pass has exactly ``batch_size`` rows (the last chunk is padded
    with zeros), because matrix kernels pick their blocking by the row count and a row's output
    could otherwise change in its last bit with N; so a sample's reward is the same whether it is
    scored alone, in a shard of a multi-process run or in the whole pool.
    """
    model.eval()
    x = np.asarray(features, dtype=np.float32)
    out = np.zeros((len(x), model.n_out), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            rows = x[start:start + batch_size]
            chunk = np.zeros((batch_size, x.shape[1]), dtype=np.float32)
            chunk[:len(rows)] = rows
            pred = model(torch.from_numpy(chunk).to(device)).float().cpu().numpy()
            out[start:start + len(rows)] = pred[:len(rows)]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _fit(model: ProbeMLP, x: torch.Tensor, y: torch.Tensor, task: str, train_idx: np.ndarray,
         val_idx: np.ndarray, cfg: TrainConfig, desc: str, progress: bool) -> dict[str, Any]:
    """Train ``model`` in place; return the loss / validation history."""
    device = torch.device(cfg.device)
    model.to(device)
    loss_fn: nn.Module = nn.CrossEntropyLoss() if task == "ce" else nn.MSELoss()
    opt = _make_optimizer(model.parameters(), cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_train = len(train_idx)
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    log_every = max(1, steps_per_epoch // 20)
    train_t = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
    hist: dict[str, Any] = {"step": [], "train_loss": [], "epoch": [], "epoch_train_loss": [],
                            "val_loss": [], "val_accuracy": []}

    def evaluate() -> tuple[float, float]:
        if len(val_idx) == 0:
            return float("nan"), float("nan")
        out = torch.from_numpy(predict(model, x[val_idx].numpy(), cfg.eval_batch_size, device))
        target = y[val_idx]
        loss = float(loss_fn(out if task == "ce" else out[:, 0], target))
        acc = float((out.argmax(1) == target).float().mean()) if task == "ce" else float("nan")
        return loss, acc

    val_loss, val_acc = evaluate()
    restore = cfg.restore_best and len(val_idx) > 0
    best_loss, best_epoch, best_state = val_loss, cfg.epochs, None
    hist["epoch"].append(0), hist["epoch_train_loss"].append(float("nan"))
    hist["val_loss"].append(val_loss), hist["val_accuracy"].append(val_acc)
    step, running, running_n = 0, 0.0, 0
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, unit="step", disable=not progress,
               mininterval=1.0)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = train_t[torch.randperm(n_train, generator=gen)]
        epoch_sum, epoch_n = 0.0, 0
        for start in range(0, n_train, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            out = model(xb)
            loss = loss_fn(out if task == "ce" else out[:, 0], yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            step += 1
            running += value * len(idx)
            running_n += len(idx)
            epoch_sum += value * len(idx)
            epoch_n += len(idx)
            if step % log_every == 0:
                hist["step"].append(step)
                hist["train_loss"].append(running / running_n)
                running, running_n = 0.0, 0
            bar.update(1)
        val_loss, val_acc = evaluate()
        hist["epoch"].append(epoch)
        hist["epoch_train_loss"].append(epoch_sum / max(epoch_n, 1))
        hist["val_loss"].append(val_loss)
        hist["val_accuracy"].append(val_acc)
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if restore and (best_state is None or val_loss < best_loss):
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    if restore and best_state is not None and best_epoch != cfg.epochs:
        model.load_state_dict(best_state)
    hist["best_epoch"] = best_epoch
    model.eval()
    model.to("cpu")
    hist["steps_per_epoch"] = steps_per_epoch
    return hist


def _standardization(features: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sub = features[idx].astype(np.float64)
    mean = sub.mean(axis=0)
    std = sub.std(axis=0)
    # Constant coordinates keep scale 1 instead of dividing by ~0.
    scale = np.where(std > 1e-6 * max(float(std.max(initial=0.0)), 1e-12), std, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def train_daar_probes(features: np.ndarray, labels: Sequence[int] | np.ndarray,
                      domains: Sequence[str], config: TrainConfig | None = None,
                      progress: bool = True) -> ProbeTrainingResult:
    """Train psi_dom on (features, labels), derive entropy targets, train psi_div on them.

    :param features: [N, d] layer-k features (float32).
    :param labels: [N] integer labels in ``[0, len(domains))``.
    :param domains: domain names, index = label.
    :param config: training settings; see :class:`TrainConfig`.
    :returns: both trained probes (on CPU, eval mode), the split, the entropy targets, metrics and
        training history.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    x_np = np.asarray(features, dtype=np.float32)
    y_np = np.asarray(labels, dtype=np.int64)
    _check_training_data(x_np, y_np, domains)
    k = len(domains)
    train_idx, val_idx = split_indices(len(x_np), cfg.val_fraction, cfg.seed)
    counts = np.bincount(y_np[train_idx], minlength=k)
    for name, c in zip(domains, counts):
        if c == 0:
            logger.warning(f"domain '{name}' has no training sample; psi_dom cannot learn it")
    dom, div = _new_probes(x_np, train_idx, k, cfg)
    logger.info(f"probes: {len(train_idx)} train / {len(val_idx)} validation samples, "
                f"d={x_np.shape[1]}, K={k}, psi_dom {dom.n_parameters:,} parameters")
    x = torch.from_numpy(x_np)
    dom_hist = _fit(dom, x, torch.from_numpy(y_np), "ce", train_idx, val_idx, cfg,
                    "psi_dom (cross-entropy)", progress)
    probs = softmax(predict(dom, x_np, cfg.eval_batch_size))
    targets = entropy_nats(probs)
    with torch.no_grad():
        # Start psi_div at the mean training entropy: with few optimisation steps (small probe
        # pools, low lr) a zero-initialised head otherwise stays far worse than predicting the mean.
        div.net[-1].bias.fill_(float(targets[train_idx].mean()))
    div_hist = _fit(div, x, torch.from_numpy(targets), "mse", train_idx, val_idx, cfg,
                    "psi_div (MSE on entropy)", progress)
    pred_h = predict(div, x_np, cfg.eval_batch_size)[:, 0]
    metrics = _training_metrics(y_np, probs.argmax(1), targets, pred_h, train_idx, val_idx,
                                domains, dom_hist, div_hist)
    return ProbeTrainingResult(dom=dom, div=div, domains=list(domains), train_idx=train_idx,
                               val_idx=val_idx, entropy_targets=targets, metrics=metrics,
                               history={"dom": dom_hist, "div": div_hist})


def _check_training_data(x: np.ndarray, y: np.ndarray, domains: Sequence[str]) -> None:
    k = len(domains)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be [N, d] with one label per row; got {x.shape} "
                         f"features and {y.shape} labels")
    if len(x) < 2:
        raise ValueError(f"need at least 2 labelled samples to train the probes, got {len(x)}")
    if k < 2:
        raise ValueError(f"need at least 2 domains, got {list(domains)}")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got range [{y.min()}, {y.max()}]")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf; refusing to train on them")


def _new_probes(x: np.ndarray, train_idx: np.ndarray, k: int, cfg: TrainConfig
                ) -> tuple[ProbeMLP, ProbeMLP]:
    """Freshly seeded psi_dom ([d] -> K) and psi_div ([d] -> 1), standardised alike."""
    d = x.shape[1]
    dom = _seeded_probe(d, k, cfg, cfg.seed)
    div = _seeded_probe(d, 1, cfg, cfg.seed + 1)  # fresh init, not a copy of psi_dom's body
    if cfg.standardize:
        mean, scale = _standardization(x, train_idx)
        dom.set_standardization(mean, scale)
        div.set_standardization(mean, scale)
    return dom, div


def _training_metrics(y: np.ndarray, pred_label: np.ndarray, targets: np.ndarray,
                      pred_h: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                      domains: Sequence[str], dom_hist: Mapping[str, Any],
                      div_hist: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``metrics``: accuracies, the reward's fit against baselines (logged)."""
    k = len(domains)
    counts = np.bincount(y[train_idx], minlength=k)
    majority = int(counts.argmax())
    nan = float("nan")

    def acc(idx: np.ndarray) -> float:
        return float((pred_label[idx] == y[idx]).mean()) if len(idx) else nan

    def mse(idx: np.ndarray) -> float:
        return float(((pred_h[idx] - targets[idx]) ** 2).mean()) if len(idx) else nan

    baseline = float(((targets[val_idx] - targets[train_idx].mean()) ** 2).mean()) \
        if len(val_idx) else nan
    metrics = {
        "n_samples": int(len(y)), "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
        "train_label_counts": {name: int(c) for name, c in zip(domains, counts)},
        "dom_train_accuracy": acc(train_idx), "dom_val_accuracy": acc(val_idx),
        "dom_val_majority_baseline": float((y[val_idx] == majority).mean())
        if len(val_idx) else nan,
        "dom_val_loss": dom_hist["val_loss"][-1],
        "div_train_mse": mse(train_idx), "div_val_mse": mse(val_idx),
        "div_val_mse_predict_mean_baseline": baseline,
        # R^2 against predicting the training mean: how much of the held-out entropy the
        # reward explains (near 0 or below: the reward is close to noise)
        "div_val_r2": 1.0 - mse(val_idx) / baseline if len(val_idx) and baseline > 0 else nan,
        "div_val_spearman": _rank_corr(pred_h[val_idx], targets[val_idx]),
        "dom_best_epoch": dom_hist["best_epoch"], "div_best_epoch": div_hist["best_epoch"],
        "entropy_target_mean": float(targets.mean()), "entropy_target_std": float(targets.std()),
        # a train mean far below the validation mean means psi_dom overfitted (see TrainConfig)
        "entropy_target_train_mean": float(targets[train_idx].mean()),
        "entropy_target_val_mean": float(targets[val_idx].mean()) if len(val_idx) else nan,
        "entropy_max": float(math.log(k)),
    }
    logger.info(f"psi_dom validation accuracy {metrics['dom_val_accuracy']:.4f} "
                f"(majority baseline {metrics['dom_val_majority_baseline']:.4f}); psi_div "
                f"validation MSE {metrics['div_val_mse']:.5f} (predict-mean baseline "
                f"{baseline:.5f}, R^2 {metrics['div_val_r2']:.3f})")
    return metrics


class DaarProbes:
    """Trained psi_dom + psi_div for inference: domain probabilities and the diversity reward."""

    def __init__(self, dom: ProbeMLP, div: ProbeMLP, domains: Sequence[str]):
        if dom.n_out != len(domains) or div.n_out != 1 or dom.in_dim != div.in_dim:
            raise ValueError("inconsistent probes: psi_dom must have one output per domain, "
                             "psi_div one output, both the same input dim")
        self.dom, self.div, self.domains = dom.eval(), div.eval(), list(domains)
        self.device: str | torch.device = "cpu"

    @property
    def feature_dim(self) -> int:
        return self.dom.in_dim

    def to(self, device: str | torch.device) -> "DaarProbes":
        self.dom.to(device)
        self.div.to(device)
        self.device = device
        return self

    def score(self, features: np.ndarray, batch_size: int = 1024
              ) -> tuple[np.ndarray, np.ndarray]:
        """(predicted entropy [N] = diversity reward, domain probabilities [N, K])."""
        probs = softmax(predict(self.dom, features, batch_size, self.device)) if len(features) \
            else np.zeros((0, len(self.domains)), dtype=np.float32)
        reward = predict(self.div, features, batch_size, self.device)[:, 0]
        return reward, probs
