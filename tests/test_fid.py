"""Fréchet distance closed forms and the FID Inception-v3 (random weights; torch parity when available)."""
import numpy as np
import pytest

from diffcleanse_jax.metrics import frechet
from diffcleanse_jax.metrics import inception as inc


# ----------------------------------------------------------------------------------------------------
# Fréchet distance.


def _random_spd(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_feature_statistics_matches_numpy():
  rng = np.random.default_rng(0)
  f = rng.standard_normal((50, 6)).astype(np.float32)
  mu, sigma = frechet.feature_statistics(f)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
  np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False, ddof=1))


def test_frechet_identical_gaussians_is_zero():
  rng = np.random.default_rng(1)
  mu, s = rng.standard_normal(8), _random_spd(rng, 8)
  assert abs(frechet.frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_diagonal_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
  d1, d2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
  got = frechet.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
  assert abs(got - want) < 1e-8 * max(1.0, want)


def test_frechet_rotation_invariant_and_commuting_case():
  rng = np.random.default_rng(3)
  d = 10
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  l1, l2 = rng.uniform(0.2, 2, d), rng.uniform(0.2, 2, d)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T  # commuting: closed form in the eigenbasis
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
  assert abs(frechet.frechet_distance(mu1, s1, mu2, s2) - want) < 1e-8
  # General (non-commuting) covariances: invariant under a common rotation of both Gaussians.
  a, b = _random_spd(rng, d), _random_spd(rng, d)
  base = frechet.frechet_distance(mu1, a, mu2, b)
  rot = frechet.frechet_distance(q @ mu1, q @ a @ q.T, q @ mu2, q @ b @ q.T)
  assert abs(base - rot) < 1e-8 and base > 0
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  assert abs(frechet.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) - (4 + 1)) < 1e-12


def test_frechet_singular_covariances_and_features():
  rng = np.random.default_rng(4)
  f1 = rng.standard_normal((5, 20))  # N < D: singular covariances
  f2 = rng.standard_normal((5, 20)) + 1.0
  val = frechet.frechet_distance_from_features(f1, f2)
  assert np.isfinite(val) and val > 0
  assert abs(frechet.frechet_distance_from_features(f1, f1)) < 1e-5


def test_statistics_npz_roundtrip(tmp_path):
  rng = np.random.default_rng(5)
  mu, s = rng.standard_normal(4), _random_spd(rng, 4)
  frechet.save_statistics(tmp_path / "ref.npz", mu, s)
  mu2, s2 = frechet.load_statistics(tmp_path / "ref.npz")
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(s, s2)


# ----------------------------------------------------------------------------------------------------
# Inception-v3 (FID variant).


@pytest.fixture(scope="module")
def random_sd():
  return inc.random_state_dict(0)


def test_state_dict_names_and_shapes(random_sd):
  shapes = inc.expected_state_dict_shapes()
  # 94 BasicConv2d layers x (conv.weight + 4 BN entries).
  assert len(shapes) == 470
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  # torchvision inception_v3(aux_logits=False) has 23,834,568 parameters; minus fc (2048*1000+1000).
  n_trainable = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))
  assert n_trainable == 23_834_568 - 2_049_000


def test_state_dict_conversion_roundtrip(random_sd):
  sd = dict(random_sd)
  sd["fc.weight"] = np.zeros((1008, 2048), np.float32)  # present in the .pth, ignored
  sd["fc.bias"] = np.zeros((1008,), np.float32)
  sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
  v = inc.convert_pytorch_fid_state_dict(sd)
  k = np.asarray(v["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"])
  assert k.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(k, random_sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(v["batch_stats"]["Mixed_5b"]["branch1x1"]["bn"]["var"]),
                                random_sd["Mixed_5b.branch1x1.bn.running_var"])
  back = inc.variables_to_state_dict(v)
  assert set(back) == set(random_sd)
  for name, arr in random_sd.items():
    np.testing.assert_array_equal(back[name], arr)
  bad = dict(random_sd)
  bad["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
  with pytest.raises(ValueError):
    inc.convert_pytorch_fid_state_dict(bad)
  missing = dict(random_sd)
  del missing["Mixed_7c.branch_pool.bn.bias"]
  with pytest.raises(KeyError):
    inc.convert_pytorch_fid_state_dict(missing)
  with pytest.raises(KeyError):
    inc.convert_pytorch_fid_state_dict({**random_sd, "AuxLogits.fc.weight": np.zeros((2, 2))})


def test_load_fid_inception_npz_and_missing(tmp_path, random_sd):
  with pytest.raises(FileNotFoundError):
    inc.load_fid_inception(tmp_path / "nope.pth")
  np.savez(tmp_path / "w.npz", **random_sd)
  v = inc.load_fid_inception(tmp_path / "w.npz")
  np.testing.assert_array_equal(np.asarray(v["params"]["Conv2d_1a_3x3"]["bn"]["scale"]),
                                random_sd["Conv2d_1a_3x3.bn.weight"])


def test_torch_bilinear_matrix_properties():
  m = inc.torch_bilinear_matrix(32, 299)
  assert m.shape == (299, 32)
  np.testing.assert_allclose(m.sum(1), 1.0)
  np.testing.assert_allclose(m[0], np.eye(32)[0])  # clamped at the left edge
  np.testing.assert_allclose(m[-1], np.eye(32)[-1])
  np.testing.assert_allclose(inc.torch_bilinear_matrix(7, 7), np.eye(7))


def test_random_inception_features_shape_and_determinism(random_sd):
  v = inc.convert_pytorch_fid_state_dict(random_sd)
  x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
  f1 = inc.inception_features(x, v)
  f2 = inc.inception_features(x, v, batch_size=1)
  assert f1.shape == (2, 2048) and f1.dtype == np.float32 and np.isfinite(f1).all()
  assert f1.std() > 0 and not np.allclose(f1[0], f1[1])
  np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(f1, inc.inception_features(x, v))
  # Sample path: [-1, 1] -> 8-bit grid -> features (the 2048-d sqrtm of a full FID is too slow for CI).
  samples = x * 2 - 1
  q = np.floor(x * 255 + 0.5) / 255
  np.testing.assert_allclose(inc.sample_features(samples, v), inc.inception_features(q, v), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Parity with a torch re-statement of pytorch-fid's architecture (torchvision is not available here, so the
# torchvision blocks are re-stated compactly following torchvision/models/inception.py and
# pytorch_fid/inception.py).


def _torch_fid_inception():
  torch = pytest.importorskip("torch")
  nn, F = torch.nn, torch.nn.functional

  class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
      self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  class A(nn.Module):
    def __init__(self, cin, pool):
      super().__init__()
      self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
      self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
      self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
      self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        self.branch_pool(avg(x))], 1)

  class B(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
      self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        F.max_pool2d(x, 3, stride=2)], 1)

  class C(nn.Module):
    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
      self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
      self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
      self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      bd = x
      for i in range(1, 6):
        bd = getattr(self, f"branch7x7dbl_{i}")(bd)
      return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

  class D(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
      self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
      self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
      b7 = x
      for i in range(1, 5):
        b7 = getattr(self, f"branch7x7x3_{i}")(b7)
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)

  class E(nn.Module):
    def __init__(self, cin, use_max):
      super().__init__()
      self.use_max = use_max
      self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
      self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
      self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
      self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
      self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
      bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
      pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.use_max else avg(x)
      return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
      self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
      self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
      self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
      self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
      self.Mixed_7a = D(768)
      self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
      self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # pytorch-fid InceptionV3([3]).forward, NCHW in [0, 1]
      x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
      x = 2 * x - 1
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = F.max_pool2d(x, 3, stride=2)
      x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
      for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(self, f"Mixed_{name}")(x)
      return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)

  return torch, Net().eval()


@pytest.mark.parity
def test_parity_with_torch_restatement(random_sd, tmp_path):
  torch, net = _torch_fid_inception()
  sd = {k: torch.from_numpy(v) for k, v in random_sd.items()}
  sd["fc.weight"] = torch.zeros(1008, 2048)
  sd["fc.bias"] = torch.zeros(1008)
  result = net.load_state_dict(sd, strict=False)
  assert not result.unexpected_keys
  assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
  # The flax side reads the torch model's own state dict (names as torch writes them).
  v = inc.convert_pytorch_fid_state_dict({k: t.numpy() for k, t in net.state_dict().items()})
  x = np.random.default_rng(7).random((2, 37, 29, 3)).astype(np.float32)  # odd, non-square size
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  got = inc.inception_features(x, v)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got / scale, want / scale, atol=1e-4)
  # A torch-saved .pth (zip format, with num_batches_tracked) through the torch-free reader.
  pytest.importorskip("diffcleanse_jax.io.torch_pickle")
  torch.save(net.state_dict(), tmp_path / inc.FID_WEIGHTS_FILENAME)
  loaded = inc.load_fid_inception(tmp_path / inc.FID_WEIGHTS_FILENAME)
  for a, b in zip(jax_leaves(loaded), jax_leaves(v)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)
