"""Box AP equals pycocotools' COCOeval run directly on hand-built COCO dicts."""
import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

from ciae_jax.evaluation import box_ap

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def panoptic_gt(coco_sample_root):
  with open(coco_sample_root / "annotations" / "panoptic_val2017.json") as f:
    return json.load(f)


def direct_cocoeval(panoptic, detections):
  """COCOeval on a detection dataset written out by hand from the panoptic
  annotations (the test's own construction, independent of box_ap.py)."""
  things = {c["id"] for c in panoptic["categories"] if c["isthing"]}
  anns, next_id = [], 1
  for ann in panoptic["annotations"]:
    for s in ann["segments_info"]:
      if s["category_id"] in things:
        anns.append({"id": next_id, "image_id": ann["image_id"],
                     "category_id": s["category_id"], "bbox": s["bbox"],
                     "area": s["area"], "iscrowd": s["iscrowd"]})
        next_id += 1
  dataset = {"images": [{"id": a["image_id"]} for a in panoptic["annotations"]],
             "categories": [{"id": c} for c in sorted(things)],
             "annotations": anns}
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    dt = gt.loadRes([dict(d) for d in detections])
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return dict(zip(KEYS, ev.stats[:6]))


def perfect_detections(panoptic):
  """One detection per non-crowd thing segment, on its gt box."""
  things = {c["id"] for c in panoptic["categories"] if c["isthing"]}
  return [{"image_id": a["image_id"], "category_id": s["category_id"],
           "bbox": list(s["bbox"]), "score": 0.9}
          for a in panoptic["annotations"] for s in a["segments_info"]
          if s["category_id"] in things and not s["iscrowd"]]


def assert_close(ours, ref):
  # The same COCOeval (float64 means over the same IoU matches) on the same inputs, built by
  # two routes: equal up to float64 rounding (1e-16 per operation); 1e-12 leaves ~1e4 ulps.
  for k in KEYS:
    assert abs(ours[k] - ref[k]) <= 1e-12, k


def test_perfect_detections_give_ap_one(panoptic_gt):
  dets = perfect_detections(panoptic_gt)
  ours = box_ap.box_ap(panoptic_gt, dets)
  assert_close(ours, direct_cocoeval(panoptic_gt, dets))
  # Perfect detections: precision 1 at every recall, AP 1 up to float64 rounding.
  assert ours["AP"] == pytest.approx(1.0)
  assert ours["AP50"] == pytest.approx(1.0)


def test_shifted_detection_lowers_ap(panoptic_gt):
  dets = perfect_detections(panoptic_gt)
  big = max(range(len(dets)), key=lambda i: dets[i]["bbox"][2])
  x, y, w, h = dets[big]["bbox"]
  dets[big]["bbox"] = [x + 0.3 * w, y, w, h]  # IoU ~0.54: AP50 ok, AP75 not
  ours = box_ap.box_ap(panoptic_gt, dets)
  assert_close(ours, direct_cocoeval(panoptic_gt, dets))
  assert ours["AP"] < 1.0


def test_noisy_detections_match_cocoeval(panoptic_gt):
  rng = np.random.default_rng(0)
  dets = perfect_detections(panoptic_gt)
  for d in dets:
    x, y, w, h = d["bbox"]
    d["bbox"] = [x + rng.normal(0, 0.15 * w), y + rng.normal(0, 0.15 * h),
                 w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)]
    d["score"] = float(rng.uniform())
  things = [c["id"] for c in panoptic_gt["categories"] if c["isthing"]]
  for _ in range(20):  # false positives of random classes
    dets.append({"image_id": panoptic_gt["annotations"][rng.integers(2)][
        "image_id"], "category_id": int(rng.choice(things)),
                 "bbox": [float(v) for v in rng.uniform(0, 200, 4)],
                 "score": float(rng.uniform())})
  ours = box_ap.box_ap(panoptic_gt, dets)
  ref = direct_cocoeval(panoptic_gt, dets)
  assert_close(ours, ref)
  assert 0.0 < ours["AP"] < 1.0


def test_no_detections(panoptic_gt):
  ours = box_ap.box_ap(panoptic_gt, [])
  assert ours["AP"] == 0.0 and ours["AP50"] == 0.0


def test_subset_of_images_and_bad_detections(panoptic_gt):
  first = panoptic_gt["annotations"][0]["image_id"]
  dets = [d for d in perfect_detections(panoptic_gt) if d["image_id"] == first]
  # Perfect on the image asked for: AP 1 up to float64 rounding.
  assert box_ap.box_ap(panoptic_gt, dets, image_ids=[first])["AP"] == (
      pytest.approx(1.0))
  with pytest.raises(ValueError, match="123"):
    box_ap.box_ap(panoptic_gt, [dict(dets[0], image_id=123)])
  with pytest.raises(ValueError, match="category_id 184"):
    box_ap.box_ap(panoptic_gt, [dict(dets[0], category_id=184)])  # stuff
  with pytest.raises(ValueError, match="score"):
    box_ap.box_ap(panoptic_gt, [{k: v for k, v in dets[0].items()
                                 if k != "score"}])


def test_gt_dataset_from_panoptic(panoptic_gt):
  dataset = box_ap.panoptic_to_box_gt(panoptic_gt)
  things = {c["id"] for c in panoptic_gt["categories"] if c["isthing"]}
  expected = [(a["image_id"], s["category_id"], s["bbox"], s["iscrowd"])
              for a in panoptic_gt["annotations"] for s in a["segments_info"]
              if s["category_id"] in things]
  got = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"])
         for a in dataset["annotations"]]
  assert got == expected
  ids = [a["id"] for a in dataset["annotations"]]
  assert len(set(ids)) == len(ids)
  assert {c["id"] for c in dataset["categories"]} == things
