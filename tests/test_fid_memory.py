"""fid.py reads an .npz's images batch by batch, as ADM's evaluator does, never its whole arr_0
(50,000 images of 512 px are 39 GB), and resizes large images without a float copy of them: the
batches are np.load's arr_0, and the memory is measured as the growth of this process's resident
memory while the command line's reader and inception_outputs take a 302 MB arr_0 through a
stand-in network."""
import numpy as np
import torch

import fid
from tiny import peak_growth

class StandIn:
    """FIDInceptionV3's features, pool3 (N, 2048) and spatial (N, 2023), from the mean of the
    graph's input: the network's own memory is not what is measured."""
    def features(self, batch):
        mean = fid.preprocess(torch.from_numpy(batch)).mean(dim=(1, 2, 3))[:, None]   # (N, 1)
        return mean.expand(-1, 2048), mean.expand(-1, 2023)


def test_arr_0_is_read_in_batches_whether_stored_or_deflated(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / 'stored.npz', arr_0=images)
    np.savez_compressed(tmp_path / 'deflated.npz', arr_0=images)
    for name in ('stored.npz', 'deflated.npz'):
        source = fid.Images(str(tmp_path / name), "SAMPLES")
        batches = list(source.batches(3))
        assert source.count == 7 and [len(b) for b in batches] == [3, 3, 1]
        assert np.array_equal(np.concatenate(batches), images)


def test_an_npz_of_images_is_read_batch_by_batch(tmp_path, one_thread):
    # 24 images of 2048 px (12.6 MB each), one random image repeated (a broadcast view: this
    # process never holds the array), stored uncompressed by np.savez
    image = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    images = np.broadcast_to(image, (24, 2048, 2048, 3))
    path = tmp_path / 'big.npz'
    np.savez(path, arr_0=images)
    def features():
        return fid.extract(fid.Images(str(path), "SAMPLES"), StandIn(), batch_size=1)[0]
    # pages shared with files left out: torch's kernels, paged in on first use, are not measured
    pool3, grown = peak_growth(features, files=False)
    assert len(pool3) == 24
    # measured: 47-59 MB more at the peak in 4 runs (the batch, the copies ZipFile's read makes of
    # it, the resize's gathered pixels); 310 MB with np.load(path)['arr_0'] instead of NpzImages,
    # 112-124 MB when the resize converts the whole image to float first
    size = images.nbytes                                         # 302 MB
    assert grown < size / 4                                      # 75 MB
