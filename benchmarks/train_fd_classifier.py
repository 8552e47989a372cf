"""Trains the Fashion-MNIST CNN whose features define FD (`diffcleanse_jax.metrics.classifier`).

  python benchmarks/train_fd_classifier.py                 # writes diffcleanse_jax/assets/fmnist_classifier.msgpack
  python benchmarks/train_fd_classifier.py --epochs 1 --out /tmp/clf.msgpack --meta-out /tmp/clf.json

Optax Adam, fixed seed, deterministic shuffling; reports test accuracy (10k) and the accuracy on the first
1000 test images, and stores both with the architecture and training config in the msgpack's JSON header
(and in a JSON sidecar when --meta-out is given). A few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffcleanse_jax.metrics import classifier as clf  # noqa: E402


def evaluate(model, params, images, labels, batch_size=1000):
  @jax.jit
  def predict(p, x):
    return model.apply({"params": p}, x).argmax(-1)

  preds = np.concatenate([np.asarray(predict(params, jnp.asarray(images[i:i + batch_size])))
                          for i in range(0, len(images), batch_size)])
  return preds == labels


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--epochs", type=int, default=4)
  ap.add_argument("--batch-size", type=int, default=128)
  ap.add_argument("--lr", type=float, default=2e-3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: $FASHION_MNIST_DIR or "
                  f"{clf.DEFAULT_FASHION_MNIST_DIR})")
  ap.add_argument("--out", default=clf.ASSET_PATH)
  ap.add_argument("--meta-out", default=None, help="optional JSON sidecar path")
  args = ap.parse_args(argv)

  x_train, y_train = clf.load_fashion_mnist("train", args.data_dir)
  x_test, y_test = clf.load_fashion_mnist("test", args.data_dir)
  arch = dict(channels=[32, 64, 64], feature_dim=128, num_classes=10)
  model = clf.FMNISTClassifier(channels=tuple(arch["channels"]), feature_dim=arch["feature_dim"],
                               num_classes=arch["num_classes"])
  key = jax.random.PRNGKey(args.seed)
  params = model.init(key, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]
  steps_per_epoch = len(x_train) // args.batch_size
  total = steps_per_epoch * args.epochs
  sched = optax.cosine_decay_schedule(args.lr, total)
  tx = optax.adam(sched)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(args.seed)
  t0 = time.time()
  for epoch in range(args.epochs):
    perm = rng.permutation(len(x_train))
    losses = []
    for s in range(steps_per_epoch):
      idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
      params, opt_state, loss = train_step(params, opt_state, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
      losses.append(loss)
    acc = float(evaluate(model, params, x_test, y_test).mean())
    print(f"epoch {epoch + 1}/{args.epochs}: train loss {float(np.mean(jax.device_get(losses))):.4f} "
          f"test acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)

  correct = evaluate(model, params, x_test, y_test)
  meta = dict(
      architecture=dict(arch, name="FMNISTClassifier", input="(B, 32, 32, 1) in [-1, 1], 28x28 padded by 2 px of -1"),
      training=dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="cosine_decay",
                    optimizer="adam", seed=args.seed, train_images=int(len(x_train)),
                    command="python benchmarks/train_fd_classifier.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))),
      test_accuracy=float(correct.mean()),
      test_accuracy_first_1000=float(correct[:1000].mean()),
      versions=dict(jax=jax.__version__),
  )
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  clf.save_fd_classifier(args.out, params, meta)
  if args.meta_out:
    with open(args.meta_out, "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
  print(json.dumps(meta, indent=2, sort_keys=True))
  print(f"test accuracy {meta['test_accuracy']:.4f}; wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) "
        f"in {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
