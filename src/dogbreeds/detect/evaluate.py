"""`dogbreeds detect evaluate`: how well the detector finds, counts and names the dogs.

    map, ap50, ap75   COCO box AP (IoU 0.5:0.95, 0.5, 0.75) by pycocotools' COCOeval (what
                      torchmetrics' MeanAveragePrecision runs), over every detection the model keeps (score >= its
                      box_score_thresh, at most detections_per_img)
    recall_at_10      COCO AR with at most 10 detections per photo (mar_10, IoU 0.5:0.95)
    exact_count       share of photos whose number of detections with score >= score_threshold
                      equals their number of dogs; exact_count_multi: the same over photos with 2+ dogs
    breed_accuracy    end-to-end, over the ground-truth dogs: right when a detection (score >=
                      score_threshold) with IoU >= 0.5 carries the dog's breed as its top-1 (each
                      box cropped with a margin and classified by the breed run given with --breeds-run)

score_threshold is the one the run chose on its validation photos (the best exact count),
saved in the checkpoint; --score-threshold overrides it. A detection "counts" as in predict
(`infer.count_keep`): score >= the threshold and not a duplicate under the run's count rule
(class-agnostic NMS at count_nms_iou, and a box covering / covered by a better one by more than
count_containment of the smaller), chosen with the threshold on the validation photos: by training
after each epoch, or for an existing run by `detect evaluate RUN --split val --choose-count`.
`--choose-size` also chooses the resize at inference (`SIZE_FACTOR_GRID` times the training
min_size / max_size), with the model NMS and the count rule chosen for each size
(`choose_inference_size`); the weights are unchanged. `--with-other-breeds` (with --split val) makes
those choices on more photos: the run's val photos plus every photo of the data root's breeds the
detector was not trained on (`other_breed_records`); breed accuracy and the crop stay on the run's
val photos.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..errors import DogbreedsError
from ..data.listing import shown_path

THRESHOLD_GRID = tuple(round(t, 2) for t in np.arange(0.30, 0.96, 0.05))
NMS_IOU_GRID = (0.3, 0.35, 0.4, 0.45, 1.0)             # 1.0: off (the model's own NMS at box_nms_thresh only)
CONTAINMENT_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)       # 1.0: off
BOX_NMS_GRID = (0.5, 0.6, 0.7)                          # the model's own NMS IoU (box_nms_thresh), --choose-count
MARGIN_GRID = (0.0, 0.1, 0.2, 0.3, 0.5)                 # crop margin before the breed run, --choose-margin ...
SQUARE_GRID = (False, True)                             # ... and the crop's shape (the box's, or a square around it)
MIRROR_GRID = (False, True)                             # ... and whether the breed run also sees the mirrored crop
SIZE_FACTOR_GRID = (1.0, 1.2, 1.4, 1.6)                 # inference resize, times the training min_size / max_size (--choose-size)
MATCH_IOU = 0.5


# --- pure metrics (numpy in, numbers out) ---

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x0 y0 x1 y1 boxes."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _count_keep(pred: dict, threshold: float, nms_iou: float = 1.0, containment: float = 1.0) -> np.ndarray:
    from .infer import count_keep

    return count_keep(pred["boxes"], pred["scores"], threshold, nms_iou, containment)


def count_scores(predictions: list[dict], gt_boxes: list[np.ndarray], threshold: float, nms_iou: float = 1.0,
                 containment: float = 1.0) -> dict:
    counted = np.asarray([len(_count_keep(p, threshold, nms_iou, containment)) for p in predictions])
    truth = np.asarray([len(g) for g in gt_boxes])
    exact = counted == truth
    multi = truth >= 2
    return {"exact_count": float(exact.mean()) if len(exact) else 0.0,
            "exact_count_multi": float(exact[multi].mean()) if multi.any() else None,
            "count_mae": float(np.abs(counted - truth).mean()) if len(exact) else 0.0,
            "n_photos": int(len(truth)), "n_multi": int(multi.sum()), "n_dogs": int(truth.sum())}


def best_count_threshold(predictions: list[dict], gt_boxes: list[np.ndarray], grid=THRESHOLD_GRID) -> float:
    """The score threshold with the best exact count (ties: the one nearest 0.5)."""
    best = max(grid, key=lambda t: (count_scores(predictions, gt_boxes, t)["exact_count"], -abs(t - 0.5)))
    return float(best)


COUNT_OBJECTIVES = ("exact", "multi")
MULTI_COUNT_FLOOR = 0.88   # --count-objective multi: the overall exact count a choice must keep (issue 14's goal + 3)
# what `detect evaluate --choose-count` ranks by unless told: "multi", chosen on val + other breeds by a rule
# written before its figures (docs/detection.md); the per-epoch choice during training keeps "exact"
DEFAULT_COUNT_OBJECTIVE = "multi"


def check_count_objective(objective: str) -> str:
    if objective not in COUNT_OBJECTIVES:
        raise DogbreedsError(f"count objective {objective!r}: use one of {', '.join(COUNT_OBJECTIVES)}")
    return objective


def count_objective_key(scores: dict, objective: str = "exact") -> tuple:
    """How a count choice ranks (higher is better). "exact": the overall exact count, then the
    multi-dog one. "multi": the choices whose overall exact count is at least MULTI_COUNT_FLOOR
    first, ranked by their multi-dog exact count, then the overall one; when none reaches the
    floor, "exact"'s order."""
    exact, multi = scores["exact_count"], scores["exact_count_multi"] or 0.0
    if check_count_objective(objective) == "exact":
        return exact, multi
    feasible = exact >= MULTI_COUNT_FLOOR - 1e-12
    return (feasible, multi, exact) if feasible else (feasible, exact, multi)


def best_counting(predictions: list[dict], gt_boxes: list[np.ndarray], grid=THRESHOLD_GRID,
                  nms_grid=NMS_IOU_GRID, containment_grid=CONTAINMENT_GRID,
                  objective: str = "exact") -> tuple[float, float, float]:
    """(score threshold, count_nms_iou, count_containment) with the best exact count; ties: the
    better count on multi-dog photos, then the threshold nearest 0.5, then the milder rule
    (`objective` "multi": `count_objective_key`'s order instead of the first two)."""
    def key(choice):
        scores = count_scores(predictions, gt_boxes, *choice)
        return (*count_objective_key(scores, objective), -abs(choice[0] - 0.5), choice[1], choice[2])

    best = max(((float(t), float(n), float(c)) for t in grid for n in nms_grid for c in containment_grid), key=key)
    return best


def coco_scores(predictions: list[dict], gt_boxes: list[np.ndarray]) -> dict:
    """COCO box AP and AR by pycocotools' COCOeval (the reference implementation; torchmetrics'
    MeanAveragePrecision runs the same code with backend="pycocotools", a test checks they agree;
    importing torchmetrics costs ~11 s of CPU, pycocotools well under one)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for image_id, (pred, gt) in enumerate(zip(predictions, gt_boxes), 1):
        images.append({"id": image_id})
        for x0, y0, x1, y1 in np.asarray(gt, dtype=np.float64).reshape(-1, 4):
            w, h = x1 - x0, y1 - y0
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
        boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
        for (x0, y0, x1, y1), score in zip(boxes, np.asarray(pred["scores"], dtype=np.float64).reshape(-1)):
            results.append({"image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": float(score)})
    zeros = {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "recall_at_10": 0.0, "recall_at_100": 0.0}
    if not annotations or not results:
        return zeros
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress and the table
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "dog"}]}
        truth.createIndex()
        found = truth.loadRes(results)
        coco_eval = COCOeval(truth, found, "bbox")
        coco_eval.params.maxDets = [1, 10, 100]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [max(0.0, float(v)) for v in coco_eval.stats]  # -1: nothing to measure
    return {"map": stats[0], "ap50": stats[1], "ap75": stats[2], "recall_at_10": stats[7], "recall_at_100": stats[8]}


def score_detections(predictions: list[dict], gt_boxes: list[np.ndarray], threshold: float | None = None,
                     rule: tuple[float, float] | None = None) -> dict:
    """COCO AP/AR (every detection) and count accuracy (`count_keep`); threshold None: the best
    threshold and count rule for these photos (validation), else rule (nms_iou, containment) or off."""
    if threshold is None:
        threshold, *rule = best_counting(predictions, gt_boxes)
    nms_iou, containment = rule if rule is not None else (1.0, 1.0)
    return {**coco_scores(predictions, gt_boxes), **count_scores(predictions, gt_boxes, threshold, nms_iou, containment),
            "count_threshold": float(threshold), "count_nms_iou": float(nms_iou),
            "count_containment": float(containment)}


def breed_hits(pred_boxes: np.ndarray, pred_breeds: list[str], gt_boxes: np.ndarray, gt_breeds: list[str]) -> list[bool]:
    """Per ground-truth dog: does some detection with IoU >= 0.5 carry its breed as top-1?"""
    if not len(pred_boxes):
        return [False] * len(gt_boxes)
    iou = box_iou(gt_boxes, pred_boxes)
    return [bool(any(iou[i, j] >= MATCH_IOU and pred_breeds[j] == gt_breeds[i] for j in range(len(pred_breeds))))
            for i in range(len(gt_boxes))]


# --- running the detector ---

def predict_records(model, records, batch_size: int = 8, mirror: bool = False) -> list[dict]:
    """The detector's raw detections (boxes, scores as numpy) for each record's photo; with mirror,
    on each photo's mirror image, the boxes mirrored back onto the photo."""
    import torch

    from .data import DetectionDataset

    was_training = model.training
    model.eval()
    dataset = DetectionDataset(records)
    out = []
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            images = [dataset[i][0] for i in range(start, min(len(records), start + batch_size))]
            for image, det in zip(images, model([im.flip(-1) for im in images] if mirror else images)):
                boxes = det["boxes"].numpy()
                if mirror:
                    boxes = boxes.copy()
                    boxes[:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
                out.append({"boxes": boxes, "scores": det["scores"].numpy()})
    model.train(was_training)
    return out


def counted_crop_tops(predictor, image, pred: dict, threshold: float, rule: tuple[float, float],
                      margin: float, square: bool, top_k: int = 1,
                      mirror: bool = False) -> tuple[np.ndarray, list[list[str]]]:
    """The boxes that count as dogs (`count_keep`) and, for each, the breed run's top-k breed ids on its
    crop, cropped as the predict path crops it (`infer.crop_dog`; with mirror, averaged with the mirrored
    crop as predict does); [] for a crop the breed run refuses."""
    from .infer import crop_dog

    boxes = np.asarray(pred["boxes"]).reshape(-1, 4)[_count_keep(pred, threshold, *rule)]
    crops = [crop_dog(image, b, margin, square) for b in boxes]
    answers = predictor.predict(crops, top_k=top_k, mirror=mirror) if crops else []
    return boxes, [[t.breed_id for t in p.top] if p.ok and p.top else [] for p in answers]


def _top1_is(predictor, image, breed_id: str, mirror: bool = False) -> bool:
    """Whether the breed run names the whole photo `breed_id` (as predict answers it)."""
    photo = predictor.predict([image], top_k=1, mirror=mirror)[0]
    return bool(photo.ok and photo.top and photo.top[0].breed_id == breed_id)


def breed_scores(predictor, records, predictions: list[dict], threshold: float, progress: bool = False,
                 rule: tuple[float, float] = (1.0, 1.0), margin: float | None = None,
                 whole: bool = True, square: bool = False, mirror: bool = False,
                 images: list | None = None) -> tuple[dict, list]:
    """End-to-end breed accuracy, and (whole) the breed run's own top-1 on the whole single-dog
    photos (with mirror, also averaged with their mirror images, as the crops are). Each counted box
    is cropped as the predict path crops it (`infer.crop_dog`, `margin` (None: DEFAULT_MARGIN),
    `square`, `mirror`), so that evaluation measures what users get. images: the records' photos already
    decoded (`choose_crop` decodes them once for all its options); None: each is decoded here."""
    from tqdm import tqdm

    from ..data.decode import decode_image
    from .infer import DEFAULT_MARGIN

    margin = DEFAULT_MARGIN if margin is None else float(margin)
    known = set(predictor.classes.breed_ids)
    hits_all, hits_single, whole_single, whole_mirror, labels = [], [], [], [], []
    for i, (record, pred) in enumerate(tqdm(list(zip(records, predictions)), desc="breeds", disable=not progress,
                                            leave=False)):
        image = decode_image(record.path) if images is None else images[i]
        boxes, tops = counted_crop_tops(predictor, image, pred, threshold, rule, margin, square, mirror=mirror)
        names = [top[0] if top else None for top in tops]
        labels.append([predictor.classes.names[predictor.classes.breed_ids.index(n)] if n in known else "?" for n in names])
        if record.breed_id not in known:
            continue
        hits = breed_hits(boxes, names, record.boxes, [record.breed_id] * record.count)
        hits_all.extend(hits)
        if record.count == 1:
            hits_single.extend(hits)
            if whole:
                whole_single.append(_top1_is(predictor, image, record.breed_id))
                if mirror:
                    whole_mirror.append(_top1_is(predictor, image, record.breed_id, mirror=True))
    scores = {
        "breed_accuracy": float(np.mean(hits_all)) if hits_all else None,
        "breed_accuracy_single": float(np.mean(hits_single)) if hits_single else None,
        "breed_run_single_dog_top1": float(np.mean(whole_single)) if whole_single else None,
        "breed_dogs": len(hits_all),
    }
    if whole_mirror:  # the same photos through the breed run with the crops' mirror averaging
        scores["breed_run_single_dog_top1_mirror"] = float(np.mean(whole_mirror))
    return scores, labels


# --- the figure ---

def detection_figure(path: Path, records, predictions: list[dict], threshold: float, labels: list | None = None,
                     n: int = 8, seed: int = 0, rule: tuple[float, float] = (1.0, 1.0)) -> Path:
    """Predicted (orange, with score [and breed]) and true (green, dashed) boxes on `n` photos,
    half of them multi-dog photos when there are that many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..data.decode import decode_image

    rng = np.random.default_rng(seed)
    multi = [i for i, r in enumerate(records) if r.count >= 2]
    single = [i for i, r in enumerate(records) if r.count < 2]
    take_multi = list(rng.permutation(multi)[: n // 2]) if multi else []
    take_single = list(rng.permutation(single)[: n - len(take_multi)])
    chosen = take_multi + take_single
    cols = min(4, max(1, len(chosen)))
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), chosen):
        record, pred = records[i], predictions[i]
        ax.imshow(decode_image(record.path))
        for x0, y0, x1, y1 in record.boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linestyle="--", linewidth=2))
        keep = _count_keep(pred, threshold, *rule)
        for k, j in enumerate(keep):
            x0, y0, x1, y1 = pred["boxes"][j]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="orange", linewidth=2))
            text = f"{pred['scores'][j]:.2f}"
            if labels is not None and k < len(labels[i]):
                text += f" {labels[i][k]}"
            ax.text(x0 + 2, y0 + 2, text, color="black", fontsize=7, va="top",
                    bbox={"facecolor": "orange", "alpha": 0.8, "pad": 1, "edgecolor": "none"})
        ax.set_title(f"{Path(record.path).name}: {record.count} dog(s), {len(keep)} found", fontsize=8)
    fig.suptitle("dashed green: true boxes; orange: detections (score >= %.2f)" % threshold, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the command ---

def trained_root(cfg: dict) -> Path | None:
    """The data root a detector run was trained on (its config's `data`), resolved; None if not recorded."""
    return Path(cfg["data"]).expanduser().resolve() if cfg.get("data") else None


def evaluation_records(run, data_root, split: str, breeds: str | None = None):
    """The photos to evaluate, and a sentence saying where they came from.

    The run's own data: its split, rebuilt exactly (same breeds, seed, fractions). Another
    dataset: its official split when it has lists, else every photo (a dataset of test photos);
    the breeds are the run's own where the dataset has them, else all of its breeds."""
    from ..data.sources import scan_source
    from .data import load_detection_data

    cfg = run.read_config()
    root = Path(data_root).expanduser().resolve()
    if trained_root(cfg) == root and breeds is None:
        data = load_detection_data(root, breeds=cfg.get("breeds", "top20"), seed=cfg.get("seed", 0),
                                   val_fraction=cfg.get("val_fraction", 0.1), test_fraction=cfg.get("test_fraction", 0.2))
        return data, data.split(split), f"the run's own {split} split of {shown_path(data_root)}"
    _, records = scan_source(root)
    present = {r.breed_id for r in records}
    if breeds is None:
        trained = [b["breed_id"] for b in run.read_json(run.classes_file)] if run.classes_file.is_file() else []
        chosen = [b for b in trained if b in present]
        breeds = chosen if chosen else "all"
    has_split = all(r.split in ("train", "test") for r in records)
    if has_split:
        data = load_detection_data(root, breeds=breeds, seed=cfg.get("seed", 0))
        return data, data.split(split), f"the {split} split of {shown_path(data_root)}"
    data = load_detection_data(root, breeds=breeds, all_as=split)
    return data, data.split(split), f"every photo of {shown_path(data_root)} (it has no train/test lists)"


def other_breed_records(run, data_root, data):
    """(records, sentence): every photo with boxes (its train and test lists alike) of the breeds of
    `data_root` that the detector run did not train on, as more validation photos for the choices that
    need no breed (the count rule, the model NMS, the inference size). The detector has one class, dog,
    and never saw these photos; in the mini data they are 600 photos of 100 breeds, 39 with 2+ dogs,
    next to the 196 val photos (16). Only on the run's own data root, where "not trained on" is known."""
    from ..data.sources import scan_source
    from .data import load_detection_data

    root = Path(data_root).expanduser().resolve()
    trained_on = trained_root(run.read_config())
    if trained_on != root:
        raise DogbreedsError(f"--with-other-breeds adds the photos of {shown_path(data_root)}'s breeds the detector "
                             f"was not trained on: give the run's own --data ({shown_path(trained_on) if trained_on else 'not recorded in its config'})")
    _, records = scan_source(root)
    others = sorted({r.breed_id for r in records} - set(data.breeds))
    if not others:
        raise DogbreedsError(f"--with-other-breeds: the run was trained on every breed of {shown_path(data_root)} "
                             f"({len(data.breeds)}), so there are no other breeds' photos to add; leave it out")
    extra = load_detection_data(root, breeds=others, all_as="val")
    photos = extra.split("val")
    text = (f"{len(photos)} photos of the {len(others)} other breeds of {shown_path(data_root)} "
            f"({sum(r.count >= 2 for r in photos)} with 2+ dogs)")
    return photos, extra, text


def detector_and_photos(run_path, data_root, split: str, other_breeds: bool = False):
    """(model, config, records, own, origin) for the benchmarks that study a detector run the way
    `detect evaluate` sees it: its split of data_root, plus with other_breeds the photos of the breeds
    it was not trained on after the run's own `own` photos; origin says where they came from."""
    from ..rundir import RunDir
    from .model import load_detector

    run = RunDir.locate(run_path)
    model, cfg = load_detector(run_path)
    data, records, origin = evaluation_records(run, data_root, split)
    own = len(records)
    if other_breeds:
        extra, _, text = other_breed_records(run, data_root, data)
        records, origin = records + extra, f"{origin} + {text}"
    return model, cfg, records, own, origin


def evaluate_detector(run_path, data_root, split: str = "test", breeds_run=None, breeds: str | None = None,
                      score_threshold: float | None = None, engine: str = "auto", progress: bool | None = None,
                      figure_photos: int = 8, choose_count: bool = False, choose_margin: bool = False,
                      choose_size: bool = False, other_breeds: bool = False,
                      count_objective: str | None = None) -> dict:
    """Evaluate a detector run on a split. choose_count (validation only): choose the model's NMS
    IoU (`BOX_NMS_GRID`), the score threshold and the count rule on these photos (`choose_counting`);
    choose_size (validation only, implies choose_count): the same at each inference size of
    `size_grid`, and the size too (`choose_inference_size`); choose_margin (validation only, with a
    breed run): the crop margin with the best end-to-end breed accuracy (`MARGIN_GRID`). All are saved in the
    config of the run's checkpoint, so that predict, the service, the export and later evaluations use them.
    other_breeds (validation only): evaluate and choose on the val photos plus `other_breed_records`;
    the result gives the figures of both parts too (`parts`), and breed accuracy, the crop choice and
    the figure use the run's val photos alone. count_objective: how choose_count / choose_size rank
    the choices (`count_objective_key`: "exact", or "multi" for the most multi-dog photos counted
    right among the choices that keep MULTI_COUNT_FLOOR of all photos counted right; None:
    DEFAULT_COUNT_OBJECTIVE)."""
    import time

    from ..rundir import RunDir
    from .model import load_detector, read_detector_meta

    if choose_size and split != "val":
        raise DogbreedsError(f"--choose-size chooses the inference size on the validation photos: use --split val "
                             f"(not {split}), then evaluate --split test")
    if choose_size and score_threshold is not None:
        raise DogbreedsError("--choose-size chooses the score threshold for each size itself: leave out --score-threshold")
    choose_count = choose_count or choose_size
    if count_objective is not None and not choose_count:
        raise DogbreedsError(f"--count-objective {count_objective} ranks the choices of --choose-count / --choose-size: "
                             "add one of them (with --split val)")
    count_objective = check_count_objective(DEFAULT_COUNT_OBJECTIVE if count_objective is None else count_objective)
    if choose_count and split != "val":
        raise DogbreedsError(f"--choose-count chooses the count threshold and rule on the validation photos: "
                             f"use --split val (not {split}), then evaluate --split test")
    if choose_count and score_threshold is not None:
        raise DogbreedsError("--choose-count chooses the score threshold itself: leave out --score-threshold")
    if choose_margin and split != "val":
        raise DogbreedsError(f"--choose-margin chooses the crop margin on the validation photos: use --split val "
                             f"(not {split}), then evaluate --split test")
    if other_breeds and split != "val":
        raise DogbreedsError(f"--with-other-breeds adds photos to the validation split for choosing: use --split val "
                             f"(not {split}); the test split stays the run's own")
    if choose_margin and breeds_run is None:
        raise DogbreedsError("--choose-margin measures breed accuracy: give the breed run with --breeds-run")
    progress = sys.stderr.isatty() if progress is None else progress
    run = RunDir.locate(run_path)
    model, cfg = load_detector(run_path)
    if cfg.channels_last:
        import torch

        model.to(memory_format=torch.channels_last)
    checkpoint = run.checkpoint()
    data, records, origin = evaluation_records(run, data_root, split, breeds)
    if not records:
        raise DogbreedsError(f"{shown_path(data_root)}: no {split} photos with dog boxes to evaluate ({origin})")
    report = data.problem_report()
    own = len(records)  # the run's own photos come first; other breeds' photos (no breed to score) after them
    if other_breeds:
        extra_records, extra, extra_origin = other_breed_records(run, data_root, data)
        records = records + extra_records
        origin = f"{origin} + {extra_origin}"
        report = "\n".join(r for r in (report, extra.problem_report()) if r)
        print(f"evaluating on {origin}", file=sys.stderr, flush=True)
    if report:
        print("annotation problems:\n  " + report.replace("\n", "\n  "), file=sys.stderr, flush=True)
    started = time.perf_counter()
    predictions = predict_records(model, records)
    seconds = time.perf_counter() - started
    options = None
    chosen_on = "val+other_breeds" if other_breeds else "val"
    if choose_size:
        size, box_nms, predictions, (chosen, nms_iou, containment), seconds, options = choose_inference_size(
            model, records, predictions, cfg, seconds, objective=count_objective)
        min_size, max_size = size
        cfg = save_settings(run, infer_min_size=min_size, infer_max_size=max_size, box_nms_thresh=box_nms,
                            score_threshold=chosen, count_nms_iou=nms_iou, count_containment=containment,
                            chosen_on=chosen_on, count_objective=count_objective)
        checkpoint = run.checkpoint()
    elif choose_count:
        box_nms, predictions, (chosen, nms_iou, containment), seconds = choose_counting(
            model, records, predictions, cfg.box_nms_thresh, seconds, objective=count_objective)
        cfg = save_settings(run, box_nms_thresh=box_nms, score_threshold=chosen, count_nms_iou=nms_iou,
                            count_containment=containment, chosen_on=chosen_on, count_objective=count_objective)
        checkpoint = run.checkpoint()
    threshold = cfg.score_threshold if score_threshold is None else float(score_threshold)
    rule = (cfg.count_nms_iou, cfg.count_containment)
    saved = read_detector_meta(checkpoint).get("extra", {})
    result = {"split": split, "run": str(run.path), "checkpoint": str(checkpoint), "backbone": cfg.backbone,
              "min_size": cfg.min_size, "max_size": cfg.max_size, "inference_size": list(cfg.inference_size()),
              "box_nms_thresh": cfg.box_nms_thresh,
              "count_objective": saved.get("count_objective", "exact"),  # training's per-epoch choice: "exact"
              "records_from": origin,
              "epoch": saved.get("epoch"),
              **score_detections(predictions, [r.boxes for r in records], threshold, rule),
              "detect_seconds_per_photo": seconds / len(records),
              "annotation_problems": data.problem_counts(),
              "annotation_problem_files": [p.to_dict() for p in data.problems][:200]}
    if options is not None:
        result["size_options"] = options  # every (size, model NMS) tried, each with its own count rule
    if other_breeds:
        result["parts"] = {part: score_detections(predictions[lo:hi], [r.boxes for r in records[lo:hi]], threshold, rule)
                           for part, lo, hi in (("val", 0, own), ("other_breeds", own, len(records)))}
        result["other_breeds_annotation_problems"] = extra.problem_counts()
        records, predictions = records[:own], predictions[:own]  # breeds, the crop and the figure: the run's photos
    labels = None
    if breeds_run is not None:
        from ..infer.predictor import Predictor

        predictor = Predictor.from_run(breeds_run, engine=engine)
        if choose_margin:
            margin, square, mirror = choose_crop(predictor, records, predictions, threshold, rule, progress)
            cfg = save_settings(run, crop_margin=margin, crop_square=square, crop_mirror=mirror)
            checkpoint = run.checkpoint()
        breed, labels = breed_scores(predictor, records, predictions, threshold, progress, rule, cfg.crop_margin,
                                     square=cfg.crop_square, mirror=cfg.crop_mirror)
        result.update(crop_margin=cfg.crop_margin, crop_square=cfg.crop_square, crop_mirror=cfg.crop_mirror)
        result.update(breed, breeds_run=str(breeds_run))
    else:
        result["breed_accuracy"] = None
        result["note"] = "breed_accuracy needs --breeds-run BREED_RUN"
    figure = detection_figure(run.figure(f"detections_{split}.png"), records, predictions, threshold, labels,
                              n=figure_photos, rule=rule)
    result["figure"] = str(figure)
    run.write_json(run.eval_file(split), result)
    return result


def _counting_options(model, records, predictions: list[dict] | None, box_nms: float, seconds: float,
                      objective: str = "exact") -> list[dict]:
    """One option per model NMS IoU of BOX_NMS_GRID (and `box_nms`) at the model's current resize:
    {"box_nms", "preds", "rule" (threshold, count_nms_iou, count_containment) chosen for it, "scores",
    "seconds" (of its pass)}. `predictions` are the model's at `box_nms` (timed `seconds`), or None."""
    import time

    gts = [r.boxes for r in records]
    options = []
    for nms in sorted(set(BOX_NMS_GRID) | {float(box_nms)}):
        if nms == float(box_nms) and predictions is not None:
            preds, took = predictions, seconds
        else:
            model.roi_heads.nms_thresh = nms
            started = time.perf_counter()
            preds = predict_records(model, records)
            took = time.perf_counter() - started
        rule = best_counting(preds, gts, objective=objective)
        options.append({"box_nms": float(nms), "preds": preds, "rule": rule, "seconds": took,
                        "scores": score_detections(preds, gts, rule[0], rule[1:])})
    return options


def _count_key(option: dict, objective: str = "exact") -> tuple:
    """The order every post-processing choice on val uses: exact count, then the multi-dog count (or
    `count_objective_key`'s order for `objective`), then mAP."""
    scores = option["scores"]
    return *count_objective_key(scores, objective), scores["map"]


def choose_counting(model, records, predictions: list[dict], box_nms: float, seconds: float,
                    objective: str = "exact"):
    """(box_nms_thresh, its predictions, (score threshold, count_nms_iou, count_containment), seconds
    per pass) with the best exact count on these photos over BOX_NMS_GRID (the model's own NMS, which
    can suppress a dog's box under its neighbour's), ties: the multi-dog count, then mAP, then the
    current setting, then the lower IoU. `predictions` are the model's at `box_nms`; the others are made here."""
    options = _counting_options(model, records, predictions, box_nms, seconds, objective)
    best = max(options, key=lambda o: (*_count_key(o, objective), o["box_nms"] == float(box_nms), -o["box_nms"]))
    model.roi_heads.nms_thresh = best["box_nms"]
    return best["box_nms"], best["preds"], best["rule"], min(o["seconds"] for o in options)


def size_grid(cfg, factors=SIZE_FACTOR_GRID) -> list[tuple[int, int]]:
    """The inference sizes --choose-size tries: (min_size, max_size) of the training resize times each
    factor (the same aspect logic as torchvision's: scale = min(min_size / short side, max_size / long
    side)), and the run's current inference size; smallest first."""
    sizes = {(int(round(cfg.min_size * f)), int(round(cfg.max_size * f))) for f in factors}
    sizes.add(tuple(cfg.inference_size()))
    return sorted(sizes)


def choose_inference_size(model, records, predictions: list[dict], cfg, seconds: float,
                          factors=SIZE_FACTOR_GRID, objective: str = "exact"):
    """((min_size, max_size), box_nms_thresh, its predictions, (score threshold, count_nms_iou,
    count_containment), seconds per pass at that size, the table of every option) with the best exact
    count on these photos over `size_grid` x BOX_NMS_GRID, the count rule chosen for each pair. Ties:
    the multi-dog count, then mAP (as `choose_counting`), then the smaller size (less detector time),
    then the current model NMS, then the lower IoU. `predictions` are the model's at the run's current
    inference size and NMS (timed `seconds`); the others are made here. The model is left at the choice."""
    current = tuple(cfg.inference_size())
    options = []
    for size in size_grid(cfg, factors):
        model.transform.min_size, model.transform.max_size = (size[0],), size[1]
        for option in _counting_options(model, records, predictions if size == current else None,
                                        cfg.box_nms_thresh, seconds, objective):
            options.append({**option, "size": size})
    best = max(options, key=lambda o: (*_count_key(o, objective), -o["size"][0], -o["size"][1],
                                       o["box_nms"] == float(cfg.box_nms_thresh), -o["box_nms"]))
    model.transform.min_size, model.transform.max_size = (best["size"][0],), best["size"][1]
    model.roi_heads.nms_thresh = best["box_nms"]
    took = min(o["seconds"] for o in options if o["size"] == best["size"])
    table = [{"min_size": o["size"][0], "max_size": o["size"][1], "box_nms_thresh": o["box_nms"],
              "count_threshold": o["rule"][0], "count_nms_iou": o["rule"][1], "count_containment": o["rule"][2],
              **{k: o["scores"][k] for k in ("map", "ap50", "recall_at_10", "exact_count", "exact_count_multi")},
              "seconds_per_photo": o["seconds"] / max(1, len(records)), "chosen": o is best} for o in options]
    return best["size"], best["box_nms"], best["preds"], best["rule"], took, table



def choose_crop(predictor, records, predictions: list[dict], threshold: float, rule: tuple[float, float],
                progress: bool = False, grid=MARGIN_GRID, shapes=SQUARE_GRID,
                mirrors=MIRROR_GRID) -> tuple[float, bool, bool]:
    """(crop margin, square, mirror) with the best end-to-end breed accuracy on these photos (ties:
    without the mirror (half the work), then the box's own shape, then the margin nearest 0.1: the crop
    used before it was chosen)."""
    from ..data.decode import decode_image

    images = [decode_image(r.path) for r in records]  # once, for every option
    accuracy = {(m, q, f): breed_scores(predictor, records, predictions, threshold, progress, rule, m, whole=False,
                                        square=q, mirror=f, images=images)[0]["breed_accuracy"] or 0.0
                for m in grid for q in shapes for f in mirrors}
    margin, square, mirror = max(accuracy, key=lambda k: (accuracy[k], not k[2], not k[1], -abs(k[0] - 0.1)))
    return float(margin), bool(square), bool(mirror)


def save_count_rule(run, threshold: float, nms_iou: float, containment: float):
    """Write (score threshold, count rule) into the config of the run's checkpoint (`save_settings`)."""
    return save_settings(run, score_threshold=float(threshold), count_nms_iou=float(nms_iou),
                         count_containment=float(containment))


def save_settings(run, chosen_on: str = "val", count_objective: str = "exact", **settings):
    """Write settings chosen on the validation photos (count rule, model NMS, crop margin) into the
    config of the checkpoint that evaluation and predict load (its weights unchanged; the other
    checkpoint is another epoch's, left as it is) and return that config. `chosen_on` says on which
    photos the count rule was chosen ("val", or "val+other_breeds" with --with-other-breeds)."""
    from safetensors.torch import load_file

    from .model import DetectorConfig, read_detector_meta, save_detector

    path = run.checkpoint()
    meta = read_detector_meta(path)
    cfg = DetectorConfig.from_dict({**meta["config"], **settings})
    chosen = sorted(set(meta.get("extra", {}).get("chosen_on_val", [])) | set(settings))
    extra = {**meta.get("extra", {}), "chosen_on_val": chosen}
    if "score_threshold" in settings:
        extra["count_rule_chosen_on"] = chosen_on
        extra["count_objective"] = count_objective

    class _Tensors:  # save_detector takes a module; the tensors are written back unchanged
        def __init__(self, tensors):
            self.tensors = tensors

        def state_dict(self):
            return self.tensors

    save_detector(_Tensors(load_file(str(path))), path, cfg, extra)
    return cfg
