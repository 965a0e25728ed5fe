"""PQ equals panopticapi's pq_compute (and hotcoco) on real and synthetic data.

The reference is the public library: `panopticapi.evaluation` (its per-core
loop `pq_compute_single_core` + `PQStat.pq_average`, which is pq_compute
without the process pool, and pq_compute itself for the end-to-end cases).
"""
import copy
import json
import os

import numpy as np
from panopticapi import evaluation as panopticapi_eval
from PIL import Image
import pytest

from ciae_jax.evaluation import pq

TOL = 1e-9
GROUPS = ("All", "Things", "Stuff")


# --------------------------------------------------------------------------
# Helpers written independently of the code under test.

def encode_rgb(id_map):
  """[H, W] ids -> [H, W, 3] uint8, R + 256 G + 256^2 B."""
  id_map = np.asarray(id_map, np.int64)
  return np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536],
                  -1).astype(np.uint8)


def decode_png(path):
  """A panoptic PNG as [H, W] int64 ids (plain arithmetic)."""
  rgb = np.array(Image.open(path), dtype=np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def write_set(folder, name, anns, id_maps, categories, images=None):
  """Writes a COCO panoptic JSON + PNG folder; returns (json, folder)."""
  png_folder = os.path.join(folder, name)
  os.makedirs(png_folder, exist_ok=True)
  for ann, id_map in zip(anns, id_maps):
    Image.fromarray(encode_rgb(id_map)).save(
        os.path.join(png_folder, ann["file_name"]))
  json_path = os.path.join(folder, name + ".json")
  with open(json_path, "w") as f:
    json.dump({"annotations": anns, "categories": categories,
               "images": images or []}, f)
  return json_path, png_folder


def write_one_image_sets(folder, gt, pred, categories):
  """Ground truth and prediction of one image (`(id map, segments_info)` each) as two sets;
  returns (gt json, gt folder, pred json, pred folder)."""
  paths = []
  for name, (id_map, segments) in (("gt", gt), ("pred", pred)):
    paths += write_set(str(folder), name, [
        {"image_id": 1, "file_name": "a.png", "segments_info": segments}], [id_map], categories)
  return tuple(paths)


def reference_pq(gt_json, gt_folder, pred_json, pred_folder):
  """pq_compute's numbers through its own per-core function (no pool)."""
  with open(gt_json) as f:
    gt = json.load(f)
  with open(pred_json) as f:
    pred = json.load(f)
  categories = {c["id"]: c for c in gt["categories"]}
  pred_by_image = {a["image_id"]: a for a in pred["annotations"]}
  pairs = [(a, pred_by_image[a["image_id"]]) for a in gt["annotations"]]
  stat = panopticapi_eval.pq_compute_single_core(0, pairs, gt_folder,
                                                 pred_folder, categories)
  results = {}
  for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
    results[name], per_class = stat.pq_average(categories, isthing=isthing)
    if name == "All":
      results["per_class"] = per_class
  return results


def assert_same(ours, ref):
  """All/Things/Stuff pq/sq/rq/n and every per-class entry within 1e-9."""
  for group in GROUPS:
    assert ours[group]["n"] == ref[group]["n"], group
    for k in ("pq", "sq", "rq"):
      assert abs(ours[group][k] - ref[group][k]) <= TOL, (group, k)
  assert set(ours["per_class"]) == set(ref["per_class"])
  for cat, values in ref["per_class"].items():
    for k in ("pq", "sq", "rq"):
      assert abs(ours["per_class"][cat][k] - values[k]) <= TOL, (cat, k)


# --------------------------------------------------------------------------
# The real COCO sample and its perturbations.

@pytest.fixture(scope="module")
def sample(coco_sample_root):
  """(gt json path, gt folder, gt dict, {image_id: gt id map})."""
  gt_json = str(coco_sample_root / "annotations" / "panoptic_val2017.json")
  gt_folder = str(coco_sample_root / "annotations" / "panoptic_val2017")
  with open(gt_json) as f:
    gt = json.load(f)
  maps = {a["image_id"]: decode_png(os.path.join(gt_folder, a["file_name"]))
          for a in gt["annotations"]}
  return gt_json, gt_folder, gt, maps


def fresh_id(rng, used):
  """A random segment id below 2^24 not in `used` (and records it)."""
  while True:
    new = int(rng.integers(1, 256**3))
    if new not in used:
      used.add(new)
      return new


def perturb(case, gt_map, gt_segments, categories, rng):
  """A predicted (id map, segments) for one image: gt with `case` applied."""
  pred = gt_map.copy()
  segs = [{"id": s["id"], "category_id": s["category_id"]} for s in gt_segments]
  used = {s["id"] for s in gt_segments}
  cat_ids = [c["id"] for c in categories]
  if case.startswith("everything"):
    steps = ["shifted_small", "split", "relabelled", "dropped", "extra",
             "void_mostly", "crowd_same_class"]
  else:
    steps = [case]
  for step in steps:
    pred, segs = apply_step(step, pred, segs, gt_map, gt_segments, cat_ids,
                            rng, used)
    # Only segments present in the map may be listed (pq_compute's rule).
    present = set(np.unique(pred).tolist())
    segs = [s for s in segs if s["id"] in present]
  return pred, segs


def apply_step(step, pred, segs, gt_map, gt_segments, cat_ids, rng, used):
  """One perturbation of a prediction (VOID and crowd come from the gt)."""
  pred = pred.copy()
  segs = [dict(s) for s in segs]
  if step == "identical":
    pass
  elif step == "dropped":
    keep = []
    for s in segs:
      if rng.random() < 0.4:
        pred[pred == s["id"]] = 0
      else:
        keep.append(s)
    segs = keep
  elif step == "merged":
    persons = [s for s in segs if s["category_id"] == 1]
    for a, b in zip(persons[::2], persons[1::2]):
      pred[pred == b["id"]] = a["id"]
  elif step == "split":
    cols = np.arange(pred.shape[1])[None, :]
    for s in list(segs):
      mask = pred == s["id"]
      if not mask.any():
        continue
      xs = np.nonzero(mask.any(0))[0]
      cut = xs.min() + rng.integers(0, xs.size + 1)
      new = fresh_id(rng, used)
      pred[mask & (cols >= cut)] = new
      segs.append({"id": new, "category_id": s["category_id"]})
  elif step in ("shifted_small", "shifted_large"):
    dy, dx = (3, -5) if step == "shifted_small" else (25, 40)
    pred = np.roll(pred, (dy, dx), axis=(0, 1))
  elif step == "relabelled":
    for s in segs:
      if rng.random() < 0.4:
        s["category_id"] = int(rng.choice(cat_ids))
  elif step == "void_mostly":
    new = fresh_id(rng, used)
    pred[gt_map == 0] = new  # entirely on VOID: never a false positive
    segs.append({"id": new, "category_id": int(rng.choice(cat_ids))})
  elif step == "void_partly":
    new = fresh_id(rng, used)
    void = gt_map == 0
    grown = void | np.roll(void, 1, 0) | np.roll(void, -1, 0) | np.roll(
        void, 2, 1) | np.roll(void, -2, 1)
    pred[grown] = new  # under half VOID: a false positive
    segs.append({"id": new, "category_id": int(rng.choice(cat_ids))})
  elif step in ("crowd_same_class", "crowd_other_class", "crowd_half"):
    for s in gt_segments:
      if not s["iscrowd"]:
        continue
      mask = gt_map == s["id"]
      if step == "crowd_half":
        rows = np.nonzero(mask.any(1))[0]
        mask &= np.arange(mask.shape[0])[:, None] < rows.mean()
      new = fresh_id(rng, used)
      pred[mask] = new
      cat = s["category_id"] if step != "crowd_other_class" else 2
      segs.append({"id": new, "category_id": cat})
  elif step == "extra":
    height, width = pred.shape
    for _ in range(6):
      y0, x0 = rng.integers(0, height - 20), rng.integers(0, width - 20)
      new = fresh_id(rng, used)
      pred[y0:y0 + rng.integers(5, 60), x0:x0 + rng.integers(5, 60)] = new
      segs.append({"id": new, "category_id": int(rng.choice(cat_ids))})
  elif step == "empty":
    pred[:] = 0
    segs = []
  elif step == "big_ids":
    new_pred = np.zeros_like(pred)
    for s in segs:
      new = fresh_id(rng, used)
      new_pred[pred == s["id"]] = new
      s["id"] = new
    pred = new_pred
  else:
    raise AssertionError(step)
  return pred, segs


def write_perturbed_predictions(case, sample, tmp_path, rng):
  """Every ground-truth image of `sample` perturbed by `case`, written as a prediction set.

  Returns (pred_json, pred_folder, annotations, id maps).
  """
  _, _, gt, maps = sample
  anns, id_maps = [], []
  for gt_ann in gt["annotations"]:
    pred_map, segs = perturb(case, maps[gt_ann["image_id"]],
                             gt_ann["segments_info"], gt["categories"], rng)
    anns.append({"image_id": gt_ann["image_id"],
                 "file_name": gt_ann["file_name"], "segments_info": segs})
    id_maps.append(pred_map)
  pred_json, pred_folder = write_set(str(tmp_path), "pred", anns, id_maps,
                                     gt["categories"])
  return pred_json, pred_folder, anns, id_maps


CASES = ["identical", "dropped", "merged", "split", "shifted_small",
         "shifted_large", "relabelled", "void_mostly", "void_partly",
         "crowd_same_class", "crowd_other_class", "crowd_half", "extra",
         "empty", "big_ids", "everything_0", "everything_1", "everything_2"]


@pytest.mark.parametrize("case", CASES)
def test_matches_pq_compute_on_coco_sample(case, sample, tmp_path):
  gt_json, gt_folder, gt, maps = sample
  rng = np.random.default_rng(abs(hash(case)) % 2**32)
  pred_json, pred_folder, anns, id_maps = write_perturbed_predictions(
      case, sample, tmp_path, rng)
  ref = reference_pq(gt_json, gt_folder, pred_json, pred_folder)
  ours = pq.pq_compute_files(gt_json, gt_folder, pred_json, pred_folder,
                             num_workers=1)
  assert_same(ours, ref)
  if case == "identical":
    for group in GROUPS:
      assert ours[group]["pq"] == ours[group]["sq"] == ours[group]["rq"] == 1.0
  # The in-memory accumulator on the same arrays gives the same numbers.
  accumulator = pq.PQAccumulator(gt["categories"])
  for gt_ann, ann, pred_map in zip(gt["annotations"], anns, id_maps):
    accumulator.add(maps[gt_ann["image_id"]], gt_ann["segments_info"],
                    pred_map, ann["segments_info"], image_id=ann["image_id"])
  assert_same(accumulator.result(), ref)


def test_full_pq_compute_and_merge_on_coco_sample(sample, tmp_path, capsys):
  """End to end against pq_compute itself (its pool); merge of two halves."""
  gt_json, gt_folder, gt, maps = sample
  rng = np.random.default_rng(7)
  pred_json, pred_folder, anns, id_maps = write_perturbed_predictions(
      "everything", sample, tmp_path, rng)
  ref = panopticapi_eval.pq_compute(gt_json, pred_json, gt_folder, pred_folder)
  printed = capsys.readouterr().out
  ours = pq.pq_compute_files(gt_json, gt_folder, pred_json, pred_folder,
                             num_workers=2)
  assert_same(ours, ref)
  # Our table is pq_compute's printed table, line for line.
  table = pq.format_pq_table(ours)
  for line in table.splitlines():
    assert line in printed.splitlines()
  # Two accumulators, one image each, merged.
  halves = []
  for gt_ann, ann, pred_map in zip(gt["annotations"], anns, id_maps):
    acc = pq.PQAccumulator(gt["categories"])
    acc.add(maps[gt_ann["image_id"]], gt_ann["segments_info"], pred_map,
            ann["segments_info"])
    halves.append(acc)
  merged = halves[0].merge(halves[1])
  assert merged.num_images == 2
  assert_same(merged.result(), ref)


def test_gt_oddities_match_pq_compute(sample, tmp_path):
  """Unlisted gt ids, listed-but-absent gt segments, two crowds per class."""
  gt_json, gt_folder, gt, maps = sample
  gt2 = copy.deepcopy(gt)
  gt_maps = []
  rng = np.random.default_rng(3)
  for ann in gt2["annotations"]:
    gt_map = maps[ann["image_id"]].copy()
    segs = ann["segments_info"]
    # 1) pixels of one listed segment get an id the JSON does not list.
    victim = segs[1]
    gt_map[gt_map == victim["id"]] = 777
    # 2) a listed segment with no pixel (counts as a false negative).
    segs.append({"id": 999, "category_id": 1, "iscrowd": 0, "area": 50,
                 "bbox": [0, 0, 5, 10]})
    # 3) a second crowd segment of the same class (the last one counts).
    crowd = [s for s in segs if s["iscrowd"]][0]
    ys, xs = np.nonzero(gt_map == 0)
    pick = rng.choice(ys.size, min(400, ys.size), replace=False)
    gt_map[ys[pick], xs[pick]] = 4242
    segs.append({"id": 4242, "category_id": crowd["category_id"], "iscrowd": 1,
                 "area": int(pick.size), "bbox": [0, 0, 1, 1]})
    # 4) a JSON area that differs from the pixel count (pq_compute uses it).
    segs[0]["area"] = int(segs[0]["area"] * 1.6)
    gt_maps.append(gt_map)
  gt2_json, gt2_folder = write_set(str(tmp_path), "gt", gt2["annotations"],
                                   gt_maps, gt2["categories"])
  anns, pred_maps = [], []
  for ann, orig, gt_map in zip(gt2["annotations"], gt["annotations"], gt_maps):
    pred_map, segs = perturb("everything", maps[ann["image_id"]],
                             orig["segments_info"], gt2["categories"], rng)
    # a prediction over the unlisted gt pixels and the second crowd
    new = 5555
    pred_map[np.isin(gt_map, [777, 4242])] = new
    segs = [s for s in segs if (pred_map == s["id"]).any()]
    segs.append({"id": new, "category_id": 1})
    anns.append({"image_id": ann["image_id"], "file_name": ann["file_name"],
                 "segments_info": segs})
    pred_maps.append(pred_map)
  pred_json, pred_folder = write_set(str(tmp_path), "pred", anns, pred_maps,
                                     gt2["categories"])
  ref = reference_pq(gt2_json, gt2_folder, pred_json, pred_folder)
  assert_same(pq.pq_compute_files(gt2_json, gt2_folder, pred_json, pred_folder,
                                  num_workers=1), ref)


def test_matches_hotcoco_on_one_case(sample, tmp_path, capsys):
  hotcoco_panoptic = pytest.importorskip("hotcoco.panoptic")
  gt_json, gt_folder, gt, maps = sample
  rng = np.random.default_rng(11)
  pred_json, pred_folder, _, _ = write_perturbed_predictions(
      "everything", sample, tmp_path, rng)
  theirs = hotcoco_panoptic.pq_compute(gt_json, pred_json, gt_folder,
                                       pred_folder)
  ours = pq.pq_compute_files(gt_json, gt_folder, pred_json, pred_folder,
                             num_workers=1)
  for group in GROUPS:
    assert ours[group]["n"] == theirs[group]["n"]
    for k in ("pq", "sq", "rq"):
      assert abs(ours[group][k] - theirs[group][k]) <= TOL, (group, k)


# --------------------------------------------------------------------------
# Synthetic random panoptic maps.

def synthetic_categories():
  return ([{"id": i, "name": f"t{i}", "isthing": 1} for i in range(1, 9)]
          + [{"id": i, "name": f"s{i}", "isthing": 0} for i in range(90, 96)])


def random_pair(rng, height, width, categories):
  """A blocky random gt map with crowd and VOID, and a noisy prediction."""
  cat_ids = np.array([c["id"] for c in categories])
  cell = int(rng.integers(4, 12))
  grid = rng.integers(0, int(rng.integers(3, 25)),
                      (height // cell + 1, width // cell + 1))
  labels = np.kron(grid, np.ones((cell, cell), int))[:height, :width]
  labels[rng.random((height, width)) < 0.03] = -1  # scattered VOID
  num = labels.max() + 1
  ids = 1 + rng.choice(256**3 - 1, num + 40, replace=False)
  cats = rng.choice(cat_ids, num)
  crowd = rng.random(num) < 0.15
  gt_map = np.where(labels >= 0, ids[np.maximum(labels, 0)], 0)
  gt_segments = [{"id": int(ids[k]), "category_id": int(cats[k]),
                  "iscrowd": int(crowd[k]), "area": int((labels == k).sum())}
                 for k in range(num) if (labels == k).any()]
  # Prediction: noisy copy with relabels, a shift, pixel noise and blobs.
  pred_labels = np.roll(labels, tuple(rng.integers(-3, 4, 2)), (0, 1))
  noise = rng.random((height, width)) < 0.1
  pred_labels = np.where(noise, rng.integers(-1, num + 5, (height, width)),
                         pred_labels)
  pred_cats = np.concatenate([cats, rng.choice(cat_ids, 5)])
  flip = rng.random(num + 5) < 0.2
  pred_cats[flip] = rng.choice(cat_ids, flip.sum())
  pred_ids = ids[num + 10:num + 10 + num + 5]
  pred_map = np.where(pred_labels >= 0, pred_ids[np.maximum(pred_labels, 0)], 0)
  pred_segments = [{"id": int(pred_ids[k]), "category_id": int(pred_cats[k])}
                   for k in range(num + 5) if (pred_labels == k).any()]
  return gt_map, gt_segments, pred_map, pred_segments


@pytest.mark.parametrize("seed", range(4))
def test_matches_pq_compute_on_synthetic_maps(seed, tmp_path):
  rng = np.random.default_rng(seed)
  categories = synthetic_categories()
  gt_anns, pred_anns, gt_maps, pred_maps = [], [], [], []
  for image_id in range(12):
    height, width = rng.integers(20, 70, 2)
    gt_map, gt_segs, pred_map, pred_segs = random_pair(rng, height, width,
                                                       categories)
    name = f"{image_id:06d}.png"
    gt_anns.append({"image_id": image_id, "file_name": name,
                    "segments_info": gt_segs})
    pred_anns.append({"image_id": image_id, "file_name": name,
                      "segments_info": pred_segs})
    gt_maps.append(gt_map)
    pred_maps.append(pred_map)
  gt_json, gt_folder = write_set(str(tmp_path), "gt", gt_anns, gt_maps,
                                 categories)
  pred_json, pred_folder = write_set(str(tmp_path), "pred", pred_anns,
                                     pred_maps, categories)
  ref = reference_pq(gt_json, gt_folder, pred_json, pred_folder)
  # seed 0 through a pool of forked processes, seed 1 of spawned ones (no
  # state inherited: everything a worker needs must be picklable).
  workers, context = {0: (2, "fork"), 1: (2, "spawn")}.get(seed, (1, None))
  assert_same(pq.pq_compute_files(gt_json, gt_folder, pred_json, pred_folder,
                                  num_workers=workers, mp_context=context),
              ref)
  accumulator = pq.PQAccumulator(categories)
  for ga, pa, gm, pm in zip(gt_anns, pred_anns, gt_maps, pred_maps):
    accumulator.add(gm, ga["segments_info"], pm, pa["segments_info"])
  assert_same(accumulator.result(), ref)


def test_ids_beyond_24_bits_and_many_segments(tmp_path):
  """The sorted-search label path and the sparse (np.unique) histogram path."""
  rng = np.random.default_rng(5)
  categories = synthetic_categories()
  height, width = 216, 216
  # Every pixel its own segment in both maps (one run per pixel, 2e9 [gt,
  # pred] cells): the sparse (np.unique) histogram path.
  gt_map = rng.permutation(height * width).reshape(height, width) + 1
  pred_map = gt_map.copy()
  moved = rng.random((height, width)) < 0.2
  pred_map[moved] = rng.permutation(pred_map[moved])
  cats = rng.choice([c["id"] for c in categories], height * width + 1)
  gt_segs = [{"id": int(i), "category_id": int(cats[i]), "iscrowd": 0,
              "area": 1} for i in range(1, height * width + 1)]
  pred_segs = [{"id": int(i), "category_id": int(cats[i])}
               for i in np.unique(pred_map) if i]
  gt_json, gt_folder, pred_json, pred_folder = write_one_image_sets(
      tmp_path, (gt_map, gt_segs), (pred_map, pred_segs), categories)
  ref = reference_pq(gt_json, gt_folder, pred_json, pred_folder)
  assert_same(pq.pq_compute_files(gt_json, gt_folder, pred_json, pred_folder,
                                  num_workers=1), ref)
  # Same scene with ids shifted beyond what a PNG can hold (in memory only).
  big = 1 << 40
  accumulator = pq.PQAccumulator(categories)
  accumulator.add(np.where(gt_map > 0, gt_map + big, 0),
                  [dict(s, id=s["id"] + big) for s in gt_segs],
                  np.where(pred_map > 0, pred_map + big, 0),
                  [dict(s, id=s["id"] + big) for s in pred_segs])
  assert_same(accumulator.result(), ref)


def test_exact_half_boundaries(tmp_path):
  """IoU exactly 0.5 is no match; exactly half on VOID is still an FP."""
  categories = synthetic_categories()
  gt_map = np.zeros((4, 8), np.int64)
  gt_map[:, :4] = 10        # gt segment A (category 1), 16 px
  gt_map[:2, 4:6] = 20      # gt segment B (category 2), 4 px
  gt_map[2:, 4:] = 30       # stuff segment C (category 90); [:2, 6:] VOID
  pred_map = np.zeros_like(gt_map)
  pred_map[:, :2] = 11      # 8 px on A: IoU 8 / 16 = 0.5 exactly
  pred_map[:, 2:4] = 12     # another 8 px on A
  pred_map[:2, 4:8] = 13    # 8 px: 4 on B, 4 on VOID (exactly half)
  pred_map[2:, 4:] = 14     # C exactly
  gt_segs = [{"id": 10, "category_id": 1, "iscrowd": 0, "area": 16},
             {"id": 20, "category_id": 2, "iscrowd": 0, "area": 4},
             {"id": 30, "category_id": 90, "iscrowd": 0, "area": 8}]
  pred_segs = [{"id": 11, "category_id": 1}, {"id": 12, "category_id": 1},
               {"id": 13, "category_id": 3}, {"id": 14, "category_id": 90}]
  gt_json, gt_folder, pred_json, pred_folder = write_one_image_sets(
      tmp_path, (gt_map, gt_segs), (pred_map, pred_segs), categories)
  ref = reference_pq(gt_json, gt_folder, pred_json, pred_folder)
  ours = pq.pq_compute_files(gt_json, gt_folder, pred_json, pred_folder,
                             num_workers=1)
  assert_same(ours, ref)
  assert ours["Things"]["n"] == 3 and ours["Things"]["pq"] == 0.0


def test_empty_group_gives_zero_not_division_error():
  """pq_compute divides by zero when a group has no counted category."""
  categories = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}]
  gt_map = np.array([[1, 1], [0, 0]])
  accumulator = pq.PQAccumulator(categories)
  accumulator.add(gt_map, [{"id": 1, "category_id": 1, "iscrowd": 0}],
                  gt_map, [{"id": 1, "category_id": 1}])
  result = accumulator.result()
  assert result["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
  assert result["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
  assert result["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_ids_sharing_label_table_slots(tmp_path):
  """Ids equal in their low 16 bits (the label table's slot): an unlisted gt
  id in a listed id's slot stays unlisted; listed ids sharing a slot (also
  VOID's slot 0) take the sorted-search path. Both equal pq_compute."""
  categories = synthetic_categories()
  slot = 1 << 16
  gt_a = np.zeros((6, 10), np.int64)
  gt_a[:, :4] = 5
  gt_a[:, 4:7] = 5 + slot  # not listed; shares the slot of 5
  gt_a[:, 7:] = 70000
  pred_a = np.zeros_like(gt_a)
  pred_a[:, 2:7] = 9  # IoU with 5: 12 / 42 (the unlisted pixels are no part)
  pred_a[:, 7:] = 9 + 3 * slot
  gt_b = np.zeros((6, 10), np.int64)
  gt_b[:, :3] = 5
  gt_b[:, 3:6] = 5 + slot
  gt_b[:, 6:9] = slot  # slot 0, as VOID
  pred_b = gt_b.copy()
  pred_b[0] = 5 + 2 * slot
  gt_anns = [
      {"image_id": 1, "file_name": "a.png", "segments_info": [
          {"id": 5, "category_id": 1, "iscrowd": 0, "area": 24},
          {"id": 70000, "category_id": 2, "iscrowd": 0, "area": 18}]},
      {"image_id": 2, "file_name": "b.png", "segments_info": [
          {"id": 5, "category_id": 1, "iscrowd": 0, "area": 18},
          {"id": 5 + slot, "category_id": 1, "iscrowd": 0, "area": 18},
          {"id": slot, "category_id": 90, "iscrowd": 0, "area": 18}]}]
  pred_anns = [
      {"image_id": 1, "file_name": "a.png", "segments_info": [
          {"id": 9, "category_id": 1}, {"id": 9 + 3 * slot, "category_id": 2}]},
      {"image_id": 2, "file_name": "b.png", "segments_info": [
          {"id": 5, "category_id": 1}, {"id": 5 + slot, "category_id": 1},
          {"id": slot, "category_id": 90},
          {"id": 5 + 2 * slot, "category_id": 3}]}]
  gt_json, gt_folder = write_set(str(tmp_path), "gt", gt_anns, [gt_a, gt_b],
                                 categories)
  pred_json, pred_folder = write_set(str(tmp_path), "pred", pred_anns,
                                     [pred_a, pred_b], categories)
  ref = reference_pq(gt_json, gt_folder, pred_json, pred_folder)
  assert_same(pq.pq_compute_files(gt_json, gt_folder, pred_json, pred_folder,
                                  num_workers=1), ref)
  accumulator = pq.PQAccumulator(categories)
  for ga, pa, gm, pm in zip(gt_anns, pred_anns, [gt_a, gt_b], [pred_a, pred_b]):
    accumulator.add(gm, ga["segments_info"], pm, pa["segments_info"])
  assert_same(accumulator.result(), ref)


@pytest.mark.parametrize("reader", ["pillow_by_env", "kornia_missing"])
def test_pillow_reader_gives_the_same_result(reader, sample, tmp_path,
                                             monkeypatch):
  """Without kornia-rs (absent, or disabled by $CIAE_PNG_DECODER) the PNGs go
  through Pillow: the same numbers as pq_compute."""
  from ciae_jax import panoptic_png  # pylint: disable=import-outside-toplevel
  gt_json, gt_folder, gt, maps = sample
  rng = np.random.default_rng(13)
  pred_json, pred_folder, _, _ = write_perturbed_predictions(
      "everything", sample, tmp_path, rng)
  ref = reference_pq(gt_json, gt_folder, pred_json, pred_folder)
  if reader == "pillow_by_env":
    monkeypatch.setenv(panoptic_png.PNG_DECODER_ENV, "pillow")
    workers = 2  # the variable reaches the worker processes
  else:
    monkeypatch.setattr(panoptic_png, "_kornia_io", lambda: None)
    workers = 1
  assert panoptic_png.fast_png_decoder() is None
  assert_same(pq.pq_compute_files(gt_json, gt_folder, pred_json, pred_folder,
                                  num_workers=workers), ref)
