"""Loss test inputs shared by tests/test_loss_engine.py and tests/data/make_ciae_loss_golden.py:
one image's segments (stuff bands, void, things, a crowd, padding rows, optional exact ties),
embeddings and memory, drawn from a NumPy generator (the same on every machine).
"""
import numpy as np

NUM_STUFF = 4
NUM_THINGS = 3
DIM = 8
NUM_ROWS = 16
SEGMENT_KEYS = ("segment_map", "seg_class", "seg_is_thing", "seg_is_crowd", "seg_box",
                "seg_valid")

# (LossHParams fields with the paper's loss parameters under "params", chunk size, case
# options) of the kernel's golden values: chunks that do not divide P (20 x 24 = 480; 120 at
# stride 2) and one larger than P, include_own both ways, ties, stride, no box filter.
GOLDEN_SETTINGS = [
    (dict(), 37, dict(jitter=True)),
    (dict(params=dict(include_own=False, top_k=3)), 7, dict(duplicate=True, empty_instance=True)),
    (dict(merge_things=False, loss_stride=2, thing_weight=2.0, alpha=0.5,
          params=dict(margin=0.3, top_k=30)), 60, dict(jitter=True)),
    (dict(use_box_filter=False, stop_query_gradient=True, params=dict(margin=0.0)), 4096,
     dict(duplicate=True)),
]


def unit(x, axis=-1):
  return (x / np.linalg.norm(x, axis=axis, keepdims=True)).astype(np.float32)


def case(rng, height=20, width=24, *, duplicate=False, empty_instance=False, jitter=False,
         things=6):
  """Stuff bands, a void block, thing rectangles (one crowd), padding rows, optional ties.

  duplicate: two thing segments of the same shape with identical pre-norm embeddings, so their
    instance means (the IAE queries) are bit-identical (an exact tie for every pixel).
  empty_instance: a valid, non-crowd thing row without pixels: its mean is the zero vector,
    similarity exactly 0 for every pixel, tying with the box-filtered instances.
  jitter: boxes moved off their masks by up to 3 px (float), as after augmentation; some pixels
    then lie outside their own box (never filtered) and box edges fall between pixel centres.
  """
  segment_map = np.zeros((height, width), np.int32)
  seg_class = rng.integers(0, NUM_STUFF + NUM_THINGS, NUM_ROWS).astype(np.int32)
  seg_is_thing = rng.random(NUM_ROWS) < 0.5  # padding rows: garbage that must never count
  seg_is_crowd = np.zeros(NUM_ROWS, bool)
  seg_valid = np.zeros(NUM_ROWS, bool)
  seg_box = np.tile(np.array([0, 0, width, height], np.float32), (NUM_ROWS, 1))
  bands = np.linspace(0, height, 4).astype(int)
  for row in range(3):
    segment_map[bands[row]:bands[row + 1]] = row + 1
    seg_class[row] = rng.integers(NUM_STUFF)
    seg_is_thing[row] = False
    seg_valid[row] = True
  segment_map[height // 2:height // 2 + 3, :4] = 0  # void
  row = 3
  if duplicate:  # Two disjoint 4 x 5 rectangles, filled below with identical embeddings.
    for y0, x0 in ((1, 1), (height - 6, width - 7)):
      segment_map[y0:y0 + 4, x0:x0 + 5] = row + 1
      seg_class[row], seg_is_thing[row], seg_valid[row] = NUM_STUFF, True, True
      row += 1
  for _ in range(things):
    h, w = rng.integers(2, 9, 2)
    y0, x0 = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    segment_map[y0:y0 + h, x0:x0 + w] = row + 1
    seg_class[row] = NUM_STUFF + rng.integers(NUM_THINGS)
    seg_is_thing[row], seg_valid[row] = True, True
    row += 1
  seg_is_crowd[row - 1] = True  # the last thing is crowd
  if duplicate:  # Keep the duplicated pair intact (later things may have painted over it).
    segment_map[1:5, 1:6] = 4
    segment_map[height - 6:height - 2, width - 7:width - 2] = 5
  seg_class[row], seg_is_thing[row], seg_valid[row] = NUM_STUFF + 1, True, True  # no pixels
  if not empty_instance:
    seg_valid[row] = False
  seg_class[row + 1], seg_valid[row + 1] = 1, True  # a stuff row without pixels
  for k in range(NUM_ROWS):
    ys, xs = np.nonzero(segment_map == k + 1)
    if ys.size:
      seg_box[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  if jitter:
    seg_box += rng.uniform(-3, 3, seg_box.shape).astype(np.float32)
  prenorm = rng.normal(size=(height, width, DIM)).astype(np.float32)
  if duplicate:
    prenorm[height - 6:height - 2, width - 7:width - 2] = prenorm[1:5, 1:6]
  embedding = unit(prenorm + 0.3 * rng.normal(size=prenorm.shape).astype(np.float32))
  return dict(embedding=embedding, embedding_prenorm=prenorm, segment_map=segment_map,
              seg_class=seg_class, seg_is_thing=seg_is_thing, seg_is_crowd=seg_is_crowd,
              seg_box=seg_box, seg_valid=seg_valid)


def memory(rng, merge_things, duplicate=False):
  memory = unit(rng.normal(size=(NUM_STUFF + (1 if merge_things else NUM_THINGS), DIM)))
  if duplicate:
    memory[2] = memory[1]  # An exact tie in L_CAE and between stuff queries of L_IAE.
  return memory
