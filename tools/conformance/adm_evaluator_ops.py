"""Write tests/fixtures/adm_evaluator_ops.npz: the operations of ADM's evaluator
(openai/guided-diffusion, evaluations/evaluator.py, the papers' scorer) computed with TensorFlow
(tensorflow-cpu), for tests/test_fid.py.

- Preprocessing: the evaluator feeds float images in [0, 255] to the 2015 Inception graph
  (classify_image_graph_def.pb) in place of its `ExpandDims` node; the graph then resizes them to
  299 x 299 and scales them. That graph is a download, so it is not loaded here: the same TF1 op
  is run instead, ResizeBilinear with align_corners False and half_pixel_centers False (the 2015
  graph's, source coordinate = output index x in/out), then (x - 128) / 128 (exact in float32 as
  the graph's multiplication by 1/128 too). `<name>_pre` holds the 299 x 299 result at rows and
  columns `pre_rows_cols` (both borders and the middle), channels last, for uint8 images `<name>`.
- Improved precision/recall (k = 3): the evaluator's own ManifoldEstimator on synthetic features
  `pr_ref` and `pr_sample` (|N(0, 2)| and 0.1 + |N(0, 2.3)|): `pr_radii_ref`, `pr_radii_sample`,
  `precision`, `recall`; `fid`: its FIDStatistics.frechet_distance of the sample statistics to the
  reference statistics (Evaluator.compute_statistics), as its main() does.

The random draws (one numpy default_rng(--seed)) are the committed fixture's at the default seed 0.

    python tools/conformance/adm_evaluator_ops.py --guided-diffusion ~/src/guided-diffusion
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402

OUTPUTS = ("adm_evaluator_ops.npz",)
PINNED = {"openai/guided-diffusion": "22e0df8183507e13a7813f8d38d51b072ca1e67c"}
ROWS = np.r_[0:20, 140:160, 279:299]           # the rows and columns of the 299 x 299 input kept


def draw(seed, sides, n_ref, n_sample, dim):
    """uint8 images of the given sides ("256" or "100x80"), then the two feature sets."""
    rng = np.random.default_rng(seed)
    images = {}
    for side in sides:
        h, w = (side.split("x") * 2)[:2]
        images[f"img{side}"] = rng.integers(0, 256, (1, int(h), int(w), 3)).astype(np.uint8)
    pr_ref = np.abs(2 * rng.standard_normal((n_ref, dim))).astype(np.float32)
    pr_sample = (0.1 + np.abs(2.3 * rng.standard_normal((n_sample, dim)))).astype(np.float32)
    return images, pr_ref, pr_sample


def official_ops(ev, images, pr_ref, pr_sample):
    """The graph's preprocessing, the evaluator's radii, precision, recall and FID."""
    tf = ev.tf                                       # tensorflow.compat.v1, the evaluator's import
    session = tf.Session()
    out = {}
    with session.graph.as_default():
        batch = tf.placeholder(tf.float32, shape=[None, None, None, 3])    # Evaluator.image_input
        resized = tf.raw_ops.ResizeBilinear(images=batch, size=[299, 299], align_corners=False,
                                            half_pixel_centers=False)
        graph_input = (resized - 128) / 128
    for name, image in images.items():
        # Evaluator.compute_activations feeds batch.astype(np.float32)
        x = session.run(graph_input, {batch: image.astype(np.float32)})
        out[f"{name}_pre"] = x[:, ROWS][:, :, ROWS]
    estimator = ev.ManifoldEstimator(session)                    # k = 3, as Evaluator builds it
    out["pr_radii_ref"] = estimator.manifold_radii(pr_ref)
    out["pr_radii_sample"] = estimator.manifold_radii(pr_sample)
    # Evaluator.compute_prec_recall's own evaluate_pr call and indexing
    pr = estimator.evaluate_pr(pr_ref, out["pr_radii_ref"], pr_sample, out["pr_radii_sample"])
    out["precision"] = np.float64(pr[0][0])
    out["recall"] = np.float64(pr[1][0])
    # an Evaluator without __init__ (which loads the Inception graph): compute_statistics only
    evaluator = ev.Evaluator.__new__(ev.Evaluator)
    sample_stats = evaluator.compute_statistics(pr_sample)
    out["fid"] = np.float64(sample_stats.frechet_distance(evaluator.compute_statistics(pr_ref)))
    session.close()
    return out


def main():
    p = official.parser(__doc__, PINNED)
    p.add_argument("--sides", nargs="+", default=["256", "32", "512", "299", "100x80"],
                   help="image sizes, S or HxW (default: 256 32 512 299 100x80)")
    p.add_argument("--n-ref", type=int, default=600, help="reference features (default: 600)")
    p.add_argument("--n-sample", type=int, default=500, help="sample features (default: 500)")
    p.add_argument("--dim", type=int, default=64, help="feature dimension (default: 64)")
    args = p.parse_args()
    (clone,) = official.checkouts(args, PINNED)
    ev = official.module("adm_evaluator", clone / "evaluations" / "evaluator.py")
    images, pr_ref, pr_sample = draw(args.seed, args.sides, args.n_ref, args.n_sample, args.dim)
    out = official_ops(ev, images, pr_ref, pr_sample)
    arrays = {"pre_rows_cols": ROWS}
    for name, image in images.items():
        arrays[name] = image
        arrays[f"{name}_pre"] = out[f"{name}_pre"]
    arrays.update(pr_ref=pr_ref, pr_sample=pr_sample, pr_radii_ref=out["pr_radii_ref"],
                  pr_radii_sample=out["pr_radii_sample"], precision=out["precision"],
                  recall=out["recall"], fid=out["fid"])
    official.save_npz(args.out / OUTPUTS[0], arrays)


if __name__ == "__main__":
    main()
