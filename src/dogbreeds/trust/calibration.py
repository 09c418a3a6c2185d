"""`Calibration`: everything a run needs at prediction time to answer honestly, and its fitting.

Stored in the run (RunDir.calibration_file: JSON; RunDir.calibration_bank_file: the feature
banks, .npz) and carried inside ONNX exports (`to_metadata` / `from_metadata`: one JSON
string with the banks base64-encoded), so the torch-free path computes the same scores.

A photo's answer (`assess`):
- `probs`: softmax(logits / temperature), the calibrated probabilities (order = the model's),
  then, when cross-validation on the validation split chose it, a top-label isotonic step
  (`apply_top_label`: the top-1 probability mapped through stored breakpoints, clamped so the
  top-1 breed stays the top-1, the others rescaled);
- `ood_score`: how far its pooled features are from the run's breeds (0..1); above
  `ood_threshold` the photo is not one of the known breeds. With other dogs at calibration
  (the data root's breeds the run does not know, `--other-dogs`): sigmoid of a weighted sum of
  two z-scores (standardised on the validation photos), the kNN distance to the training photos
  and the logit of an outlier-exposure head (logistic regression: training photos vs other
  dogs), weight and head penalty chosen by 2-fold cross-validation over the other dogs' breeds;
  the same cross-validation may add a third z-score, 1 - the model's own top-1 softmax
  probability (`ood_msp`, raw logits), with a weight from OOD_MSP_WEIGHT_GRID.
  Without other dogs (or when cross-validation prefers it): the kNN distance alone;
- `dog_score`: how little it looks like a dog. With photos of non-dogs at calibration
  (`--not-dogs`), P(not a dog) from a logistic-regression head on the pooled features (dogs:
  training photos + other dogs; non-dogs: those photos); without them, the kNN distance to
  every dog photo the calibration saw (the training photos and the "other dogs": the data
  root's breeds the run does not know). With the head, any photo above `not_a_dog_threshold`
  is "not_a_dog" (on a fine-tuned model many cats fall within the kNN threshold: docs/trust.md);
  with the kNN dog score only photos above `ood_threshold` can be. The others above
  `ood_threshold` are "unknown_breed";
- `breed_set`: the split-conformal set for the chosen coverage.
Banks are stored L2-normalised in float16 and read back as the same float16 values on every
path, so only the features themselves (torch vs onnxruntime, ~1e-5) differ between paths.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import DogbreedsError
from .scores import (check_fraction, check_set_method, conformal_quantile, conformal_scores, fit_logistic,
                     fit_temperature, knn_distance, logistic_score, nll, normalise, prediction_sets, softmax)

FORMAT = "dogbreeds-calibration"
VERSION = 5                # 2: the outlier-exposure part of ood_score (version-1 files: kNN alone)
#                            3: the optional top-label isotonic step (older files: temperature alone)
#                            4: the breed-set method, RAPS or LAC (older files: RAPS)
#                            5: the max-softmax part of ood_score (older files: weight 0)
TEMPERATURE, ISOTONIC = "temperature", "temperature + isotonic"
# the isotonic step is used only when its out-of-fold ECE on the validation split (TOP_LABEL_FOLDS
# folds, seeded, TOP_LABEL_BINS bins, pooled) beats the temperature alone by TOP_LABEL_MARGIN;
# margin and folds were fixed before any test figure of this rule was seen (docs/trust.md)
TOP_LABEL_FOLDS = 5
TOP_LABEL_BINS = 15
TOP_LABEL_MARGIN = 0.005
TOP_LABEL_MIN_VAL = 50     # fewer validation photos: temperature alone, no cross-validation
TOP_LABEL_GAP = 1e-5       # relative gap kept between the clamped top-1 and the largest other probability
DEFAULT_COVERAGE = 0.9
DEFAULT_KEEP = 0.95       # share of in-breed (validation) dogs a threshold keeps as "breed"
DEFAULT_OOD_K = 10        # chosen by measurement on fitting photos (docs/trust.md)
DEFAULT_DOG_K = 10
DEFAULT_RAPS_LAMBDA = 0.0  # APS, when there are too few validation photos to choose a penalty
DEFAULT_RAPS_K_REG = 0
# RAPS (lambda, k_reg) candidates, chosen by 2-fold cross-validation on the validation split
RAPS_GRID = ((0.0, 0), (0.01, 1), (0.01, 3), (0.05, 1), (0.05, 3), (0.2, 1))
# "auto" uses LAC sets (may be empty) instead of RAPS (never empty) when RAPS's out-of-fold coverage on
# the validation split exceeds the target by more than this (rule fixed before its test figures: docs/trust.md)
SET_OVERCOVER_MARGIN = 0.02
SET_MIN_VAL = 40           # fewer validation photos: RAPS with the default penalty, no cross-validation
DOG_HEAD_L2 = 1e-3         # used when there are too few not-dog photos to choose one
# dog / not-dog head regularisation candidates, chosen by 2-fold cross-validation (docs/trust.md)
DOG_HEAD_L2_GRID = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
# ood_score = sigmoid(mix * z(kNN) + (1 - mix) * z(head logit)): candidates, chosen by 2-fold
# cross-validation over the other dogs (mix 1.0 = the kNN distance alone; ties keep it)
OOD_MIX_GRID = (1.0, 0.75, 0.5, 0.25, 0.0)
OOD_HEAD_L2_GRID = (1e-4, 1e-5, 1e-6)
# weight of a third z-score in ood_score, 1 - max softmax of the raw logits: (1 - it) scales the two above.
# Chosen by the same cross-validation; 0 (no such part) wins ties (docs/trust.md: measured on fitting photos)
OOD_MSP_WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.5)
OOD_HEAD_MIN_OTHER_DOGS = 20
VERDICTS = ("breed", "unknown_breed", "not_a_dog")
UNCALIBRATED_NOTE = ("this run has no calibration: the verdict comes from the top-1 probability alone and cannot "
                     "tell 'not a dog' from 'unknown breed'; run `dogbreeds calibrate RUN --data DATA`")


@dataclass
class Assessment:
    """The trust part of one photo's answer."""
    verdict: str
    ood_score: float
    dog_score: float | None
    probs: np.ndarray
    breed_set: list[int]
    note: str | None = None


@dataclass
class Calibration:
    temperature: float
    ood_k: int
    ood_threshold: float
    dog_k: int
    not_a_dog_threshold: float | None
    conformal_scores: np.ndarray          # validation photos' true-breed scores (RAPS or LAC: set_method)
    bank: np.ndarray                      # float16 [N, D], L2-normalised training features
    dog_bank: np.ndarray                  # float16 [M, D], L2-normalised other-dog features (M may be 0)
    coverage: float = DEFAULT_COVERAGE
    raps_lambda: float = DEFAULT_RAPS_LAMBDA
    raps_k_reg: int = DEFAULT_RAPS_K_REG
    set_method: str = "raps"              # "raps": never empty; "lac": may be empty, smallest on average
    info: dict = field(default_factory=dict)  # what it was fitted on, and what that measured
    dog_head_w: np.ndarray | None = None  # float32 [D]: the dog / not-dog head (None: kNN dog score)
    dog_head_b: float | None = None
    head_on_all: bool = False             # the head's threshold applies to every photo, not only OOD ones
    ood_head_w: np.ndarray | None = None  # float32 [D]: the outlier-exposure head (None: ood_score = kNN alone)
    ood_head_b: float = 0.0
    ood_mix: float = 1.0                  # weight of the kNN z-score (1 - it: the head's)
    ood_stats: tuple = (0.0, 1.0, 0.0, 1.0, 0.0, 1.0)  # validation mean / std: kNN distance, head logit, ood_msp
    ood_msp_weight: float = 0.0           # weight of the ood_msp z-score (0: ood_score from the features alone)
    top_label_x: np.ndarray | None = None  # float64 breakpoints of the top-label isotonic step (None: temperature alone)
    top_label_y: np.ndarray | None = None

    def __post_init__(self):
        # float32 copies of the float16 banks, made once (the same values on every path)
        self._bank = np.asarray(self.bank, dtype=np.float32)
        self._dogs = np.concatenate([self._bank, np.asarray(self.dog_bank, dtype=np.float32).reshape(
            -1, self._bank.shape[1])])

    # --- prediction ---

    def qhat(self, coverage: float | None = None) -> float:
        return conformal_quantile(self.conformal_scores, self.coverage if coverage is None else coverage)

    def assess(self, logits: np.ndarray, features: np.ndarray, ood_threshold: float | None = None,
               coverage: float | None = None) -> list[Assessment]:
        ood_threshold = self.ood_threshold if ood_threshold is None else check_fraction("ood threshold", ood_threshold)
        coverage = self.coverage if coverage is None else check_fraction("coverage", coverage)
        logits = np.asarray(logits, dtype=np.float32)
        probs = self.calibrated_probs(logits)
        ood = self.ood_scores(features, logits)
        dog = self.dog_scores(features)
        sets = self.breed_sets(probs, coverage)
        out = []
        for i in range(len(logits)):
            not_a_dog = self.not_a_dog_threshold is not None and dog[i] > self.not_a_dog_threshold
            if self.head_on_all and not_a_dog:
                verdict = "not_a_dog"
            elif ood[i] <= ood_threshold:
                verdict = "breed"
            elif not_a_dog:
                verdict = "not_a_dog"
            else:
                verdict = "unknown_breed"
            out.append(Assessment(verdict, float(ood[i]), float(dog[i]), probs[i], sets[i]))
        return out

    def breed_sets(self, probs: np.ndarray, coverage: float | None = None) -> list[list[int]]:
        """The conformal breed set of each row of calibrated probabilities (label indices, most probable first)."""
        return prediction_sets(probs, self.qhat(coverage), self.raps_lambda, self.raps_k_reg, self.set_method)

    @property
    def method(self) -> str:
        return TEMPERATURE if self.top_label_x is None else ISOTONIC

    def calibrated_probs(self, logits: np.ndarray) -> np.ndarray:
        """float32 calibrated probabilities: softmax(logits / T), then the top-label isotonic step if any."""
        probs = softmax(logits, self.temperature)
        if self.top_label_x is None:
            return probs
        return apply_top_label(probs, self.top_label_x, self.top_label_y)

    def ood_scores(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """ood_score per photo; `logits` (the raw ones) are needed when the score has a max-softmax part."""
        knn = knn_distance(features, self._bank, self.ood_k)
        if self.ood_head_w is None and self.ood_msp_weight == 0.0:
            return knn
        if self.ood_msp_weight and logits is None:
            raise DogbreedsError("this calibration's ood_score has a max-softmax part: pass the logits too")
        head = None if self.ood_head_w is None else ood_head_logit(features, self.ood_head_w, self.ood_head_b)
        return mixed_ood_score(knn, head, self.ood_mix, self.ood_stats,
                               None if logits is None else ood_msp(logits), self.ood_msp_weight)

    def dog_scores(self, features: np.ndarray) -> np.ndarray:
        if self.dog_head_w is not None:
            return logistic_score(features, self.dog_head_w, self.dog_head_b)
        return knn_distance(features, self._dogs, self.dog_k)

    # --- storage ---

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION,
            "temperature": self.temperature, "coverage": self.coverage,
            "probabilities": {"method": self.method,
                              "isotonic_x": None if self.top_label_x is None else [float(v) for v in self.top_label_x],
                              "isotonic_y": None if self.top_label_y is None else [float(v) for v in self.top_label_y],
                              "choice": self.info.get("top_label")},
            "ood": {"method": " + ".join(["knn-cosine"] + ["outlier-exposure head"] * (self.ood_head_w is not None)
                                          + ["max-softmax"] * (self.ood_msp_weight > 0)),
                    "k": self.ood_k, "threshold": self.ood_threshold, "mix": self.ood_mix,
                    "msp_weight": self.ood_msp_weight,
                    "head_bias": None if self.ood_head_w is None else self.ood_head_b,
                    "stats": dict(zip(OOD_STAT_KEYS, _full_stats(self.ood_stats)))},
            "not_a_dog": {"method": "knn-cosine to training + other dogs" if self.dog_head_w is None else
                          "logistic head on normalised features", "k": self.dog_k,
                          "bias": self.dog_head_b, "threshold": self.not_a_dog_threshold,
                          "applies_to": "all" if self.head_on_all else "ood"},
            "conformal": {"method": self.set_method, "lambda": self.raps_lambda, "k_reg": self.raps_k_reg,
                          "scores": [float(s) for s in self.conformal_scores]},  # the choice: info.breed_set
            "bank": {"train": int(len(self.bank)), "other_dogs": int(len(self.dog_bank)),
                     "dim": int(self.bank.shape[1]), "dtype": "float16"},
            "info": self.info,
        }

    def banks_npz(self) -> bytes:
        buffer = io.BytesIO()
        head = np.zeros(0, np.float32) if self.dog_head_w is None else np.asarray(self.dog_head_w, np.float32)
        ood_head = np.zeros(0, np.float32) if self.ood_head_w is None else np.asarray(self.ood_head_w, np.float32)
        np.savez(buffer, bank=self.bank.astype(np.float16), dog_bank=self.dog_bank.astype(np.float16), dog_head=head,
                 ood_head=ood_head)
        return buffer.getvalue()

    @classmethod
    def from_parts(cls, meta: dict, banks: bytes, origin: str) -> "Calibration":
        try:
            if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
            with np.load(io.BytesIO(banks), allow_pickle=False) as arrays:
                bank, dog_bank, head = arrays["bank"], arrays["dog_bank"], arrays["dog_head"]
                ood_head = arrays["ood_head"] if "ood_head" in arrays.files else np.zeros(0, np.float32)
            bias = meta["not_a_dog"].get("bias")
            ood_bias = meta["ood"].get("head_bias")  # version 1: absent (kNN alone)
            stats = meta["ood"].get("stats") or {}
            probabilities = meta.get("probabilities") or {}  # version <= 2: absent (temperature alone)
            iso_x, iso_y = probabilities.get("isotonic_x"), probabilities.get("isotonic_y")
            if (iso_x is None) != (iso_y is None) or (iso_x is not None and (
                    len(iso_x) != len(iso_y) or len(iso_x) < 1 or np.any(np.diff(np.asarray(iso_x, float)) < 0))):
                raise ValueError("isotonic breakpoints must be two lists of the same length, x increasing")
            ood_stats = tuple(float(stats.get(key, default)) for key, default in zip(OOD_STAT_KEYS, _full_stats(())))
            if not all(np.isfinite(ood_stats)) or min(ood_stats[1::2]) <= 0:  # ood_score divides by each std
                raise ValueError(f"ood statistics {dict(zip(OOD_STAT_KEYS, ood_stats))}: means must be finite "
                                 "and standard deviations finite and above 0")
            if float(meta["ood"].get("mix", 1.0)) < 1.0 and ood_bias is None:
                raise ValueError("a mix below 1 needs the outlier-exposure head")
            if ood_bias is not None and ood_head.shape != (bank.shape[1],):
                raise ValueError(f"outlier-exposure head of shape {ood_head.shape} for {bank.shape[1]}-d features")
            return cls(
                temperature=float(meta["temperature"]), coverage=float(meta["coverage"]),
                ood_k=int(meta["ood"]["k"]), ood_threshold=float(meta["ood"]["threshold"]),
                dog_k=int(meta["not_a_dog"]["k"]),
                not_a_dog_threshold=(None if meta["not_a_dog"]["threshold"] is None
                                     else float(meta["not_a_dog"]["threshold"])),
                conformal_scores=np.asarray(meta["conformal"]["scores"], dtype=np.float64),
                raps_lambda=float(meta["conformal"]["lambda"]), raps_k_reg=int(meta["conformal"]["k_reg"]),
                set_method=check_set_method(meta["conformal"].get("method", "raps")),  # version <= 3: RAPS
                bank=bank, dog_bank=dog_bank.reshape(-1, bank.shape[1]), info=dict(meta.get("info", {})),
                dog_head_w=head if bias is not None else None, dog_head_b=None if bias is None else float(bias),
                head_on_all=meta["not_a_dog"].get("applies_to", "ood") == "all",  # older files: "ood"
                ood_head_w=ood_head if ood_bias is not None else None, ood_head_b=float(ood_bias or 0.0),
                ood_mix=float(meta["ood"].get("mix", 1.0)),
                ood_msp_weight=check_msp_weight(float(meta["ood"].get("msp_weight", 0.0))),  # version <= 4: 0
                ood_stats=ood_stats,
                top_label_x=None if iso_x is None else np.asarray(iso_x, dtype=np.float64),
                top_label_y=None if iso_y is None else np.asarray(iso_y, dtype=np.float64),
            )
        except (KeyError, TypeError, ValueError, OSError, DogbreedsError) as exc:
            raise DogbreedsError(f"{origin}: unreadable calibration ({exc}); rerun `dogbreeds calibrate RUN --data DATA`"
                                 ) from None

    def save(self, run) -> None:
        run.write_bytes(run.calibration_bank_file, self.banks_npz())
        run.write_json(run.calibration_file, self.to_json())

    @classmethod
    def load(cls, run) -> "Calibration | None":
        """The run's calibration, or None when it has none (trained before calibration existed)."""
        if not run.calibration_file.is_file():
            return None
        if not run.calibration_bank_file.is_file():
            raise DogbreedsError(f"{run.calibration_file} exists but {run.calibration_bank_file} does not; rerun "
                                 "`dogbreeds calibrate RUN --data DATA`")
        return cls.from_parts(run.read_json(run.calibration_file), run.calibration_bank_file.read_bytes(),
                              str(run.calibration_file))

    def to_metadata(self) -> str:
        """One JSON string for an ONNX export's metadata."""
        return json.dumps({"calibration": self.to_json(), "banks": base64.b64encode(self.banks_npz()).decode()})

    @classmethod
    def from_metadata(cls, text: str, origin: str = "ONNX metadata") -> "Calibration":
        try:
            data = json.loads(text)
            banks = base64.b64decode(data["banks"])
        except (KeyError, TypeError, ValueError, RecursionError) as exc:  # RecursionError: a nesting bomb
            raise DogbreedsError(f"{origin}: unreadable calibration ({exc}); re-export the run") from None
        return cls.from_parts(data["calibration"], banks, origin)


def assess_uncalibrated(logits: np.ndarray, low_confidence: float = 0.3) -> list[Assessment]:
    """What a run without calibration can say: plain softmax, ood_score = 1 - top-1 probability,
    "unknown_breed" under the low-confidence threshold, the top breed alone as its set."""
    probs = softmax(logits)
    out = []
    for row in probs:
        top = float(row.max())
        verdict = "breed" if top >= low_confidence else "unknown_breed"
        out.append(Assessment(verdict, 1.0 - top, None, row, [int(row.argmax())], UNCALIBRATED_NOTE))
    return out


def fit_calibration(train_features: np.ndarray, val_features: np.ndarray, val_logits: np.ndarray,
                    val_labels: np.ndarray, other_dog_features: np.ndarray | None = None,
                    not_dog_features: np.ndarray | None = None,
                    coverage: float = DEFAULT_COVERAGE, keep: float = DEFAULT_KEEP, ood_k: int = DEFAULT_OOD_K,
                    dog_k: int = DEFAULT_DOG_K, raps: tuple[float, int] | None = None,
                    info: dict | None = None, seed: int = 0, other_dog_groups: np.ndarray | None = None,
                    ood_head: bool | tuple = True, top_label: str = "auto",
                    set_method: str = "auto", other_dog_logits: np.ndarray | None = None) -> Calibration:
    """Fit temperature, thresholds and conformal scores on the validation split.

    - ood_threshold: the conformal (n+1)-quantile at `keep` of the validation photos' kNN
      distances to the training bank, so on exchangeable in-breed photos at least `keep` of
      them stay "breed" (in expectation);
    - not_a_dog_threshold: the same quantile of the dog scores of the validation photos and of
      the other dogs (each scored against the bank without itself): at least `keep` of dogs,
      known breed or not, are never called "not a dog". No photo of a non-dog is needed.
      None when there are no other dogs (the validation dogs alone say nothing about non-dogs).
      With `not_dog_features` (photos of anything but dogs), a logistic dog / not-dog head
      (L2 penalty from DOG_HEAD_L2_GRID by 2-fold cross-validation over the not-dog photos:
      best AUROC of validation dogs vs the held-out half) replaces the kNN dog score and
      applies to every photo; its threshold keeps (1 + keep) / 2 of the validation dogs (which
      the head never saw) as dogs, and the OOD threshold is then the `keep` quantile of the
      validation dogs' kNN distances counting those the head rejects as infinitely far, so at
      least `keep` of them stay "breed" overall;
    - ood_score: with `ood_head` and at least OOD_HEAD_MIN_OTHER_DOGS other dogs, the kNN distance
      mixed with an outlier-exposure head (training photos vs other dogs); the mix weight and
      the head's L2 penalty are the OOD_MIX_GRID x OOD_HEAD_L2_GRID entry with the best mean
      AUROC of validation dogs vs held-out other dogs in 2-fold cross-validation, the folds
      splitting `other_dog_groups` (breed per other dog; -1 = none known, split at random);
      the thresholds below then use that score. With `other_dog_logits` (the other dogs' raw
      logits) the grid also holds OOD_MSP_WEIGHT_GRID, the weight of a third z-score, `ood_msp`
      (1 - the top-1 softmax probability; 0 wins ties). `ood_head` = (mix, l2[, msp_weight]) gives
      the choice instead (any number of other dogs); False: the kNN distance alone;
    - probabilities: softmax(logits / T), T minimising the validation NLL; then, with `top_label`
      "auto", the top-label isotonic step when `choose_top_label` (K-fold cross-validation of
      the out-of-fold ECE on the validation split) prefers it; "temperature" / "isotonic" force
      the choice. The conformal scores and the RAPS choice use these final probabilities;
    - RAPS penalty `raps` = (lambda, k_reg): given, or the grid entry with the smallest sets in
      2-fold cross-validation on the validation split (APS when it has under 40 photos);
    - breed-set method: `set_method` "raps" or "lac", or "auto": `choose_set_method` (LAC when
      RAPS's never-empty sets over-cover the target by more than SET_OVERCOVER_MARGIN out of fold).
    """
    coverage, keep = check_fraction("coverage", coverage), check_fraction("keep", keep)
    val_labels = np.asarray(val_labels)
    if len(val_labels) < 2:
        raise DogbreedsError(f"calibration needs validation photos, got {len(val_labels)}; "
                             "train with --val-fraction > 0 (default 0.1)")
    bank = normalise(train_features).astype(np.float16)
    other = np.zeros((0, bank.shape[1]), np.float32) if other_dog_features is None else np.asarray(other_dog_features)
    dog_bank = normalise(other).astype(np.float16) if len(other) else np.zeros((0, bank.shape[1]), np.float16)
    temperature = fit_temperature(val_logits, val_labels)
    probs = softmax(val_logits, temperature)
    if top_label == "auto":
        top_choice = choose_top_label(val_logits, val_labels, seed)
    elif top_label in ("temperature", "isotonic"):
        top_choice = {"method": TEMPERATURE if top_label == "temperature" else ISOTONIC, "given": True}
    else:
        raise DogbreedsError(f"top_label {top_label!r}: use 'auto', 'temperature' or 'isotonic'")
    iso_x = iso_y = None
    if top_choice["method"] == ISOTONIC:
        iso_x, iso_y = fit_top_label_isotonic(probs, val_labels)
        probs = apply_top_label(probs, iso_x, iso_y)
    val_ood = knn_distance(val_features, bank, ood_k)
    ood_head_w, ood_head_b, ood_mix, ood_stats, ood_choice = None, 0.0, 1.0, _full_stats(()), None
    if isinstance(ood_head, tuple) and len(other):
        ood_choice = {"mix": float(ood_head[0]), "l2": float(ood_head[1]),
                      "msp_weight": check_msp_weight(float(ood_head[2]) if len(ood_head) > 2 else 0.0), "given": True}
    elif ood_head is True and len(other) >= OOD_HEAD_MIN_OTHER_DOGS:
        ood_choice = choose_ood_head(train_features, other, val_features, val_ood, other_dog_groups, seed, ood_k,
                                     val_logits=val_logits, other_logits=other_dog_logits)
    msp_weight = 0.0 if ood_choice is None else ood_choice.get("msp_weight", 0.0)
    if ood_choice is not None and (ood_choice["mix"] < 1.0 or msp_weight > 0):
        ood_mix, val_head, val_msp = ood_choice["mix"], None, ood_msp(val_logits) if msp_weight > 0 else None
        if ood_mix < 1.0:
            ood_head_w, ood_head_b = fit_logistic(train_features, other, ood_choice["l2"])
            val_head = ood_head_logit(val_features, ood_head_w, ood_head_b)
        ood_stats = _ood_stats(val_ood, val_head, val_msp)
        val_ood = mixed_ood_score(val_ood, val_head, ood_mix, ood_stats, val_msp, msp_weight)
    ood_threshold = min(conformal_quantile(val_ood, keep), 1.0 - 1e-6)
    not_a_dog_threshold = None
    head_w = head_b = None
    head_l2 = None
    if not_dog_features is not None and len(not_dog_features):
        dogs = np.concatenate([train_features, other])
        head_l2 = choose_head_l2(dogs, np.asarray(not_dog_features), val_features, seed)
        head_w, head_b = fit_logistic(dogs, not_dog_features, head_l2)
        val_dog = logistic_score(val_features, head_w, head_b)
        not_a_dog_threshold = min(conformal_quantile(val_dog, (1.0 + keep) / 2.0), 1.0 - 1e-6)
        combined = np.where(val_dog <= not_a_dog_threshold, val_ood, np.inf)
        ood_threshold = min(conformal_quantile(combined, keep), 1.0 - 1e-6)
    elif len(dog_bank):
        full = np.concatenate([bank, dog_bank])
        val_dog = knn_distance(val_features, full, dog_k)
        others = _knn_leave_one_out(other, full, len(bank), dog_k)
        not_a_dog_threshold = min(conformal_quantile(np.concatenate([val_dog, others]), keep), 1.0 - 1e-6)
    raps_lambda, raps_k_reg = raps if raps is not None else choose_raps(probs, val_labels, coverage, seed)
    if set_method == "auto":
        set_choice = choose_set_method(probs, val_labels, coverage, raps_lambda, raps_k_reg, seed)
    else:
        set_choice = {"method": check_set_method(set_method), "given": True}
    calibration = Calibration(
        temperature=temperature, ood_k=ood_k, ood_threshold=float(ood_threshold), dog_k=dog_k,
        not_a_dog_threshold=None if not_a_dog_threshold is None else float(not_a_dog_threshold),
        conformal_scores=conformal_scores(probs, val_labels, raps_lambda, raps_k_reg, set_choice["method"]),
        bank=bank, dog_bank=dog_bank, coverage=coverage, raps_lambda=raps_lambda, raps_k_reg=raps_k_reg,
        set_method=set_choice["method"], dog_head_w=head_w, dog_head_b=head_b,
        head_on_all=head_w is not None, ood_head_w=ood_head_w, ood_head_b=ood_head_b, ood_mix=ood_mix,
        ood_stats=ood_stats, ood_msp_weight=msp_weight, top_label_x=iso_x, top_label_y=iso_y,
    )
    calibration.info = {
        "val_photos": int(len(val_labels)), "train_photos": int(len(bank)), "other_dogs": int(len(dog_bank)),
        "not_dogs": 0 if not_dog_features is None else int(len(not_dog_features)), "dog_head_l2": head_l2,
        "ood_head": ood_choice, "top_label": top_choice, "breed_set": set_choice,
        "keep": keep, "val_nll_before": nll(val_logits, val_labels), "val_nll_after": nll(val_logits, val_labels,
                                                                                           temperature),
        **(info or {}),
    }
    return calibration


def fit_top_label_isotonic(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (x, y) of an increasing isotonic regression (scikit-learn) of "the top-1 breed is
    right" on the top-1 probability; between them the map is linear, outside them constant."""
    from sklearn.isotonic import IsotonicRegression

    probs = np.asarray(probs, dtype=np.float64)
    right = (probs.argmax(1) == np.asarray(labels)).astype(np.float64)
    fit = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(probs.max(1), right)
    return np.asarray(fit.X_thresholds_, np.float64), np.asarray(fit.y_thresholds_, np.float64)


def apply_top_label(probs: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The top-label isotonic step, keeping every photo's top-1 breed by construction.

    The top-1 probability c becomes c' = isotonic(c) (np.interp on the breakpoints: the same
    piecewise-linear map scikit-learn's predict uses, clipped at the ends) and the other
    probabilities are scaled by (1 - c') / (1 - c). The second largest, p2, becomes
    p2 (1 - c') / (1 - c), which stays below c' exactly when c' > p2 / (1 - c + p2); so c' is
    clamped to at least that bound (times 1 + TOP_LABEL_GAP, which survives float32 rounding
    and breaks ties towards the original top-1) and to [1/K, 1]. Rows with 1 - c < 1e-12 are
    left as they are. 1 - c is taken as the sum of the other probabilities (so the output sums
    to 1 even when the input's float32 rounding does not). float32 out, computed in float64."""
    p = np.asarray(probs, dtype=np.float64)
    n, k = p.shape
    if n == 0:
        return p.astype(np.float32)
    rows = np.arange(n)
    top = p.argmax(1)
    c = p[rows, top]
    rest = p.copy()
    rest[rows, top] = 0.0
    p2 = rest.max(1)
    left = rest.sum(1)  # 1 - c up to the input's rounding; using the sum makes the output sum to 1
    bound = np.divide(p2, left + p2, out=np.zeros(n), where=(left + p2) > 0)
    lower = np.maximum(1.0 / k, np.minimum(1.0, bound * (1.0 + TOP_LABEL_GAP)))
    new = np.clip(np.interp(c, np.asarray(x, np.float64), np.asarray(y, np.float64)), lower, 1.0)
    movable = left > 1e-12
    new = np.where(movable, new, c)
    scale = np.where(movable, (1.0 - new) / np.where(movable, left, 1.0), 1.0)
    out = p * scale[:, None]
    out[rows, top] = new
    return out.astype(np.float32)


def choose_top_label(val_logits: np.ndarray, val_labels: np.ndarray, seed: int = 0, folds: int = TOP_LABEL_FOLDS,
                     margin: float = TOP_LABEL_MARGIN) -> dict:
    """Temperature alone or temperature + isotonic, on the validation split only.

    K-fold cross-validation (seeded): on each fold's complement fit T (validation NLL) and the
    isotonic step, apply both to the held-out fold; the out-of-fold probabilities of all folds
    are pooled and their ECE (TOP_LABEL_BINS bins) compared. Isotonic only when it beats the
    temperature alone by `margin`. Under TOP_LABEL_MIN_VAL photos: temperature alone."""
    from ..evaluate.metrics import expected_calibration_error

    logits, labels = np.asarray(val_logits, dtype=np.float64), np.asarray(val_labels)
    n = len(labels)
    record = {"method": TEMPERATURE, "folds": folds, "seed": seed, "margin": margin, "bins": TOP_LABEL_BINS,
              "val_photos": int(n)}
    if n < max(TOP_LABEL_MIN_VAL, 2 * folds):
        return {**record, "cv_ece_temperature": None, "cv_ece_isotonic": None,
                "reason": f"under {TOP_LABEL_MIN_VAL} validation photos"}
    fold = np.empty(n, dtype=int)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    plain, iso = np.empty(logits.shape, np.float32), np.empty(logits.shape, np.float32)
    for f in range(folds):
        fit, held = fold != f, fold == f
        t = fit_temperature(logits[fit], labels[fit])
        x, y = fit_top_label_isotonic(softmax(logits[fit], t), labels[fit])
        plain[held] = softmax(logits[held], t)
        iso[held] = apply_top_label(plain[held], x, y)
    ece_t = expected_calibration_error(plain, labels, TOP_LABEL_BINS)
    ece_i = expected_calibration_error(iso, labels, TOP_LABEL_BINS)
    return {**record, "method": ISOTONIC if ece_i < ece_t - margin else TEMPERATURE,
            "cv_ece_temperature": round(float(ece_t), 5), "cv_ece_isotonic": round(float(ece_i), 5)}


def ood_head_logit(features: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """The outlier-exposure head's logit of P(another dog than the run's breeds)."""
    return -(normalise(features) @ np.asarray(w, dtype=np.float32) + np.float32(b))


OOD_STAT_KEYS = ("knn_mean", "knn_std", "head_mean", "head_std", "msp_mean", "msp_std")


def _full_stats(stats: tuple) -> tuple:
    """The six validation statistics of ood_score, missing ones (older files, absent parts) as mean 0, std 1."""
    return tuple(stats) + (0.0, 1.0, 0.0, 1.0, 0.0, 1.0)[len(stats):]


def _mean_std(values: np.ndarray | None) -> tuple:
    return (0.0, 1.0) if values is None else (float(np.mean(values)), float(max(np.std(values), 1e-6)))


def _ood_stats(knn: np.ndarray, head: np.ndarray | None, msp: np.ndarray | None = None) -> tuple:
    return _mean_std(knn) + _mean_std(head) + _mean_std(msp)


def ood_msp(logits: np.ndarray) -> np.ndarray:
    """1 - the top-1 softmax probability of the raw logits (no temperature): the max-softmax part of ood_score."""
    return 1.0 - softmax(np.asarray(logits, dtype=np.float32)).max(1)


def check_msp_weight(weight: float) -> float:
    if not 0.0 <= weight < 1.0:
        raise DogbreedsError(f"max-softmax weight {weight!r} of ood_score must lie in [0, 1)")
    return weight


def mixed_ood_score(knn: np.ndarray, head: np.ndarray | None, mix: float, stats: tuple,
                    msp: np.ndarray | None = None, msp_weight: float = 0.0) -> np.ndarray:
    """sigmoid((1 - m) * (mix * z(kNN) + (1 - mix) * z(head logit)) + m * z(ood_msp)), m = msp_weight, each z
    standardised with `stats` (a missing head needs mix 1, a missing msp weight 0): in (0, 1)."""
    stats = _full_stats(stats)
    z = mix * (np.asarray(knn, np.float64) - stats[0]) / stats[1]
    if mix < 1.0:
        z = z + (1.0 - mix) * (np.asarray(head, np.float64) - stats[2]) / stats[3]
    if msp_weight > 0:
        z = (1.0 - msp_weight) * z + msp_weight * (np.asarray(msp, np.float64) - stats[4]) / stats[5]
    return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)


def choose_ood_head(train_features: np.ndarray, other: np.ndarray, val_features: np.ndarray, val_knn: np.ndarray,
                    groups: np.ndarray | None = None, seed: int = 0, k: int = DEFAULT_OOD_K,
                    val_logits: np.ndarray | None = None, other_logits: np.ndarray | None = None) -> dict:
    """{'mix', 'l2', 'msp_weight', 'cv_auroc', 'knn_cv_auroc', 'cv_auroc_without_msp'}: the OOD_MIX_GRID x
    OOD_HEAD_L2_GRID (x OOD_MSP_WEIGHT_GRID, given both logits) entry with the best mean AUROC of validation
    dogs vs the held-out other dogs, in 2-fold cross-validation over the other dogs (by breed where `groups`
    gives one: a held-out breed was never seen by the head; -1: at random). mix 1.0 (kNN alone) wins ties,
    and so does the stronger penalty; a max-softmax weight above 0 must beat the best without it by 1e-3."""
    from .scores import auroc

    rng = np.random.default_rng(seed)
    groups = np.full(len(other), -1) if groups is None else np.asarray(groups)
    fold = rng.integers(0, 2, len(other))
    named = np.unique(groups[groups >= 0])
    if len(named) >= 2:
        first = set(rng.permutation(named)[: len(named) // 2].tolist())
        fold = np.where(groups >= 0, np.isin(groups, list(first)).astype(int), fold)
    if min((fold == 0).sum(), (fold == 1).sum()) == 0:
        fold = np.arange(len(other)) % 2
    bank = normalise(train_features).astype(np.float16)
    other_knn = knn_distance(other, bank, k)
    with_msp = val_logits is not None and other_logits is not None
    val_msp, other_msp = (ood_msp(val_logits), ood_msp(other_logits)) if with_msp else (None, None)
    results: dict = {}
    for l2 in OOD_HEAD_L2_GRID:
        for f in (0, 1):
            w, b = fit_logistic(train_features, other[fold != f], l2)
            held = fold == f
            val_head, other_head = ood_head_logit(val_features, w, b), ood_head_logit(other[held], w, b)
            stats = _ood_stats(val_knn, val_head, val_msp)
            for weight in OOD_MSP_WEIGHT_GRID if with_msp else (0.0,):
                for mix in OOD_MIX_GRID:
                    held_msp = None if other_msp is None else other_msp[held]
                    results.setdefault((mix, l2, weight), []).append(auroc(
                        mixed_ood_score(val_knn, val_head, mix, stats, val_msp, weight),
                        mixed_ood_score(other_knn[held], other_head, mix, stats, held_msp, weight)))
    means = {key: float(np.mean(v)) for key, v in results.items()}
    best = (1.0, OOD_HEAD_L2_GRID[0], 0.0)
    for key in results:  # in grid order: kNN alone, then stronger penalties first; no max-softmax part first
        if key[2] == 0.0 and means[key] > means[best] + 1e-3:
            best = key
    without_msp = best
    for key in results:
        if key[2] > 0.0 and means[key] > means[best] + 1e-3:
            best = key
    return {"mix": best[0], "l2": best[1], "msp_weight": best[2], "cv_auroc": round(means[best], 4),
            "knn_cv_auroc": round(means[(1.0, OOD_HEAD_L2_GRID[0], 0.0)], 4),
            "cv_auroc_without_msp": round(means[without_msp], 4)}


def _knn_leave_one_out(features: np.ndarray, full_bank: np.ndarray, offset: int, k: int) -> np.ndarray:
    """kNN distance of features[i] (stored at full_bank[offset + i]) to full_bank without itself."""
    query = normalise(features)
    out = np.empty(len(query), np.float32)
    bank = np.asarray(full_bank, dtype=np.float32)
    for start in range(0, len(query), 1024):
        sims = query[start:start + 1024] @ bank.T
        rows = np.arange(len(sims))
        sims[rows, offset + start + rows] = -np.inf
        kth = min(k, len(bank) - 1)
        out[start:start + 1024] = (1.0 - np.partition(sims, len(bank) - kth, axis=1)[:, len(bank) - kth]) / 2.0
    return np.clip(out, 0.0, 1.0)


def choose_head_l2(dogs: np.ndarray, not_dogs: np.ndarray, val_features: np.ndarray, seed: int = 0) -> float:
    """The DOG_HEAD_L2_GRID entry with the best mean AUROC of validation dogs vs not-dog photos in
    2-fold cross-validation over the not-dog photos (the head fitted on the dogs and one half,
    scored on the other half); DOG_HEAD_L2 when there are under 20 not-dog photos."""
    from .scores import auroc

    if len(not_dogs) < 20:
        return DOG_HEAD_L2
    order = np.random.default_rng(seed).permutation(len(not_dogs))
    folds = (order[: len(order) // 2], order[len(order) // 2:])
    best, best_auroc = DOG_HEAD_L2, -1.0
    for l2 in DOG_HEAD_L2_GRID:
        scores = []
        for fit, held in (folds, folds[::-1]):
            w, b = fit_logistic(dogs, not_dogs[fit], l2)
            scores.append(auroc(logistic_score(val_features, w, b), logistic_score(not_dogs[held], w, b)))
        if np.mean(scores) > best_auroc + 1e-4:  # ties keep the stronger penalty
            best, best_auroc = l2, float(np.mean(scores))
    return best


def _set_folds(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // 2], order[n // 2:]


def _out_of_fold_sets(probs: np.ndarray, labels: np.ndarray, coverage: float, lam: float, k_reg: int, method: str,
                      seed: int) -> tuple[float, float]:
    """(coverage, mean set size) of 2-fold cross-validation: the quantile fitted on one half of the
    validation photos, the sets measured on the other, both ways, pooled."""
    covered, sizes = [], []
    folds = _set_folds(len(labels), seed)
    for fit, held in (folds, folds[::-1]):
        qhat = conformal_quantile(conformal_scores(probs[fit], labels[fit], lam, k_reg, method), coverage)
        sets = prediction_sets(probs[held], qhat, lam, k_reg, method)
        covered += [int(label) in s for label, s in zip(labels[held], sets)]
        sizes += [len(s) for s in sets]
    return float(np.mean(covered)), float(np.mean(sizes))


def choose_raps(probs: np.ndarray, labels: np.ndarray, coverage: float, seed: int = 0) -> tuple[float, int]:
    """The RAPS_GRID entry whose sets are smallest at `coverage`, by 2-fold cross-validation on
    the validation photos (fit the quantile on one half, measure set sizes on the other)."""
    labels = np.asarray(labels)
    if len(labels) < SET_MIN_VAL:
        return DEFAULT_RAPS_LAMBDA, DEFAULT_RAPS_K_REG
    best, best_size = RAPS_GRID[0], float("inf")
    for lam, k_reg in RAPS_GRID:
        size = _out_of_fold_sets(probs, labels, coverage, lam, k_reg, "raps", seed)[1]
        if size < best_size - 1e-9:
            best, best_size = (lam, k_reg), size
    return best


def choose_set_method(probs: np.ndarray, labels: np.ndarray, coverage: float, lam: float, k_reg: int,
                      seed: int = 0) -> dict:
    """RAPS, unless its never-empty sets over-cover: when the out-of-fold coverage of the RAPS
    sets (the same 2 folds as `choose_raps`) exceeds `coverage` by more than SET_OVERCOVER_MARGIN,
    which happens when the model's top-1 alone is right more often than that, LAC sets (which may
    be empty) are used. Under SET_MIN_VAL validation photos: RAPS. Both methods' figures are kept."""
    labels = np.asarray(labels)
    if len(labels) < SET_MIN_VAL:
        return {"method": "raps", "val_photos": int(len(labels))}
    figures = {}
    for method in ("raps", "lac"):
        cv_coverage, cv_size = _out_of_fold_sets(probs, labels, coverage, lam, k_reg, method, seed)
        figures[method] = {"cv_coverage": cv_coverage, "cv_mean_size": cv_size}
    method = "lac" if figures["raps"]["cv_coverage"] > coverage + SET_OVERCOVER_MARGIN else "raps"
    return {"method": method, "coverage": coverage, "margin": SET_OVERCOVER_MARGIN, **figures}
