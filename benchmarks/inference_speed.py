r"""Inference speed of CIAE end to end, against torchvision FCOS-R50 in the same run.

Ours, per dtype (float32, bfloat16 activations): one jitted function from a normalised image
array `[B, H, W, 3]` on the device to the panoptic id map and the per-query arrays (network,
FCOS decoding, class-wise NMS, panoptic assignment and filters), timed call by call with
`block_until_ready`, compilation and warm-up excluded. Also, apart: the network alone, the
post-processing alone (decoding + NMS + fusion from the network outputs), decoding + NMS alone,
and the fusion alone (the paper's "fusing time": queries from 100 detections and the embedding
map -> S = P V^T -> box filter -> argmax -> segment filters).

Peer: torchvision `FCOS` with a ResNet-50-FPN backbone (detection only), eval mode, float32
and `torch.autocast(bfloat16)`, fed an image tensor already on the device, same size, same
device; its transform normalises and keeps the size (min_size / max_size = the image's).
Skipped with a printed line when torch or torchvision is not installed.

  python benchmarks/inference_speed.py                      # R50, 800 x 1344, batch 1
  python benchmarks/inference_speed.py --size 256,384 --backbone resnet18 --repeats 5  # CPU

Our inputs are padded to multiples of 32 (`common.PAD_MULTIPLE`; FCOS level l is the
`ceil(H / stride)` map, docs/interfaces.md), as torchvision pads; `--pad_multiple` pads further
and both sizes are printed. The peer runs at the size given. Random weights:
our inference has static shapes, so its time does not depend on them; the peer's
post-processing does (how many boxes pass `score_thresh`), so it runs with
`--peer_score_thresh 0` by default: 1000 candidates per level, as ours always processes.
Prints a table and a one-line JSON summary (`inference_speed {...}`). Imports no TensorFlow.
"""
from __future__ import annotations

import argparse
import functools
from typing import Any, Callable

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ciae_jax import hparams  # noqa: E402
from ciae_jax import ops  # noqa: E402
from ciae_jax.inference import detection  # noqa: E402
from ciae_jax.inference import panoptic  # noqa: E402
import common  # noqa: E402  pylint: disable=g-bad-import-order

OUTPUT_KEYS = ("cls_logits", "centerness", "box_reg", "embedding")


# The paper's inference settings (instance_score_thresh as in the configs).
INFERENCE = hparams.InferenceHParams()


def postprocess_fn(*, num_stuff: int) -> Callable[..., dict[str, jax.Array]]:
  """`(outputs [B, ...], memory, image_size [B, 2]) -> per-image inference dict [B, ...]`."""

  def postprocess(outputs, memory, image_size):
    outputs = {k: outputs[k] for k in OUTPUT_KEYS}
    return jax.vmap(lambda o, size: panoptic.panoptic_inference(
        o, memory, size, INFERENCE, num_stuff=num_stuff, merge_things=True))(outputs, image_size)
  return postprocess


def make_end_to_end(model: Any, *, num_stuff: int) -> Callable[..., dict[str, jax.Array]]:
  """One jitted `(variables, memory, images [B, H, W, 3], image_size [B, 2]) -> results`.

  `image_size` is traced: images of one padded size share one compiled program.
  """
  postprocess = postprocess_fn(num_stuff=num_stuff)

  def predict(variables, memory, images, image_size):
    outputs = model.apply(variables, images)
    return postprocess(outputs, memory, image_size)
  return jax.jit(predict)


def make_detection() -> Callable[..., dict[str, jax.Array]]:
  """Jitted FCOS decoding + class-wise NMS alone: `(outputs [B, ...], image_size [B, 2])`."""

  def detect_one(outputs, image_size):
    candidates = detection.decode_detections(
        outputs["cls_logits"], outputs["centerness"], outputs["box_reg"], image_size,
        pre_nms_thresh=INFERENCE.pre_nms_thresh, pre_nms_top_n=INFERENCE.pre_nms_top_n)
    keep, valid = detection.class_nms(candidates["box"], candidates["score"],
                                      candidates["thing_class"], candidates["valid"],
                                      nms_thresh=INFERENCE.nms_thresh,
                                      max_detections=INFERENCE.max_detections)
    return {"box": candidates["box"][keep], "valid": valid}  # [K, 4], [K]

  def detect(outputs, image_size):
    outputs = {k: outputs[k] for k in ("cls_logits", "centerness", "box_reg")}
    return jax.vmap(detect_one)(outputs, image_size)
  return jax.jit(detect)


def make_fusion(*, num_stuff: int) -> Callable[..., dict[str, jax.Array]]:
  """Jitted fusion alone, per image: detections + embedding map -> panoptic map (paper IV-C).

  Takes `embedding [B, H, W, D]`, memory, `det_box [B, K, 4]`, `det_score [B, K]`,
  `det_class [B, K]`, `det_valid [B, K]`, `location [B, K, 2]`, `image_size [B, 2]`: the same
  steps `panoptic_inference` runs after NMS (its own helpers, so the two cannot drift).
  """
  def fuse_one(embedding, memory, box, score, thing_class, valid, location, image_size):
    height, width = image_size[0], image_size[1]
    query_x = jnp.clip(location[:, 0], 0, width - 1)  # [K]
    query_y = jnp.clip(location[:, 1], 0, height - 1)  # [K]
    thing_queries = ops.l2_normalize(embedding[query_y, query_x])  # [K, D]
    stuff_queries = ops.l2_normalize(memory[:num_stuff])  # [num_stuff, D]
    assignment, inside = panoptic.assign_pixels(
        embedding, stuff_queries, thing_queries, box, valid, height, width,
        box_expand=INFERENCE.box_expand_infer,
        outside_box_similarity=INFERENCE.outside_box_similarity)
    return panoptic.finish(
        assignment, inside, num_stuff=num_stuff, thing_usable=valid,
        thing_class=num_stuff + thing_class, thing_score=score, thing_box=box, hp=INFERENCE,
        resize_scale=1.0)

  def fuse(embedding, memory, box, score, thing_class, valid, location, image_size):
    return jax.vmap(fuse_one, in_axes=(0, None, 0, 0, 0, 0, 0, 0))(
        embedding, memory, box, score, thing_class, valid, location, image_size)
  return jax.jit(fuse)


def random_detections(batch: int, size: tuple[int, int], num: int = 100,
                      num_things: int = common.NUM_THINGS, seed: int = 4
                      ) -> dict[str, np.ndarray]:
  """`num` valid detections per image: boxes of 16-400 px, their centres as locations."""
  rng = np.random.default_rng(seed)
  height, width = size
  wh = rng.uniform(16, min(400, height, width), size=(batch, num, 2))  # [B, K, 2]
  x0 = rng.uniform(0, width - wh[..., 0])  # [B, K]
  y0 = rng.uniform(0, height - wh[..., 1])  # [B, K]
  box = np.stack([x0, y0, x0 + wh[..., 0], y0 + wh[..., 1]], -1).astype(np.float32)
  location = ((box[..., :2] + box[..., 2:]) / 2).astype(np.int32)  # [B, K, 2]
  return {"box": box, "score": rng.uniform(0.05, 1, (batch, num)).astype(np.float32),
          "thing_class": rng.integers(0, num_things, (batch, num)).astype(np.int32),
          "valid": np.ones((batch, num), bool), "location": location}


def bench_ours(args: argparse.Namespace, dtype: str, padded: tuple[int, int]
               ) -> dict[str, Any]:
  """Timings of our end-to-end function and its parts, in one dtype."""
  model = common.build_model(args.backbone, dtype)
  variables = common.init_variables(model)
  memory = common.random_memory(common.NUM_STUFF, model.hp.embed_dim)  # [M, D]
  images = jax.device_put(common.normalised_images(args.batch, padded))  # [B, H, W, 3]
  image_size = jnp.asarray(np.tile(np.asarray(args.size, np.int32), (args.batch, 1)))  # [B, 2]
  run = functools.partial(common.time_calls, repeats=args.repeats, warmup=args.warmup)

  end_to_end = make_end_to_end(model, num_stuff=common.NUM_STUFF)
  e2e = run(lambda: end_to_end(variables, memory, images, image_size))

  network = jax.jit(lambda v, x: model.apply(v, x))
  net = run(lambda: network(variables, images))
  outputs = network(variables, images)
  post = jax.jit(postprocess_fn(num_stuff=common.NUM_STUFF))
  postprocess = run(lambda: post(outputs, memory, image_size))

  detect = make_detection()
  detection = run(lambda: detect(outputs, image_size))

  detections = {k: jax.device_put(v) for k, v in
                random_detections(args.batch, tuple(args.size)).items()}
  fuse = make_fusion(num_stuff=common.NUM_STUFF)
  fusion = run(lambda: fuse(outputs["embedding"], memory, detections["box"],
                            detections["score"], detections["thing_class"],
                            detections["valid"], detections["location"], image_size))
  result = {"dtype": dtype, "end_to_end": common.summary(e2e), "network": common.summary(net),
            "postprocess": common.summary(postprocess), "detection": common.summary(detection),
            "fusion": common.summary(fusion)}
  result["fps"] = 1e3 * args.batch / result["end_to_end"]["median_ms"]
  # Programs compiled for the end-to-end function (1: no recompilation across calls); a private
  # JAX counter, None if a JAX version drops it.
  cache_size = getattr(end_to_end, "_cache_size", None)
  result["compiles"] = cache_size() if cache_size else None
  return result


def bench_peer(args: argparse.Namespace, dtypes: list[str]) -> dict[str, Any] | None:
  """torchvision FCOS-R50 inference per dtype, or None when it cannot run."""
  modules = common.import_torchvision()
  if modules is None:
    return None
  torch, torchvision = modules
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  model = common.build_torchvision_fcos(torchvision, args.size, literal=args.peer_literal,
                                        score_thresh=args.peer_score_thresh)
  model.eval().to(device)
  generator = torch.Generator().manual_seed(0)
  images = [torch.rand(3, *args.size, generator=generator).to(device)
            for _ in range(args.batch)]
  sync = common.torch_sync(torch, device)
  results = {"device": device, "torch": torch.__version__,
             "torchvision": torchvision.__version__,
             "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
             "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
             "build": "literal" if args.peer_literal else "frozen_bn, 3 trainable stages"}
  for dtype in dtypes:
    def infer(dtype=dtype):
      with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16,
                                                  enabled=dtype == "bfloat16"):
        return model(images)
    times = common.time_calls(infer, repeats=args.repeats, warmup=args.warmup, sync=sync)
    detections = sync(infer())
    summary = common.summary(times)
    summary["fps"] = 1e3 * args.batch / summary["median_ms"]
    summary["boxes_per_image"] = float(np.mean([len(d["boxes"]) for d in detections]))
    results[dtype] = summary
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.parse_size, default=(800, 1344),
                      help="H,W of the image (ours pads it to multiples of --pad_multiple)")
  parser.add_argument("--backbone", default="resnet50")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--pad_multiple", type=int, default=common.PAD_MULTIPLE)
  parser.add_argument("--skip_peer", action="store_true")
  parser.add_argument("--peer_literal", action="store_true",
                      help="fcos_resnet50_fpn(weights=None, weights_backbone=None) as is "
                           "(trainable BatchNorm) instead of the frozen-BN build")
  parser.add_argument("--peer_score_thresh", type=float, default=0.0)
  args = parser.parse_args(argv)
  dtypes = [d for d in args.dtypes.split(",") if d]
  padded = common.round_up(args.size, args.pad_multiple)
  info = common.device_info()
  print(f"inference speed: {args.backbone}, image {args.size[0]}x{args.size[1]} (ours padded "
        f"to {padded[0]}x{padded[1]}), batch {args.batch}, {args.repeats} repeats after "
        f"{args.warmup} warm-up calls; {info}")

  ours = {dtype: bench_ours(args, dtype, padded) for dtype in dtypes}
  peer = None if args.skip_peer else bench_peer(args, dtypes)
  if args.skip_peer:
    print("peer skipped: --skip_peer")
  if peer is not None and args.backbone != "resnet50":
    print(f"note: the peer is always ResNet-50; ours is {args.backbone}, so the ratio is not "
          "like for like")

  rows = []
  for dtype, r in ours.items():
    theirs = peer[dtype] if peer else None
    rows.append([f"ours {args.backbone}", dtype, f"{padded[0]}x{padded[1]}",
                 f"{r['end_to_end']['median_ms']:.2f}", f"{r['fps']:.2f}",
                 f"{r['network']['median_ms']:.2f}", f"{r['postprocess']['median_ms']:.2f}",
                 f"{r['detection']['median_ms']:.2f}", f"{r['fusion']['median_ms']:.2f}",
                 "n/a" if theirs is None else f"{r['fps'] / theirs['fps']:.2f}"])
  if peer:
    for dtype in dtypes:
      p = peer[dtype]
      rows.append([f"torchvision FCOS-R50 ({peer['device']})", dtype,
                   f"{args.size[0]}x{args.size[1]}", f"{p['median_ms']:.2f}", f"{p['fps']:.2f}",
                   "", "", "", "", ""])
  common.print_table(["system", "dtype", "input", "end to end ms (median)", "fps",
                      "network ms", "post-processing ms", "decode + NMS ms", "fusion ms",
                      "fps ours / peer"], rows)
  payload = {"args": {"size": list(args.size), "padded": list(padded),
                      "backbone": args.backbone, "batch": args.batch,
                      "repeats": args.repeats, "warmup": args.warmup},
             "info": info, "ours": ours, "peer": peer,
             "ratio_fps": {d: common.ratio(ours[d]["fps"], peer[d]["fps"] if peer else None)
                           for d in dtypes}}
  common.print_json("inference_speed", payload)
  return payload


if __name__ == "__main__":
  main()
