"""The numbers behind a verdict, as plain numpy functions (no torch: the ONNX path uses them too).

- temperature scaling (Guo et al. 2017): one scalar T, probabilities = softmax(logits / T),
  fitted by minimising the negative log-likelihood on the validation split; dividing every
  logit by the same T > 0 never changes their order, so top-1 is unchanged by construction;
- k-nearest-neighbour distance (Sun et al. 2022) in the model's pooled feature space:
  features are L2-normalised and the score is (1 - cosine similarity to the k-th most similar
  bank photo) / 2, in [0, 1], higher = further from the photos the model was fitted on;
- split conformal prediction sets with the RAPS score (Angelopoulos et al. 2021; lam=0 is
  APS): a photo's set holds the breeds whose score is within the quantile of the validation
  photos' true-breed scores, so it holds the true breed with the chosen coverage on photos
  exchangeable with the validation split. RAPS sets are never empty; the LAC score (Sadinle et
  al. 2019: 1 - the true breed's probability) gives the smallest sets on average and may give
  an empty one (no breed likely enough), which keeps coverage near the target on a model that
  is right more often than the target.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import DogbreedsError
from .fractions import check_fraction  # noqa: F401  (re-exported)


# --- temperature ---

def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float32 probabilities of logits / temperature (computed in float64)."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature)).astype(np.float32)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0,
                    iterations: int = 80) -> float:
    """The T in [low, high] minimising NLL(softmax(logits / T), labels).

    The NLL is convex in 1/T (a log-sum-exp minus a linear term), hence unimodal in log T:
    a golden-section search on log T finds the minimum to ~1e-12 relative in 80 steps."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        raise DogbreedsError("cannot fit a temperature on 0 validation photos; train with --val-fraction > 0")
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return float(math.exp((a + b) / 2))


# --- k-nearest-neighbour distance ---

def normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def knn_distance(features: np.ndarray, bank: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """(1 - cosine similarity to the k-th most similar row of `bank`) / 2 for each row of `features`.

    `bank` holds L2-normalised rows (any float dtype; computed in float32). exclude_self: the
    rows of `features` are also rows of `bank` (same order), and each skips its own match."""
    if len(bank) == 0:
        raise DogbreedsError("the feature bank is empty; run `dogbreeds calibrate RUN --data DATA`")
    query = normalise(features)
    bank = np.asarray(bank, dtype=np.float32)
    out = np.empty(len(query), dtype=np.float32)
    kth = min(int(k) + int(exclude_self), len(bank)) - 1
    for start in range(0, len(query), 1024):  # bounded memory for long lists
        sims = query[start:start + 1024] @ bank.T
        # k-th largest similarity = (n - k)-th smallest
        part = np.partition(sims, len(bank) - 1 - kth, axis=1)[:, len(bank) - 1 - kth]
        out[start:start + 1024] = (1.0 - part) / 2.0
    return np.clip(out, 0.0, 1.0)


# --- a dog / not-dog head on the pooled features ---

def fit_logistic(positives: np.ndarray, negatives: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, float]:
    """(w, b) of an L2-regularised, class-balanced logistic regression on L2-normalised features:
    sigmoid(normalise(x) @ w + b) = P(x is a positive). Fitted with scipy's L-BFGS (fitting only;
    prediction is one dot product)."""
    from scipy.optimize import minimize

    x = np.concatenate([normalise(positives), normalise(negatives)]).astype(np.float64)
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    weight = np.where(y == 1, 0.5 / max(1, len(positives)), 0.5 / max(1, len(negatives)))

    def loss(params):
        z = x @ params[:-1] + params[-1]
        p = 1.0 / (1.0 + np.exp(-z))
        value = -(weight * (y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))).sum()
        grad_z = weight * (p - y)
        return (value + l2 * (params[:-1] ** 2).sum(),
                np.r_[x.T @ grad_z + 2 * l2 * params[:-1], grad_z.sum()])

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return result.x[:-1].astype(np.float32), float(result.x[-1])


def logistic_score(features: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """P(negative class) = 1 - sigmoid(normalise(x) @ w + b): for the dog head, P(not a dog)."""
    z = normalise(features) @ np.asarray(w, dtype=np.float32) + np.float32(b)
    return (1.0 / (1.0 + np.exp(np.clip(z, -60, 60)))).astype(np.float32)


# --- conformal sets ---

def _penalised_cumulative(probs: np.ndarray, lam: float, k_reg: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, score) per row: classes by falling probability, and each one's RAPS score
    (the mass of the classes ranked above it plus its own, + lam * max(0, rank - k_reg))."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=1)
    rank = np.arange(1, probs.shape[1] + 1)
    score = np.cumsum(sorted_probs, axis=1) + lam * np.maximum(0, rank - k_reg)[None, :]
    return order, score


def conformal_scores(probs: np.ndarray, labels: np.ndarray, lam: float = 0.0, k_reg: int = 0,
                     method: str = "raps") -> np.ndarray:
    """The conformal score of each photo's true breed (lower = the model ranks it more confidently):
    RAPS (the mass ranked above it plus its own, + the rank penalty) or LAC (1 - its probability)."""
    labels = np.asarray(labels)
    if check_set_method(method) == "lac":
        probs = np.asarray(probs, dtype=np.float64)
        return 1.0 - probs[np.arange(len(labels)), labels]
    order, score = _penalised_cumulative(probs, lam, k_reg)
    position = np.argmax(order == labels[:, None], axis=1)
    return score[np.arange(len(position)), position]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """Split-conformal threshold: the ceil((n+1) * coverage)-th smallest calibration score
    (infinite when n is too small for the coverage: every breed then enters the set)."""
    coverage = check_fraction("coverage", coverage)
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * coverage)
    return float("inf") if rank > len(scores) else float(scores[rank - 1])


def prediction_sets(probs: np.ndarray, qhat: float, lam: float = 0.0, k_reg: int = 0,
                    method: str = "raps") -> list[list[int]]:
    """Per row, the breeds (label indices, most probable first) whose score is <= qhat, so a
    true breed with score <= qhat is in.
    RAPS: breeds that add nothing to the score (probability 0 in float32, no penalty) stay out,
    and the top breed is always in (never an empty set; so coverage >= the top-1 accuracy).
    LAC (Sadinle et al. 2019, the smallest sets on average): the breeds with probability
    >= 1 - qhat; empty when no breed is that likely (coverage close to the target at any accuracy)."""
    if check_set_method(method) == "lac":
        probs = np.asarray(probs, dtype=np.float64)
        order = np.argsort(-probs, axis=1, kind="stable")
        sizes = (np.take_along_axis(probs, order, axis=1) >= 1.0 - qhat - 1e-12).sum(axis=1)
        return [order[i, :sizes[i]].tolist() for i in range(len(order))]
    order, score = _penalised_cumulative(probs, lam, k_reg)
    adds = np.diff(score, axis=1, prepend=0.0) > 0
    sizes = np.maximum(1, ((score <= qhat + 1e-12) & adds).sum(axis=1))
    return [order[i, :sizes[i]].tolist() for i in range(len(order))]


def set_metrics(sets: list[list[int]], labels) -> dict:
    """Empirical coverage (share of photos whose set holds their label), mean set size and share of
    empty sets; NaN for no photos."""
    if not len(sets):
        return {"coverage": float("nan"), "mean_set_size": float("nan"), "empty_sets": float("nan")}
    return {"coverage": float(np.mean([int(label) in s for label, s in zip(labels, sets)])),
            "mean_set_size": float(np.mean([len(s) for s in sets])),
            "empty_sets": float(np.mean([not s for s in sets]))}


SET_METHODS = ("raps", "lac")


def check_set_method(method: str) -> str:
    if method not in SET_METHODS:
        raise DogbreedsError(f"breed-set method {method!r}: use one of {', '.join(SET_METHODS)}")
    return method


# --- evaluation helpers (used by calibrate, evaluate and the benchmark) ---

def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    neg, pos = np.asarray(negatives, dtype=np.float64), np.asarray(positives, dtype=np.float64)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    values = np.concatenate([neg, pos])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(neg) * len(pos)))


def fpr_at_tpr(negatives: np.ndarray, positives: np.ndarray, tpr: float = 0.95) -> float:
    """Share of `positives` (the OOD photos) scored below the threshold that keeps `tpr` of the
    `negatives` (in-distribution photos) below it, i.e. OOD photos let through as in-distribution."""
    threshold = np.quantile(np.asarray(negatives, dtype=np.float64), tpr, method="higher")
    return float(np.mean(np.asarray(positives) <= threshold))

